"""The part every export route shares: PyTorch module → ONNX file, the proof that the two agree, optional fp16,
and the weights folder (ONNX files + recipe.json) written all at once or not at all."""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from hnseg_infer.errors import ExportError, HnsegError, RecipeError
from hnseg_infer.inference.agreement import (
    MIN_AGREEMENT_FP16,
    MIN_AGREEMENT_FP32,
    TOLERANCE_FP16,
    TOLERANCE_FP32,
    compare_logits,
)
from hnseg_infer.io.atomic import write_atomic
from hnseg_infer.recipe.load import RECIPE_FILE, load_files, load_recipe
from hnseg_infer.recipe.parse import parse_recipe
from hnseg_infer.recipe.spec import SCHEMA_VERSION
from hnseg_infer.restore.postprocess import PostprocessConfig
from hnseg_infer.roi.locate import check_params

SHOWN = 5  # keys listed in an error message
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# fp16 keeps these in fp32: normalisation statistics over a whole tile overflow or lose precision in fp16.
FP32_OPS = ["InstanceNormalization", "LayerNormalization", "GroupNormalization", "BatchNormalization",
            "ReduceMean", "ReduceSumSquare", "Pow", "Sqrt", "Softmax", "Sigmoid", "Exp"]


class FirstOutput(torch.nn.Module):
    """The full-resolution logits only: deep-supervision networks return a list, highest resolution first."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x):
        out = self.network(x)
        return out[0] if isinstance(out, (list, tuple)) else out


def export_onnx(network: torch.nn.Module, path: Path, *, n_channels: int, patch_zyx) -> Path:
    """[N, C, *patch] float32 → [N, K, *patch] logits, dynamic batch, opset 17, one self-contained file."""
    module = FirstOutput(network).eval()
    example = torch.zeros(1, n_channels, *patch_zyx)
    try:
        with torch.no_grad():
            # The TorchScript exporter: for convolutional networks it is exact and 5x faster than the dynamo one.
            torch.onnx.export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=OPSET, dynamo=False, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}})
        onnx.checker.check_model(str(path))
    except Exception as error:  # torch raises many kinds; all mean the same to the user
        raise ExportError(f"cannot export {type(network).__name__} to ONNX for input [N, {n_channels}, "
                          f"{', '.join(map(str, patch_zyx))}] ({type(error).__name__}: {error}): check that the "
                          f"network runs on that shape in PyTorch") from error
    return Path(path)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(path: Path, batch_nczyx: np.ndarray) -> np.ndarray:
    session = _session(path)
    return session.run(None, {session.get_inputs()[0].name: batch_nczyx.astype(np.float32)})[0].astype(np.float32)


def proof_input(n_channels: int, patch_zyx, *, batch: int = 2, seed: int = 0) -> np.ndarray:
    """A full-size tile batch of smooth random values (blurred noise at image-like scale, not white noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(batch, n_channels, *[max(2, p // 8) for p in patch_zyx])).astype(np.float32)
    x = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=tuple(patch_zyx), mode="trilinear")
    return (x.numpy() + 0.1 * rng.normal(size=x.shape)).astype(np.float32)


def prove(network: torch.nn.Module, onnx_path: Path, *, n_channels: int, patch_zyx, head: str) -> dict:
    """PyTorch vs onnxruntime (CPU) on a full-size input; ExportError if they disagree."""
    x = proof_input(n_channels, patch_zyx)
    with torch.no_grad():
        reference = FirstOutput(network).eval()(torch.from_numpy(x)).float().numpy()
    result = compare_logits(reference, run_onnx(onnx_path, x), head=head, tolerance=TOLERANCE_FP32,
                            min_agreement=MIN_AGREEMENT_FP32)
    result.update(reference=f"torch {torch.__version__}", runtime=f"onnxruntime {ort.__version__} CPU",
                  input_shape=list(x.shape))
    if not result["passed"]:
        raise ExportError(f"{onnx_path.name}: the ONNX export disagrees with PyTorch (max |Δlogit| "
                          f"{result['max_abs_logit_diff']:.3g}, allowed {result['tolerance']:.3g}; agreement "
                          f"{result['agreement']:.4f}, needed {MIN_AGREEMENT_FP32}): an operator is exported "
                          f"differently; nothing was written")
    return result


def convert_fp16(fp32_path: Path, fp16_path: Path, *, n_channels: int, patch_zyx, head: str) -> dict:
    """fp16 weights and activations with float32 inputs/outputs and normalisation layers; measured against fp32."""
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(_unaliased(onnx.load(str(fp32_path))), keep_io_types=True,
                                             op_block_list=float16.DEFAULT_OP_BLOCK_LIST + FP32_OPS)
    onnx.save(model, str(fp16_path))
    x = proof_input(n_channels, patch_zyx, seed=1)
    result = compare_logits(run_onnx(fp32_path, x), run_onnx(fp16_path, x), head=head, tolerance=TOLERANCE_FP16,
                            min_agreement=MIN_AGREEMENT_FP16)
    result.update(reference="fp32 ONNX", kept_fp32=FP32_OPS, input_shape=list(x.shape))
    if not result["passed"]:
        raise ExportError(f"{fp16_path.name}: fp16 disagrees with fp32 (max |Δlogit| {result['max_abs_logit_diff']:.3g}, "
                          f"agreement {result['agreement']:.4f}, needed {MIN_AGREEMENT_FP16}): export without --fp16")
    return result


def _unaliased(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each Identity over an initializer replaced by a copy of it. The exporter shares equal parameters (a zero
    conv bias and a zero norm bias) through Identity; fp16 conversion must be free to give them different types."""
    initializers = {init.name: init for init in model.graph.initializer}
    aliases = [n for n in model.graph.node if n.op_type == "Identity" and n.input[0] in initializers]
    for node in aliases:
        copy = onnx.TensorProto()
        copy.CopyFrom(initializers[node.input[0]])
        copy.name = node.output[0]
        model.graph.initializer.append(copy)
        model.graph.node.remove(node)
    return model


def stamp(onnx_path: Path, provenance: dict) -> None:
    """Write the provenance (source, proof) into the ONNX file's metadata, key `hnseg.provenance`."""
    model = onnx.load(str(onnx_path))
    kept = [p for p in model.metadata_props if p.key != "hnseg.provenance"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key="hnseg.provenance", value=json.dumps(provenance))
    onnx.save(model, str(onnx_path))


def export_folds(networks: dict[str, torch.nn.Module], folder: Path, *, n_channels: int, patch_zyx, head: str,
                 fp16: bool = False, source: dict) -> tuple[list[str], dict]:
    """Export, prove and stamp each network as `<name>.onnx` in `folder`; returns the file names the recipe lists
    and the model's provenance (source and one proof per file)."""
    files, proofs = [], {}
    for name, network in networks.items():
        fp32 = export_onnx(network, folder / f"{name}.onnx", n_channels=n_channels, patch_zyx=patch_zyx)
        proof = {"fp32": prove(network, fp32, n_channels=n_channels, patch_zyx=patch_zyx, head=head)}
        path = fp32
        if fp16:
            path = folder / f"{name}.fp16.onnx"
            proof["fp16"] = convert_fp16(fp32, path, n_channels=n_channels, patch_zyx=patch_zyx, head=head)
            fp32.unlink()
        stamp(path, {"source": source, "proof": proof})
        files.append(path.name)
        proofs[path.name] = proof
    return files, {"source": source, "proof": proofs}


@contextmanager
def staged_weights(out_dir: Path, *, overwrite: bool = False):
    """Yield an empty staging folder beside `out_dir`; on success it becomes `out_dir`, on any error it is removed,
    so a failed export leaves nothing half-written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"output folder {out_dir} exists and is not empty: choose another --out or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a container's non-root user must read the weights
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def json_object(text: str, option: str) -> dict:
    """A command-line option's JSON object, or an ExportError naming the option."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ExportError(f"{option} {text!r} is not valid JSON ({error}): pass a JSON object, e.g. "
                          f"'{{\"key\": 1}}' (mind the shell quoting)") from error
    if not isinstance(value, dict):
        raise ExportError(f"{option} must be a JSON object {{...}}, got {type(value).__name__} {text!r}")
    return value


def check_roi_and_postprocess(roi: dict, postprocess: dict) -> None:
    """The --roi and --postprocess objects, checked by the runtime's own validators before the slow export."""
    method = roi.get("method")
    if not isinstance(method, str) or set(roi) - {"method", "params"} or not isinstance(roi.get("params", {}), dict):
        raise ExportError(f"--roi {json.dumps(roi)}: give {{\"method\": NAME, \"params\": {{...}}}} (params "
                          f"optional)")
    try:
        check_params(method, roi.get("params", {}))
    except RecipeError as error:
        raise ExportError(f"--roi: {error}") from error
    try:
        PostprocessConfig.from_dict(postprocess)
    except RecipeError as error:
        raise ExportError(f"--postprocess: {error}") from error


def load_strictly(network: torch.nn.Module, state_dict: dict, *, source: str, fix: str) -> torch.nn.Module:
    """Every parameter and buffer present with its shape, nothing else, or an ExportError naming `source`, listing
    the first few problems and ending with `fix`. Returns the network in eval mode."""
    expected = network.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    reshaped = [f"{key} {tuple(state_dict[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
                if key in state_dict and state_dict[key].shape != value.shape]
    problems = [f"{len(keys)} {what}: {', '.join(keys[:SHOWN])}{', ...' if len(keys) > SHOWN else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("with another shape (file vs network)", reshaped)) if keys]
    if problems:
        raise ExportError(f"{source} does not fit {type(network).__name__}: {'; '.join(problems)}. {fix}")
    network.load_state_dict(state_dict, strict=True)
    return network.eval()


def write_recipe(folder: Path, *, name: str, description: str, roi: dict, models: list[dict],
                 postprocess: dict, restore: str = "probabilities", uncertainty: dict | None = None,
                 pet_optional: bool = False) -> Path:
    """recipe.json in `folder`, through hnseg_infer's own validator and writer: the entries are parsed into a
    Recipe (a recipe that the runtime would refuse fails the export instead) and written by Recipe.to_json, every
    default spelled out, then read back."""
    raw = {"schema_version": SCHEMA_VERSION, "name": name, "description": description, "pet_optional": pet_optional,
           "roi": roi, "models": models, "postprocess": postprocess, "restore": restore,
           **({"uncertainty": uncertainty} if uncertainty is not None else {})}
    path = Path(folder) / RECIPE_FILE
    try:
        recipe = load_files(parse_recipe(raw, path))  # the files hashed: the recipe records their sha256
        write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(recipe.to_json(), indent=2) + "\n"))
        written = load_recipe(folder)
    except HnsegError as error:
        raise ExportError(f"the recipe written for {name!r} does not validate ({error}); this is a bug in the "
                          f"export route") from error
    if written != recipe:
        raise ExportError(f"the recipe written for {name!r} reads back differently from what was parsed; this is a "
                          f"bug in Recipe.to_json")
    return path
