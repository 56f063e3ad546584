"""End to end in-process: a lesion placed in physical space comes back on the CT grid where it belongs,
whatever the CT's direction, origin and spacing, and whatever grid the model runs on."""

import numpy as np
import pytest
import SimpleITK as sitk

from builders import model_entry, oblique_direction, signed_permutations, write_weights
from conftest import LESION_CENTER_XYZ_MM, small_case
from hnseg_infer.grid import Grid
from hnseg_infer.io import Case, detect_pet_unit
from hnseg_infer.pipeline import predict_case
from hnseg_infer.recipe import load_recipe


def make_case(ct, pet) -> Case:
    return Case(ct, pet, ct_path=__import__("pathlib").Path("ct.mha"), pet_path=__import__("pathlib").Path("pet.mha"),
                pet_unit=detect_pet_unit(pet))


def label_centroid_index_xyz(mask: sitk.Image, label: int) -> np.ndarray:
    zyx = np.argwhere(sitk.GetArrayFromImage(mask) == label)
    assert len(zyx), f"label {label} not found"
    return zyx.mean(axis=0)[::-1]


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("w")
    return {
        "lps": load_recipe(write_weights(root / "lps")),
        "ct": load_recipe(write_weights(root / "ct", models=[model_entry(orientation="ct",
                                                                         spacing_xyz_mm=[1.5, 2.0, 3.0])])),
    }


@pytest.mark.parametrize("direction", signed_permutations() + [oblique_direction()])
@pytest.mark.parametrize("orientation", ["lps", "ct"])
def test_lesion_comes_back_where_it_is(direction, orientation, recipes):
    ct, pet = small_case(ct_direction=direction)
    prediction = predict_case(make_case(ct, pet), recipes[orientation], device="cpu")
    mask = prediction.mask
    assert Grid.of(mask).same_as(Grid.of(ct), tol=0.0)
    expected_index = Grid.of(ct).physical_to_index(LESION_CENTER_XYZ_MM)[0]
    error = np.abs(label_centroid_index_xyz(mask, 1) - expected_index)
    assert np.all(error < 1.0), (error, expected_index)
    # the segmented volume is the sphere's (4/3·π·7³ ≈ 1437 mm³) within the partial-volume error of a 2-3 mm grid
    volume = (sitk.GetArrayFromImage(mask) == 1).sum() * np.prod(ct.GetSpacing())
    assert 1000 < volume < 1900, volume


def test_report_records_stages_grids_and_labels(recipes):
    ct, pet = small_case()
    report = predict_case(make_case(ct, pet), recipes["lps"], device="cpu").report.data
    assert report["roi"]["method"] == "ct_extent"
    assert [m["name"] for m in report["models"]] == ["pet_threshold"]
    assert report["models"][0]["grid"]["spacing_xyz_mm"] == [2.0, 2.0, 2.0]
    assert {"load_models", "locate_roi", "pet_threshold: sliding_window", "decode_and_postprocess"} <= set(report["stages_s"])
    assert report["labels"]["GTVp"]["components"] == 1 and report["labels"]["GTVn"]["voxels"] == 0
