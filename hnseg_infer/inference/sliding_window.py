"""Sliding-window inference over a [C, z, y, x] volume, as nnU-Net v2's predictor or MONAI's
sliding_window_inference does it (the recipe's `tiling`).

The network is any callable `float32[N, C, z, y, x] -> float32[N, K, z, y, x]` (logits); this module does not know
which backend runs it. With tiling "nnunet", tile positions, the Gaussian importance map, padding of small images
and mirroring TTA follow nnunetv2/inference (compute_steps_for_sliding_window, compute_gaussian, pad_nd_image,
_internal_maybe_mirror_and_predict) so that predictions match nnUNetPredictor. With tiling "monai", tile positions
and the importance map follow monai.inferers.sliding_window_inference (_get_scan_interval, dense_patch_slices,
compute_importance_map); its padding of small images is nnU-Net's (diff//2 below, the rest above), and the
weighted average is the same. One deliberate difference: the accumulators are float32 where nnU-Net uses float16
on the GPU (more exact; the volumes here fit in host memory).

Memory: one float32 [K, z, y, x] accumulator, one [z, y, x] weight map and the (padded) input; everything else is
tile-sized.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from itertools import combinations, product

import numpy as np
from scipy.ndimage import gaussian_filter

from hnseg_infer.errors import ModelError
from hnseg_infer.recipe.vocabulary import Tiling, values

RunBatch = Callable[[np.ndarray], np.ndarray]

GAUSSIAN_PEAK = 10.0  # nnU-Net's value_scaling_factor: keeps the tails of the map far from float underflow
MONAI_MIN_WEIGHT = 1e-3  # compute_importance_map clamps its (peak 1) map to at least this
TILINGS = values(Tiling)


def predict_sliding_window(run_batch: RunBatch, image_czyx: np.ndarray, *, patch_zyx: Sequence[int],
                           n_outputs: int, step_fraction: float = 0.5, tile_batch: int = 1,
                           mirror_axes_zyx: Sequence[int] = (), sigma_fraction: float = 1 / 8,
                           gaussian: bool = True, tiling: str = "nnunet", overlap: float = 0.25,
                           flips_zyx: Sequence[tuple[int, ...]] | None = None,
                           on_batch: Callable[[int, int], None] | None = None) -> np.ndarray:
    """float32 [K, z, y, x] logits: tiles weighted by a Gaussian (or uniformly) and averaged where they overlap.

    `tiling` "nnunet" places tiles by `step_fraction`, "monai" by `overlap` (MONAI's parameter), each with its own
    Gaussian (sigma = patch * sigma_fraction). An axis shorter than the patch is zero-padded symmetrically to the
    patch and cropped back afterwards. With `mirror_axes_zyx`, each tile is predicted 2**len(axes) times (every
    combination of flips) and the logits averaged. Tiles go to `run_batch` `tile_batch` at a time.
    `flips_zyx` instead runs exactly these flip combinations (each a tuple of axes, () unflipped; the anytime
    passes run one at a time, inference/anytime.py). `on_batch(tiles_done, n_tiles)` is called after each tile
    batch (it may raise to stop the pass).
    """
    window = WindowSums(image_czyx, patch_zyx=patch_zyx, n_outputs=n_outputs, step_fraction=step_fraction,
                        tile_batch=tile_batch, mirror_axes_zyx=mirror_axes_zyx, sigma_fraction=sigma_fraction,
                        gaussian=gaussian, tiling=tiling, overlap=overlap)
    window.add(run_batch, range(window.n_tiles), flips_zyx=flips_zyx, on_batch=on_batch)
    return window.logits(in_place=True)


class WindowSums:
    """One sliding window's weighted sums, filled tile by tile. After any set of tiles that covers every voxel
    (e.g. `covering()`, then the rest), `logits()` is the Gaussian-weighted mean of the tiles added; after all of
    them it is predict_sliding_window's result (the same tiles in the same order give the same floats)."""

    def __init__(self, image_czyx: np.ndarray, *, patch_zyx: Sequence[int], n_outputs: int,
                 step_fraction: float = 0.5, tile_batch: int = 1, mirror_axes_zyx: Sequence[int] = (),
                 sigma_fraction: float = 1 / 8, gaussian: bool = True, tiling: str = "nnunet",
                 overlap: float = 0.25):
        self.patch = _check_patch(patch_zyx)
        _check_arguments(image_czyx, n_outputs=n_outputs, step_fraction=step_fraction, tile_batch=tile_batch,
                         mirror_axes_zyx=mirror_axes_zyx, sigma_fraction=sigma_fraction, tiling=tiling,
                         overlap=overlap)
        self.image, self.crop = _pad_to_patch(np.asarray(image_czyx, dtype=np.float32), self.patch)
        size = self.image.shape[1:]
        if tiling == "nnunet":
            self.starts = tile_starts_zyx(size, self.patch, step_fraction)
            importance = gaussian_importance
        else:
            self.starts = monai_tile_starts_zyx(size, self.patch, overlap)
            importance = monai_gaussian_importance
        self.tile_weights = importance(self.patch, sigma_fraction) if gaussian else np.ones(self.patch, np.float32)
        self.n_outputs, self.tile_batch, self.mirror_axes_zyx = n_outputs, tile_batch, tuple(mirror_axes_zyx)
        # nnU-Net's and MONAI's order: z outermost, x innermost (it matters only for float rounding).
        self.corners = list(product(*self.starts))
        self.sums = np.zeros((n_outputs, *size), np.float32)
        self.weights = np.zeros(size, np.float32)
        self.added: set[int] = set()

    @property
    def n_tiles(self) -> int:
        return len(self.corners)

    def covering(self) -> list[int]:
        """The indices of a subset of the tiles that still covers every voxel: per axis, from the first start, the
        furthest start that leaves no gap, to the last (with tiles placed without overlap: all of them)."""
        chosen = [set(_covering_starts(starts, p)) for starts, p in zip(self.starts, self.patch)]
        return [i for i, corner in enumerate(self.corners) if all(c in axis for c, axis in zip(corner, chosen))]

    def add(self, run_batch: RunBatch, indices, *, flips_zyx: Sequence[tuple[int, ...]] | None = None,
            on_batch: Callable[[int, int], None] | None = None) -> None:
        """Predict the tiles `indices` (in that order, `tile_batch` at a time) and add them; `on_batch(done,
        len(indices))` after each batch, which may raise to stop: the batches before stay added."""
        indices = list(indices)
        for first in range(0, len(indices), self.tile_batch):
            part = indices[first:first + self.tile_batch]
            boxes = [tuple(slice(s, s + p) for s, p in zip(self.corners[i], self.patch)) for i in part]
            batch = np.stack([self.image[(slice(None), *box)] for box in boxes])
            if flips_zyx is None:
                predicted = _predict_mirrored(run_batch, batch, self.mirror_axes_zyx, self.n_outputs)
            else:
                predicted = _predict_flips(run_batch, batch, flips_zyx, self.n_outputs)
            predicted *= self.tile_weights
            for box, tile_logits in zip(boxes, predicted):
                self.sums[(slice(None), *box)] += tile_logits  # in place: no volume-sized temporary per tile
                self.weights[box] += self.tile_weights
            self.added.update(part)
            if on_batch is not None:
                on_batch(first + len(boxes), len(indices))

    def logits(self, *, in_place: bool = False) -> np.ndarray:
        """The weighted mean of the tiles added, cropped to the image: [K, z, y, x]. `in_place` divides the sums
        themselves (no further tile may be added then)."""
        out = self.sums if in_place else np.empty_like(self.sums)
        np.divide(self.sums, self.weights, out=out)
        return out[(slice(None), *self.crop)]


def _covering_starts(starts: list[int], patch: int) -> list[int]:
    chosen = [starts[0]]
    while chosen[-1] != starts[-1]:
        reach = max(s for s in starts if s <= chosen[-1] + patch)
        # tiles are never placed further apart than a patch; if they were, the next one (the gap stays uncovered)
        chosen.append(reach if reach > chosen[-1] else min(s for s in starts if s > chosen[-1]))
    return chosen


def tile_starts_zyx(image_size_zyx: Sequence[int], patch_zyx: Sequence[int], step_fraction: float) -> list[list[int]]:
    """Tile start indices per axis, as nnU-Net's compute_steps_for_sliding_window.

    The step is at most patch*step_fraction, shrunk so that the tiles spread evenly from 0 to size - patch.
    An axis shorter than the patch is padded to it first, so it gets the single start 0.
    """
    patch = _check_patch(patch_zyx)
    if not 0 < step_fraction <= 1:
        raise ModelError(f"step_fraction must be in (0, 1], got {step_fraction}")
    starts = []
    for size, tile in zip((max(int(s), p) for s, p in zip(image_size_zyx, patch)), patch):
        n_steps = int(np.ceil((size - tile) / (tile * step_fraction))) + 1
        spacing = (size - tile) / (n_steps - 1) if n_steps > 1 else 0.0
        # np.round (half to even) as nnU-Net, so that 10.5 -> 10 exactly as there.
        starts.append([int(np.round(spacing * i)) for i in range(n_steps)])
    return starts


def monai_tile_starts_zyx(image_size_zyx: Sequence[int], patch_zyx: Sequence[int],
                          overlap: float) -> list[list[int]]:
    """Tile start indices per axis, as MONAI's sliding_window_inference (_get_scan_interval, dense_patch_slices).

    The scan interval is int(patch * (1 - overlap)) (at least 1; the patch itself where it equals the size); tiles
    start at multiples of it until one reaches the end, and the last is moved back to end exactly at the border.
    An axis shorter than the patch is padded to it first, so it gets the single start 0.
    """
    patch = _check_patch(patch_zyx)
    if not 0 <= overlap < 1:
        raise ModelError(f"overlap must be in [0, 1), got {overlap}")
    starts = []
    for size, tile in zip((max(int(s), p) for s, p in zip(image_size_zyx, patch)), patch):
        interval = tile if tile == size else max(int(tile * (1 - overlap)), 1)
        n_tiles = next(d for d in range(size) if d * interval + tile >= size) + 1
        starts.append([min(i * interval, size - tile) for i in range(n_tiles)])
    return starts


def monai_gaussian_importance(patch_zyx: Sequence[int], sigma_fraction: float = 0.125) -> np.ndarray:
    """float32 weights over a tile, as MONAI's compute_importance_map(mode="gaussian", sigma_scale=sigma_fraction):
    a separable Gaussian centred at (size - 1) / 2, peak 1, clamped below at 1e-3, computed in float32 in the same
    order as there. Read-only: it is cached."""
    if not sigma_fraction > 0:
        raise ModelError(f"sigma_fraction must be > 0, got {sigma_fraction}")
    return _monai_gaussian_cached(_check_patch(patch_zyx), float(sigma_fraction))


@lru_cache(maxsize=8)
def _monai_gaussian_cached(patch: tuple[int, int, int], sigma_fraction: float) -> np.ndarray:
    weights = None
    for size in patch:
        x = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=np.float32)
        profile = np.exp(x**2 / np.float32(-2 * (size * sigma_fraction) ** 2))
        weights = profile if weights is None else weights[..., None] * profile
    weights = np.maximum(weights, max(float(weights.min()), MONAI_MIN_WEIGHT)).astype(np.float32)
    weights.flags.writeable = False
    return weights


def gaussian_importance(patch_zyx: Sequence[int], sigma_fraction: float = 1 / 8) -> np.ndarray:
    """float32 weights over a tile, as nnU-Net's compute_gaussian(value_scaling_factor=10): a delta at the centre
    (index size//2) blurred with sigma = size*sigma_fraction, peak scaled to 10, zeros lifted to the smallest
    non-zero value (a voxel weighted 0 by every tile would divide 0 by 0). Read-only: it is cached."""
    if not sigma_fraction > 0:
        raise ModelError(f"sigma_fraction must be > 0, got {sigma_fraction}")
    return _gaussian_cached(_check_patch(patch_zyx), float(sigma_fraction))


@lru_cache(maxsize=8)
def _gaussian_cached(patch: tuple[int, int, int], sigma_fraction: float) -> np.ndarray:
    delta = np.zeros(patch)
    delta[tuple(size // 2 for size in patch)] = 1
    blurred = gaussian_filter(delta, [size * sigma_fraction for size in patch], 0, mode="constant", cval=0)
    weights = (blurred / blurred.max() * GAUSSIAN_PEAK).astype(np.float32)
    weights[weights == 0] = weights[weights != 0].min()
    weights.flags.writeable = False
    return weights


def _predict_mirrored(run_batch: RunBatch, batch: np.ndarray, mirror_axes_zyx: Sequence[int],
                      n_outputs: int) -> np.ndarray:
    """The mean of the logits over the unflipped batch and every non-empty combination of flipped axes
    (nnU-Net's _internal_maybe_mirror_and_predict). Returns a new array the caller may modify."""
    total = np.array(_run_checked(run_batch, batch, n_outputs), dtype=np.float32)  # a copy we own
    axes_nczyx = [axis + 2 for axis in mirror_axes_zyx]
    flips = [c for r in range(1, len(axes_nczyx) + 1) for c in combinations(axes_nczyx, r)]
    for axes in flips:
        flipped = np.ascontiguousarray(np.flip(batch, axes))
        total += np.flip(_run_checked(run_batch, flipped, n_outputs), axes)
    if flips:
        total /= len(flips) + 1
    return total


def mirror_combinations(mirror_axes_zyx: Sequence[int]) -> list[tuple[int, ...]]:
    """The flip combinations mirroring over these axes averages: () first, then as _predict_mirrored runs them."""
    return [(), *(c for r in range(1, len(mirror_axes_zyx) + 1) for c in combinations(mirror_axes_zyx, r))]


def _predict_flips(run_batch: RunBatch, batch: np.ndarray, flips_zyx: Sequence[tuple[int, ...]],
                   n_outputs: int) -> np.ndarray:
    """The mean of the logits over exactly these flip combinations (axes zyx; () is the unflipped batch)."""
    if not flips_zyx or any(not set(f) <= {0, 1, 2} for f in flips_zyx):
        raise ModelError(f"flips_zyx must be a non-empty list of combinations of axes 0, 1, 2, got {flips_zyx!r}")
    total = None
    for flip in flips_zyx:
        axes = tuple(a + 2 for a in flip)
        source = np.ascontiguousarray(np.flip(batch, axes)) if axes else batch
        out = _run_checked(run_batch, source, n_outputs)
        out = np.flip(out, axes) if axes else out
        total = np.array(out, dtype=np.float32) if total is None else np.add(total, out, out=total)
    if len(flips_zyx) > 1:
        total /= len(flips_zyx)
    return total


def _run_checked(run_batch: RunBatch, batch: np.ndarray, n_outputs: int) -> np.ndarray:
    """run_batch(batch) as float32, its shape checked: a wrong shape would otherwise broadcast or fail obscurely."""
    out = np.asarray(run_batch(batch), dtype=np.float32)
    expected = (batch.shape[0], n_outputs, *batch.shape[2:])
    if out.shape != expected:
        raise ModelError(f"the network returned shape {out.shape} for a batch of shape {batch.shape}; expected "
                         f"{expected} (N, n_outputs, *patch): check the recipe's patch size and number of outputs "
                         f"against the model")
    return out


def _pad_to_patch(image: np.ndarray, patch: tuple[int, int, int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Zero-pad axes shorter than the patch, the extra split low = diff//2, high = the rest (nnU-Net's
    pad_nd_image); return the padded image and the slices that crop its spatial axes back. No copy if none."""
    diffs = [max(p - s, 0) for s, p in zip(image.shape[1:], patch)]
    if not any(diffs):
        return image, tuple(slice(None) for _ in patch)
    widths = [(d // 2, d - d // 2) for d in diffs]
    padded = np.pad(image, [(0, 0), *widths], mode="constant", constant_values=0)
    return padded, tuple(slice(lo, lo + s) for (lo, _), s in zip(widths, image.shape[1:]))


def _check_patch(patch_zyx: Sequence[int]) -> tuple[int, int, int]:
    patch = tuple(patch_zyx)
    if len(patch) != 3 or not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) and p > 0
                                  for p in patch):
        raise ModelError(f"patch_zyx must be 3 positive integers, got {patch_zyx!r}")
    return tuple(int(p) for p in patch)


def _check_arguments(image_czyx: np.ndarray, *, n_outputs: int, step_fraction: float, tile_batch: int,
                     mirror_axes_zyx: Sequence[int], sigma_fraction: float, tiling: str, overlap: float) -> None:
    shape = np.shape(image_czyx)
    if len(shape) != 4 or 0 in shape:
        raise ModelError(f"the sliding window takes a non-empty [C, z, y, x] image, got shape {shape}")
    if not (isinstance(n_outputs, (int, np.integer)) and n_outputs > 0):
        raise ModelError(f"n_outputs must be a positive integer, got {n_outputs!r}")
    if not 0 < step_fraction <= 1:
        raise ModelError(f"step_fraction must be in (0, 1], got {step_fraction}")
    if not (isinstance(tile_batch, (int, np.integer)) and tile_batch >= 1):
        raise ModelError(f"tile_batch must be an integer >= 1, got {tile_batch!r}")
    axes = tuple(mirror_axes_zyx)
    if len(set(axes)) != len(axes) or not set(axes) <= {0, 1, 2}:
        raise ModelError(f"mirror_axes_zyx must be distinct axes among 0 (z), 1 (y), 2 (x), got {axes}")
    if not sigma_fraction > 0:
        raise ModelError(f"sigma_fraction must be > 0, got {sigma_fraction}")
    if tiling not in TILINGS:
        raise ModelError(f"tiling must be one of {TILINGS}, got {tiling!r}")
    if not 0 <= overlap < 1:
        raise ModelError(f"overlap must be in [0, 1), got {overlap}")
