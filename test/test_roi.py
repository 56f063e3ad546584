"""ROI location on phantoms of every field of view, under flipped/permuted CT directions, and with no head."""

import numpy as np
import pytest

from builders import signed_permutations
from hnseg_infer.errors import RecipeError
from hnseg_infer.phantom import make_phantom
from hnseg_infer.roi import locate_roi

FAST = {"ct_spacing_xyz_mm": (3.0, 3.0, 3.0), "ct_size_xy": 170, "pet_spacing_xyz_mm": (5.0, 5.0, 5.0)}
HEAD_METHODS = ["brain_peak_head_crop", "pet_threshold_head_neck_box"]


def contains(box, point_xyz_mm, margin_mm=0.0) -> bool:
    lo = np.asarray(box.corner_xyz_mm) + margin_mm
    return bool(np.all(point_xyz_mm >= lo) and np.all(point_xyz_mm <= lo + box.size_xyz_mm - 2 * margin_mm))


@pytest.fixture(scope="module")
def phantoms():
    return {fov: make_phantom(seed=3, fov=fov, **FAST) for fov in ("head-only", "head-neck", "whole-body", "no-head")}


@pytest.mark.parametrize("method", HEAD_METHODS)
@pytest.mark.parametrize("fov", ["head-only", "head-neck", "whole-body"])
def test_head_box_holds_the_tumour_and_nodes_not_the_bladder(phantoms, method, fov):
    phantom = phantoms[fov]
    roi = locate_roi(method, ct=phantom.ct, pet=phantom.pet, suv_per_stored_value=1.0, params={})
    assert not roi.fell_back and roi.warnings == ()
    for shape in phantom.shapes:
        if shape.label:  # tumour and nodes, with a 5 mm margin
            assert contains(roi.box, np.asarray(shape.center), 5.0), (shape, roi.box)
    assert roi.box.corner_xyz_mm[2] > -500  # nowhere near the heart (-470 mm) centre's far side or the bladder (-800 mm)
    assert roi.box.corner_xyz_mm[2] + roi.box.size_xyz_mm[2] > -20  # starts at the top of the head


@pytest.mark.parametrize("method", HEAD_METHODS)
def test_same_box_under_any_ct_direction(method):
    reference = None
    for direction in signed_permutations()[::5]:
        phantom = make_phantom(seed=3, fov="head-neck", ct_direction=direction, **FAST)
        box = locate_roi(method, ct=phantom.ct, pet=phantom.pet, suv_per_stored_value=1.0, params={}).box
        reference = reference or box
        assert np.allclose(box.corner_xyz_mm, reference.corner_xyz_mm, atol=6.0)
        assert np.allclose(box.size_xyz_mm, reference.size_xyz_mm, atol=6.0)


@pytest.mark.parametrize("method", HEAD_METHODS)
def test_no_head_falls_back_with_a_warning(phantoms, method):
    phantom = phantoms["no-head"]
    roi = locate_roi(method, ct=phantom.ct, pet=phantom.pet, suv_per_stored_value=1.0, params={})
    assert roi.fell_back and "found no head" in roi.warnings[0]
    assert contains(roi.box, np.asarray(phantom.tumour_center_xyz_mm))


def test_bqml_pet_gives_the_same_box_with_its_factor():
    suv = make_phantom(seed=4, fov="head-neck", **FAST)
    bqml = make_phantom(seed=4, fov="head-neck", pet_unit="bqml", **FAST)
    a = locate_roi("pet_threshold_head_neck_box", ct=suv.ct, pet=suv.pet, suv_per_stored_value=1.0, params={})
    b = locate_roi("pet_threshold_head_neck_box", ct=bqml.ct, pet=bqml.pet, suv_per_stored_value=1 / 5000, params={})
    assert np.allclose(a.box.corner_xyz_mm, b.box.corner_xyz_mm, atol=1e-3)


def test_brain_peak_crop_size_and_fixed_box():
    phantom = make_phantom(seed=5, fov="whole-body", **FAST)
    roi = locate_roi("brain_peak_head_crop", ct=phantom.ct, pet=phantom.pet, suv_per_stored_value=1.0, params={})
    assert roi.box.size_xyz_mm == (256.0, 256.0, 336.0) and roi.record["anchored"] in ("top", "peak")
    fixed = locate_roi("fixed_box", ct=phantom.ct, pet=phantom.pet, suv_per_stored_value=1.0, params={},
                       point_xyz_mm=(1.0, 2.0, -150.0))
    assert np.allclose(fixed.box.center_xyz_mm, (1, 2, -150)) and fixed.box.size_xyz_mm == (144.0, 144.0, 144.0)
    with pytest.raises(RecipeError, match="needs a point"):
        locate_roi("fixed_box", ct=phantom.ct, pet=phantom.pet, suv_per_stored_value=1.0, params={})


def test_unknown_parameter_is_a_recipe_error(phantoms):
    phantom = phantoms["head-neck"]
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['threshold'\]"):
        locate_roi("pet_threshold_head_neck_box", ct=phantom.ct, pet=phantom.pet, suv_per_stored_value=1.0,
                   params={"threshold": 2})
