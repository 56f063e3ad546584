"""The OpenVINO backend and the backend choice: f32 forced and read back, static shapes per tile batch, fixed-batch
models padded, deep-supervision outputs, fp16 files, the performance-hint plan, errors that name the file, and the
factory's choice with its fallback lines. The model kinds the project exports are compared in their own tests
(test/export, test/systems: `assert_backends_agree`)."""

from __future__ import annotations

import builtins

import numpy as np
import onnx
import pytest
from backend_parity import assert_backends_agree
from onnx import helper
from onnx_models import save_conv_model, save_rank_model, save_voxelwise_model, voxelwise_reference

from hnseg_infer.errors import ModelError
from hnseg_infer.inference import openvino_engine
from hnseg_infer.inference.agreement import MIN_AGREEMENT_FP16, TOLERANCE_FP16
from hnseg_infer.inference.backend import BackendRefused, describe, open_model
from hnseg_infer.inference.onnx_engine import CPU, OnnxModel
from hnseg_infer.inference.openvino_engine import OpenVinoModel, plan_hint
from hnseg_infer.inference.sliding_window import predict_sliding_window


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ov_models")
    return {
        "voxelwise": save_voxelwise_model(folder / "voxelwise.onnx", n_in=2, n_out=4),
        "conv": save_conv_model(folder / "conv.onnx", n_in=2, n_out=3, hidden=8),
        "fixed1": save_voxelwise_model(folder / "fixed1.onnx", n_in=2, n_out=3, batch=1, patch_zyx=(6, 5, 4)),
        "fixed2": save_conv_model(folder / "fixed2.onnx", n_in=2, n_out=3, batch=2, patch_zyx=(6, 5, 4)),
        "rank4": save_rank_model(folder / "rank4.onnx", rank=4),
        "deep_supervision": _save_deep_supervision(folder / "ds.onnx"),
    }


def _tiles(n, shape=(6, 5, 4), channels=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, channels, *shape)).astype(np.float32)


def _save_deep_supervision(path):
    """The conv model with a second output, its logits average-pooled by 2 (a deep-supervision head)."""
    model = onnx.load(str(save_conv_model(path, n_in=2, n_out=3)))
    graph = model.graph
    graph.node.append(helper.make_node("AveragePool", ["logits"], ["ds1"], kernel_shape=[2, 2, 2], strides=[2, 2, 2]))
    graph.output.append(helper.make_tensor_value_info("ds1", onnx.TensorProto.FLOAT, ["N", 3, "z2", "y2", "x2"]))
    onnx.save(model, str(path))
    return path


def _fp16(source, path, *, keep_io_types: bool):
    from onnxconverter_common import float16

    onnx.save(float16.convert_float_to_float16(onnx.load(str(source)), keep_io_types=keep_io_types), str(path))
    return path


def test_precision_is_f32_read_back_and_reported(models):
    model = OpenVinoModel(models["conv"], patch_zyx=(6, 5, 4), tile_batch=2)
    compiled, _ = next(iter(model._compiled.values()))  # compiled at load, for the recipe's tile batch
    assert compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    record = describe(model)
    assert record["backend"] == "openvino" and record["precision"] == "f32"
    assert record["version"] == openvino_engine.version() and record["version"][:4].isdigit()
    assert describe(OnnxModel(models["conv"], device="cpu"))["backend"] == "onnxruntime"


def test_another_precision_is_refused(models, monkeypatch):
    """A compiled model that reports bf16 where f32 was asked for (OpenVINO's default on CPUs with bf16) is
    refused; under "auto" onnxruntime runs the model instead, with a line naming the precision."""
    monkeypatch.setattr(openvino_engine, "compiled_precision", lambda compiled: "bf16")
    with pytest.raises(BackendRefused, match=r"conv\.onnx: OpenVINO compiled it in bf16 where f32 was asked for"):
        OpenVinoModel(models["conv"], patch_zyx=(6, 5, 4))
    model = open_model(models["conv"], device="cpu", patch_zyx=(6, 5, 4))
    assert isinstance(model, OnnxModel) and model.provider == CPU
    assert "OpenVINO not used for conv.onnx" in model.fallbacks[0] and "bf16" in model.fallbacks[0]
    with pytest.raises(BackendRefused, match="bf16"):
        open_model(models["conv"], device="cpu", backend="openvino", patch_zyx=(6, 5, 4))


def test_bf16_on_a_cpu_without_it_runs_f32_and_says_so(models):
    if "BF16" in openvino_engine.core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU computes bf16: the proof is tested below")
    model = open_model(models["conv"], device="cpu", precision="bf16", patch_zyx=(6, 5, 4), tile_batch=2)
    assert model.precision == "f32" and model.fallbacks == [
        "bf16 asked for conv.onnx but OpenVINO compiled it in f32 on this CPU: running f32"]
    np.testing.assert_allclose(model(_tiles(2)), OnnxModel(models["conv"], device="cpu")(_tiles(2)), atol=1e-4)
    ort = open_model(models["conv"], device="cpu", backend="onnxruntime", precision="bf16")
    assert "bf16 asked for conv.onnx but onnxruntime runs it in the model file's precision" in ort.fallbacks


@pytest.mark.parametrize("bf16_error", [0.0, 1.0])
def test_bf16_is_kept_only_if_its_first_batch_agrees_with_f32(models, monkeypatch, bf16_error):
    """As on a CPU with bf16 (the compile reports what was asked for): the first batch runs in both precisions;
    within the fp16 rule bf16 is kept, with its proof in the report; beyond it, f32 with a line giving the figures,
    and the first batch's logits are f32's either way."""
    asked = []
    real_compile, real_run = OpenVinoModel._compile, OpenVinoModel._run

    def compile_noting(self, shape, precision):
        asked.append(precision)  # reported back as obtained; computed in this CPU's own f32
        return real_compile(self, shape, "f32")

    def run_perturbed(self, batch, precision):
        logits = real_run(self, batch, precision)
        return logits + np.float32(bf16_error) * (precision == "bf16") * np.sign(logits)

    monkeypatch.setattr(OpenVinoModel, "_compile", compile_noting)
    monkeypatch.setattr(openvino_engine, "compiled_precision", lambda compiled: asked[-1])
    monkeypatch.setattr(OpenVinoModel, "_run", run_perturbed)
    model = OpenVinoModel(models["conv"], patch_zyx=(6, 5, 4), tile_batch=2, precision="bf16")
    assert model.precision == "bf16" and model.bf16_proof is None
    tiles = _tiles(2)
    first = model(tiles)
    np.testing.assert_allclose(first, OnnxModel(models["conv"], device="cpu")(tiles), atol=1e-4)
    assert model.bf16_proof["passed"] == (bf16_error == 0.0)
    record = describe(model)
    if bf16_error == 0.0:
        assert model.precision == "bf16" and record["bf16_proof"]["passed"] and model.fallbacks == []
    else:
        assert model.precision == "f32" and record["precision"] == "f32"
        (line,) = model.fallbacks
        assert line.startswith("bf16 asked for conv.onnx but its first tile batch in bf16 disagrees with f32 (max")


@pytest.mark.parametrize("tile_batch", [1, 2, 3])
def test_logits_equal_onnxruntime_whatever_the_tile_batch(models, tile_batch):
    """Each plan (LATENCY with the whole batch, THROUGHPUT one tile per request) gives onnxruntime's logits, also
    for a last batch smaller than the compiled one."""
    tiles = _tiles(5, seed=tile_batch)
    model = OpenVinoModel(models["conv"], patch_zyx=(6, 5, 4), tile_batch=tile_batch)
    reference = OnnxModel(models["conv"], device="cpu")
    for first in range(0, 5, tile_batch):
        np.testing.assert_allclose(model(tiles[first:first + tile_batch]), reference(tiles[first:first + tile_batch]),
                                   atol=1e-4)
    assert_backends_agree(models["conv"], tiles, tile_batch=tile_batch)


def test_voxelwise_model_is_exact_and_float32(models):
    tiles = _tiles(2, shape=(7, 3, 5))
    out = OpenVinoModel(models["voxelwise"])(tiles.astype(np.float64))  # dynamic model, compiled on first use
    assert out.dtype == np.float32 and out.shape == (2, 4, 7, 3, 5)
    for item, logits in zip(tiles, out):
        np.testing.assert_allclose(logits, voxelwise_reference(item, n_out=4), atol=1e-5)


@pytest.mark.parametrize("name, n", [("fixed1", 3), ("fixed2", 1), ("fixed2", 3)])
def test_fixed_batch_models_run_any_batch(models, name, n):
    """A fixed batch of 1 runs tile by tile; of 2, the last chunk zero-filled and its extra item dropped."""
    model = OpenVinoModel(models[name], patch_zyx=(6, 5, 4), tile_batch=3)
    assert model.fixed_batch == int(name[-1]) and model.patch_zyx == (6, 5, 4)
    tiles = _tiles(n, seed=n)
    np.testing.assert_allclose(model(tiles), OnnxModel(models[name], device="cpu")(tiles), atol=1e-4)


def test_fixed_batch_model_under_the_sliding_window(models):
    image = _tiles(1, shape=(11, 9, 7))[0]
    out = predict_sliding_window(OpenVinoModel(models["fixed1"], patch_zyx=(6, 5, 4), tile_batch=3), image,
                                 patch_zyx=(6, 5, 4), n_outputs=3, tile_batch=3, mirror_axes_zyx=(0, 1))
    np.testing.assert_allclose(out, voxelwise_reference(image, n_out=3), atol=1e-5)


def test_deep_supervision_outputs_are_ignored(models):
    model = OpenVinoModel(models["deep_supervision"], patch_zyx=(6, 6, 4), tile_batch=2)
    assert model.n_outputs == 3
    assert_backends_agree(models["deep_supervision"], _tiles(2, shape=(6, 6, 4)))


@pytest.mark.parametrize("keep_io_types", [True, False])
def test_fp16_files_agree_within_the_fp16_rule(models, tmp_path, keep_io_types):
    """fp16 weights (float32 or float16 inputs): OpenVINO decompresses them and computes in f32, onnxruntime in the
    file's precision, so the two agree to the fp16 rule (and the f32 computation is closer to the fp32 file)."""
    path = _fp16(models["conv"], tmp_path / "conv.fp16.onnx", keep_io_types=keep_io_types)
    model = OpenVinoModel(path, patch_zyx=(6, 5, 4), tile_batch=2)
    assert model._input_dtype == (np.float32 if keep_io_types else np.float16) and model.precision == "f32"
    tiles = _tiles(2)
    assert_backends_agree(path, tiles, tolerance=TOLERANCE_FP16, min_agreement=MIN_AGREEMENT_FP16)
    fp32 = OnnxModel(models["conv"], device="cpu")(tiles)
    assert np.abs(model(tiles) - fp32).max() < 0.05 * max(1.0, np.abs(fp32).max())


def test_plan_follows_the_tile_size_and_the_tile_batch():
    assert plan_hint((64, 64, 64), 2) == ("THROUGHPUT", 2)
    assert plan_hint((48, 48, 48), 4) == ("THROUGHPUT", 2)
    assert plan_hint((48, 48, 48), 1) == ("LATENCY", 1)  # one tile per call: a second request would idle
    assert plan_hint((48, 96, 96), 2) == ("LATENCY", 1)
    assert plan_hint((128, 128, 128), 2) == ("LATENCY", 1)


def test_errors_name_the_file(models, tmp_path):
    with pytest.raises(ModelError, match=r"fold_7\.onnx: model file not found"):
        OpenVinoModel(tmp_path / "fold_7.onnx")
    with pytest.raises(ModelError, match=r"rank4\.onnx: input shape .* must both be 5-D"):
        OpenVinoModel(models["rank4"])
    model = OpenVinoModel(models["fixed1"])
    with pytest.raises(ModelError, match=r"fixed1\.onnx: given 3 channels, the model takes 2"):
        model(_tiles(1, channels=3))
    with pytest.raises(ModelError, match=r"fixed1\.onnx: given tiles of \(6, 5, 5\), the model is fixed to"):
        model(_tiles(1, shape=(6, 5, 5)))
    with pytest.raises(ModelError, match="unknown OpenVINO precision 'f16'"):
        OpenVinoModel(models["conv"], precision="f16")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(0).bytes(2000))
    for path in (corrupt, garbage):
        with pytest.raises(BackendRefused, match=rf"{path.stem}\.onnx: OpenVINO cannot read it"):
            OpenVinoModel(path)
    with pytest.raises(ModelError, match=r"corrupt\.onnx: not a loadable ONNX model"):  # auto: onnxruntime's words
        open_model(corrupt, device="cpu")


# ------------------------------------------------------------------------------------------------ the choice

def test_auto_on_the_cpu_is_openvino_without_fallbacks(models):
    for device in ("cpu", "auto"):  # this machine has no CUDA
        model = open_model(models["conv"], device=device, patch_zyx=(6, 5, 4), tile_batch=2)
        assert isinstance(model, OpenVinoModel) and model.fallbacks == [] and model.provider == "OpenVINO CPU"


def test_forced_backends(models):
    assert isinstance(open_model(models["conv"], device="cpu", backend="onnxruntime"), OnnxModel)
    assert isinstance(open_model(models["conv"], device="cpu", backend="openvino"), OpenVinoModel)
    with pytest.raises(ModelError, match="backend 'openvino' runs on the CPU only"):
        open_model(models["conv"], device="cuda", backend="openvino")
    with pytest.raises(ModelError, match="unknown backend 'tensorflow'"):
        open_model(models["conv"], device="cpu", backend="tensorflow")
    with pytest.raises(ModelError, match="unknown device 'gpu'"):
        open_model(models["conv"], device="gpu")


def test_without_the_package_auto_falls_back_and_forced_is_an_error(models, monkeypatch):
    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name.startswith(("hnseg_infer.inference.openvino_engine", "openvino")):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    model = open_model(models["conv"], device="cpu")
    assert isinstance(model, OnnxModel) and len(model.fallbacks) == 1
    assert "OpenVINO not used for conv.onnx (No module named 'openvino')" in model.fallbacks[0]
    with pytest.raises(ModelError, match="backend 'openvino' asked for conv.onnx but the openvino package is not"):
        open_model(models["conv"], device="cpu", backend="openvino")

