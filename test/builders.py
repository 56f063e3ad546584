"""Small builders shared by the tests: 1×1×1-conv ONNX models (logits linear in the channels), recipe folders,
and synthetic images with chosen geometry."""

from __future__ import annotations

import json
from itertools import permutations, product
from pathlib import Path

import numpy as np
import onnx
import SimpleITK as sitk
from onnx import TensorProto, helper, numpy_helper

from hnseg_infer.io.images import Case, detect_pet_unit


def save_linear_model(path: Path, weight_kc, bias_k, *, fixed_patch_zyx=None) -> Path:
    """ONNX model: logits[k] = Σ_c weight[k, c]·x[c] + bias[k], voxel-wise (a 1×1×1 Conv), dynamic batch."""
    weight = np.asarray(weight_kc, np.float32)
    k, c = weight.shape
    spatial = list(fixed_patch_zyx) if fixed_patch_zyx else ["z", "y", "x"]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, *spatial])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k, *spatial])
    w = numpy_helper.from_array(weight.reshape(k, c, 1, 1, 1), "W")
    b = numpy_helper.from_array(np.asarray(bias_k, np.float32), "B")
    graph = helper.make_graph([helper.make_node("Conv", ["input", "W", "B"], ["logits"])], "linear", [x], [y], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 8)  # onnx 1.23 writes IR 14; the image's onnxruntime 1.22 reads <= 10
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


PET_THRESHOLD_MODEL = {"weight": [[0, 0], [0, 2.0], [0, 0]], "bias": [0, -10.0, -10.0]}  # GTVp where SUV > 5


def model_entry(**overrides) -> dict:
    entry = {
        "name": "pet_threshold", "files": ["model.onnx"], "spacing_xyz_mm": [2.0, 2.0, 2.0],
        "patch_size_zyx": [16, 16, 16],
        "channels": [{"source": "ct", "ops": [{"op": "window", "min": -1000, "max": 1000, "to": [-1, 1]}]},
                     {"source": "pet", "ops": [{"op": "suv"}]}],
        "head": {"type": "softmax", "labels": [0, 1, 2]}, "step_fraction": 0.5, "tile_batch": 2,
    }
    entry.update(overrides)
    return entry


def write_weights(folder: Path, *, models=None, roi=None, postprocess=None, extra=None,
                  linear=PET_THRESHOLD_MODEL) -> Path:
    """A weights folder: recipe.json and, for every file the recipe names, the linear model `linear`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    models = models or [model_entry()]
    for m in models:
        for f in m["files"]:
            if not (folder / f).exists():
                save_linear_model(folder / f, linear["weight"], linear["bias"])
    recipe = {"schema_version": 1, "name": "test", "roi": roi or {"method": "ct_extent"}, "models": models,
              "postprocess": postprocess or {}}
    recipe.update(extra or {})
    (folder / "recipe.json").write_text(json.dumps(recipe, indent=1))
    return folder


def signed_permutations() -> list[tuple[float, ...]]:
    """All 48 axis permutations with flips, as row-major 3×3 direction tuples."""
    out = []
    for perm in permutations(range(3)):
        for signs in product((1.0, -1.0), repeat=3):
            m = np.zeros((3, 3))
            for row, col in enumerate(perm):
                m[row, col] = signs[row]
            out.append(tuple(m.flatten().tolist()))
    return out


def oblique_direction() -> tuple[float, ...]:
    """A proper rotation of ~20° about an oblique axis."""
    axis = np.array([1.0, 2.0, 3.0]) / np.linalg.norm([1.0, 2.0, 3.0])
    angle = np.deg2rad(20)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    return tuple(rotation.flatten().tolist())


def image_from_function(fn, *, size_xyz, spacing_xyz_mm, origin_xyz_mm, direction) -> sitk.Image:
    """A float32 image whose voxel values are fn(physical points (N, 3)) at its voxel centres."""
    image = sitk.Image([int(s) for s in size_xyz], sitk.sitkFloat32)
    image.SetSpacing(spacing_xyz_mm)
    image.SetOrigin(origin_xyz_mm)
    image.SetDirection(direction)
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in size_xyz[::-1]), indexing="ij")
    index_xyz = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1).astype(np.float64)
    d = np.asarray(direction).reshape(3, 3)
    points = np.asarray(origin_xyz_mm) + (index_xyz * np.asarray(spacing_xyz_mm)) @ d.T
    values = fn(points).reshape(size_xyz[::-1]).astype(np.float32)
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(image)
    return out


def make_case(ct, pet) -> Case:
    """A Case straight from two images (what load_case makes of files), named ct.mha and pet.mha."""
    return Case(ct, pet, ct_path=Path("ct.mha"), pet_path=Path("pet.mha"), pet_unit=detect_pet_unit(pet))


def label_centroid_index_xyz(mask: sitk.Image, label: int) -> np.ndarray:
    zyx = np.argwhere(sitk.GetArrayFromImage(mask) == label)
    assert len(zyx), f"label {label} not found"
    return zyx.mean(axis=0)[::-1]


def torch_route_parser():
    """As export/to_onnx.py builds the torch subcommand (it imports every route, some written elsewhere)."""
    import argparse

    from hnseg_export import from_torch

    parser = argparse.ArgumentParser()
    from_torch.add_arguments(parser)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    return parser
