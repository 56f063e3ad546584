"""Any PyTorch module: import a class, build it from JSON kwargs, load one state dict per fold → ONNX + recipe.

A bare module does not know how it must be fed, so the user gives that as SPEC.json: one recipe model entry
without "files" (name, spacing_xyz_mm, orientation, patch_size_zyx, channels, head and optional keys). The spec,
--roi and --postprocess are validated by the recipe validator before the slow export; every fold is loaded
strictly (no missing, unexpected or reshaped parameter), then exported, proven against PyTorch and stamped.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import pickle
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch

from hnseg_infer.errors import ExportError, RecipeError
from hnseg_infer.io.atomic import file_sha256
from hnseg_infer.recipe.parse import RESTORES, parse_model
from hnseg_infer.recipe.spec import ModelSpec

from .onnx_export import (
    OUTPUT_NAME,
    SHOWN,
    check_roi_and_postprocess,
    export_folds,
    json_object,
    load_strictly,
    proof_input,
    run_onnx,
    staged_weights,
    write_recipe,
)
from .stochastic import add_stochastic_twins, uncertainty_block

CONTAINER_KEYS = ("state_dict", "model", "network_weights")  # Lightning/our trainers, common scripts, nnU-Net
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DistributedDataParallel, torch.compile
ROUTE_KEYS = ("files", "provenance")  # what the route writes into the model entry itself


def add_arguments(parser) -> None:
    parser.add_argument("--module", required=True, metavar="pkg.mod:Class",
                        help="the network class: a dotted module (importable, or under the current folder) or a "
                             ".py file, then ':' and the class name, e.g. hnseg_export.snu:SNUNet")
    parser.add_argument("--kwargs", default="{}", metavar="JSON",
                        help="the class's constructor keyword arguments as a JSON object (default {})")
    parser.add_argument("--state-dict", nargs="+", type=Path, required=True, metavar="FILE",
                        help="one state dict per fold (torch.save of state_dict(), a checkpoint holding one under "
                             f"{'/'.join(CONTAINER_KEYS)}, or .safetensors)")
    parser.add_argument("--model-spec", type=Path, required=True, metavar="SPEC.json",
                        help="how the network is fed: one recipe model entry without 'files' (name, "
                             "spacing_xyz_mm, orientation, patch_size_zyx, channels, head, optional keys)")
    parser.add_argument("--roi", default='{"method": "ct_extent"}', metavar="JSON",
                        help='the recipe\'s ROI as JSON (default {"method": "ct_extent"})')
    parser.add_argument("--postprocess", default="{}", metavar="JSON",
                        help="the recipe's post-processing as JSON (default {}: none)")
    parser.add_argument("--name", default=None, help="recipe name (default: the spec's model name)")
    parser.add_argument("--pet-optional", action="store_true",
                        help="the network was trained to run without PET (its PET channels zero-filled): the recipe "
                             "gets \"pet_optional\": true, so cases without PET (or --ct-only) run in CT-only mode")
    parser.add_argument("--uncertainty", default=None, metavar="JSON",
                        help="the recipe's uncertainty block (HN-UISeg), e.g. '{\"passes\": 8, \"dropout_rate\": "
                             "0.05, \"seed\": 0, \"augmentations\": {\"flip\": {\"axes_zyx\": [0, 1, 2]}}}'; "
                             "with a dropout rate > 0 each fold also gets a proven stochastic twin "
                             "(<fold>.stochastic.onnx, its nn.Dropout modules active)")
    parser.add_argument("--restore", choices=RESTORES, default="probabilities",
                        help="how labels reach the CT grid: probabilities interpolated onto the CT, then decoded "
                             "(default), or paste_nearest: decoded on the model grid, then nearest neighbour (SNU)")


def export(args) -> Path:
    spec = _read_spec(args.model_spec)
    roi = json_object(args.roi, "--roi")
    postprocess = json_object(args.postprocess, "--postprocess")
    kwargs = json_object(args.kwargs, "--kwargs")
    fold_names = [f"{_file_safe(spec['name'])}_fold{i}" for i in range(len(args.state_dict))]
    model = _validate_early(spec, roi, postprocess, spec_path=args.model_spec, fold_names=fold_names)
    uncertainty = uncertainty_block(args.uncertainty, model)
    networks, state_dicts = _load_folds(import_class(args.module), kwargs, dict(zip(fold_names, args.state_dict)),
                                        module=args.module)
    source = {"route": "torch", "module": args.module, "kwargs": kwargs, "state_dicts": state_dicts,
              "torch": torch.__version__}
    n_channels = len(model.channels)
    with staged_weights(args.out, overwrite=args.overwrite) as staging:
        files, provenance = export_folds(networks, staging, n_channels=n_channels,
                                         patch_zyx=model.tiling.patch_size_zyx,
                                         head=model.head.type, fp16=args.fp16, source=source)
        for file in files:
            _check_outputs(staging / file, model.head.n_outputs, n_channels=n_channels,
                           patch_zyx=model.tiling.patch_size_zyx, module=args.module, spec_path=args.model_spec)
        twins = add_stochastic_twins(uncertainty, networks, staging, model=model, module=args.module)
        if twins:
            provenance["stochastic"] = twins.pop("stochastic_provenance")
        write_recipe(staging, name=args.name or spec["name"],
                     description=f"{args.module} ({len(files)} fold(s)), exported by the torch route",
                     roi=roi, models=[{**spec, "files": files, **twins, "provenance": provenance}],
                     postprocess=postprocess, restore=args.restore, uncertainty=uncertainty,
                     pet_optional=args.pet_optional)
    return Path(args.out)


def _load_folds(network_class: type, kwargs: dict, paths: dict[str, Path], *, module: str):
    """One network per fold, built with kwargs and loaded strictly; and each state dict's file, sha256 and what
    was unwrapped, for the provenance."""
    networks, sources = {}, {}
    for fold, path in paths.items():
        state_dict, unwrapped = read_state_dict(path)
        networks[fold] = _build(network_class, kwargs, module)
        load_strictly(networks[fold], state_dict, source=f"--state-dict {path} ({module} built with these --kwargs)",
                      fix="Check --module/--kwargs against the training run")
        sources[fold] = {"file": str(path), "sha256": file_sha256(path), "unwrapped": unwrapped}
    return networks, sources


# ----------------------------------------------------------------------------------------------- the user's JSON

def _read_spec(path: Path) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ExportError(f"--model-spec {path}: cannot read it ({error.strerror}): give the JSON file with the "
                          f"model entry (name, spacing_xyz_mm, patch_size_zyx, channels, head, ...)") from error
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as error:
        raise ExportError(f"--model-spec {path} is not valid JSON ({error}): fix the file") from error
    if not isinstance(spec, dict):
        raise ExportError(f"--model-spec {path} must hold one JSON object (a recipe model entry), got "
                          f"{type(spec).__name__}")
    if given := [key for key in ROUTE_KEYS if key in spec]:
        raise ExportError(f"--model-spec {path}: remove {given}; the export writes the model files and their "
                          f"provenance itself")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ExportError(f"--model-spec {path}: 'name' must be a non-empty string, got {spec.get('name')!r}")
    return spec


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _validate_early(spec: dict, roi: dict, postprocess: dict, *, spec_path: Path,
                    fold_names: list[str]) -> ModelSpec:
    """The recipe's parser on the spec (it reads no file, so the folds' files need not exist yet), the ROI and the
    post-processing: a mistake there costs seconds, not an export. Returns the parsed model entry."""
    check_roi_and_postprocess(roi, postprocess)
    files = [f"{fold}.onnx" for fold in fold_names]
    try:
        return parse_model({**spec, "files": files}, f"--model-spec {spec_path}", Path(spec_path).parent)
    except RecipeError as error:
        raise ExportError(f"{error}: fix the spec file") from error


# ------------------------------------------------------------------------------------------------- the network

def import_class(target: str) -> type[torch.nn.Module]:
    """`pkg.mod:Class` or `path/to/file.py:Class` → the class, an nn.Module subclass."""
    module_name, sep, class_name = target.rpartition(":")
    if not sep or not module_name or not class_name:
        raise ExportError(f"--module {target!r}: give the module and the class as pkg.mod:Class (or file.py:Class)")
    try:
        module = _import(module_name)
    except Exception as error:  # an import runs arbitrary code; whatever it raises means the same to the user
        raise ExportError(f"--module {target!r}: cannot import {module_name!r} ({type(error).__name__}: {error}): "
                          f"check the name, run from the folder that holds the package or set PYTHONPATH, and "
                          f"install what it imports") from error
    if not hasattr(module, class_name):
        raise ExportError(f"--module {target!r}: {module_name!r} has no attribute {class_name!r}; its nn.Module "
                          f"classes: {_module_classes(module) or 'none'}")
    network_class = getattr(module, class_name)
    if not (inspect.isclass(network_class) and issubclass(network_class, torch.nn.Module)):
        raise ExportError(f"--module {target!r}: {class_name!r} is {type(network_class).__name__}, not a subclass "
                          f"of torch.nn.Module; name the network class")
    return network_class


def _import(module_name: str):
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"no file {path}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # as an import would: dataclasses and pickling look the module up there
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[spec.name]
            raise
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:  # as `python -m` does: the current folder's packages
        sys.path.append(os.getcwd())
    return importlib.import_module(module_name)


def _module_classes(module) -> str:
    return ", ".join(sorted(name for name, value in vars(module).items()
                            if inspect.isclass(value) and issubclass(value, torch.nn.Module)
                            and value.__module__ == module.__name__))


def _build(network_class: type, kwargs: dict, target: str) -> torch.nn.Module:
    try:
        return network_class(**kwargs)
    except (TypeError, ValueError) as error:
        raise ExportError(f"--kwargs {json.dumps(kwargs)}: {target} cannot be built with them "
                          f"({type(error).__name__}: {error}); its signature: "
                          f"{network_class.__name__}{_signature(network_class)}") from error


def _signature(network_class: type) -> str:
    try:
        return str(inspect.signature(network_class))
    except (TypeError, ValueError):
        return "(?)"


# ---------------------------------------------------------------------------------------------- the state dicts

def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The parameter tensors in `path`, with the usual checkpoint containers and wrapper prefixes removed; also
    returns what was unwrapped (container keys, prefixes), for the provenance."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"--state-dict {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            # weights_only: tensors and plain containers only, so a checkpoint cannot run code while loading
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ExportError(f"--state-dict {path}: not loaded ({_unpickler_reason(error)}): it is not a PyTorch "
                          f"file, or it holds Python objects besides tensors and plain containers, which are not "
                          f"unpickled for safety; re-save the weights alone with torch.save(model.state_dict(), "
                          f"FILE)") from error
    except Exception as error:  # zip, safetensors and I/O errors of many kinds; all mean "not readable"
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise ExportError(f"--state-dict {path}: cannot read it as a state dict ({type(error).__name__}: "
                          f"{first_line}): save it with torch.save(model.state_dict(), FILE)") from error
    unwrapped = []
    while isinstance(obj, Mapping) and (key := next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)),
                                                    None)):
        obj, unwrapped = obj[key], [*unwrapped, key]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = sorted(obj)[:SHOWN] if isinstance(obj, Mapping) else type(obj).__name__
        raise ExportError(f"--state-dict {path}: holds no state dict (found {found}); save "
                          f"torch.save(model.state_dict(), FILE) or a checkpoint with one under "
                          f"{' / '.join(CONTAINER_KEYS)}")
    state_dict = dict(obj)
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
            unwrapped.append(prefix)
    return state_dict, unwrapped


def _unpickler_reason(error: Exception) -> str:
    """torch's weights_only message is a page of advice; its cause is the line after 'WeightsUnpickler error:'."""
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n|\.\s|$)", str(error))
    return match.group(1).strip() if match else type(error).__name__


# ------------------------------------------------------------------------------------------------ after export

def _check_outputs(onnx_path: Path, n_outputs: int, *, n_channels: int, patch_zyx, module: str,
                   spec_path: Path) -> None:
    """The network's output channels must be the head's outputs, or the runtime would decode the wrong labels."""
    dim = next(o for o in onnx.load(str(onnx_path)).graph.output if o.name == OUTPUT_NAME).type.tensor_type.shape.dim
    channels = dim[1].dim_value if len(dim) > 1 else 0
    if not channels:  # not inferred by the exporter: run it once
        channels = run_onnx(onnx_path, proof_input(n_channels, patch_zyx, batch=1)).shape[1]
    if channels != n_outputs:
        raise ExportError(f"{module} gives {channels} output channels but the head in --model-spec {spec_path} "
                          f"declares {n_outputs}: match the head's labels/regions to the network (or its "
                          f"n_classes); nothing was written")
