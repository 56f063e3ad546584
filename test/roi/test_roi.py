"""ROI location on phantoms of every field of view, under flipped/permuted CT directions, with no head, and on the
two real (thigh sarcoma) cases, which must fall back with a warning."""

import json
from itertools import permutations, product

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
from builders import signed_permutations
from conftest import REAL_DATA, SMALL_PHANTOM

from hnseg_infer.errors import RecipeError
from hnseg_infer.geometry.grid import IDENTITY, Grid
from hnseg_infer.roi.locate import HEAD_CHECK, StageLabels, check_params, locate_roi
from hnseg_infer.tools.phantom import BLADDER_CENTER_XYZ_MM, HEART_CENTER_XYZ_MM, make_phantom

FAST = SMALL_PHANTOM
HEAD_METHODS = ["brain_peak_head_crop", "pet_threshold_head_neck_box"]
ORIENTATIONS = ["".join(p) for axes in permutations(("RL", "AP", "SI")) for p in product(*axes)]  # all 48
REAL_CASES = sorted(p for p in REAL_DATA.glob("STS_*") if p.is_dir()) if REAL_DATA.is_dir() else []


def roi(method, phantom_or_pair, params=None, suv_per_stored_value=1.0, **kwargs):
    ct, pet = phantom_or_pair if isinstance(phantom_or_pair, tuple) else (phantom_or_pair.ct, phantom_or_pair.pet)
    return locate_roi(method, ct=ct, pet=pet, suv_per_stored_value=suv_per_stored_value, params=params or {},
                      **kwargs)


def inside(box, points_xyz_mm, margin_mm=0.0) -> np.ndarray:
    lo = np.asarray(box.corner_xyz_mm) + margin_mm
    hi = np.asarray(box.corner_xyz_mm) + box.size_xyz_mm - margin_mm
    points = np.atleast_2d(points_xyz_mm)
    return np.all((points >= lo) & (points <= hi), axis=1)


def lesions_xyz_mm(phantom) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(label, centroid, all voxel centres) of each connected lesion in the reference label, in physical mm."""
    label_zyx = sitk.GetArrayFromImage(phantom.label)
    grid = Grid.of(phantom.label)
    out = []
    for value in (1, 2):
        components = cc3d.connected_components(label_zyx == value, connectivity=26)
        for k in range(1, int(components.max()) + 1):
            points = grid.index_to_physical(np.argwhere(components == k)[:, ::-1])
            out.append((value, points.mean(axis=0), points))
    return out


@pytest.fixture(scope="module")
def phantoms():
    return {fov: make_phantom(seed=2, fov=fov, **FAST) for fov in ("head-only", "head-neck", "whole-body", "no-head")}


@pytest.mark.parametrize("method", HEAD_METHODS)
@pytest.mark.parametrize("fov", ["head-only", "head-neck", "whole-body"])
def test_head_box_holds_the_tumour_and_nodes_not_the_heart_or_bladder(phantoms, method, fov):
    phantom = phantoms[fov]
    result = roi(method, phantom)
    assert not result.fell_back and result.warnings == () and result.method == method
    lesions = lesions_xyz_mm(phantom)
    assert {value for value, _, _ in lesions} == {1, 2}  # seed 2: a tumour and nodes
    for value, centroid, points in lesions:
        assert inside(result.box, centroid, margin_mm=10.0).all(), (value, centroid, result.box)
        assert inside(result.box, points).all(), (value, result.box)
    assert not inside(result.box, [HEART_CENTER_XYZ_MM, BLADDER_CENTER_XYZ_MM]).any()
    top_mm = result.box.corner_xyz_mm[2] + result.box.size_xyz_mm[2]
    assert -5.0 < top_mm < 25.0  # hangs from the top of the head (vertex at z = 5 mm)
    assert abs(result.box.center_xyz_mm[0]) < 5.0  # centred on the head left-right
    assert result.record["skull_ray_fraction"] >= HEAD_CHECK["min_skull_fraction"]
    json.dumps(result.record)


@pytest.mark.parametrize("method", HEAD_METHODS)
def test_same_box_under_any_ct_orientation_of_the_same_voxels(phantoms, method):
    """DICOMOrient reorders the voxels and keeps physical space: the box must not move."""
    phantom = phantoms["head-neck"]
    reference = roi(method, phantom).box
    for code in ORIENTATIONS[::4]:
        ct = sitk.DICOMOrient(phantom.ct, code)
        assert ct.GetDirection() != phantom.ct.GetDirection() or code == "LPS"
        box = roi(method, (ct, phantom.pet)).box
        assert np.allclose(box.corner_xyz_mm, reference.corner_xyz_mm, atol=0.5), code
        assert np.allclose(box.size_xyz_mm, reference.size_xyz_mm, atol=1e-6), code
    flipped_pet = sitk.DICOMOrient(phantom.pet, "RAI")
    box = roi(method, (sitk.DICOMOrient(phantom.ct, "SLA"), flipped_pet)).box
    assert np.allclose(box.corner_xyz_mm, reference.corner_xyz_mm, atol=0.5)


@pytest.mark.parametrize("method", HEAD_METHODS)
def test_same_box_on_ct_lattices_with_permuted_directions(method):
    """Phantoms sampled on CT lattices with other directions: the box moves by at most a working voxel or two."""
    boxes = [roi(method, make_phantom(seed=3, fov="head-neck", ct_direction=direction, **FAST)).box
             for direction in (signed_permutations()[0], signed_permutations()[13], signed_permutations()[42])]
    for box in boxes[1:]:
        assert np.allclose(box.corner_xyz_mm, boxes[0].corner_xyz_mm, atol=6.0), (box, boxes[0])
        assert np.allclose(box.size_xyz_mm, boxes[0].size_xyz_mm, atol=1e-6)


def test_head_cut_by_the_top_of_the_scan_is_still_a_head():
    phantom = make_phantom(seed=2, fov="head-neck", ct_origin_shift_mm=(0.0, 0.0, -60.0), **FAST)  # CT top at -50
    for method in HEAD_METHODS:
        result = roi(method, phantom)
        assert not result.fell_back, result.warnings
        assert inside(result.box, phantom.tumour_center_xyz_mm, margin_mm=10.0).all()
    assert result.record["superior_boundary_z_mm"] == pytest.approx(-50.0, abs=3.0)


def with_hot_blob(pet: sitk.Image, center_xyz_mm, radius_mm: float, suv: float) -> sitk.Image:
    """The PET with a uniform sphere of uptake added (a raised hand, a stray hot spot)."""
    grid = Grid.of(pet)
    zyx = np.argwhere(np.ones(grid.size_zyx, bool))
    distance = np.linalg.norm(grid.index_to_physical(zyx[:, ::-1]) - center_xyz_mm, axis=1).reshape(grid.size_zyx)
    return grid.image_from_array((sitk.GetArrayFromImage(pet) + suv * (distance <= radius_mm)).astype(np.float32))


@pytest.mark.parametrize("method", HEAD_METHODS)
def test_a_hot_spot_above_the_head_does_not_move_the_box(method):
    """The top of uptake is the top of the region that holds the brain, not of any voxel above threshold."""
    phantom = make_phantom(seed=2, fov="head-neck", ct_origin_shift_mm=(0.0, 0.0, 30.0), **FAST)  # CT up to z = 40
    hand = with_hot_blob(phantom.pet, (150.0, 0.0, 27.0), 10.0, 2.0)  # the vertex is at z = 5
    assert Grid.of(hand).same_as(Grid.of(phantom.pet))
    reference, result = roi(method, phantom), roi(method, (phantom.ct, hand))
    assert not result.fell_back
    assert np.allclose(result.box.corner_xyz_mm, reference.box.corner_xyz_mm, atol=1e-6)


@pytest.mark.parametrize("method", HEAD_METHODS)
def test_no_head_falls_back_with_a_warning_though_the_sarcoma_is_brain_sized(phantoms, method):
    phantom = phantoms["no-head"]
    result = roi(method, phantom)
    assert result.fell_back and len(result.warnings) == 1
    assert f"ROI method {method!r} found no head" in result.warnings[0] and "used instead" in result.warnings[0]
    # the hot sarcoma passes the PET size test; the missing skull is what rejects it
    assert result.record["brain_sized"] and result.record["skull_ray_fraction"] < HEAD_CHECK["min_skull_fraction"]
    ct_box = Grid.of(phantom.ct).box()
    assert inside(ct_box, result.box.corners_xyz_mm()).all()  # clipped to the CT
    overlap_center = ct_box.intersect(Grid.of(phantom.pet).box()).center_xyz_mm
    assert np.allclose(result.box.center_xyz_mm, overlap_center, atol=1e-6)
    assert inside(result.box, phantom.tumour_center_xyz_mm).all()
    json.dumps(result.record)


@pytest.mark.skipif(not REAL_CASES, reason=f"real cases not found at {REAL_DATA}")
@pytest.mark.parametrize("case", REAL_CASES, ids=lambda p: p.name)
@pytest.mark.parametrize("method", HEAD_METHODS)
def test_real_thigh_sarcomas_fall_back_with_a_warning(case, method):
    ct = sitk.ReadImage(str(next((case / "input/images/ct").glob("*.mha"))))
    pet = sitk.ReadImage(str(next((case / "input/images/pet").glob("*.mha"))))
    result = roi(method, (ct, pet))
    assert result.fell_back and "found no head" in result.warnings[0] and method in result.warnings[0]
    assert result.record["skull_ray_fraction"] < HEAD_CHECK["min_skull_fraction"]
    assert inside(Grid.of(ct).box(), result.box.corners_xyz_mm(), margin_mm=-1e-3).all()
    reference = sitk.ReadImage(str(case / "reference/tumour-mask-on-ct.mha"))
    tumour_zyx = np.argwhere(sitk.GetArrayFromImage(reference) > 0)
    tumour_xyz_mm = Grid.of(reference).index_to_physical(tumour_zyx[::50, ::-1])
    assert inside(result.box, tumour_xyz_mm).all()  # the crop is small: the fallback box holds the whole tumour


def test_bqml_pet_gives_the_same_box_with_its_factor():
    suv = make_phantom(seed=4, fov="head-neck", **FAST)
    bqml = make_phantom(seed=4, fov="head-neck", pet_unit="bqml", **FAST)
    for method in HEAD_METHODS:
        a, b = roi(method, suv), roi(method, bqml, suv_per_stored_value=1 / 5000)
        assert not b.fell_back and np.allclose(a.box.corner_xyz_mm, b.box.corner_xyz_mm, atol=1e-3)


def test_brain_peak_crop_size_anchor_and_peak_branch(phantoms):
    phantom = phantoms["whole-body"]
    top = roi("brain_peak_head_crop", phantom)
    assert top.box.size_xyz_mm == (256.0, 256.0, 336.0) and top.record["anchored"] == "top"
    assert top.record["peak_index_slices"] <= 50 and -110 < top.record["peak_z_mm"] < -30  # the brain
    # neither anchor condition holds: the box's superior end is at the brain peak
    peak = roi("brain_peak_head_crop", phantom, {"top_mean_threshold": 1e9, "peak_index_max": 0, "n_slices": 100})
    assert peak.record["anchored"] == "peak" and peak.box.size_xyz_mm[2] == 300.0
    assert peak.box.corner_xyz_mm[2] + 300.0 == pytest.approx(peak.record["peak_z_mm"])
    assert peak.box.corner_xyz_mm[2] + 300.0 < top.box.corner_xyz_mm[2] + 336.0 - 30.0


def _stage_labels(labels_zyx, grid, name="coarse"):
    return StageLabels(name, labels_zyx, grid, grid.box().in_frame(IDENTITY))


def test_cascade_methods_read_the_previous_stage_labels(phantoms):
    """labels_bbox and labels_centroid_cube on a permuted, flipped, anisotropic previous-stage grid: the box is
    found in physical space around the labelled voxels."""
    phantom = phantoms["head-only"]
    grid = Grid((40, 30, 20), (2.0, 3.0, 4.0), (60.0, -30.0, -120.0), (0, 0, -1, 1, 0, 0, 0, -1, 0))
    labels_zyx = np.zeros(grid.size_zyx, np.uint8)
    labels_zyx[5:8, 10:13, 20:25] = 1  # index x 20-24, y 10-12, z 5-7
    labels_zyx[6, 11, 30] = 2
    points = grid.index_to_physical(np.argwhere(labels_zyx > 0)[:, ::-1])
    bbox = roi("labels_bbox", phantom, {"margin_mm": 5}, previous=_stage_labels(labels_zyx, grid))
    grow = 5 + 4.0 / 2  # margin plus half the largest voxel side
    assert np.allclose(bbox.box.corner_xyz_mm, points.min(axis=0) - grow)
    assert np.allclose(np.add(bbox.box.corner_xyz_mm, bbox.box.size_xyz_mm), points.max(axis=0) + grow)
    cube = roi("labels_centroid_cube", phantom, previous=_stage_labels(labels_zyx, grid))
    assert np.allclose(cube.box.center_xyz_mm, points.mean(axis=0)) and cube.box.size_xyz_mm == (144.0, 144.0, 144.0)
    assert not cube.fell_back and cube.record["from_stage"] == "coarse"


def test_centroid_cube_moves_to_contain_far_labels(phantoms):
    """A large tumour and a node far below it: the centroid cube cuts the node off; with contain_labels the cube
    moves (along z only, the least distance) until it holds every labelled voxel centre. Labels that cannot fit
    leave the centre on the centroid along that axis."""
    phantom = phantoms["head-only"]
    grid = Grid((60, 50, 70), (2.0, 3.0, 2.5), (60.0, -30.0, -120.0), (0, 0, -1, 1, 0, 0, 0, -1, 0))
    labels_zyx = np.zeros(grid.size_zyx, np.uint8)
    labels_zyx[5:25, 10:30, 10:30] = 1  # the tumour: 8000 voxels
    labels_zyx[55:58, 20:23, 20:23] = 2  # a small node 130 mm from the tumour's top along index z
    points = grid.index_to_physical(np.argwhere(labels_zyx > 0)[:, ::-1])
    centroid, lo, hi = points.mean(axis=0), points.min(axis=0), points.max(axis=0)
    size = [144.0, 144.0, 144.0]
    plain = roi("labels_centroid_cube", phantom, {"size_mm": size}, previous=_stage_labels(labels_zyx, grid))
    assert np.allclose(plain.box.center_xyz_mm, centroid)
    corner, far = np.asarray(plain.box.corner_xyz_mm), np.asarray(plain.box.corner_xyz_mm) + 144.0
    assert ((points < corner) | (points > far)).any()  # the node is cut off
    moved = roi("labels_centroid_cube", phantom, {"size_mm": size, "contain_labels": True},
                previous=_stage_labels(labels_zyx, grid))
    corner, far = np.asarray(moved.box.corner_xyz_mm), np.asarray(moved.box.corner_xyz_mm) + 144.0
    assert ((points >= corner - 1e-6) & (points <= far + 1e-6)).all()
    shift = moved.box.center_xyz_mm - centroid
    assert np.count_nonzero(np.abs(shift) > 1e-9) == 1 and np.allclose(moved.record["shift_to_contain_labels_mm"],
                                                                       shift, atol=1e-3)
    axis = int(np.argmax(np.abs(shift)))  # the least move: the labels touch the far face
    assert min(abs(far[axis] - hi[axis]), abs(lo[axis] - corner[axis])) == pytest.approx(0, abs=1e-6)
    assert hi[axis] - lo[axis] > 100.0
    small_size = list(size)
    small_size[axis] = 100.0  # too small to hold them along that axis: no move
    small = roi("labels_centroid_cube", phantom, {"size_mm": small_size, "contain_labels": True},
                previous=_stage_labels(labels_zyx, grid))
    assert np.allclose(small.box.center_xyz_mm, centroid)
    with pytest.raises(RecipeError, match="'contain_labels' must be true or false"):
        check_params("labels_centroid_cube", {"contain_labels": 1})


def test_cascade_methods_fall_back_when_the_previous_stage_found_nothing(phantoms):
    phantom = phantoms["head-neck"]
    grid = Grid.of(phantom.pet)
    empty = _stage_labels(np.zeros(grid.size_zyx, np.uint8), grid)
    bbox = roi("labels_bbox", phantom, previous=empty)
    assert bbox.fell_back and bbox.box == empty.box and "labelled nothing" in bbox.warnings[0]
    cube = roi("labels_centroid_cube", phantom, previous=empty)
    head_crop = roi("brain_peak_head_crop", phantom)
    assert cube.fell_back and cube.box == head_crop.box and "'brain_peak_head_crop' instead" in cube.warnings[0]
    with pytest.raises(RecipeError, match="needs the labels of a previous cascade stage"):
        roi("labels_bbox", phantom)


def test_ct_top_and_ct_extent(phantoms):
    phantom = phantoms["head-only"]
    ct_box = Grid.of(phantom.ct).box()
    top = roi("ct_top", phantom, {"size_mm": [500, 400, 384]}).box
    assert top.size_xyz_mm == (500.0, 400.0, 384.0)
    assert top.corner_xyz_mm[2] + 384.0 == pytest.approx(ct_box.corner_xyz_mm[2] + ct_box.size_xyz_mm[2])
    assert np.allclose(top.center_xyz_mm[:2], ct_box.center_xyz_mm[:2])
    extent = roi("ct_extent", phantom).box
    ct_box, pet_box = Grid.of(phantom.ct).box(), Grid.of(phantom.pet).box()
    assert np.allclose(extent.size_xyz_mm[:2], ct_box.size_xyz_mm[:2])  # the PET is wider in-plane
    assert extent.corner_xyz_mm[2] == pytest.approx(ct_box.corner_xyz_mm[2])  # the PET starts lower
    top = lambda box: box.corner_xyz_mm[2] + box.size_xyz_mm[2]
    assert top(extent) == pytest.approx(top(ct_box))
    assert extent.size_xyz_mm[2] < pet_box.size_xyz_mm[2]


def test_unknown_or_bad_parameters_are_recipe_errors(phantoms):
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['threshold'\]; allowed keys: .*'threshold_suv'"):
        roi("pet_threshold_head_neck_box", phantoms["head-neck"], {"threshold": 2})
    with pytest.raises(RecipeError, match="unknown ROI method 'head_box'"):
        check_params("head_box", {})
    with pytest.raises(RecipeError, match="'size_mm' must be 3 positive numbers"):
        check_params("labels_centroid_cube", {"size_mm": [144, 144]})
    with pytest.raises(RecipeError, match="'margin_mm' must be >= 0"):
        check_params("labels_bbox", {"margin_mm": -1})
    with pytest.raises(RecipeError, match="'n_slices' must be positive"):
        check_params("brain_peak_head_crop", {"n_slices": 0})
    with pytest.raises(RecipeError, match="'slice_mm' must be a number"):
        check_params("brain_peak_head_crop", {"slice_mm": "3"})
    filled = check_params("brain_peak_head_crop", {"n_slices": 96})
    assert filled["n_slices"] == 96 and filled["uptake_threshold_suv"] == 0.5 and filled["window_xy_mm"] == 256.0
