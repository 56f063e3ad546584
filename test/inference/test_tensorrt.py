"""Prebuilt TensorRT engines: the stamp (read, compare), the plan OnnxModel follows (engine, or the plain ONNX with
a line saying why), to_tensorrt's refusal without a GPU, and, where a GPU with TensorRT is present, a real build.

On a machine without a GPU the facts of the GPU are given by a stand-in probe (`Platform` values); everything else,
the stamp logic, onnxruntime's sessions and the command line, is the real code."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import model_entry, write_weights
from onnx import TensorProto, helper
from onnx_models import save_conv_model, save_voxelwise_model, voxelwise_reference

import hnseg_infer.inference.onnx_engine as engine_module
import hnseg_infer.inference.tensorrt as trt
from hnseg_infer.errors import ExportError, ModelError
from hnseg_infer.inference.onnx_engine import CPU, CUDA, TENSORRT, OnnxModel

REPO = Path(__file__).resolve().parents[2]
T4 = trt.Platform("Tesla T4", "7.5", "10.9.0")
H100 = trt.Platform("NVIDIA H100 80GB HBM3", "9.0", "10.9.0")
GPU_BUILD = [TENSORRT, CUDA, CPU]


def _load_to_tensorrt():
    spec = importlib.util.spec_from_file_location("to_tensorrt", REPO / "export" / "to_tensorrt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


to_tensorrt = _load_to_tensorrt()


def save_context_model(path: Path, *, engine_file: str, n_in=2, n_out=3) -> Path:
    """An EP-context model as onnxruntime's TensorRT EP dumps it: one com.microsoft EPContext node naming the
    engine file beside it. Only the TensorRT EP can run it."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", n_in, "z", "y", "x"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out, "z", "y", "x"])
    node = helper.make_node("EPContext", ["input"], ["logits"], domain="com.microsoft", embed_mode=0,
                            ep_cache_context=engine_file, hardware_architecture="75")
    model = helper.make_model(helper.make_graph([node], "ctx", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def write_engine(model_path: Path, platform: trt.Platform, *, source_sha256: str | None = None,
                 tile_batch: int = 2) -> Path:
    """An engine folder beside `model_path` as to_tensorrt writes it, stamped for `platform`."""
    folder = trt.engine_dir(model_path)
    folder.mkdir()
    (folder / "TensorrtExecutionProvider_sm75.engine").write_bytes(os.urandom(4096))
    save_context_model(folder / trt.CONTEXT_MODEL, engine_file="TensorrtExecutionProvider_sm75.engine")
    files = {f.name: trt.file_sha256(f) for f in sorted(folder.iterdir())}
    trt.EngineStamp(source_file=model_path.name, source_sha256=source_sha256 or trt.file_sha256(model_path),
                    gpu_name=platform.gpu_name, compute_capability=platform.compute_capability,
                    tensorrt_version=platform.tensorrt_version, onnxruntime_version="1.22.0", fp16=True,
                    input_name="input", profile_min=(1, 2, 6, 5, 4), profile_opt=(tile_batch, 2, 6, 5, 4),
                    profile_max=(tile_batch, 2, 6, 5, 4), files_sha256=files).write(folder)
    return folder


@pytest.fixture
def model(tmp_path):
    return save_voxelwise_model(tmp_path / "fold_0.onnx", n_in=2, n_out=3)


def _batch(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 2, 6, 5, 4)).astype(np.float32)


def _facts(platform):
    def probe():
        return platform
    return probe


def _no_probe():
    raise AssertionError("the GPU was probed although no engine is there to check")


# --- the stamp ---------------------------------------------------------------------------------------------------

def test_stamp_round_trip(model):
    folder = write_engine(model, T4)
    stamp = trt.read_stamp(folder / trt.STAMP_FILE)
    assert stamp.platform == T4 and stamp.profile_max == (2, 2, 6, 5, 4)
    assert set(stamp.files_sha256) == {trt.CONTEXT_MODEL, "TensorrtExecutionProvider_sm75.engine"}
    assert stamp.source_sha256 == trt.file_sha256(model)


@pytest.mark.parametrize("edit, message", [
    (lambda d: "{not json", "not a readable engine stamp"),
    (lambda d: "[1, 2]", "schema 'list'"),
    (lambda d: {**d, "schema": 7}, "engine stamp schema 7, this hnseg reads schema 1"),
    (lambda d: {k: v for k, v in d.items() if k != "tensorrt_version"}, "keys do not match"),
    (lambda d: {**d, "colour": "red"}, "keys do not match"),
    (lambda d: {**d, "compute_capability": 75}, "invalid compute_capability"),
    (lambda d: {**d, "profile_max": [2, 2, 6]}, "invalid profile_max"),
    (lambda d: {**d, "files_sha256": {}}, "invalid files_sha256"),
])
def test_corrupt_stamp_is_a_model_error_naming_file_and_fault(model, edit, message):
    folder = write_engine(model, T4)
    path = folder / trt.STAMP_FILE
    edited = edit(json.loads(path.read_text()))
    path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(ModelError, match=message) as caught:
        trt.read_stamp(path)
    assert str(path) in str(caught.value)


def test_platform_comparison(model):
    stamp = trt.read_stamp(write_engine(model, T4) / trt.STAMP_FILE)
    assert trt.platform_mismatch(stamp, T4) is None
    other_gpu = trt.platform_mismatch(stamp, H100)
    assert other_gpu == ("built for Tesla T4 (sm_75) with TensorRT 10.9.0, this is NVIDIA H100 80GB HBM3 (sm_90) "
                         "with TensorRT 10.9.0")
    other_trt = trt.platform_mismatch(stamp, trt.Platform("Tesla T4", "7.5", "10.8.0"))
    assert "with TensorRT 10.9.0, this is Tesla T4 (sm_75) with TensorRT 10.8.0" in other_trt
    # Same compute capability, another GPU model: TensorRT does not support moving engines between models.
    assert "this is NVIDIA GeForce RTX 2080 (sm_75)" in trt.platform_mismatch(
        stamp, trt.Platform("NVIDIA GeForce RTX 2080", "7.5", "10.9.0"))
    unknown = trt.platform_mismatch(stamp, trt.Platform(None, None, None, ("no NVIDIA driver (…)",)))
    assert unknown == "it cannot be checked on this machine (no NVIDIA driver (…))"


def test_files_comparison(model):
    folder = write_engine(model, T4)
    stamp = trt.read_stamp(folder / trt.STAMP_FILE)
    sha = trt.file_sha256(model)
    assert trt.files_mismatch(stamp, folder, model, sha) is None
    assert "(the model was re-exported after the engine was built)" in trt.files_mismatch(stamp, folder, model,
                                                                                         "ab" * 32)
    (folder / "TensorrtExecutionProvider_sm75.engine").write_bytes(b"truncated")
    assert trt.files_mismatch(stamp, folder, model, sha) == ("TensorrtExecutionProvider_sm75.engine differs from "
                                                             "the file the stamp describes (truncated or replaced)")
    (folder / "TensorrtExecutionProvider_sm75.engine").unlink()
    assert "is missing" in trt.files_mismatch(stamp, folder, model, sha)


def test_trt_version_numbers_decode():
    assert trt.decode_trt_version(100900) == "10.9.0"  # TensorRT 10: major·10000 + minor·100 + patch
    assert trt.decode_trt_version(101302) == "10.13.2"
    assert trt.decode_trt_version(8601) == "8.6.1"  # TensorRT 8: major·1000 + minor·100 + patch


# --- the plan OnnxModel follows ------------------------------------------------------------------------------------

def test_matching_engine_is_planned_on_tensorrt_alone(model):
    folder = write_engine(model, T4)
    plan = trt.plan_engine(model, GPU_BUILD, probe=_facts(T4))
    assert plan.engine == folder / trt.CONTEXT_MODEL and plan.fallbacks == []
    assert plan.providers == [CUDA, CPU]  # for the plain ONNX, should the engine fail to load
    assert plan.stamp.profile_max[0] == 2


@pytest.mark.parametrize("here, built_sha, says", [
    (H100, None, "built for Tesla T4 (sm_75) with TensorRT 10.9.0, this is NVIDIA H100 80GB HBM3 (sm_90) with "
                 "TensorRT 10.9.0"),
    (trt.Platform("Tesla T4", "7.5", "10.8.0"), None, "this is Tesla T4 (sm_75) with TensorRT 10.8.0"),
    (T4, "0" * 64, "built from fold_0.onnx with sha256 000000000000…"),
])
def test_mismatching_engine_is_refused_with_the_reason(model, here, built_sha, says):
    write_engine(model, T4, source_sha256=built_sha)
    plan = trt.plan_engine(model, GPU_BUILD, probe=_facts(here))
    assert plan.engine is None and plan.providers == [CUDA, CPU]  # no TensorRT build at run time either
    (line,) = plan.fallbacks
    assert line.startswith("TensorRT engine fold_0.trt refused for fold_0.onnx: ")
    assert says in line
    assert line.endswith("running fold_0.onnx on CUDAExecutionProvider instead; rebuild the engines on this GPU "
                         "with: python export/to_tensorrt.py WEIGHTS_DIR --overwrite")


def test_corrupt_stamp_is_refused_not_fatal(model):
    folder = write_engine(model, T4)
    (folder / trt.STAMP_FILE).write_text("{")
    plan = trt.plan_engine(model, GPU_BUILD, probe=_facts(T4))
    assert plan.engine is None and plan.providers == [CUDA, CPU]
    assert f"{folder / trt.STAMP_FILE}: not a readable engine stamp" in plan.fallbacks[0]
    (folder / trt.STAMP_FILE).unlink()  # an engine folder without its stamp: not used blind
    (line,) = trt.plan_engine(model, GPU_BUILD, probe=_facts(T4)).fallbacks
    assert f"{folder / trt.STAMP_FILE}: not a readable engine stamp ([Errno 2] No such file" in line


def test_no_engine_runs_cuda_unless_a_build_is_allowed_and_cpu_keeps_its_plan(model):
    plan = trt.plan_engine(model, GPU_BUILD, probe=_no_probe)  # no engine build inside a case by default
    assert plan.engine is None and plan.providers == [CUDA, CPU]
    assert plan.fallbacks == [f"no prebuilt TensorRT engine for {model.name}: running it on {CUDA}, since building "
                              f"one inside a case can take minutes (build it beforehand with export/to_tensorrt.py, "
                              f"or pass --allow-trt-build)"]
    assert trt.plan_engine(model, GPU_BUILD, probe=_no_probe, allow_build=True) == \
        trt.EnginePlan(None, None, GPU_BUILD, [])
    assert trt.plan_engine(model, [CUDA, CPU], probe=_no_probe) == trt.EnginePlan(None, None, [CUDA, CPU], [])
    write_engine(model, T4)
    assert trt.plan_engine(model, [CPU], probe=_no_probe) == trt.EnginePlan(None, None, [CPU], [])


def test_engine_without_tensorrt_provider_is_refused(model):
    write_engine(model, T4)
    plan = trt.plan_engine(model, [CUDA, CPU], probe=_no_probe)
    assert plan.engine is None and plan.providers == [CUDA, CPU]
    assert f"this onnxruntime build cannot run it ({TENSORRT} is not available)" in plan.fallbacks[0]


def test_this_machines_probe_says_what_is_missing():
    here = trt.probe_platform()
    if here.ready:
        pytest.skip(f"this machine has a GPU and TensorRT: {here.describe()}")
    assert here.problems and all(isinstance(p, str) and p for p in here.problems)
    assert any("no NVIDIA driver" in p or "no usable GPU" in p or "no TensorRT library" in p for p in here.problems)


# --- OnnxModel with an engine folder, on this machine's onnxruntime ------------------------------------------------

def test_engine_with_this_onnxruntime_build(model):
    """Whatever this build offers, a model with an engine folder runs and the report says what happened."""
    write_engine(model, T4)
    loaded = OnnxModel(model, device="cuda")
    batch = _batch(3)
    for item, logits in zip(batch, loaded(batch)):
        np.testing.assert_allclose(logits, voxelwise_reference(item, n_out=3), atol=1e-2)
    if TENSORRT not in ort.get_available_providers():
        assert loaded.engine is None and loaded.provider != TENSORRT
        assert any(f.startswith(f"{TENSORRT} requested (device 'cuda') but not in this onnxruntime build")
                   or "refused for fold_0.onnx: this onnxruntime build cannot run it" in f for f in loaded.fallbacks)


@pytest.fixture
def gpu_build_without_gpu(monkeypatch):
    """This onnxruntime as if it listed the GPU providers: asked for, they fail to start as on a broken GPU box."""
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA: the real GPU tests below cover it")
    monkeypatch.setattr(engine_module.ort, "get_available_providers", lambda: list(GPU_BUILD))


@pytest.mark.filterwarnings("ignore:Specified provider")  # onnxruntime's note on the providers it lacks
def test_matching_engine_that_fails_to_load_falls_back_to_the_plain_onnx(model, monkeypatch, gpu_build_without_gpu):
    write_engine(model, T4)
    monkeypatch.setattr(trt, "probe_platform", _facts(T4))
    loaded = OnnxModel(model, device="cuda", sha256=trt.file_sha256(model))
    assert loaded.engine is None and loaded.provider == CPU and loaded.max_batch is None
    failed = [f for f in loaded.fallbacks if f.startswith("TensorRT engine fold_0.trt for fold_0.onnx failed to load")]
    assert len(failed) == 1 and "context.onnx" in failed[0] and failed[0].endswith("running the plain ONNX instead")
    batch = _batch(5, seed=1)
    for item, logits in zip(batch, loaded(batch)):
        np.testing.assert_allclose(logits, voxelwise_reference(item, n_out=3), atol=1e-5)


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_mismatching_engine_runs_the_plain_onnx_and_says_why(model, monkeypatch, gpu_build_without_gpu):
    write_engine(model, T4)
    monkeypatch.setattr(trt, "probe_platform", _facts(H100))
    loaded = OnnxModel(model, device="cuda")
    assert loaded.engine is None and loaded.provider == CPU
    refused = [f for f in loaded.fallbacks if "refused" in f]
    assert len(refused) == 1 and "this is NVIDIA H100 80GB HBM3 (sm_90)" in refused[0]
    assert not any("failed to load" in f for f in loaded.fallbacks)  # the engine was never tried


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_the_callers_hash_is_what_the_stamp_is_checked_against(model, monkeypatch, gpu_build_without_gpu):
    write_engine(model, T4)
    monkeypatch.setattr(trt, "probe_platform", _facts(T4))
    loaded = OnnxModel(model, device="cuda", sha256="ff" * 32)  # as if the recipe had hashed another file
    assert any("but fold_0.onnx has sha256 ffffffffffff… (the model was re-exported" in f for f in loaded.fallbacks)


# --- export/to_tensorrt.py -----------------------------------------------------------------------------------------

def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def weights(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    save_conv_model(folder / "fold_0.onnx", n_in=2, n_out=3, seed=3)
    save_conv_model(folder / "fold_1.onnx", n_in=2, n_out=3, seed=4)
    return write_weights(folder, models=[model_entry(files=["fold_0.onnx", "fold_1.onnx"])])


@pytest.mark.skipif(TENSORRT in ort.get_available_providers() and trt.probe_platform().ready,
                    reason="this machine can build engines: the GPU test below runs instead")
def test_to_tensorrt_without_gpu_exits_2_and_writes_nothing(weights):
    before = _listing(weights)
    done = subprocess.run([sys.executable, str(REPO / "export" / "to_tensorrt.py"), str(weights)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("to_tensorrt: error: cannot build TensorRT engines here: ")
    assert done.stderr.rstrip().endswith("nothing was written")
    assert done.stdout == "" and _listing(weights) == before


def test_to_tensorrt_names_each_missing_fact(weights, monkeypatch):
    monkeypatch.setattr(to_tensorrt.ort, "get_available_providers", lambda: list(GPU_BUILD))
    missing = trt.Platform(None, None, "10.9.0", ("no NVIDIA driver (libcuda.so.1: cannot open)",))
    with pytest.raises(ExportError, match=r"here: no NVIDIA driver \(libcuda\.so\.1: cannot open\)\. Run") as caught:
        to_tensorrt.build_weights(weights, probe=_facts(missing))
    assert TENSORRT not in str(caught.value)  # the provider is there: only the driver is named
    monkeypatch.setattr(to_tensorrt.ort, "get_available_providers", lambda: [CPU])
    with pytest.raises(ExportError, match=f"has no {TENSORRT}; no NVIDIA driver"):
        to_tensorrt.build_weights(weights, probe=_facts(missing))


def test_to_tensorrt_keeps_existing_engines_without_overwrite(weights, monkeypatch):
    monkeypatch.setattr(to_tensorrt.ort, "get_available_providers", lambda: list(GPU_BUILD))
    write_engine(weights / "fold_1.onnx", T4)
    before = _listing(weights)
    with pytest.raises(ExportError, match=r"fold_1\.trt exist: pass --overwrite"):
        to_tensorrt.build_weights(weights, probe=_facts(T4))
    assert _listing(weights) == before


def test_profile_covers_one_tile_to_the_tile_batch(tmp_path):
    from hnseg_infer.recipe.load import load_recipe

    folder = tmp_path / "w"
    save_conv_model(folder / "dynamic.onnx", n_in=2, n_out=3)
    save_conv_model(folder / "fixed.onnx", n_in=2, n_out=3, batch=3, patch_zyx=(16, 16, 16))
    save_conv_model(folder / "other_patch.onnx", n_in=2, n_out=3, patch_zyx=(8, 16, 16))
    write_weights(folder, models=[model_entry(name="m", files=["dynamic.onnx", "fixed.onnx", "other_patch.onnx"],
                                              tile_batch=4)])
    spec = load_recipe(folder).models[0]

    def shapes(name):
        session = ort.InferenceSession(str(folder / name), providers=[CPU])
        return to_tensorrt.profile_shapes(session, spec, folder / name)

    assert shapes("dynamic.onnx") == {"min": [1, 2, 16, 16, 16], "opt": [4, 2, 16, 16, 16], "max": [4, 2, 16, 16, 16]}
    assert shapes("fixed.onnx") == {"min": [3, 2, 16, 16, 16], "opt": [3, 2, 16, 16, 16], "max": [3, 2, 16, 16, 16]}
    with pytest.raises(ExportError, match=r"other_patch\.onnx: input axis 2 is fixed to 8 but the recipe's model 'm' "
                                          r"gives 16"):
        shapes("other_patch.onnx")


def test_engine_proof_thresholds():
    reference = np.random.default_rng(0).normal(size=(2, 3, 8, 8, 8)).astype(np.float32)
    assert to_tensorrt.compare(reference, reference + 1e-3, head="softmax")["passed"]
    drift = reference.copy()
    drift[0, 0, 0, 0, 0] += 1.0  # one voxel off by more than 5 % of the largest logit
    assert not to_tensorrt.compare(reference, drift, head="softmax")["passed"]
    swapped = reference[:, ::-1]  # the classes exchanged: small values, wrong answers
    assert to_tensorrt.compare(reference, swapped, head="softmax")["agreement"] < 0.5
    x = to_tensorrt.proof_input([2, 3, 16, 8, 8])
    assert x.shape == (2, 3, 16, 8, 8) and x.dtype == np.float32 and 0.5 < x.std() < 2


# --- on a machine with an NVIDIA GPU, onnxruntime-gpu's TensorRT EP and TensorRT 10 -----------------------------------

_HERE = trt.probe_platform()
_CAN_BUILD = TENSORRT in ort.get_available_providers() and _HERE.ready
_GPU_REASON = (f"needs an NVIDIA GPU, onnxruntime-gpu with {TENSORRT} and TensorRT libraries; here: "
               f"onnxruntime {ort.__version__} providers {ort.get_available_providers()}; "
               f"{'; '.join(_HERE.problems) or _HERE.describe()}")


@pytest.mark.gpu
@pytest.mark.skipif(not _CAN_BUILD, reason=_GPU_REASON)
def test_build_then_run_then_refuse_on_this_gpu(weights, capsys):
    assert to_tensorrt.main([str(weights)]) == 0
    print(capsys.readouterr().out)  # the measured build time, batch times and agreement, for the record
    stamp = trt.read_stamp(weights / "fold_0.trt" / trt.STAMP_FILE)
    assert stamp.platform == _HERE
    assert stamp.profile_min[0] == 1 and stamp.profile_max[0] == 2 and stamp.proof["passed"]

    loaded = OnnxModel(weights / "fold_0.onnx", device="cuda")
    assert loaded.engine is not None and loaded.provider == TENSORRT and loaded.fallbacks == []
    batch = to_tensorrt.proof_input([5, 2, 16, 16, 16], seed=3)  # 5 tiles: run in chunks of the profile's 2
    plain = OnnxModel(weights / "fold_0.onnx", device="cpu")
    result = to_tensorrt.compare(plain(batch), loaded(batch), head="softmax")
    assert result["passed"], result

    path = weights / "fold_0.trt" / trt.STAMP_FILE
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "compute_capability": "6.1"}))
    refused = OnnxModel(weights / "fold_0.onnx", device="cuda")
    assert refused.engine is None and refused.provider == CUDA
    assert any("built for " in f and "(sm_61)" in f for f in refused.fallbacks)
    assert to_tensorrt.main([str(weights)]) == 2  # engines exist: --overwrite needed
