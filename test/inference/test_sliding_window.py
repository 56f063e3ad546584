"""Sliding window: exact stitching with an analytic model, nnU-Net's tile starts and Gaussian, padding, mirroring,
tile batching, and errors."""

from __future__ import annotations

from itertools import combinations, product

import numpy as np
import pytest
from onnx_models import save_conv_model, save_voxelwise_model, voxelwise_reference
from scipy.ndimage import gaussian_filter

from hnseg_infer.errors import ModelError
from hnseg_infer.inference.onnx_engine import OnnxModel
from hnseg_infer.inference.sliding_window import (
    gaussian_importance,
    monai_gaussian_importance,
    monai_tile_starts_zyx,
    predict_sliding_window,
    tile_starts_zyx,
)

SHAPE_ZYX = (37, 45, 29)  # odd sizes, none a multiple of the patches below
N_OUT = 3


@pytest.fixture(scope="module")
def voxelwise(tmp_path_factory):
    return OnnxModel(save_voxelwise_model(tmp_path_factory.mktemp("m") / "voxelwise.onnx", n_in=2, n_out=N_OUT),
                     device="cpu", threads=1)


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    return OnnxModel(save_conv_model(tmp_path_factory.mktemp("m") / "conv.onnx", n_in=2, n_out=N_OUT, seed=3),
                     device="cpu", threads=1)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(7).standard_normal((2, *SHAPE_ZYX)).astype(np.float32)


@pytest.fixture(scope="module")
def whole(voxelwise, image):
    return voxelwise(image[None])[0]


def test_voxelwise_model_matches_its_numpy_reference(whole, image):
    np.testing.assert_allclose(whole, voxelwise_reference(image, n_out=N_OUT), atol=1e-5)


# Patches: inside the image, equal to it, and larger than it along z and x / along y (padding).
PATCHES = [(16, 20, 12), SHAPE_ZYX, (40, 16, 32), (8, 50, 10)]
STEPS = [0.5, 0.33, 1.0]
OPTIONS = [(1, (), True), (3, (0, 1, 2), False), (3, (1,), True), (1, (0, 2), True)]  # tile_batch, mirror, gaussian


@pytest.mark.parametrize("index, patch, step", [(i, p, s) for i, (p, s) in enumerate(product(PATCHES, STEPS))])
def test_stitching_is_exact_over_patches_and_steps(voxelwise, image, whole, index, patch, step):
    tile_batch, mirror, gaussian = OPTIONS[index % len(OPTIONS)]
    out = predict_sliding_window(voxelwise, image, patch_zyx=patch, n_outputs=N_OUT, step_fraction=step,
                                 tile_batch=tile_batch, mirror_axes_zyx=mirror, gaussian=gaussian)
    assert out.shape == (N_OUT, *SHAPE_ZYX) and out.dtype == np.float32
    assert np.abs(out - whole).max() < 1e-5


@pytest.mark.parametrize("tile_batch, mirror, gaussian",
                         list(product([1, 3], [(), (0, 1, 2), (2,), (0, 1)], [True, False])))
def test_stitching_is_exact_over_batches_mirroring_and_weighting(voxelwise, image, whole, tile_batch, mirror,
                                                                 gaussian):
    out = predict_sliding_window(voxelwise, image, patch_zyx=(16, 20, 12), n_outputs=N_OUT, step_fraction=0.5,
                                 tile_batch=tile_batch, mirror_axes_zyx=mirror, gaussian=gaussian)
    assert np.abs(out - whole).max() < 1e-5


@pytest.mark.parametrize("size, patch, step, expected", [
    (110, 64, 0.5, [0, 23, 46]),             # nnU-Net's own example in compute_steps_for_sliding_window
    (37, 16, 0.33, [0, 5, 10, 16, 21]),      # spacing 5.25: 10.5 rounds half to even, as np.round
    (45, 20, 1.0, [0, 12, 25]),              # spacing 12.5 -> 12
    (29, 12, 0.5, [0, 6, 11, 17]),           # spacing 17/3
    (64, 64, 0.5, [0]),                      # image == patch: one tile
    (20, 32, 0.5, [0]),                      # image < patch: padded, one tile
])
def test_tile_starts_match_nnunet(size, patch, step, expected):
    assert tile_starts_zyx((size, 64, 64), (patch, 64, 64), step) == [expected, [0], [0]]


def test_tile_starts_per_axis():
    assert tile_starts_zyx((110, 37, 45), (64, 16, 20), 0.5) == [[0, 23, 46], [0, 7, 14, 21], [0, 8, 17, 25]]


def test_gaussian_is_symmetric_peaked_and_never_zero():
    g = gaussian_importance((15, 21, 9))
    assert g.dtype == np.float32 and g.shape == (15, 21, 9)
    for axis in range(3):
        np.testing.assert_array_equal(g, np.flip(g, axis))
    assert g[7, 10, 4] == g.max() == pytest.approx(10.0)
    assert g.min() > 0
    assert not g.flags.writeable  # cached: nobody may change it for the next caller


def test_gaussian_peak_of_even_patch_is_at_size_over_two():
    g = gaussian_importance((8, 6, 4))
    assert np.unravel_index(np.argmax(g), g.shape) == (4, 3, 2)
    np.testing.assert_allclose(g[4, 3, 1:], g[4, 3, :0:-1], rtol=1e-6)  # symmetric about the centre index


@pytest.mark.parametrize("patch, sigma_fraction", [((32, 32, 32), 1 / 64), ((20, 17, 12), 1 / 8)])
def test_gaussian_is_nnunet_compute_gaussian(patch, sigma_fraction):
    # nnU-Net's recipe written out; with sigma = size/64 the truncated filter leaves zeros, which get lifted.
    delta = np.zeros(patch)
    delta[tuple(p // 2 for p in patch)] = 1
    raw = gaussian_filter(delta, [p * sigma_fraction for p in patch], 0, mode="constant", cval=0)
    expected = (raw / raw.max() * 10).astype(np.float32)
    expected[expected == 0] = expected[expected != 0].min()
    np.testing.assert_array_equal(gaussian_importance(patch, sigma_fraction), expected)
    if sigma_fraction < 1 / 8:
        assert (raw == 0).sum() > raw.size // 2


@pytest.mark.parametrize("patch, overlap", [((16, 20, 12), 0.625), (SHAPE_ZYX, 0.25), ((40, 16, 32), 0.5),
                                            ((8, 50, 10), 0.0), ((16, 20, 12), 0.75)])
@pytest.mark.parametrize("gaussian, mirror, tile_batch", [(True, (), 1), (False, (0, 2), 3)])
def test_monai_tiling_stitches_exactly(voxelwise, image, whole, patch, overlap, gaussian, mirror, tile_batch):
    out = predict_sliding_window(voxelwise, image, patch_zyx=patch, n_outputs=N_OUT, tiling="monai",
                                 overlap=overlap, gaussian=gaussian, mirror_axes_zyx=mirror, tile_batch=tile_batch)
    assert out.shape == (N_OUT, *SHAPE_ZYX)
    np.testing.assert_allclose(out, whole, rtol=1e-5, atol=1e-5)  # float32 sums over up to 4×4×4 overlapping tiles


@pytest.mark.parametrize("size, patch, overlap, expected", [
    (37, 16, 0.625, [0, 6, 12, 18, 21]),   # interval int(16·0.375) = 6; the last tile moved back to end at 37
    (45, 20, 0.25, [0, 15, 25]),
    (29, 12, 0.0, [0, 12, 17]),
    (17, 10, 0.7, [0, 3, 6, 7]),           # 10·(1 − 0.7) = 3.0000000000000004 in floating point → 3
    (12, 10, 0.99, [0, 1, 2]),             # int(0.1) = 0 → interval 1
    (64, 64, 0.5, [0]),                    # image == patch: one tile
    (20, 32, 0.5, [0]),                    # image < patch: padded, one tile
])
def test_monai_tile_starts(size, patch, overlap, expected):
    assert monai_tile_starts_zyx((size, 64, 64), (patch, 64, 64), overlap) == [expected, [0], [0]]


def test_monai_tiles_differ_from_nnunet_tiles():
    # the same patch and "half overlap" place tiles differently: MONAI steps by a fixed interval, nnU-Net spreads
    assert monai_tile_starts_zyx((110, 8, 8), (64, 8, 8), 0.5)[0] == [0, 32, 46]
    assert tile_starts_zyx((110, 8, 8), (64, 8, 8), 0.5)[0] == [0, 23, 46]


@pytest.mark.parametrize("patch", [(15, 21, 9), (8, 6, 4)])
def test_monai_gaussian_is_a_centred_separable_gaussian_with_a_floor(patch):
    g = monai_gaussian_importance(patch, 0.125)
    assert g.dtype == np.float32 and g.shape == patch and not g.flags.writeable
    axes = [np.arange(p) - (p - 1) / 2 for p in patch]  # centred between the middle voxels of an even axis
    expected = np.ones(patch)
    for a, (x, p) in enumerate(zip(axes, patch)):
        expected = expected * np.exp(-x**2 / (2 * (p * 0.125) ** 2)).reshape([-1 if b == a else 1 for b in range(3)])
    np.testing.assert_allclose(g, np.maximum(expected, 1e-3), rtol=1e-5)
    for axis in range(3):
        np.testing.assert_array_equal(g, np.flip(g, axis))
    assert g.max() == pytest.approx(1.0 if all(p % 2 for p in patch) else g.max()) and g.min() >= 1e-3
    assert g.min() == pytest.approx(1e-3)  # the corners of a sigma = size/8 Gaussian fall far below the floor


def test_mirroring_is_the_mean_of_the_flipped_predictions(conv):
    tile = np.random.default_rng(1).standard_normal((2, 12, 10, 8)).astype(np.float32)
    for mirror in [(0, 1, 2), (1,), (0, 2)]:
        passes = [conv(tile[None])[0]]
        for zyx in (c for r in range(1, len(mirror) + 1) for c in combinations(mirror, r)):
            axes = tuple(a + 1 for a in zyx)  # [C, z, y, x] / [K, z, y, x]
            flipped = np.ascontiguousarray(np.flip(tile, axes))
            passes.append(np.flip(conv(flipped[None])[0], axes))
        out = predict_sliding_window(conv, tile, patch_zyx=(12, 10, 8), n_outputs=N_OUT, mirror_axes_zyx=mirror)
        assert len(passes) == 2 ** len(mirror)
        np.testing.assert_allclose(out, np.mean(passes, axis=0), atol=1e-5)
        assert np.abs(out - passes[0]).max() > 1e-3  # the conv net is not flip-invariant: mirroring did something


def _naive_nnunet(run, image, patch, step, gaussian, mirror):
    """nnU-Net's algorithm written plainly in float64: one tile at a time, full-volume accumulators."""
    diffs = [max(p - s, 0) for s, p in zip(image.shape[1:], patch)]
    padded = np.pad(image, [(0, 0)] + [(d // 2, d - d // 2) for d in diffs])
    weight = gaussian_importance(patch).astype(np.float64) if gaussian else np.ones(patch)
    total = np.zeros((N_OUT, *padded.shape[1:]))
    count = np.zeros(padded.shape[1:])
    for corner in product(*tile_starts_zyx(padded.shape[1:], patch, step)):
        box = tuple(slice(c, c + p) for c, p in zip(corner, patch))
        tile = padded[(slice(None), *box)][None]
        combos = [c for r in range(len(mirror) + 1) for c in combinations([a + 2 for a in mirror], r)]
        pred = np.mean([np.flip(run(np.ascontiguousarray(np.flip(tile, a))), a) for a in combos], axis=0)[0]
        total[(slice(None), *box)] += pred * weight
        count[box] += weight
    crop = tuple(slice(d // 2, d // 2 + s) for d, s in zip(diffs, image.shape[1:]))
    return (total / count)[(slice(None), *crop)]


@pytest.mark.parametrize("patch, step, gaussian, mirror, tile_batch", [
    ((16, 20, 12), 0.5, True, (), 1),
    ((16, 20, 12), 0.33, True, (0, 2), 3),
    ((40, 16, 32), 0.5, False, (1,), 2),
])
def test_conv_net_matches_a_plain_nnunet_loop(conv, image, patch, step, gaussian, mirror, tile_batch):
    out = predict_sliding_window(conv, image, patch_zyx=patch, n_outputs=N_OUT, step_fraction=step,
                                 tile_batch=tile_batch, mirror_axes_zyx=mirror, gaussian=gaussian)
    expected = _naive_nnunet(conv, image, patch, step, gaussian, mirror)
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_small_axes_are_padded_symmetrically_like_pad_nd_image():
    image = np.arange(1, 1 + 2 * 5 * 6 * 7, dtype=np.float32).reshape(2, 5, 6, 7)
    seen = []

    def identity(batch):
        seen.append(batch.copy())
        return batch[:, :1] * 2

    out = predict_sliding_window(identity, image, patch_zyx=(8, 6, 10), n_outputs=1)
    (tile,) = seen[0]
    assert tile.shape == (2, 8, 6, 10)
    np.testing.assert_array_equal(tile[:, 1:6, :, 1:8], image)  # z: 3 extra → 1 below, 2 above; x: 3 → 1, 2
    assert tile.sum() == image.sum()  # the rest is zeros
    np.testing.assert_allclose(out[0], image[0] * 2, rtol=1e-6)


def test_tiles_go_in_batches_and_mirrors_multiply_the_calls():
    sizes = []

    def first_channel(batch):
        sizes.append(len(batch))
        return batch[:, :1].copy()

    image = np.ones((1, 20, 20, 20), np.float32)
    predict_sliding_window(first_channel, image, patch_zyx=(10, 10, 10), n_outputs=1, tile_batch=4,
                           mirror_axes_zyx=(0, 2))  # 3×3×3 = 27 tiles
    assert sizes == [n for n in [4] * 6 + [3] for _ in range(4)]


def test_input_is_not_modified(voxelwise, image):
    before = image.copy()
    predict_sliding_window(voxelwise, image, patch_zyx=(40, 16, 32), n_outputs=N_OUT, mirror_axes_zyx=(0,))
    np.testing.assert_array_equal(image, before)


@pytest.mark.parametrize("returned, wrong", [((1, 2, 8, 8, 8), "2"), ((1, 3, 8, 8, 7), "7"), ((3, 8, 8, 8), "")])
def test_wrong_network_output_shape_is_a_model_error(returned, wrong):
    with pytest.raises(ModelError, match=r"returned shape .*expected \(1, 3, 8, 8, 8\)"):
        predict_sliding_window(lambda batch: np.zeros(returned, np.float32), np.zeros((1, 8, 8, 8), np.float32),
                               patch_zyx=(8, 8, 8), n_outputs=3)


@pytest.mark.parametrize("kwargs, message", [
    ({"image_czyx": np.zeros((8, 8, 8), np.float32)}, "C, z, y, x"),
    ({"patch_zyx": (8, 0, 8)}, "patch_zyx"),
    ({"patch_zyx": (8, 8)}, "patch_zyx"),
    ({"patch_zyx": (8.5, 8, 8)}, "patch_zyx"),
    ({"step_fraction": 0}, "step_fraction"),
    ({"step_fraction": 1.5}, "step_fraction"),
    ({"tile_batch": 0}, "tile_batch"),
    ({"n_outputs": 0}, "n_outputs"),
    ({"mirror_axes_zyx": (3,)}, "mirror_axes_zyx"),
    ({"mirror_axes_zyx": (1, 1)}, "mirror_axes_zyx"),
    ({"sigma_fraction": 0}, "sigma_fraction"),
    ({"tiling": "torchio"}, "tiling"),
    ({"tiling": "monai", "overlap": 1.0}, "overlap"),
    ({"tiling": "monai", "overlap": -0.1}, "overlap"),
])
def test_invalid_arguments_are_model_errors(kwargs, message):
    args = {"image_czyx": np.zeros((1, 8, 8, 8), np.float32), "patch_zyx": (8, 8, 8), "n_outputs": 1, **kwargs}
    with pytest.raises(ModelError, match=message):
        predict_sliding_window(lambda batch: batch[:, :1], **args)
