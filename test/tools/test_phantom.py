"""The synthetic PET/CT phantom: determinism, grids, the same anatomy under any CT geometry, HECKTOR-like
acquisitions, the varied lesions, named regions, the GC layout and the CLI."""

import numpy as np
import pytest
import SimpleITK as sitk
from builders import signed_permutations
from conftest import SMALL_PHANTOM

from hnseg_infer.cli.main import main
from hnseg_infer.geometry.grid import Box, Grid
from hnseg_infer.tools.phantom import (
    BLADDER_CENTER_XYZ_MM,
    BQML_PER_SUV,
    BRAIN_CENTER_XYZ_MM,
    FOV_Z_RANGE_MM,
    NECK_BOTTOM_Z_MM,
    SHAPE_NAMES,
    SOFT_TISSUE_HU,
    Ellipsoid,
    _union_zyx,
    _uptake_zyx,
    acquisition_grids,
    anatomy,
    hecktor_acquisition,
    make_phantom,
    write_case,
)

FAST = SMALL_PHANTOM
SKULL_POINT_XYZ_MM = (64.0, 6.0, -80.0)  # between the brain (x ≤ 59 there) and the skull's outside (x ≤ 68)
AIR_POINT_XYZ_MM = (0.0, -200.0, -80.0)  # in front of the face


def label_centroid_xyz_mm(phantom, value: int) -> np.ndarray:
    zyx = np.argwhere(sitk.GetArrayFromImage(phantom.label) == value).mean(axis=0)
    return Grid.of(phantom.label).index_to_physical(zyx[::-1])[0]


def ct_at(phantom, point_xyz_mm) -> float:
    return phantom.ct.EvaluateAtPhysicalPoint(tuple(map(float, point_xyz_mm)), sitk.sitkNearestNeighbor)


def ct_mean_near(phantom, point_xyz_mm, half_voxels: int = 1) -> float:
    """Mean CT over the (2h+1)³ voxels around a point (a single voxel's 10 HU noise can leave a tissue's range)."""
    k = np.round(Grid.of(phantom.ct).physical_to_index(point_xyz_mm)[0]).astype(int)[::-1]
    block = sitk.GetArrayFromImage(phantom.ct)[tuple(slice(c - half_voxels, c + half_voxels + 1) for c in k)]
    return float(block.mean())


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
    assert 20 < ct_mean_near(p, BRAIN_CENTER_XYZ_MM) < 40 and ct_at(p, SKULL_POINT_XYZ_MM) > 600
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


SEEDS = range(31)
HEAD_FOVS = ("head-only", "head-neck", "whole-body")


def lesions(shapes):
    return [s for s in shapes if s.name == "tumour"], [s for s in shapes if s.name == "node"]


def bounds_xyz_mm(shapes) -> tuple[np.ndarray, np.ndarray]:
    lo = np.min([np.subtract(s.center, s.half_extent_xyz_mm()) for s in shapes], axis=0)
    hi = np.max([np.add(s.center, s.half_extent_xyz_mm()) for s in shapes], axis=0)
    return lo, hi


def box_holds(box: Box, lo, hi) -> bool:
    corner = np.asarray(box.corner_xyz_mm)
    return bool(np.all(corner <= lo) and np.all(hi <= corner + box.size_xyz_mm))


def test_hecktor_acquisition_ranges_over_seeds_and_grids_that_hold_the_lesions():
    """Seeds 0..30, grids only: CT 512² at 0.9-1.0 mm with 1.5-3.3 mm slices; PET 128-200² at 2.7-5.5 mm with
    its own z-range and origin; both hold every lesion in every fov with a head."""
    draws = [hecktor_acquisition(seed) for seed in SEEDS]
    assert hecktor_acquisition(5) == draws[5] and draws[5] != draws[6]
    for seed, kw in zip(SEEDS, draws):
        ct_sp, pet_sp = kw["ct_spacing_xyz_mm"], kw["pet_spacing_xyz_mm"]
        assert kw["ct_size_xy"] == 512 and ct_sp[0] == ct_sp[1] and 0.9 <= ct_sp[0] <= 1.0 and 1.5 <= ct_sp[2] <= 3.3
        assert all(2.7 <= s <= 5.5 for s in pet_sp) and 128 <= kw["pet_size_xyz"][0] == kw["pet_size_xyz"][1] <= 200
        for fov in (*HEAD_FOVS, "no-head"):
            lo, hi = bounds_xyz_mm([s for s in anatomy(seed, fov) if s.label])
            ct, pet = acquisition_grids(fov, **kw)
            assert ct.size_xyz[:2] == (512, 512) and pet.size_xyz[:2] == kw["pet_size_xyz"][:2]
            ct_box, pet_box = ct.box(), pet.box()
            ct_z = (ct_box.corner_xyz_mm[2], ct_box.corner_xyz_mm[2] + ct_box.size_xyz_mm[2])
            pet_z = (pet_box.corner_xyz_mm[2], pet_box.corner_xyz_mm[2] + pet_box.size_xyz_mm[2])
            assert abs(pet_z[1] - ct_z[1]) > 2.0 and pet.origin_xyz_mm[2] != ct.origin_xyz_mm[2]
            assert 60 <= ct.size_xyz[2] <= 736 and pet_z[1] >= ct_z[1] - 8.0 + 5.0
            assert box_holds(ct_box, lo, hi) and box_holds(pet_box, lo, hi), (seed, fov)
    assert len({kw["ct_spacing_xyz_mm"][2] for kw in draws}) > 4 and len({kw["pet_size_xyz"] for kw in draws}) > 3
    # the PET starts above the CT's bottom in some whole-body scans and below it in others
    bottoms = [np.sign(acquisition_grids("whole-body", **kw)[1].box().corner_xyz_mm[2]
                       - acquisition_grids("whole-body", **kw)[0].box().corner_xyz_mm[2]) for kw in draws]
    assert {-1.0, 1.0} <= set(bottoms)


def test_lesions_vary_over_seeds_within_their_ranges():
    n_nodes, n_lobes, necrotic = [], [], 0
    for seed in range(60):
        shapes = anatomy(seed)
        tumour, nodes = lesions(shapes)
        assert lesions(anatomy(seed, "whole-body")) == (tumour, nodes)  # the same patient in every fov
        first_lesion = min(i for i, s in enumerate(shapes) if s.label)
        assert all(s.label for s in shapes[first_lesion:])  # lesions are painted last: they win over glands
        assert all(s.label == 1 for s in tumour) and all(s.label == 2 for s in nodes)
        n_lobes.append(len(tumour))
        n_nodes.append(len(nodes))
        necrotic += any(s.name == "necrosis" and s.label == 1 for s in shapes)
        for lobe in tumour:  # lobes vary ±20 % / ±5 HU around the main one
            assert 4.0 <= lobe.suv <= 18.0 and SOFT_TISSUE_HU + 15 <= lobe.hu <= SOFT_TISSUE_HU + 45
        assert 5.0 <= tumour[0].suv <= 15.0 and SOFT_TISSUE_HU + 20 <= tumour[0].hu <= SOFT_TISSUE_HU + 40
        for node in nodes:
            assert 5.0 - 1e-6 <= 2 * min(node.radii) and 2 * max(node.radii) <= 30.0 + 1e-6
            assert 2.5 <= node.suv <= 10.0 and NECK_BOTTOM_Z_MM < node.center[2] < -150.0
            assert 15.0 < abs(node.center[0])  # lateral, on either side of the neck
    assert set(n_nodes) == {0, 1, 2, 3, 4} and set(n_lobes) >= {2, 3, 4} and max(n_lobes) <= 4
    assert 5 <= necrotic <= 40
    all_nodes = [n for seed in range(60) for n in lesions(anatomy(seed))[1]]
    sizes, suvs = [2 * max(n.radii) for n in all_nodes], [n.suv for n in all_nodes]
    assert min(sizes) < 8.0 and max(sizes) > 22.0  # small and large nodes
    assert min(suvs) < 3.5 and max(suvs) > 8.0  # faint and hot nodes


@pytest.mark.parametrize("seed", [0, 9, 17])
def test_lesions_do_not_touch_and_lie_in_the_head_and_neck(seed):
    """On a 1 mm grid: nodes are disjoint from the tumour, each other and the glands, and inside the head/neck."""
    p = make_phantom(seed=seed, fov="head-only", **FAST)
    tumour, nodes = lesions(p.shapes)
    lo, hi = bounds_xyz_mm(tumour + nodes)
    grid = Grid.covering(Box(tuple(lo - 5), tuple(hi - lo + 10)), (1.0, 1.0, 1.0))
    neck = p.region_zyx(grid, ("head", "neck"))
    glands = p.region_zyx(grid, ("parotid", "submandibular", "tonsil"))
    tumour_mask = p.region_zyx(grid, "tumour")
    assert tumour_mask.sum() > 1000 and not (tumour_mask & ~neck).any()
    masks = [_union_zyx([node], grid) for node in nodes]
    for i, m in enumerate(masks):
        assert m.any() and not (m & tumour_mask).any() and not (m & glands).any() and not (m & ~neck).any()
        assert not any((m & other).any() for other in masks[i + 1:])


def test_named_regions_match_the_label_and_the_uptake():
    p = make_phantom(seed=2, fov="whole-body", **FAST)
    assert all(s.name in SHAPE_NAMES for s in p.shapes) and all(s.name for s in anatomy(2, "no-head"))
    names = {s.name for s in p.shapes}
    assert {"body", "head", "neck", "skull", "brain", "parotid", "submandibular", "tonsil", "tumour", "node",
            "heart", "bladder", "lung", "leg"} <= names
    assert not {"heart", "bladder", "lung", "leg"} & {s.name for s in anatomy(2, "head-only")}
    ct_grid, pet_grid = Grid.of(p.ct), Grid.of(p.pet)
    label = sitk.GetArrayFromImage(p.label)
    assert np.array_equal(p.region_zyx(ct_grid, "tumour"), label == 1)  # lesions are painted last
    assert np.array_equal(p.region_zyx(ct_grid, "node"), label == 2)
    head_neck = p.region_zyx(ct_grid, ("head", "neck"))
    assert head_neck.shape == ct_grid.size_zyx and head_neck[label > 0].all()
    z_mm = ct_grid.index_to_physical(np.argwhere(head_neck)[:, ::-1])[:, 2]
    assert z_mm.max() <= 6.0 and z_mm.min() >= -331.0
    pet = sitk.GetArrayFromImage(p.pet)
    brain, parotid = p.region_zyx(pet_grid, "brain"), p.region_zyx(pet_grid, "parotid")
    assert brain.shape == pet_grid.size_zyx and pet[brain].mean() > 6.0 > pet[parotid].mean() > 1.0
    assert pet[p.region_zyx(pet_grid, "heart")].mean() > 1.5
    assert pet[p.region_zyx(pet_grid, "tumour")].max() > 4.0
    assert p.region_zyx(pet_grid, ()).sum() == 0
    with pytest.raises(ValueError, match="unknown shape name"):
        p.region_zyx(ct_grid, ("head", "torso"))


def test_hecktor_cli_writes_the_three_files_on_hecktor_grids(tmp_path, capsys):
    assert main(["phantom", "--seed", "3", "--fov", "head-only", "--pet-unit", "bqml", "--out", str(tmp_path)]) == 0
    assert "hnseg phantom: wrote" in capsys.readouterr().out
    files = {sub: list((tmp_path / sub).glob("*.mha")) for sub in ("input/images/ct", "input/images/pet", "reference")}
    assert all(len(found) == 1 for found in files.values())
    ct, pet, label = (sitk.ReadImage(str(files[sub][0])) for sub in files)
    kw = hecktor_acquisition(3)
    expected_ct, expected_pet = acquisition_grids("head-only", **kw)
    assert Grid.of(ct).same_as(expected_ct) and Grid.of(label).same_as(expected_ct)
    assert Grid.of(pet).same_as(expected_pet) and ct.GetSize()[:2] == (512, 512)
    assert set(np.unique(sitk.GetArrayFromImage(label))) <= {0, 1, 2} and (sitk.GetArrayFromImage(label) == 1).any()
    assert sitk.GetArrayFromImage(pet).max() > 5.0 * BQML_PER_SUV  # Bq/mL: the brain at SUV ≥ 8


@pytest.mark.parametrize("offset_mm", [0.0, 1.4, 2.75])
def test_pet_partial_volume_keeps_a_small_nodes_uptake_wherever_the_grid_falls(offset_mm):
    """A 5 mm node on a 5.5 mm PET grid: its total uptake (SUV × volume) is kept within 15 %, not lost between
    voxel centres nor blown up to a whole voxel."""
    node = Ellipsoid((offset_mm, -offset_mm, 0.5 * offset_mm), (2.5, 2.5, 2.5), 50.0, 8.0, 2, "node")
    grid = Grid.covering(Box((-22.0, -22.0, -22.0), (44.0, 44.0, 44.0)), (5.5, 5.5, 5.5))
    suv = _uptake_zyx([node], grid)
    total = suv.sum() * grid.voxel_volume_mm3
    assert total == pytest.approx(8.0 * 4 / 3 * np.pi * 2.5 ** 3, rel=0.15) and suv.max() < 8.0
