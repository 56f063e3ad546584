"""Spectrum-swapping CT harmonisation (SSIMH, as team BIGS2 applied it to HECKTOR CTs).

Each axial slice of the CT on the model grid is taken to the frequency domain by the orthonormal type-II 2-D DCT
(scipy.fft.dctn(type=2, norm="ortho") over the slice's (y, x) axes), its low-frequency block is replaced by a
reference subject's, and the slice is brought back by the inverse DCT. The block of radius τ is the τ × τ
coefficients with max(u, v) < τ (u, v the vertical and horizontal frequency indices, 0 the constant term): what
the SSIMH authors' own code swaps (`a_src(1:b, 1:b) = a_trg(1:b, 1:b)` between dct2 and idct2 of slice i of the
source and slice i of the reference, b = 3; guanharry/DomainATM, algorithms_img/SSIMH.m). MATLAB's dct2 is the
orthonormal type-II DCT, as here. Only these τ² coefficients change: the output's DCT equals the input's outside
the block.

**The reference** is stored beside the weights as a NumPy .npz (`reference_ct_dct.npz`, written by
export/make_harmonisation_reference.py) holding

- `low_frequency_dct`: float64 [Z, B, B], B >= τ: the block of each axial slice of the reference CT, slice k of
  the model grid (z index k, inferior → superior for the `lps` and `ras` orientations) in row k;
- `grid_size_zyx`: int [3], the model-grid size it was computed on.

The coefficients of an orthonormal DCT depend on the slice size (the constant term is the slice mean × √(Y·X)),
so the reference is computed on the model grid itself: the reference CT cropped by the recipe's ROI method and
sampled as the model samples its CT channel. As in SSIMH, slice k is harmonised with the reference's slice k
(the ROI box is anchored on anatomy, so row k is the same level in every subject). This is exact when the model
grid has the reference's size, which is always the case for a fixed-size ROI (the recipe's 200×200×310 mm box at
1 mm: a 310×200×200 grid); the recipe loader refuses a reference whose size does not fit such a grid. A grid of
another size (a no-head fallback box clipped to the CT, a variable-size ROI) uses a mapped reference, and the run
report says so: slices paired by relative position (nearest row) and the coefficients scaled by
√(Y·X / (Y_ref·X_ref)), which keeps the slice mean and the amplitude of each low-frequency cosine.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.fft import dctn, idctn

from hnseg_infer.errors import RecipeError
from hnseg_infer.io.atomic import file_sha256, write_atomic

REFERENCE_FILE = "reference_ct_dct.npz"
DEFAULT_RADIUS = 3
KEYS = ("low_frequency_dct", "grid_size_zyx")
_CHUNK_SLICES = 32  # slices transformed at a time (float64 work arrays of a 200×200 slab: ~10 MB)


def slice_dct(x_zyx: np.ndarray) -> np.ndarray:
    """The orthonormal type-II 2-D DCT of every axial slice (over the y and x axes), float64."""
    return dctn(np.asarray(x_zyx, dtype=np.float64), type=2, norm="ortho", axes=(1, 2))


def low_frequency_block(x_zyx: np.ndarray, radius: int) -> np.ndarray:
    """[Z, radius, radius]: the DCT coefficients with max(u, v) < radius of each axial slice."""
    if not 1 <= radius <= min(x_zyx.shape[1:]):
        raise ValueError(f"radius {radius} must be in [1, {min(x_zyx.shape[1:])}] for slices of {x_zyx.shape[1:]}")
    out = np.empty((x_zyx.shape[0], radius, radius), np.float64)
    for start in range(0, x_zyx.shape[0], _CHUNK_SLICES):
        out[start:start + _CHUNK_SLICES] = slice_dct(x_zyx[start:start + _CHUNK_SLICES])[:, :radius, :radius]
    return out


def swap_low_frequencies(x_zyx: np.ndarray, block_zrr: np.ndarray) -> np.ndarray:
    """Each axial slice with its DCT coefficients max(u, v) < r replaced by `block_zrr` [Z, r, r]; float32.
    The input is not modified."""
    z, r = x_zyx.shape[0], block_zrr.shape[1]
    if block_zrr.shape != (z, r, r) or r > min(x_zyx.shape[1:]):
        raise ValueError(f"block {block_zrr.shape} does not fit {z} slices of {x_zyx.shape[1:]}")
    out = np.empty(x_zyx.shape, np.float32)
    for start in range(0, z, _CHUNK_SLICES):
        stop = min(start + _CHUNK_SLICES, z)
        coefficients = slice_dct(x_zyx[start:stop])
        coefficients[:, :r, :r] = block_zrr[start:stop]
        out[start:stop] = idctn(coefficients, type=2, norm="ortho", axes=(1, 2))
    return out


@dataclass(frozen=True, eq=False)
class SpectrumReference:
    """A loaded reference: the low-frequency DCT blocks of a reference CT on a model grid of `grid_size_zyx`."""

    path: Path
    sha256: str
    low_frequency_dct: np.ndarray = field(compare=False)  # float64 [Z, B, B]; `sha256` is its identity
    grid_size_zyx: tuple[int, int, int]

    def block_for(self, size_zyx, radius: int) -> tuple[np.ndarray, str | None]:
        """The [Z, r, r] block for a grid of `size_zyx` (r = radius, at most the slice size), and a note when the
        grid is not the reference's and the mapped block was used (see the module's docstring)."""
        size_zyx = tuple(int(s) for s in size_zyx)
        r = min(radius, *size_zyx[1:])
        if size_zyx == self.grid_size_zyx:
            return self.low_frequency_dct[:, :r, :r], None
        z, z_ref = size_zyx[0], self.grid_size_zyx[0]
        rows = np.rint(np.arange(z) * ((z_ref - 1) / (z - 1) if z > 1 else 0.0)
                       + ((z_ref - 1) / 2 if z == 1 else 0.0)).astype(int)
        scale = np.sqrt(size_zyx[1] * size_zyx[2] / (self.grid_size_zyx[1] * self.grid_size_zyx[2]))
        note = (f"spectrum_swap: reference {self.path.name} was computed on a {_size(self.grid_size_zyx)} (z×y×x) "
                f"model grid, this grid is {_size(size_zyx)}: reference slices paired by relative position and "
                f"its coefficients scaled by sqrt(in-plane voxel ratio) = {scale:.4f}")
        return self.low_frequency_dct[rows, :r, :r] * scale, note


def _size(size_zyx) -> str:
    return "×".join(str(int(s)) for s in size_zyx)


def harmonise(x_zyx: np.ndarray, *, reference: SpectrumReference, radius: int = DEFAULT_RADIUS) -> np.ndarray:
    """The recipe op `spectrum_swap`: x with each slice's low-frequency block replaced by the reference's."""
    block, _ = reference.block_for(x_zyx.shape, radius)
    return swap_low_frequencies(x_zyx, block)


def load_reference(path: Path, *, radius: int, where: str) -> SpectrumReference:
    """Read and check a reference file; RecipeError naming the file and the fix for anything wrong."""

    path = Path(path)
    fix = "recompute it with export/make_harmonisation_reference.py"
    if not path.is_file():
        raise RecipeError(f"{where}: harmonisation reference {path} does not exist: {fix}, or fix 'reference'")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in KEYS if key not in data.files]
            if missing:
                raise RecipeError(f"{where}: harmonisation reference {path} lacks {missing} (it holds "
                                  f"{sorted(data.files)}): {fix}")
            block = np.asarray(data["low_frequency_dct"], dtype=np.float64)
            size = np.asarray(data["grid_size_zyx"])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise RecipeError(f"{where}: harmonisation reference {path} cannot be read as a NumPy .npz "
                          f"({type(error).__name__}: {error}): {fix}") from error
    if size.shape != (3,) or not np.issubdtype(size.dtype, np.integer) or (size < 1).any():
        raise RecipeError(f"{where}: harmonisation reference {path}: grid_size_zyx must be 3 positive integers, got "
                          f"{size.tolist()}: {fix}")
    grid_size = tuple(int(s) for s in size)
    if block.ndim != 3 or block.shape[0] != grid_size[0] or block.shape[1] != block.shape[2]:
        raise RecipeError(f"{where}: harmonisation reference {path}: low_frequency_dct has shape "
                          f"{list(block.shape)}, expected [{grid_size[0]}, B, B] (one B×B block per slice of its "
                          f"{_size(grid_size)} grid): {fix}")
    if not np.isfinite(block).all():
        raise RecipeError(f"{where}: harmonisation reference {path} holds non-finite coefficients: {fix}")
    if block.shape[1] < radius:
        raise RecipeError(f"{where}: harmonisation reference {path} holds {block.shape[1]}×{block.shape[1]} "
                          f"blocks but the op's radius is {radius}: lower 'radius' or recompute it with "
                          f"--radius {radius}")
    if block.shape[1] > min(grid_size[1:]):
        raise RecipeError(f"{where}: harmonisation reference {path}: {block.shape[1]}×{block.shape[1]} blocks do "
                          f"not fit slices of {grid_size[1]}×{grid_size[2]}: {fix}")
    return SpectrumReference(path, file_sha256(path), block, grid_size)


def check_fits(reference: SpectrumReference, expected_size_zyx, *, where: str) -> None:
    """A reference must have been computed on the model grid that a fixed-size ROI gives."""
    expected = tuple(int(s) for s in expected_size_zyx)
    if reference.grid_size_zyx != expected:
        raise RecipeError(f"{where}: harmonisation reference {reference.path.name} was computed on a "
                          f"{_size(reference.grid_size_zyx)} (z×y×x) grid but this model's grid in its ROI is "
                          f"{_size(expected)}: recompute it with export/make_harmonisation_reference.py for this "
                          f"recipe")


def save_reference(path: Path, low_frequency_dct: np.ndarray, grid_size_zyx) -> Path:
    """Write a reference file atomically (io/atomic.py)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, low_frequency_dct=np.asarray(low_frequency_dct, np.float64),
                     grid_size_zyx=np.asarray(grid_size_zyx, np.int64))

    return write_atomic(path, write)
