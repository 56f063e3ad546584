"""Masks agree voxel for voxel with masks committed with the test (test/golden_masks/), so that a restructuring
that should change no mask is seen to change none. The cases: the demo cascade (its weights, with mirroring off and
tiles without overlap to keep the suite fast: every code path of the full recipe) on six phantoms (every field of
view, both PET units, identity, flipped, permuted and oblique CT directions, anisotropic spacings, shifted
origins) and the SUV baseline on two of them. At most 0.1 % of the voxels that either mask labels may differ
(floating-point reordering); a change beyond that is a change of behaviour.

Regenerate the committed masks (only when a change of masks is intended, and say so in the commit):
    .venv/bin/python test/test_same_masks.py --write
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from hnseg_infer.segmenter import Segmenter  # noqa: E402
from hnseg_infer.tools.phantom import make_phantom  # noqa: E402

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "golden_masks"
MAX_DIFFERING_FRACTION = 1e-3
BACKEND = "onnxruntime"  # the committed masks' backend
OBLIQUE = (0.9848077530, -0.1736481777, 0.0, 0.1736481777, 0.9848077530, 0.0, 0.0, 0.0, 1.0)  # 10° about z
FLIP_XY = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # stored RAS-wise
PERMUTED = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # array x along patient y, slices running feet-wards

# name: make_phantom keywords (small CTs keep the suite fast; the models' grids are in mm, so they see the same)
PHANTOMS = {
    "head_neck_suv": dict(seed=101, fov="head-neck", ct_spacing_xyz_mm=(1.8, 1.8, 2.5), ct_size_xy=280),
    "head_only_bqml_oblique": dict(seed=102, fov="head-only", pet_unit="bqml", ct_spacing_xyz_mm=(1.5, 1.7, 3.0),
                                   ct_size_xy=300, ct_direction=OBLIQUE, pet_spacing_xyz_mm=(3.5, 3.5, 3.0)),
    "whole_body_suv_flipped": dict(seed=103, fov="whole-body", ct_spacing_xyz_mm=(2.0, 2.0, 3.3), ct_size_xy=256,
                                   ct_direction=FLIP_XY, ct_origin_shift_mm=(7.0, -11.0, 4.0)),
    "no_head_bqml": dict(seed=104, fov="no-head", pet_unit="bqml", ct_spacing_xyz_mm=(1.9, 1.9, 2.0),
                         ct_size_xy=260),
    "head_neck_bqml_permuted": dict(seed=105, fov="head-neck", pet_unit="bqml", ct_spacing_xyz_mm=(1.6, 2.1, 2.7),
                                    ct_size_xy=280, ct_direction=PERMUTED, pet_spacing_xyz_mm=(5.0, 5.0, 4.0)),
    "whole_body_bqml_shifted": dict(seed=106, fov="whole-body", pet_unit="bqml", ct_spacing_xyz_mm=(2.2, 2.2, 3.0),
                                    ct_size_xy=240, ct_origin_shift_mm=(-13.0, 9.0, -5.0)),
}
# (weights, phantom) pairs; "suv_baseline" is written by export/make_suv_baseline.py into a temporary folder
CASES = [("demo", name) for name in PHANTOMS] + [("suv_baseline", "head_neck_suv"),
                                                  ("suv_baseline", "whole_body_suv_flipped")]


def write_phantom(name: str, folder: Path) -> tuple[Path, Path]:
    phantom = make_phantom(**PHANTOMS[name])
    folder.mkdir(parents=True, exist_ok=True)
    ct, pet = folder / f"{name}_ct.mha", folder / f"{name}_pet.mha"
    sitk.WriteImage(sitk.Cast(sitk.Round(phantom.ct), sitk.sitkInt16), str(ct), useCompression=True)
    sitk.WriteImage(phantom.pet, str(pet), useCompression=True)
    return ct, pet


def fast_demo_weights(folder: Path) -> Path:
    """The demo recipe with mirroring off and tiles that do not overlap, beside links to the demo's models."""
    import json

    demo = REPO / "weights" / "demo"
    recipe = json.loads((demo / "recipe.json").read_text())
    for stage in recipe["stages"]:
        for model in stage["models"]:
            model["mirror_axes_zyx"] = []
            if model.get("tiling") == "monai":
                model["overlap"] = 0.0
            else:
                model["step_fraction"] = 1.0
    folder.mkdir(parents=True, exist_ok=True)
    for onnx in demo.glob("*.onnx"):
        (folder / onnx.name).symlink_to(onnx)
    (folder / "recipe.json").write_text(json.dumps(recipe, indent=1))
    return folder


def suv_baseline_weights(folder: Path) -> Path:
    import subprocess

    subprocess.run([sys.executable, str(REPO / "export" / "make_suv_baseline.py"), "--out", str(folder)], check=True,
                   capture_output=True)
    return folder


def predict(segmenter: Segmenter, ct: Path, pet: Path) -> sitk.Image:
    return segmenter.predict(ct, pet).mask


def differing(mask: sitk.Image, golden: sitk.Image) -> tuple[int, int]:
    """(voxels whose label differs, voxels either mask labels)."""
    a, b = sitk.GetArrayViewFromImage(mask), sitk.GetArrayViewFromImage(golden)
    return int(np.count_nonzero(a != b)), int(np.count_nonzero((a > 0) | (b > 0)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("same_masks")
    # onnxruntime, as the masks were committed: OpenVINO, the default CPU backend, is compared with it elsewhere
    # (docs/backends.md; bench/openvino_masks.py gives its figures on these cases)
    return {"root": root, "segmenters": {"demo": Segmenter.from_weights(fast_demo_weights(root / "demo"), device="cpu",
                                                                        backend=BACKEND),
                                         "suv_baseline": Segmenter.from_weights(suv_baseline_weights(root / "suv"),
                                                                                device="cpu", backend=BACKEND)}}


@pytest.mark.parametrize("weights_name,phantom", CASES, ids=[f"{w}-{p}" for w, p in CASES])
def test_mask_matches_the_committed_mask(inputs, weights_name, phantom):
    ct, pet = write_phantom(phantom, inputs["root"] / "cases")
    mask = predict(inputs["segmenters"][weights_name], ct, pet)  # models loaded once for all cases
    golden = sitk.ReadImage(str(GOLDEN / f"{weights_name}-{phantom}.mha"))
    ct_image = sitk.ReadImage(str(ct))
    for key in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):  # exactly the CT grid, as committed
        assert getattr(mask, key)() == getattr(golden, key)() == getattr(ct_image, key)()
    n_differ, n_labelled = differing(mask, golden)
    assert n_labelled > 0, "the committed mask and the prediction are both empty: the case tests nothing"
    assert n_differ <= MAX_DIFFERING_FRACTION * n_labelled, (
        f"{n_differ} of {n_labelled} labelled voxels differ from test/golden_masks/{weights_name}-{phantom}.mha")


def _write_all() -> None:
    import tempfile

    GOLDEN.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        segmenters = {"demo": Segmenter.from_weights(fast_demo_weights(Path(tmp) / "demo"), device="cpu",
                                                     backend=BACKEND),
                      "suv_baseline": Segmenter.from_weights(suv_baseline_weights(Path(tmp) / "suv"), device="cpu",
                                                             backend=BACKEND)}
        for weights_name, phantom in CASES:
            ct, pet = write_phantom(phantom, Path(tmp) / "cases")
            mask = predict(segmenters[weights_name], ct, pet)
            sitk.WriteImage(mask, str(GOLDEN / f"{weights_name}-{phantom}.mha"), useCompression=True)
            counts = np.bincount(sitk.GetArrayViewFromImage(mask).ravel(), minlength=3)
            print(f"{weights_name}-{phantom}: GTVp {counts[1]} voxels, GTVn {counts[2]} voxels")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    _write_all()
