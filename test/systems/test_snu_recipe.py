"""The SNU recipe end to end (DESIGN §5, PET-guided preprocessing + PSAM U-Net): an SNUNet with small random weights
exported by export/to_onnx.py's torch route (export/make_snu_random.py), run by process.py on a head-and-neck
phantom. Asserts the structure: the brain-peak head crop of 256×256×(112×3) mm, one 256×256×112 model grid at
1×1×3 mm, SNU's normalisations and interpolations, the paste-back restoration, the sidecar, and a mask of labels
0/1/2 on exactly the CT grid."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import GC_OUTPUT, REPO, SMALL_PHANTOM, run_container

from hnseg_infer.geometry.grid import Box, Grid
from hnseg_infer.io.sidecar import redo_paste_back
from hnseg_infer.recipe.load import load_recipe
from hnseg_infer.tools.phantom import make_phantom, write_case

pytestmark = pytest.mark.torch


def _make_snu_random():
    spec = importlib.util.spec_from_file_location("make_snu_random", REPO / "export" / "make_snu_random.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def snu_weights(tmp_path_factory) -> Path:
    """The torch route, proof included (~10-30 s on 2 cores: one full 256×256×112 batch in PyTorch and ONNX)."""
    return _make_snu_random().make(tmp_path_factory.mktemp("snu") / "snu-random", seed=0)


def test_the_exported_recipe_is_snus(snu_weights):
    recipe = load_recipe(snu_weights)
    (stage,) = recipe.stages
    assert stage.roi.method == "brain_peak_head_crop" and stage.restore == "paste_nearest"
    assert stage.roi.params["window_xy_mm"] == 256 and stage.roi.params["n_slices"] == 112
    (model,) = stage.models
    assert model.grid.spacing_xyz_mm == (1.0, 1.0, 3.0) and model.tiling.patch_size_zyx == (112, 256, 256)
    ct, pet = model.channels
    assert (ct.source, ct.interpolation, pet.source, pet.interpolation) == ("ct", "bspline", "pet", "linear")
    assert [op.name for op in ct.ops] == ["clip", "scale", "sigmoid"]
    assert (ct.ops[0].min, ct.ops[0].max, ct.ops[1].factor) == (-1000, 1000, 0.001)
    assert [op.to_json() for op in pet.ops] == [{"op": "zscore", "over": "all"}, {"op": "sigmoid"}]
    assert model.provenance["source"]["module"] == "hnseg_export.snu:SNUNet"
    assert all(proof["fp32"]["passed"] for proof in model.provenance["proof"].values())


@pytest.fixture(scope="module")
def snu_run(snu_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("snu_case")
    phantom = make_phantom(seed=3, fov="head-neck", **SMALL_PHANTOM)
    write_case(phantom, root / "case")
    out, report, sidecar = root / "output", root / "report.json", root / "side" / "case.json"
    code = run_container(root / "case" / "input", out, snu_weights, report, "--sidecar", sidecar)
    ct_path = next((root / "case" / "input" / "images" / "ct").glob("*.mha"))
    return {"code": code, "mask": out / GC_OUTPUT,
            "report": json.loads(report.read_text()), "sidecar": sidecar, "ct": sitk.ReadImage(str(ct_path)),
            "output": out}


def test_snu_runs_end_to_end_from_process_py(snu_run):
    assert snu_run["code"] == 0
    assert sorted(p.relative_to(snu_run["output"]).as_posix() for p in snu_run["output"].rglob("*") if p.is_file()) \
        == ["images/tumor-lymph-node-segmentation/output.mha"]
    mask, ct = sitk.ReadImage(str(snu_run["mask"])), snu_run["ct"]
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert Grid.of(mask).same_as(Grid.of(ct), tol=0)
    values = sitk.GetArrayFromImage(mask)
    assert set(np.unique(values)) <= {0, 1, 2}
    # labels only inside the ROI box (background outside)
    box = Box.from_dict(snu_run["report"]["roi"]["box"])
    centres = Grid.of(ct).index_to_physical(np.argwhere(values > 0)[:, ::-1])
    lo, hi = np.asarray(box.corner_xyz_mm), np.asarray(box.corner_xyz_mm) + box.size_xyz_mm
    assert np.all((centres >= lo) & (centres <= hi))


def test_snu_crop_is_the_brain_peak_head_crop(snu_run):
    report = snu_run["report"]
    roi = report["roi"]
    assert roi["method"] == "brain_peak_head_crop" and not roi["fell_back"] and report["warnings"] == []
    assert roi["box"]["size_xyz_mm"] == [256.0, 256.0, 336.0]  # 256 × 256 mm, 112 slices of 3 mm
    record = roi["record"]
    # SNU's anchoring rule, as recorded: the top of uptake when the top slice is hot or the brain peak is near the
    # top, else the peak; the box's superior face is at the anchor
    anchored_top = record["top_slice_mean_suv"] > 0.1 or record["peak_index_slices"] <= 50
    assert record["anchored"] == ("top" if anchored_top else "peak")
    anchor = record["top_uptake_z_mm"] if anchored_top else record["peak_z_mm"]
    assert record["superior_z_mm"] == anchor
    assert roi["box"]["corner_xyz_mm"][2] + 336.0 == pytest.approx(anchor)
    assert roi["box"]["center_xyz_mm"][:2] == pytest.approx(record["centroid_xy_mm"], abs=1e-3)
    (model,) = report["stages"][0]["models"]
    assert model["grid"]["size_xyz"] == [256, 256, 112] and model["grid"]["spacing_xyz_mm"] == [1.0, 1.0, 3.0]
    assert model["patch_size_zyx"] == [112, 256, 256]  # one window: the whole crop
    assert {"locate_roi", "snu: sample_and_normalise", "snu: sliding_window", "restore_to_ct_and_decode",
            "sidecar", "write"} <= set(report["stages_s"])


def test_snu_sidecar_redoes_the_paste_back(snu_run):
    sidecar = json.loads(snu_run["sidecar"].read_text())
    assert sidecar["restore"] == "paste_nearest" and sidecar["roi"] == snu_run["report"]["roi"]
    (model,) = sidecar["models"]
    assert model["grid"]["size_xyz"] == [256, 256, 112]
    # the crop's index ranges in the 3 mm CT: 256 / 3 ≈ 85 voxels in-plane, 336 / 3 = 112 slices (or fewer where
    # the crop reaches beyond the CT: then its bounds say so)
    ct_range = model["ct_index_range"]
    extent = np.asarray(ct_range["stop_xyz"]) - ct_range["start_xyz"]
    assert np.all(np.abs(extent[:2] - 256 / 3) <= 1) and extent[2] <= 112
    redone = redo_paste_back(snu_run["sidecar"])
    mask = sitk.ReadImage(str(snu_run["mask"]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(redone), sitk.GetArrayFromImage(mask))
