"""A three-stage cascade (localise → coarse → fine ensemble) end to end, with analytic PET-threshold models: each
stage's ROI comes from the labels of the stage before, in physical space, whatever the CT's direction."""

import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
from builders import (
    PET_THRESHOLD_MODEL,
    label_centroid_index_xyz,
    make_case,
    model_entry,
    oblique_direction,
    save_linear_model,
)
from conftest import LESION_CENTER_XYZ_MM, LESION_RADIUS_MM, small_case

from hnseg_infer.errors import RecipeError
from hnseg_infer.geometry.grid import Grid
from hnseg_infer.recipe.load import load_recipe
from hnseg_infer.segmenter import Segmenter

REGION_MODEL = {"weight": [[0, 0], [0, 2.0]], "bias": [0, -10.0]}  # label 1 where SUV > 5
NOTHING_MODEL = {"weight": [[0, 0], [0, 0]], "bias": [0, -10.0]}  # never label 1
FINE_CUBE_MM = 30.0


def cascade(coarse_model=REGION_MODEL) -> dict:
    return {"schema_version": 1, "name": "cascade", "stages": [
        {"name": "localise", "roi": {"method": "ct_top", "params": {"size_mm": [60, 60, 40]}},
         "models": [model_entry(name="localiser", files=["localiser.onnx"], spacing_xyz_mm=[4.0, 4.0, 4.0],
                                head={"type": "softmax", "labels": [0, 1]})]},
        {"name": "coarse", "roi": {"method": "labels_bbox", "params": {"margin_mm": 6}},
         "models": [model_entry(name="coarse", files=["coarse.onnx"], head={"type": "softmax", "labels": [0, 1]})]},
        {"name": "fine", "roi": {"method": "labels_centroid_cube", "params": {"size_mm": [FINE_CUBE_MM] * 3}},
         "models": [model_entry(name="fine_lps", files=["fine_a.onnx"], spacing_xyz_mm=[1.0, 1.0, 1.0]),
                    model_entry(name="fine_ct", files=["fine_b.onnx"], orientation="ct",
                                spacing_xyz_mm=[1.5, 2.0, 3.0], patch_size_zyx=[8, 16, 16])],
         "postprocess": {"keep_largest_gtvp": True}}]}


def write_cascade(folder, recipe: dict, models: dict) -> object:
    folder.mkdir(parents=True, exist_ok=True)
    for name, linear in models.items():
        save_linear_model(folder / f"{name}.onnx", linear["weight"], linear["bias"])
    (folder / "recipe.json").write_text(json.dumps(recipe))
    return load_recipe(folder)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    linear = {"localiser": REGION_MODEL, "coarse": REGION_MODEL, "fine_a": PET_THRESHOLD_MODEL,
              "fine_b": PET_THRESHOLD_MODEL}
    return {"finds": write_cascade(root / "finds", cascade(), linear),
            "misses": write_cascade(root / "misses", cascade(), {**linear, "coarse": NOTHING_MODEL})}


@pytest.mark.parametrize("direction", [(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), (0, 0, -1.0, -1.0, 0, 0, 0, 1.0, 0),
                                       oblique_direction()])
def test_each_stage_narrows_the_roi_onto_the_lesion(direction, weights):
    ct, pet = small_case(ct_direction=direction)
    prediction = Segmenter(weights["finds"], device="cpu").predict_case(make_case(ct, pet))
    report = prediction.report.data
    assert [s["name"] for s in report["stages"]] == ["localise", "coarse", "fine"]
    localise, coarse, fine = (s["roi"] for s in report["stages"])
    assert [localise["method"], coarse["method"], fine["method"]] == ["ct_top", "labels_bbox", "labels_centroid_cube"]
    assert not any(s["fell_back"] for s in (localise, coarse, fine))
    # the coarse box holds the lesion found by the 4 mm localiser, and is smaller than the localiser's box
    coarse_lo = np.asarray(coarse["box"]["corner_xyz_mm"])
    coarse_hi = coarse_lo + coarse["box"]["size_xyz_mm"]
    assert np.all(coarse_lo < LESION_CENTER_XYZ_MM - LESION_RADIUS_MM + 6)
    assert np.all(coarse_hi > LESION_CENTER_XYZ_MM + LESION_RADIUS_MM - 6)
    assert np.prod(coarse["box"]["size_xyz_mm"]) < np.prod(localise["box"]["size_xyz_mm"]) / 3
    # the fine cube is centred on the lesion as the 2 mm coarse model labels it
    assert fine["box"]["size_xyz_mm"] == [FINE_CUBE_MM] * 3
    assert np.allclose(fine["box"]["center_xyz_mm"], LESION_CENTER_XYZ_MM, atol=1.0)
    assert report["roi"] == fine
    fine_models = report["stages"][2]["models"]
    assert [m["grid"]["spacing_xyz_mm"][:2] for m in fine_models] == [[1.0, 1.0], [1.5, 2.0]]
    assert report["stages"][1]["labels"]["GTVp"]["components"] == 1
    assert {"localise: locate_roi", "localise: localiser: sliding_window", "localise: decode", "coarse: decode",
            "fine: fine_ct: sliding_window", "restore_to_ct_and_decode", "postprocess"} <= set(report["stages_s"])
    # the mask: the lesion, where it is, on exactly the CT grid
    mask = prediction.mask
    assert Grid.of(mask).same_as(Grid.of(ct))
    expected_index = Grid.of(ct).physical_to_index(LESION_CENTER_XYZ_MM)[0]
    assert np.all(np.abs(label_centroid_index_xyz(mask, 1) - expected_index) < 1.0)
    assert set(np.unique(sitk.GetArrayFromImage(mask))) == {0, 1}


def test_a_coarse_stage_that_finds_nothing_falls_back_to_the_head_crop(weights):
    ct, pet = small_case()
    report = Segmenter(weights["misses"], device="cpu").predict_case(make_case(ct, pet)).report.data
    fine = report["stages"][2]["roi"]
    assert fine["fell_back"] and fine["record"]["fallback"] == "brain_peak_head_crop"
    assert any("'coarse' labelled nothing" in w for w in report["warnings"])
    assert report["stages"][1]["labels"]["GTVp"]["voxels"] == 0


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["stages"][0].update(roi={"method": "labels_bbox"}), "first stage"),
    (lambda r: r["stages"][1].update(name="localise"), "stage name(s) ['localise'] used more than once"),
    (lambda r: r["stages"][2]["models"][1].update(name="coarse"), "model name(s) ['coarse'] used more than once"),
    (lambda r: r["stages"][1].update(extra=1), "unknown key(s) ['extra']"),
    (lambda r: r.update(stages=[]), "'stages' is empty"),
    (lambda r: r.update(models=[]), "unknown key(s) ['models']"),
])
def test_bad_cascades_are_recipe_errors(tmp_path, mutate, message):
    recipe = cascade()
    mutate(recipe)
    linear = dict.fromkeys(("localiser", "coarse", "fine_a", "fine_b"), REGION_MODEL)
    with pytest.raises(RecipeError, match=re.escape(message)):
        write_cascade(tmp_path, recipe, linear)
