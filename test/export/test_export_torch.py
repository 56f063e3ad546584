"""The generic PyTorch route (`to_onnx.py torch`) on the SNU network: state dicts saved here, folds exported,
proven and loaded by the runtime; every bad input an ExportError naming it, with no --out folder left behind."""

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from backend_parity import assert_backends_agree
from builders import torch_route_parser as _parser

from hnseg_export import from_torch
from hnseg_export.snu import SNUNet
from hnseg_infer.errors import ExportError
from hnseg_infer.inference.agreement import MIN_AGREEMENT_FP16, TOLERANCE_FP16
from hnseg_infer.inference.onnx_engine import OnnxModel
from hnseg_infer.recipe.load import load_recipe

pytestmark = pytest.mark.torch

MODULE = "hnseg_export.snu:SNUNet"
KWARGS = {"base_features": 4, "depth": 3, "attention_features": 2, "blocks_per_level": 1}
PATCH_ZYX = [16, 32, 32]
SPEC = {  # DESIGN §5 SNU: CT clip [-1000, 1000] → scale → sigmoid; PET global z-score → sigmoid
    "name": "snu", "spacing_xyz_mm": [1.0, 1.0, 3.0], "orientation": "lps", "patch_size_zyx": PATCH_ZYX,
    "channels": [
        {"source": "ct", "interpolation": "bspline",
         "ops": [{"op": "clip", "min": -1000, "max": 1000}, {"op": "scale", "factor": 0.001}, {"op": "sigmoid"}]},
        {"source": "pet", "ops": [{"op": "suv"}, {"op": "zscore", "over": "all"}, {"op": "sigmoid"}]}],
    "head": {"type": "softmax", "labels": [0, 1, 2]}, "fold_average": "probabilities", "tile_batch": 2,
}


def _network(seed: int, **kwargs) -> SNUNet:
    torch.manual_seed(seed)
    return SNUNet(**{**KWARGS, **kwargs}).eval()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """fold 0: a bare state dict; fold 1: a DataParallel state dict inside a training checkpoint."""
    root = tmp_path_factory.mktemp("torch_route")
    fold0, fold1 = root / "fold0.pt", root / "fold1.ckpt"
    torch.save(_network(0).state_dict(), fold0)
    wrapped = {f"module.{key}": value for key, value in _network(1).state_dict().items()}
    torch.save({"state_dict": wrapped, "epoch": 300, "best_dice": 0.71}, fold1)
    spec = root / "spec.json"
    spec.write_text(json.dumps(SPEC))
    return {"root": root, "folds": [fold0, fold1], "spec": spec}


def _argv(inputs, out: Path, *, state_dicts=None, **options) -> list[str]:
    """The torch route's command line; options by their Python names (model_spec → --model-spec)."""
    defaults = {"module": MODULE, "kwargs": json.dumps(KWARGS), "model_spec": inputs["spec"], "out": out}
    argv = [item for key, value in {**defaults, **options}.items() for item in (f"--{key.replace('_', '-')}",
                                                                               str(value))]
    return argv + ["--state-dict", *map(str, inputs["folds"] if state_dicts is None else state_dicts)]


def export(inputs, out: Path, *flags, **options) -> Path:
    return from_torch.export(_parser().parse_args(_argv(inputs, out, **options) + list(flags)))


def _provenance(path: Path) -> dict:
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(props["hnseg.provenance"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _torch_logits(seed: int, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return _network(seed)(torch.from_numpy(x)).numpy()


def _tiles(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2, 2, *PATCH_ZYX)).astype(np.float32)


# ------------------------------------------------------------------------------------------------------ success

def test_two_folds_exported_proven_and_run_by_the_runtime(inputs, tmp_path):
    out = export(inputs, tmp_path / "weights")
    recipe = load_recipe(out)
    (model,) = recipe.models
    assert [f.name for f in model.files] == ["snu_fold0.onnx", "snu_fold1.onnx"]
    assert model.channels[1].ops[1].to_json() == {"op": "zscore", "over": "all"} and model.head.labels == (0, 1, 2)
    x = _tiles(seed=5)
    outputs = []
    for seed, (path, state_dict) in enumerate(zip(model.files, inputs["folds"])):
        provenance = _provenance(path)
        assert provenance["proof"]["fp32"]["passed"] and provenance["proof"]["fp32"]["input_shape"] == [2, 2,
                                                                                                         *PATCH_ZYX]
        source = provenance["source"]
        assert (source["module"], source["kwargs"]) == (MODULE, KWARGS)
        assert source["state_dicts"][path.stem]["sha256"] == _sha256(state_dict)
        assert onnx.load(str(path)).opset_import[0].version == 17
        # each file is its own fold's network, run by hnseg_infer's engine on inputs the proof did not use
        outputs.append(OnnxModel(path, device="cpu")(x))
        np.testing.assert_allclose(outputs[-1], _torch_logits(seed, x), atol=1e-4, rtol=1e-4)
        assert_backends_agree(path, x)  # the SNU network (SE Norm, PSAM) on OpenVINO too
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-2  # two different folds, not one file twice
    assert source["state_dicts"]["snu_fold1"]["unwrapped"] == ["state_dict", "module."]
    assert model.provenance["proof"].keys() == {"snu_fold0.onnx", "snu_fold1.onnx"}
    assert sorted(p.name for p in out.iterdir()) == ["recipe.json", "snu_fold0.onnx", "snu_fold1.onnx"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_fp16_folds(inputs, tmp_path):
    out = export(inputs, tmp_path / "weights16", "--fp16", postprocess='{"min_volume_mm3": {"GTVn": 50}}',
                 roi='{"method": "ct_extent"}')
    recipe = load_recipe(out)
    (model,) = recipe.models
    assert [f.name for f in model.files] == ["snu_fold0.fp16.onnx", "snu_fold1.fp16.onnx"]
    assert recipe.postprocess.min_volume_mm3 == {2: 50.0}
    x = _tiles(seed=6)
    for seed, path in enumerate(model.files):
        proof = _provenance(path)["proof"]
        assert proof["fp32"]["passed"] and proof["fp16"]["passed"]
        weights = onnx.load(str(path)).graph.initializer
        assert any(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
        reference = _torch_logits(seed, x)
        logits = OnnxModel(path, device="cpu")(x)
        assert (logits.argmax(1) == reference.argmax(1)).mean() > 0.98
        # OpenVINO computes the fp16 file in f32: within the fp16 rule of onnxruntime's fp16 run
        assert_backends_agree(path, x, tolerance=TOLERANCE_FP16, min_agreement=MIN_AGREEMENT_FP16)
        assert np.abs(logits - reference).max() < 0.05 * max(1.0, np.abs(reference).max())


def test_safetensors_and_a_nnunet_style_checkpoint(inputs, tmp_path):
    from safetensors.torch import save_file

    single = tmp_path / "fold.safetensors"
    save_file(_network(0).state_dict(), str(single))
    nested = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {f"_orig_mod.{k}": v for k, v in _network(1).state_dict().items()},
                "trainer_name": "x"}, nested)
    out = export(inputs, tmp_path / "w", state_dicts=[single, nested])
    (model,) = load_recipe(out).models
    x = _tiles(seed=7)
    for seed, path in enumerate(model.files):
        np.testing.assert_allclose(OnnxModel(path, device="cpu")(x), _torch_logits(seed, x), atol=1e-4, rtol=1e-4)
    assert _provenance(model.files[1])["source"]["state_dicts"]["snu_fold1"]["unwrapped"] == ["network_weights",
                                                                                              "_orig_mod."]


# ------------------------------------------------------------------------------------------------------- errors

def _state_dict_variant(root: Path, name: str, change) -> Path:
    state = dict(_network(0).state_dict())
    change(state)
    torch.save(state, root / name)
    return root / name


def _drop_a_key(state):
    del state["head.bias"]


def _add_a_key(state):
    state["extra.weight"] = torch.zeros(3)


def _widen(state):
    state.clear()
    state.update(_network(0, base_features=8).state_dict())


def _write(root: Path, name: str, content) -> Path:
    """A text file, or JSON for a dict."""
    (root / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return root / name


def _save(root: Path, name: str, obj) -> Path:
    torch.save(obj, root / name)
    return root / name


ERRORS = {  # case → (changes to the command line, words the message must hold)
    "module without class": ({"module": "hnseg_export.snu"}, ["pkg.mod:Class"]),
    "module not importable": ({"module": "no_such_pkg.nets:Net"}, ["cannot import 'no_such_pkg.nets'",
                                                                   "ModuleNotFoundError"]),
    "module file broken": ({"module": lambda root: f"{_write(root, 'net.py', 'class Net(:')}:Net"},
                           ["cannot import", "net.py", "SyntaxError"]),
    "no such class": ({"module": "hnseg_export.snu:UNet"}, ["no attribute 'UNet'", "SNUNet"]),
    "not a module class": ({"module": "json:JSONDecoder"}, ["not a subclass of torch.nn.Module"]),
    "not a class": ({"module": "hnseg_export.snu:_stack"}, ["'_stack' is function"]),
    "kwargs not JSON": ({"kwargs": "{depth: 3}"}, ["--kwargs", "not valid JSON"]),
    "kwargs not an object": ({"kwargs": "[3]"}, ["--kwargs", "JSON object"]),
    "unknown kwarg": ({"kwargs": json.dumps({**KWARGS, "n_layers": 4})}, ["--kwargs", "n_layers",
                                                                          "cannot be built", "pet_channel"]),
    "kwarg value refused": ({"kwargs": json.dumps({**KWARGS, "pet_channel": 5})}, ["--kwargs", "pet_channel 5"]),
    "missing key": ({"state_dicts": lambda root: [_state_dict_variant(root, "m.pt", _drop_a_key)]},
                    ["m.pt", "1 missing: head.bias"]),
    "unexpected key": ({"state_dicts": lambda root: [_state_dict_variant(root, "u.pt", _add_a_key)]},
                       ["u.pt", "1 unexpected: extra.weight"]),
    "shape mismatch": ({"state_dicts": lambda root: [_state_dict_variant(root, "w.pt", _widen)]},
                       ["w.pt", "with another shape", "(8, 2, 3, 3, 3) vs (4, 2, 3, 3, 3)"]),
    "state dict missing": ({"state_dicts": lambda root: [root / "nope.pt"]}, ["nope.pt", "no such file"]),
    "state dict not torch": ({"state_dicts": lambda root: [_write(root, "text.pt", "weights")]},
                             ["text.pt", "not loaded", "not a PyTorch file"]),
    "checkpoint with objects": ({"state_dicts": lambda root: [_save(root, "obj.pt", {
        "state_dict": _network(0).state_dict(), "hparams": argparse.Namespace(depth=3)})]},
        ["obj.pt", "Unsupported global", "argparse.Namespace", "torch.save(model.state_dict(), FILE)"]),
    "no tensors inside": ({"state_dicts": lambda root: [_save(root, "meta.pt", {"epoch": 3})]},
                          ["meta.pt", "holds no state dict", "epoch"]),
    "spec not JSON": ({"model_spec": lambda root: _write(root, "s.json", "{name: snu}")}, ["s.json", "not valid JSON"]),
    "spec with files": ({"model_spec": lambda root: _write(root, "s.json", {**SPEC, "files": ["a.onnx"]})},
                        ["s.json", "remove ['files']"]),
    "spec value": ({"model_spec": lambda root: _write(root, "s.json", {**SPEC, "orientation": "xyz"})},
                   ["s.json", "orientation", "'xyz'"]),
    "spec op": ({"model_spec": lambda root: _write(root, "s.json", {
        **SPEC, "channels": [SPEC["channels"][0], {"source": "pet", "ops": [{"op": "log"}]}]})},
        ["s.json", "channels[1]", "unknown op 'log'"]),
    "spec missing head": ({"model_spec": lambda root: _write(root, "s.json", {k: v for k, v in SPEC.items()
                                                                              if k != "head"})},
                          ["s.json", "missing required key 'head'"]),
    "roi method": ({"roi": '{"method": "brain_magic"}'}, ["--roi", "unknown ROI method 'brain_magic'"]),
    "postprocess key": ({"postprocess": '{"min_volume": 3}'}, ["--postprocess", "min_volume"]),
    # found only by exporting: the staging folder must go
    "head does not match outputs": ({"model_spec": lambda root: _write(root, "s.json", {
        **SPEC, "head": {"type": "sigmoid", "regions": [[1, 2], [2]], "region_labels": [1, 2]}})},
        ["gives 3 output channels", "declares 2"]),
    "channels do not match the network": ({"model_spec": lambda root: _write(root, "s.json", {
        **SPEC, "channels": SPEC["channels"] + [{"source": "zero"}]})}, ["cannot export SNUNet", "[N, 3, 16"]),
}


@pytest.mark.parametrize("case", ERRORS)
def test_bad_input_is_an_export_error_and_writes_nothing(inputs, tmp_path, case):
    changes, words = ERRORS[case]
    changes = {key: value(tmp_path) if callable(value) else value for key, value in changes.items()}
    out = tmp_path / "out" / "weights"
    (tmp_path / "out").mkdir()
    with pytest.raises(ExportError) as error:
        export(inputs, out, **changes)
    for word in words:
        assert word in str(error.value), str(error.value)
    assert list((tmp_path / "out").iterdir()) == []  # neither --out nor a staging folder


def test_spec_checked_before_the_state_dicts_are_read(inputs, tmp_path):
    bad_spec = _write(tmp_path, "s.json", {**SPEC, "patch_size_zyx": [16, 32]})
    with pytest.raises(ExportError, match="patch_size_zyx"):
        export(inputs, tmp_path / "w", model_spec=bad_spec, state_dicts=[tmp_path / "not_there.pt"])


def test_existing_out_folder_is_kept_unless_overwrite(inputs, tmp_path):
    out = tmp_path / "weights"
    out.mkdir()
    (out / "keep.txt").write_text("earlier export")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export(inputs, out, state_dicts=inputs["folds"][:1])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export(inputs, out, "--overwrite", state_dicts=inputs["folds"][:1])
    assert sorted(p.name for p in out.iterdir()) == ["recipe.json", "snu_fold0.onnx"]


def test_module_from_a_python_file(inputs, tmp_path):
    """--module path/to/file.py:Class, for a network that is not in an installed package."""
    source = tmp_path / "my_net.py"
    source.write_text("from hnseg_export.snu import SNUNet\n\n\nclass MyNet(SNUNet):\n    pass\n")
    out = export(inputs, tmp_path / "w", module=f"{source}:MyNet", state_dicts=inputs["folds"][:1])
    (model,) = load_recipe(out).models
    x = _tiles(seed=8)
    np.testing.assert_allclose(OnnxModel(model.files[0], device="cpu")(x), _torch_logits(0, x), atol=1e-4, rtol=1e-4)


def test_command_line_exit_code(inputs, tmp_path, capsys):
    """Through export/to_onnx.py itself, once every route module it imports exists."""
    pytest.importorskip("hnseg_export.from_nnunet")
    pytest.importorskip("hnseg_export.from_monai")
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "export" / "to_onnx.py"
    spec = importlib.util.spec_from_file_location("to_onnx", path)
    to_onnx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(to_onnx)
    argv = ["torch", *_argv(inputs, tmp_path / "w", module="hnseg_export.snu:Nope")]
    assert to_onnx.main(argv) == 2
    assert "to_onnx: error: --module 'hnseg_export.snu:Nope'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
