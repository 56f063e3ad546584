"""Test-time augmentations of the uncertainty passes, each with its exact inverse.

A pass draws one kind from the recipe's `augmentations` (uncertainty/config.py):
- noise: Gaussian noise on the image channels (CT/PET sources; not the click prompts or zero channels) with a
  standard deviation of `std` × the channel's own on the model grid. Spatially the identity: nothing to invert.
- flip: the model-grid arrays reversed along one axis; the probabilities are reversed back (exact).
- rotation: the model grid turned about one of its own axes by a small angle, around the grid's centre, and
  enlarged to cover the original grid; the input is sampled straight from the native CT/PET onto the turned grid
  (one interpolation, as for any model grid), and the probabilities are resampled from the turned grid back onto
  the model grid (the inverse transform; linear interpolation, the only error).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hnseg_infer.geometry.grid import Box, Grid, sample
from hnseg_infer.uncertainty.config import Augmentations

AXIS_NAMES = ("z", "y", "x")


@dataclass(frozen=True)
class Draw:
    """The augmentation of one pass."""

    kind: str  # "none", "noise", "flip" or "rotation"
    axis_zyx: int | None = None  # flip: the reversed array axis; rotation: the grid axis turned about
    degrees: float | None = None
    noise_std: float | None = None

    def to_dict(self) -> dict:
        out: dict = {"kind": self.kind}
        if self.axis_zyx is not None:
            out["axis"] = AXIS_NAMES[self.axis_zyx]
        if self.degrees is not None:
            out["degrees"] = round(self.degrees, 4)
        if self.noise_std is not None:
            out["std_fraction"] = self.noise_std
        return out


def draw(augmentations: Augmentations, rng: np.random.Generator) -> Draw:
    """One kind, uniformly among the recipe's, with its parameters ("none" when the recipe lists none)."""
    kinds = augmentations.kinds
    if not kinds:
        return Draw("none")
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "noise":
        return Draw("noise", noise_std=augmentations.noise_std)
    if kind == "flip":
        axes = augmentations.flip_axes_zyx
        return Draw("flip", axis_zyx=int(axes[int(rng.integers(len(axes)))]))
    limit = augmentations.rotation_max_degrees
    return Draw("rotation", axis_zyx=int(rng.integers(3)), degrees=float(rng.uniform(-limit, limit)))


def flip(array_czyx: np.ndarray, axis_zyx: int) -> np.ndarray:
    """[C, z, y, x] reversed along one spatial axis (its own inverse), as a contiguous copy."""
    return np.ascontiguousarray(np.flip(array_czyx, axis=1 + axis_zyx))


def add_noise(image_czyx: np.ndarray, *, image_channels: list[int], std_fraction: float,
              rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise added to the listed channels, each with std_fraction × its standard deviation (in place)."""
    for c in image_channels:
        sd = float(image_czyx[c].std())
        if sd > 0:
            image_czyx[c] += rng.standard_normal(image_czyx.shape[1:], dtype=np.float32) * np.float32(std_fraction * sd)
    return image_czyx


def rotation_matrix(axis_xyz: int, degrees: float) -> np.ndarray:
    """3×3 rotation by `degrees` about the unit vector of axis `axis_xyz` (0 x, 1 y, 2 z)."""
    theta = np.deg2rad(degrees)
    c, s = np.cos(theta), np.sin(theta)
    i, j = [a for a in range(3) if a != axis_xyz]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def rotated_grid(grid: Grid, *, axis_zyx: int, degrees: float) -> Grid:
    """The grid's axes turned about its own axis `axis_zyx` by `degrees` around its centre, with its spacing, and
    large enough that its voxel centres enclose every voxel centre of `grid` (one voxel of margin)."""
    direction = np.asarray(grid.direction).reshape(3, 3) @ rotation_matrix(2 - axis_zyx, degrees)
    frame = tuple(direction.flatten().tolist())
    enclosing = grid.box().in_frame(frame)
    spacing = np.asarray(grid.spacing_xyz_mm)
    grown = Box(tuple((np.asarray(enclosing.corner_xyz_mm) - direction @ spacing).tolist()),
                tuple((np.asarray(enclosing.size_xyz_mm) + 2 * spacing).tolist()), frame)
    return Grid.covering(grown, grid.spacing_xyz_mm)


def resample_back(channels_kzyx: np.ndarray, *, source: Grid, target: Grid, fill_values: list[float]) -> np.ndarray:
    """[K, z, y, x] on `source` → on `target`, each channel interpolated linearly (the rotation's inverse)."""
    out = np.empty((len(channels_kzyx), *target.size_zyx), np.float32)
    for k, channel in enumerate(channels_kzyx):
        image = source.image_from_array(np.ascontiguousarray(channel, dtype=np.float32))
        out[k] = sample(image, target, interpolation="linear", fill_value=fill_values[k])
    return out

