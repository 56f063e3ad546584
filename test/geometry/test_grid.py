import numpy as np
import pytest
import SimpleITK as sitk
from builders import image_from_function, oblique_direction, signed_permutations

from hnseg_infer.geometry.grid import IDENTITY, Box, Grid, sample

DIRECTIONS = signed_permutations() + [oblique_direction()]
SPACING = (0.9, 1.3, 2.7)


def make_grid(direction, origin=(-31.5, 12.25, 101.0)) -> Grid:
    return Grid((11, 7, 5), SPACING, origin, direction)


def test_there_are_48_signed_permutations():
    assert len(set(signed_permutations())) == 48


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_index_to_physical_matches_simpleitk(direction):
    grid = make_grid(direction)
    image = grid.reference_image()
    rng = np.random.default_rng(0)
    for index in rng.uniform(-2, 12, size=(5, 3)):
        expected = image.TransformContinuousIndexToPhysicalPoint(index.tolist())
        assert np.allclose(grid.index_to_physical(index)[0], expected, atol=1e-9)
        assert np.allclose(grid.physical_to_index(expected)[0], index, atol=1e-9)
    assert Grid.of(image) == grid


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_box_of_grid_contains_all_voxel_centres_by_half_a_voxel(direction):
    grid = make_grid(direction)
    box = grid.box()
    corners_idx = grid.physical_to_index(box.corners_xyz_mm())
    assert np.allclose(corners_idx.min(axis=0), -0.5) and np.allclose(corners_idx.max(axis=0), np.array(grid.size_xyz) - 0.5)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_covering_grid_is_centred_and_tiles_the_box(direction):
    box = Box.around((10.0, -20.0, 35.0), (50.0, 31.0, 72.0), direction)
    grid = Grid.covering(box, (2.0, 1.0, 3.0))
    assert grid.size_xyz == (25, 31, 24)
    assert np.allclose(grid.box().center_xyz_mm, box.center_xyz_mm)
    assert np.allclose(grid.box().size_xyz_mm, box.size_xyz_mm)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_fitted_grid_fills_the_box_exactly_with_the_rounded_count(direction):
    box = Box.around((10.0, -20.0, 35.0), (50.0, 31.0, 71.0), direction)
    grid = Grid.covering(box, (2.2, 1.0, 3.0), fit_box=True)  # 50/2.2 = 22.7 → 23 voxels of 50/23 mm
    assert grid.size_xyz == (23, 31, 24)
    assert np.allclose(grid.spacing_xyz_mm, (50.0 / 23, 1.0, 71.0 / 24))
    assert np.allclose(grid.box().center_xyz_mm, box.center_xyz_mm)
    assert np.allclose(grid.box().corners_xyz_mm(), box.corners_xyz_mm())


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_crop_to_selects_exactly_the_voxels_whose_centres_are_inside(direction):
    grid = make_grid(direction)
    box = Box.around(grid.index_to_physical([4.2, 3.1, 2.4])[0], (5.0, 4.0, 3.0))  # LPS-aligned box
    cropped = grid.crop_to(box)
    # brute force: every voxel centre tested against the box in its own frame
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in grid.size_zyx), indexing="ij")
    centres = grid.index_to_physical(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1))
    local = (centres - np.asarray(box.corner_xyz_mm))  # identity frame
    inside = np.all((local >= -1e-9) & (local <= np.asarray(box.size_xyz_mm) + 1e-9), axis=1).reshape(grid.size_zyx)
    if direction in signed_permutations():  # an axis-aligned box in a permuted grid is an exact index block
        assert cropped is not None
        sub, slices = cropped
        expected = np.zeros(grid.size_zyx, bool)
        expected[slices] = True
        assert np.array_equal(expected, inside)
        assert np.allclose(sub.origin_xyz_mm, grid.index_to_physical([s.start for s in slices[::-1]])[0])
    else:  # oblique: the crop is the bounding block, which must contain every inside voxel
        sub, slices = cropped
        block = np.zeros(grid.size_zyx, bool)
        block[slices] = True
        assert np.all(block[inside])


def test_crop_to_outside_is_none():
    grid = make_grid(IDENTITY)
    assert grid.crop_to(Box((500.0, 500.0, 500.0), (10.0, 10.0, 10.0))) is None


def test_intersect_and_in_frame():
    a = Box((0.0, 0.0, 0.0), (10.0, 10.0, 10.0))
    b = Box((5.0, -5.0, 2.0), (10.0, 10.0, 4.0))
    common = a.intersect(b)
    assert np.allclose(common.corner_xyz_mm, (5, 0, 2)) and np.allclose(common.size_xyz_mm, (5, 5, 4))
    assert a.intersect(Box((20.0, 0.0, 0.0), (1.0, 1.0, 1.0))) is None
    flipped = (-1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0)
    same = a.in_frame(flipped)
    assert np.allclose(np.sort(same.corners_xyz_mm(), axis=0), np.sort(a.corners_xyz_mm(), axis=0))


def linear_field(points):
    return 3.0 * points[:, 0] - 2.0 * points[:, 1] + 0.5 * points[:, 2] + 7.0


@pytest.mark.parametrize("direction", DIRECTIONS[::7] + [oblique_direction()])
def test_sample_reproduces_a_linear_field_in_physical_space(direction):
    """Linear interpolation is exact for a linear field: any error is a geometry error."""
    source = image_from_function(linear_field, size_xyz=(30, 28, 26), spacing_xyz_mm=(1.1, 0.8, 2.5),
                                 origin_xyz_mm=(-15.0, -10.0, -30.0), direction=direction)
    centre = Grid.of(source).box().center_xyz_mm
    target = Grid.covering(Box.around(centre, (12.0, 9.0, 20.0)), (1.7, 1.3, 3.1))
    values = sample(source, target, interpolation="linear", fill_value=-999)
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in target.size_zyx), indexing="ij")
    points = target.index_to_physical(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1))
    assert np.allclose(values.ravel(), linear_field(points), atol=1e-3)


def test_sample_fills_outside_the_image():
    source = image_from_function(linear_field, size_xyz=(5, 5, 5), spacing_xyz_mm=(1.0, 1.0, 1.0),
                                 origin_xyz_mm=(0.0, 0.0, 0.0), direction=IDENTITY)
    far = Grid((3, 3, 3), (1.0, 1.0, 1.0), (100.0, 100.0, 100.0))
    assert np.all(sample(source, far, interpolation="linear", fill_value=-1024) == -1024)


def test_image_from_array_checks_shape():
    grid = make_grid(IDENTITY)
    with pytest.raises(ValueError):
        grid.image_from_array(np.zeros(grid.size_xyz, np.float32))  # xyz order is wrong
    image = grid.image_from_array(np.zeros(grid.size_zyx, np.float32))
    assert Grid.of(image) == grid and image.GetPixelID() == sitk.sitkFloat32
