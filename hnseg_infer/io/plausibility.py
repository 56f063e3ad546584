"""Does the CT look like a CT and the PET like a PET? Cheap statistics on what the pipeline will use.

A CT in Hounsfield units has air near -1000 HU somewhere in its field (around the neck, in the airway, in the
lungs); a PET has non-negative uptake and a body above its background. A modality in the other's folder, the CT
given twice, or a CT without its rescale (uint16 holding HU+1024, uint8 windows) fails these and would otherwise
run to a silent wrong mask. The statistics come from a strided sample of at most SAMPLE_VOXELS voxels, and for the
PET only from its part inside the CT's field, so a huge, mostly empty PET field neither fails them nor costs
memory; exact minima and maxima come from ITK without a copy.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hnseg_infer.errors import InputError
from hnseg_infer.geometry.grid import Grid

SAMPLE_VOXELS = 1 << 21
AIR_HU_MAX = -300.0  # a CT's lowest value is at most this (air -1000, lung -800); soft tissue and bone are above
UNSIGNED_HU_OFFSET = 1024  # the usual rescale intercept of CTs stored without it (uint16 holding HU+1024)
SOFT_TISSUE_HU = (-200.0, 250.0)  # fat to contrast-enhanced tissue: most of a CT's body lies here
MIN_SOFT_TISSUE_FRACTION = 0.5
# A PET's reconstruction may dip a little below 0 in its background; a CT has air (-1000 HU) in part of its field.
# (stored value, fraction of the sampled voxels below it beyond which the "PET" is a CT)
PET_NEGATIVE_LIMITS = ((-50.0, 0.05), (-500.0, 0.001))
PET_MAX_STORED = 1e8  # Bq/mL of a bladder is ~1e6; values near float32's maximum are a broken conversion


def sample_zyx(array_zyx: np.ndarray, max_voxels: int = SAMPLE_VOXELS) -> np.ndarray:
    """A strided sub-lattice of at most ~max_voxels voxels (every voxel of a small image), as a flat copy."""
    stride = max(1, math.ceil((array_zyx.size / max_voxels) ** (1 / 3)))
    return np.asarray(array_zyx[::stride, ::stride, ::stride], dtype=np.float32).ravel()


def min_max(image: sitk.Image) -> tuple[float, float]:
    """The exact extremes of every voxel, without copying the image."""
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    return stats.GetMinimum(), stats.GetMaximum()


def check_ct(ct: sitk.Image, path: Path, warnings: list[str]) -> sitk.Image:
    """The CT, refused unless it looks like a CT in HU; an integer CT stored as HU+1024 is corrected (warned)."""
    low, high = min_max(ct)
    if low == high:
        raise InputError(f"CT {path} is constant ({low:g}): expected a CT in HU")
    if low <= AIR_HU_MAX:
        return ct
    values = sample_zyx(sitk.GetArrayViewFromImage(ct))
    if _looks_like_hu_plus_offset(ct, values, low):
        warnings.append(f"CT {path.name}: stored as HU+{UNSIGNED_HU_OFFSET} (lowest value {low:g}, body around "
                        f"{np.median(values[values > UNSIGNED_HU_OFFSET - 500]):g}); {UNSIGNED_HU_OFFSET} subtracted")
        return _shifted(ct, -UNSIGNED_HU_OFFSET)
    raise InputError(f"CT {path} does not look like a CT in Hounsfield units: its lowest value is {low:g} (median "
                     f"{np.median(values):g}, highest {high:g}) but a CT has air near -1000 HU: check that the CT "
                     f"folder holds the CT (not the PET) and that its conversion applied the rescale slope and "
                     f"intercept (a windowed uint8 image cannot be used)")


def _looks_like_hu_plus_offset(ct: sitk.Image, values: np.ndarray, low: float) -> bool:
    """An integer CT whose air sits near 0 and whose body sits around +1024: HU stored without the intercept."""
    integer = ct.GetPixelID() in (sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32)
    if not integer or not -50 <= low <= 200:
        return False
    hu = values - UNSIGNED_HU_OFFSET
    body = hu[hu > -500]
    if body.size == 0:
        return False
    soft = np.count_nonzero((body >= SOFT_TISSUE_HU[0]) & (body <= SOFT_TISSUE_HU[1]))
    return soft / body.size >= MIN_SOFT_TISSUE_FRACTION


def _shifted(ct: sitk.Image, offset: int) -> sitk.Image:
    """The CT plus `offset`, as int16 when it fits (a whole-body CT stays half the size of float32)."""
    values = sitk.GetArrayViewFromImage(ct).astype(np.int32) + offset
    dtype = np.int16 if values.min() >= -32768 and values.max() <= 32767 else np.int32
    shifted = sitk.GetImageFromArray(values.astype(dtype))
    shifted.CopyInformation(ct)  # same grid, values corrected
    return shifted


def pet_within(pet: sitk.Image, ct_grid: Grid) -> np.ndarray:
    """The PET voxels (zyx view, no copy) inside the CT's field: what the pipeline samples."""
    crop = Grid.of(pet).crop_to(ct_grid.box())
    array = sitk.GetArrayViewFromImage(pet)
    return array[crop[1]] if crop is not None else array[:0, :0, :0]


def check_pet(pet: sitk.Image, ct: sitk.Image, path: Path) -> None:
    """Refuse a PET without uptake inside the CT's field, or one with a CT's air (a CT in the PET folder)."""
    ct_grid = Grid.of(ct)
    if Grid.of(pet).same_as(ct_grid, tol=0.0) and pet.GetPixelID() == ct.GetPixelID() and np.array_equal(
            sitk.GetArrayViewFromImage(pet), sitk.GetArrayViewFromImage(ct)):
        raise InputError(f"PET {path} is the same image as the CT (same grid and voxels): put the PET of the "
                         f"study in the PET folder")
    within = pet_within(pet, ct_grid)
    highest = float(within.max()) if within.size else float("nan")
    if not highest > 0:
        raise InputError(f"PET {path} has no positive uptake inside the CT's field of view (highest value "
                         f"{highest:g}): expected an FDG PET in SUV or Bq/mL of the same study")
    if highest > PET_MAX_STORED:
        raise InputError(f"PET {path} has values up to {highest:.3g}, beyond any uptake in SUV or Bq/mL "
                         f"({PET_MAX_STORED:.0e}): check the conversion of this image (its rescale slope)")
    values = sample_zyx(within)
    for limit, max_fraction in PET_NEGATIVE_LIMITS:
        fraction = np.count_nonzero(values < limit) / values.size
        if fraction > max_fraction:
            raise InputError(f"PET {path} has {fraction:.1%} of its voxels below {limit:g} (lowest "
                             f"{float(values.min()):g}), as a CT's air has, but PET uptake is non-negative: check "
                             f"that the PET folder holds the PET and not a second CT")
