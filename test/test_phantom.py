"""The synthetic PET/CT phantom: determinism, grids, the same anatomy under any CT geometry, the GC layout."""

import numpy as np
import pytest
import SimpleITK as sitk
from builders import signed_permutations

from hnseg_infer.grid import Grid
from hnseg_infer.phantom import (
    BLADDER_CENTER_XYZ_MM,
    BQML_PER_SUV,
    BRAIN_CENTER_XYZ_MM,
    FOV_Z_RANGE_MM,
    make_phantom,
    write_case,
)

FAST = {"ct_spacing_xyz_mm": (3.0, 3.0, 3.0), "ct_size_xy": 170, "pet_spacing_xyz_mm": (5.0, 5.0, 5.0)}
SKULL_POINT_XYZ_MM = (64.0, 6.0, -80.0)  # between the brain (x ≤ 59 there) and the skull's outside (x ≤ 68)
AIR_POINT_XYZ_MM = (0.0, -200.0, -80.0)  # in front of the face


def label_centroid_xyz_mm(phantom, value: int) -> np.ndarray:
    zyx = np.argwhere(sitk.GetArrayFromImage(phantom.label) == value).mean(axis=0)
    return Grid.of(phantom.label).index_to_physical(zyx[::-1])[0]


def ct_at(phantom, point_xyz_mm) -> float:
    return phantom.ct.EvaluateAtPhysicalPoint(tuple(map(float, point_xyz_mm)), sitk.sitkNearestNeighbor)


def test_deterministic_from_the_seed():
    a, b, c = (make_phantom(seed=s, **FAST) for s in (2, 2, 3))
    for image in ("ct", "pet", "label"):
        assert np.array_equal(sitk.GetArrayFromImage(getattr(a, image)), sitk.GetArrayFromImage(getattr(b, image)))
    assert c.tumour_center_xyz_mm != a.tumour_center_xyz_mm
    assert not np.array_equal(sitk.GetArrayFromImage(a.ct), sitk.GetArrayFromImage(c.ct))


def test_label_on_the_ct_grid_tumour_where_it_was_placed_and_hot():
    p = make_phantom(seed=2, **FAST)
    assert Grid.of(p.label) == Grid.of(p.ct) and Grid.of(p.pet) != Grid.of(p.ct)
    assert p.label.GetPixelID() == sitk.sitkUInt8 and p.ct.GetPixelID() == p.pet.GetPixelID() == sitk.sitkFloat32
    assert set(np.unique(sitk.GetArrayFromImage(p.label))) == {0, 1, 2}  # seed 2 has nodes
    assert np.linalg.norm(label_centroid_xyz_mm(p, 1) - p.tumour_center_xyz_mm) < 3.0
    pet = lambda point: p.pet.EvaluateAtPhysicalPoint(tuple(map(float, point)), sitk.sitkLinear)
    assert pet(p.tumour_center_xyz_mm) > 3.0 and pet(BRAIN_CENTER_XYZ_MM) > 6.0 and pet(AIR_POINT_XYZ_MM) < 0.2
    assert 20 < ct_at(p, BRAIN_CENTER_XYZ_MM) < 80 and ct_at(p, SKULL_POINT_XYZ_MM) > 600
    assert ct_at(p, AIR_POINT_XYZ_MM) < -900


DIRECTIONS = {"flip-z": (1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0), "permuted": signed_permutations()[13],
              "permuted-flipped": signed_permutations()[42]}


@pytest.mark.parametrize("direction", list(DIRECTIONS.values()), ids=list(DIRECTIONS))
def test_same_anatomy_under_a_flipped_or_permuted_direction_and_offset_origin(direction):
    shift = (7.0, -11.0, 13.0)
    a = make_phantom(seed=2, **FAST)
    b = make_phantom(seed=2, ct_direction=direction, ct_origin_shift_mm=shift, **FAST)
    assert b.ct.GetDirection() == direction and Grid.of(b.label) == Grid.of(b.ct)
    assert np.allclose(np.subtract(Grid.of(b.ct).box().center_xyz_mm, Grid.of(a.ct).box().center_xyz_mm), shift)
    for value in (1, 2):
        assert np.linalg.norm(label_centroid_xyz_mm(a, value) - label_centroid_xyz_mm(b, value)) < 2.0
    for point, (lo, hi) in ((BRAIN_CENTER_XYZ_MM, (0, 70)), (SKULL_POINT_XYZ_MM, (600, 800)),
                            (AIR_POINT_XYZ_MM, (-1100, -900))):
        assert lo < ct_at(b, point) < hi, point
    assert np.array_equal(sitk.GetArrayFromImage(a.pet), sitk.GetArrayFromImage(b.pet))  # PET has its own grid


@pytest.mark.parametrize("fov", ["head-only", "head-neck", "whole-body", "no-head"])
def test_field_of_view_sets_the_z_extent_and_the_anatomy(fov):
    p = make_phantom(seed=1, fov=fov, ct_spacing_xyz_mm=(4.0, 4.0, 5.0), ct_size_xy=128,
                     pet_spacing_xyz_mm=(6.0, 6.0, 6.0))
    z_lo, z_hi = FOV_Z_RANGE_MM[fov]
    assert p.ct.GetSize()[2] == round((z_hi - z_lo) / 5.0)
    pet_box, ct_box = Grid.of(p.pet).box(), Grid.of(p.ct).box()
    assert pet_box.corner_xyz_mm[2] < ct_box.corner_xyz_mm[2] - 10  # the PET starts lower than the CT
    brain_suv = p.pet.EvaluateAtPhysicalPoint(BRAIN_CENTER_XYZ_MM, sitk.sitkLinear)
    assert (brain_suv > 6.0) == (fov != "no-head")
    bladder_in_view = z_lo < BLADDER_CENTER_XYZ_MM[2] < z_hi
    assert bladder_in_view == (fov == "whole-body")
    if bladder_in_view:
        assert p.pet.EvaluateAtPhysicalPoint(BLADDER_CENTER_XYZ_MM, sitk.sitkLinear) > 12.0


def test_bqml_multiplies_suv():
    suv, bqml = make_phantom(seed=4, **FAST), make_phantom(seed=4, pet_unit="bqml", **FAST)
    assert np.allclose(sitk.GetArrayFromImage(bqml.pet), BQML_PER_SUV * sitk.GetArrayFromImage(suv.pet), rtol=1e-5)
    with pytest.raises(ValueError, match="pet_unit"):
        make_phantom(seed=4, pet_unit="kBq", **FAST)
    with pytest.raises(ValueError, match="fov"):
        make_phantom(seed=4, fov="chest", **FAST)


def test_write_case_layout_compressed(tmp_path):
    phantom = make_phantom(seed=2, fov="head-only", **FAST)
    write_case(phantom, tmp_path)
    files = {sub: list((tmp_path / sub).glob("*.mha")) for sub in ("input/images/ct", "input/images/pet", "reference")}
    assert all(len(found) == 1 for found in files.values())
    assert len({found[0].name for found in files.values()}) == 1  # one uuid for the case
    for found in files.values():
        assert b"CompressedData = True" in found[0].read_bytes()[:1000]
    ct = sitk.ReadImage(str(files["input/images/ct"][0]))
    label = sitk.ReadImage(str(files["reference"][0]))
    assert ct.GetPixelID() == sitk.sitkInt16 and Grid.of(label).same_as(Grid.of(phantom.ct))
    assert np.array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(phantom.label))
