"""The separable cubic B-spline (`sample` on a grid with the image's axes) against SimpleITK's own Resample."""

import numpy as np
import pytest
import SimpleITK as sitk
from builders import oblique_direction, signed_permutations

from hnseg_infer.geometry.grid import Grid, _mirror, sample

FLIP_PERMUTE = signed_permutations()[13]


def random_image(size_xyz, spacing_xyz_mm, origin_xyz_mm, direction, seed=0) -> sitk.Image:
    values = np.random.default_rng(seed).normal(0, 100, size_xyz[::-1]).astype(np.float32)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(spacing_xyz_mm)
    image.SetOrigin(origin_xyz_mm)
    image.SetDirection(direction)
    return image


def itk_bspline(image: sitk.Image, grid: Grid, fill_value: float) -> np.ndarray:
    out = sitk.Resample(image, grid.reference_image(), sitk.Transform(), sitk.sitkBSpline, fill_value,
                        sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def target_grid(image: sitk.Image, spacing_xyz_mm, shift_voxels_xyz, size_xyz) -> Grid:
    """A grid along the image's axes, its first voxel `shift_voxels_xyz` source voxels from the image's first."""
    source = Grid.of(image)
    origin = source.index_to_physical([shift_voxels_xyz])[0]
    return Grid(tuple(size_xyz), tuple(spacing_xyz_mm), tuple(origin.tolist()), source.direction)


@pytest.mark.parametrize("direction", [(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), FLIP_PERMUTE, oblique_direction()])
@pytest.mark.parametrize("spacing_xyz_mm, shift_xyz, size_xyz", [
    ((2.0, 2.0, 3.0), (0.3, 0.55, 0.0), (12, 10, 9)),  # downsampling in-plane, on the source's planes along z
    ((0.4, 0.7, 1.1), (-0.4, 1.25, 2.5), (40, 22, 15)),  # upsampling, a fractional offset on every axis
    ((1.7, 1.1, 2.9), (-3.0, -1.0, 4.0), (20, 25, 12)),  # partly outside the image: those voxels take the fill
])
def test_matches_simpleitk_resample(direction, spacing_xyz_mm, shift_xyz, size_xyz):
    image = random_image((23, 17, 11), (0.9, 1.3, 2.7), (-31.5, 12.25, 101.0), direction)
    grid = target_grid(image, spacing_xyz_mm, shift_xyz, size_xyz)
    expected = itk_bspline(image, grid, -1024.0)
    got = sample(image, grid, interpolation="bspline", fill_value=-1024.0)
    assert got.dtype == np.float32 and got.shape == grid.size_zyx
    assert np.array_equal(got == -1024.0, expected == -1024.0)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("size_xyz", [(1, 9, 8), (2, 9, 8), (3, 2, 8), (3, 4, 3)])
def test_tiny_axes_match_simpleitk(size_xyz):
    """Axes of 3 voxels: the cubic's taps mirror at both ends; of 1 or 2: SimpleITK's own rule (it runs there)."""
    image = random_image(size_xyz, (1.0, 1.5, 2.0), (5.0, -7.0, 3.0), FLIP_PERMUTE, seed=3)
    grid = target_grid(image, (0.6, 0.8, 0.9), (-0.45, 0.2, 0.1), (4, 14, 16))
    expected = itk_bspline(image, grid, 0.0)
    got = sample(image, grid, interpolation="bspline", fill_value=0.0)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_a_grid_with_other_axes_takes_simpleitk():
    image = random_image((15, 13, 9), (0.9, 1.3, 2.7), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    grid = Grid((8, 8, 6), (1.5, 1.5, 2.0), (2.0, 2.0, 3.0), oblique_direction())
    assert np.array_equal(sample(image, grid, interpolation="bspline", fill_value=0.0), itk_bspline(image, grid, 0.0))


def test_mirror_folds_about_the_end_samples():
    assert _mirror(np.array([-2, -1, 0, 4, 5, 6, 9]), 5).tolist() == [2, 1, 0, 4, 3, 2, 1]
    assert _mirror(np.array([-2, -1, 3, 4]), 3).tolist() == [2, 1, 1, 0]
