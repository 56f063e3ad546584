"""End to end in-process: a lesion placed in physical space comes back on the CT grid where it belongs,
whatever the CT's direction, origin and spacing, and whatever grid the model runs on."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from builders import (
    label_centroid_index_xyz,
    make_case,
    model_entry,
    oblique_direction,
    save_linear_model,
    signed_permutations,
    write_weights,
)
from conftest import LESION_CENTER_XYZ_MM, small_case

from hnseg_infer.channels.intensity import validate_ops
from hnseg_infer.geometry.grid import Grid
from hnseg_infer.io.images import Case, detect_pet_unit
from hnseg_infer.recipe.load import load_recipe
from hnseg_infer.recipe.spec import GridSpec
from hnseg_infer.segmenter import Segmenter


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
    prediction = Segmenter(recipes[orientation], device="cpu").predict_case(make_case(ct, pet))
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
    report = Segmenter(recipes["lps"], device="cpu").predict_case(make_case(ct, pet)).report.data
    assert report["roi"]["method"] == "ct_extent"
    (stage,) = report["stages"]
    assert stage["name"] == "main" and stage["roi"] == report["roi"]
    assert [m["name"] for m in stage["models"]] == ["pet_threshold"]
    assert stage["models"][0]["grid"]["spacing_xyz_mm"] == [2.0, 2.0, 2.0]
    assert {"load_models", "locate_roi", "pet_threshold: sliding_window", "restore_to_ct_and_decode",
            "postprocess"} <= set(report["stages_s"])
    assert report["labels"]["GTVp"]["components"] == 1 and report["labels"]["GTVn"]["voxels"] == 0


def test_heterogeneous_ensemble_softmax_and_sigmoid_models(tmp_path):
    """Two models with their own spacing, orientation, patch and head, combined on the CT voxels of the ROI."""
    softmax = model_entry(name="softmax_2mm", files=["a.onnx"], fold_average="logits")
    sigmoid = model_entry(name="sigmoid_regions", files=["b_fold0.onnx", "b_fold1.onnx"], orientation="ct",
                          spacing_xyz_mm=[1.5, 2.0, 3.0], patch_size_zyx=[8, 24, 20], mirror_axes_zyx=[0, 2],
                          head={"type": "sigmoid", "regions": [[1, 2], [2]], "region_labels": [1, 2]})
    folder = write_weights(tmp_path, models=[softmax])
    # region {1,2}: SUV > 5; region {2}: never. Same linear form, two outputs.
    for name in ("b_fold0.onnx", "b_fold1.onnx"):
        save_linear_model(folder / name, [[0, 2.0], [0, 0]], [-10.0, -10.0])
    folder = write_weights(tmp_path, models=[softmax, sigmoid])
    recipe = load_recipe(folder)
    ct, pet = small_case(ct_direction=signed_permutations()[21])
    prediction = Segmenter(recipe, device="cpu").predict_case(make_case(ct, pet))
    report = prediction.report.data
    assert [m["name"] for m in report["stages"][0]["models"]] == ["softmax_2mm", "sigmoid_regions"]
    assert report["stages"][0]["models"][1]["grid"]["spacing_xyz_mm"] == [1.5, 2.0, 3.0]
    assert report["stages"][0]["models"][1]["grid"]["direction"] == list(ct.GetDirection())
    expected_index = Grid.of(ct).physical_to_index(LESION_CENTER_XYZ_MM)[0]
    assert np.all(np.abs(label_centroid_index_xyz(prediction.mask, 1) - expected_index) < 1.0)
    assert set(np.unique(sitk.GetArrayFromImage(prediction.mask))) == {0, 1}


@pytest.mark.parametrize("direction", [signed_permutations()[13], oblique_direction()])
def test_ops_before_sampling_clip_the_native_voxels_first(direction):
    """An air/body edge (−1000 | 30 HU) sampled halfway between two voxels with a clip to [−150, 250]: clipping
    first (nnU-Net's order) gives the mean of −150 and 30; sampling first gives the clip of −485."""
    from hnseg_infer.channels.build import build_input
    from hnseg_infer.recipe.spec import ChannelSpec

    ct = sitk.GetImageFromArray(np.where(np.arange(8) < 4, -1000.0, 30.0)[None, None, :].repeat(4, 0).repeat(4, 1)
                                .astype(np.float32))
    ct.SetSpacing((2.0, 1.5, 3.0))
    ct.SetDirection(direction)
    ct.SetOrigin((5.0, -7.0, 11.0))
    native = Grid.of(ct)
    # one voxel halfway between x indices 3 and 4 (the edge), at y 1, z 2
    centre = native.index_to_physical([3.5, 1.0, 2.0])[0]
    grid = Grid((1, 1, 1), (1.0, 1.0, 1.0), tuple(centre.tolist()), direction)
    case = Case(ct, ct, Path("ct.mha"), Path("pet.mha"), detect_pet_unit(ct))
    clip = validate_ops([{"op": "clip", "min": -150.0, "max": 250.0}], source="ct", where="test")

    class Spec:  # build_input reads only the grid's resampling and the channels
        grid = GridSpec((1.0, 1.0, 1.0))
        channels = (ChannelSpec("ct", "linear", clip, ops_before_sampling=True), ChannelSpec("ct", "linear", clip))

    before, after = build_input(case, grid, Spec).reshape(2)
    assert before == pytest.approx((-150.0 + 30.0) / 2, abs=1e-3)
    assert after == pytest.approx(-150.0)
