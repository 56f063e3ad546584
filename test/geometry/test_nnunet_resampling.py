"""grid.sample_nnunet against nnU-Net's own resampling (resample_data_or_seg_to_shape), on grids with permuted,
flipped axes, offset origins and anisotropic voxels: the data path (cubic, "separate z" across thick slices) and the
restore path (linear, from the isotropic model grid back onto thick slices)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from builders import oblique_direction
from scipy.ndimage import gaussian_filter

from hnseg_infer.geometry.grid import Grid, lowres_axis, sample, sample_nnunet

pytestmark = pytest.mark.torch

DIRECTION = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # permuted and flipped axes


def nnunet_resample(array_zyx: np.ndarray, source: Grid, target: Grid, order: int) -> np.ndarray:
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    # nnU-Net's default configuration: order_z 0, force_separate_z None (its anisotropy rule decides)
    return resample_data_or_seg_to_shape(array_zyx[None].astype(np.float64), target.size_zyx,
                                         source.spacing_xyz_mm[::-1], target.spacing_xyz_mm[::-1], is_seg=False,
                                         order=order, order_z=0, force_separate_z=None)[0]


def smooth_image(size_xyz, spacing_xyz_mm, *, seed: int = 0) -> sitk.Image:
    """A smooth random field with sharp peaks (values 0-100), so that a cubic spline overshoots somewhere."""
    values = gaussian_filter(np.random.default_rng(seed).normal(size=size_xyz[::-1]), 1.5)
    image = sitk.GetImageFromArray((100 * (values - values.min()) / np.ptp(values)).astype(np.float32))
    image.SetSpacing(spacing_xyz_mm)
    image.SetOrigin((12.5, -31.0, 44.0))
    image.SetDirection(DIRECTION)
    return image


@pytest.mark.parametrize("spacing_xyz_mm,axis", [((0.9, 0.95, 3.2), 2), ((3.5, 1.0, 1.1), 0), ((1.0, 1.0, 2.9), None),
                                                 ((3.5, 1.0, 3.5), None), ((0.5, 0.5, 1.4), None)])
def test_lowres_axis_is_nnunets_rule(spacing_xyz_mm, axis):
    assert lowres_axis(spacing_xyz_mm) == axis


@pytest.mark.parametrize("size_xyz,spacing_xyz_mm", [((40, 36, 12), (0.9, 0.95, 3.2)),
                                                     ((12, 36, 30), (3.4, 0.98, 1.05)),
                                                     ((24, 36, 30), (1.3, 0.9, 2.0))])
def test_data_path_matches_nnunet_cubic_resampling(size_xyz, spacing_xyz_mm):
    """CT-like voxels onto a 1 mm grid fitted to the same box, as nnU-Net's preprocessing: equal to nnU-Net's away
    from the border (nnU-Net repeats the edge where ITK mirrors; the difference decays within a few voxels)."""
    image = smooth_image(size_xyz, spacing_xyz_mm)
    source = Grid.of(image)
    target = Grid.covering(source.box(), (1.0, 1.0, 1.0), fit_box=True)
    ours = sample_nnunet(image, target, interpolation="bspline", fill_value=0.0)
    theirs = nnunet_resample(sitk.GetArrayFromImage(image), source, target, order=3)
    inner = tuple(slice(7, -7) for _ in range(3))
    assert np.abs(ours - theirs)[inner].max() < 0.05  # of values 0-100
    assert np.median(np.abs(ours - theirs)[inner]) < 1e-3
    if lowres_axis(spacing_xyz_mm) is not None:  # the plain 3-D spline is not nnU-Net's rule here
        plain = sample(image, target, interpolation="bspline", fill_value=0.0)
        assert np.abs(plain - theirs)[inner].max() > 1.0


def test_restore_path_matches_nnunet_linear_resampling():
    """Probabilities on the isotropic model grid back onto thick slices: linear in-plane, nearest across."""
    thick = Grid((40, 36, 12), (0.9, 0.95, 3.2), (12.5, -31.0, 44.0), DIRECTION)
    model = Grid.covering(thick.box(), (1.0, 1.0, 1.0), fit_box=True)
    values = sitk.GetArrayFromImage(smooth_image(model.size_xyz, model.spacing_xyz_mm, seed=1))
    ours = sample_nnunet(model.image_from_array(values), thick, interpolation="linear", fill_value=0.0)
    theirs = nnunet_resample(values, model, thick, order=1)
    assert np.abs(ours - theirs).max() < 1e-4


def test_target_beyond_the_source_planes_takes_the_fill():
    image = smooth_image((20, 18, 6), (0.9, 0.95, 3.2))
    source = Grid.of(image)
    beyond_last_slice = np.asarray(source.origin_xyz_mm) + np.asarray(DIRECTION).reshape(3, 3)[:, 2] * 500
    far = Grid((20, 18, 4), (0.9, 0.95, 1.0), tuple(beyond_last_slice.tolist()), DIRECTION)
    assert source.box().intersect(far.box()) is None
    assert np.all(sample_nnunet(image, far, interpolation="bspline", fill_value=-7.0) == -7.0)


def test_grids_with_other_axes_are_refused():
    image = smooth_image((20, 18, 6), (0.9, 0.95, 3.2))
    other = Grid((10, 10, 10), (1.0, 1.0, 1.0), Grid.of(image).origin_xyz_mm, oblique_direction())
    with pytest.raises(ValueError, match="same axes"):
        sample_nnunet(image, other, interpolation="linear", fill_value=0.0)
