"""ROI location: pure functions from the native CT/PET to a physical box (mm, LPS axes) and a record.

All methods look at the PET in SUV on an LPS-aligned working grid (superior = physical +z whatever the CT's
direction), so flipped or permuted CTs give the same box. When a method's anatomy (a head) is not in view it falls
back to a box of the method's size centred on the CT/PET overlap and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import cc3d
import numpy as np
import SimpleITK as sitk

from .errors import InputError, RecipeError
from .grid import IDENTITY, Box, Grid, sample

WORK_SPACING_XYZ_MM = (4.0, 4.0, 3.0)  # localisation needs no finer grid; boxes are in mm
# A head shows as a large hot region (the brain) near the top of the scan: at least this volume above this SUV,
# at least this wide in x and y, within the top of the field of view. A hot limb tumour is smaller or narrower.
HEAD_CHECK = {"brain_suv": 3.0, "min_volume_ml": 200.0, "min_width_mm": 90.0, "search_depth_mm": 300.0}

DEFAULTS = {
    "brain_peak_head_crop": {"uptake_threshold_suv": 0.5, "slab_slices": 20, "window_xy_mm": 256.0, "n_slices": 112,
                             "slice_mm": 3.0, "top_mean_threshold": 0.1, "peak_index_max": 50},
    "pet_threshold_head_neck_box": {"threshold_suv": 1.0, "superior_slab_mm": 50.0, "size_mm": [200.0, 200.0, 310.0],
                                    "margin_above_mm": 10.0},
    "fixed_box": {"size_mm": [144.0, 144.0, 144.0]},
    "ct_extent": {},
}


@dataclass(frozen=True)
class RoiResult:
    box: Box  # LPS-aligned physical box
    method: str
    fell_back: bool
    record: dict
    warnings: tuple[str, ...]


def check_params(method: str, params: dict) -> dict:
    """The method's parameters with defaults filled; RecipeError for an unknown method or key."""
    if method not in DEFAULTS:
        raise RecipeError(f"unknown ROI method {method!r}; known methods: {', '.join(DEFAULTS)}")
    if unknown := set(params) - set(DEFAULTS[method]):
        raise RecipeError(f"ROI method {method!r}: unknown key(s) {sorted(unknown)}; allowed keys: "
                          f"{sorted(DEFAULTS[method])}")
    return {**DEFAULTS[method], **params}


@dataclass(frozen=True)
class _PetView:
    """The PET in SUV on an LPS-aligned working grid, rows ordered from the most superior slice down."""

    suv_top_down: np.ndarray  # [z from top, y, x]
    grid: Grid  # the working grid (z ascending = inferior → superior)

    def z_mm(self, row: float) -> float:
        """Physical z of a top-down row index."""
        index_z = self.grid.size_xyz[2] - 1 - row
        return float(self.grid.origin_xyz_mm[2] + index_z * self.grid.spacing_xyz_mm[2])

    def xy_mm(self, iy: np.ndarray, ix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (self.grid.origin_xyz_mm[0] + ix * self.grid.spacing_xyz_mm[0],
                self.grid.origin_xyz_mm[1] + iy * self.grid.spacing_xyz_mm[1])


def _overlap_box(ct: sitk.Image, pet: sitk.Image) -> Box:
    common = Grid.of(ct).box().in_frame(IDENTITY).intersect(Grid.of(pet).box().in_frame(IDENTITY))
    if common is None:
        raise InputError("PET and CT do not overlap in physical space")
    return common


def _pet_view(ct: sitk.Image, pet: sitk.Image, suv_per_stored_value: float) -> _PetView:
    grid = Grid.covering(_overlap_box(ct, pet), WORK_SPACING_XYZ_MM)
    suv = sample(pet, grid, interpolation="linear", fill_value=0.0) * np.float32(suv_per_stored_value)
    return _PetView(suv[::-1], grid)


def _head_found(view: _PetView) -> tuple[bool, dict]:
    """Is the brain in view: a large, wide hot component in the top part of the scan?"""
    rows = int(HEAD_CHECK["search_depth_mm"] / view.grid.spacing_xyz_mm[2])
    hot = view.suv_top_down[:rows] > HEAD_CHECK["brain_suv"]
    if not hot.any():
        return False, {"largest_hot_volume_ml": 0.0}
    components = cc3d.largest_k(hot, k=1, connectivity=26)
    zz, yy, xx = np.nonzero(components)
    sx, sy, _ = view.grid.spacing_xyz_mm
    volume_ml = len(zz) * float(np.prod(view.grid.spacing_xyz_mm)) / 1000
    width_x, width_y = (np.ptp(xx) + 1) * sx, (np.ptp(yy) + 1) * sy
    found = (volume_ml >= HEAD_CHECK["min_volume_ml"] and min(width_x, width_y) >= HEAD_CHECK["min_width_mm"])
    return found, {"largest_hot_volume_ml": round(volume_ml, 1), "largest_hot_width_xy_mm": [float(width_x), float(width_y)],
                   "head_check": HEAD_CHECK}


def _fallback(method: str, size_mm, ct: sitk.Image, pet: sitk.Image, record: dict) -> RoiResult:
    overlap = _overlap_box(ct, pet)
    box = Box.around(overlap.center_xyz_mm, size_mm).intersect(Grid.of(ct).box().in_frame(IDENTITY)) or overlap
    warning = (f"ROI method {method!r} found no head in view (no hot region of >= {HEAD_CHECK['min_volume_ml']:g} mL "
               f"above SUV {HEAD_CHECK['brain_suv']:g} near the top of the scan); used a {list(size_mm)} mm box "
               f"centred on the CT/PET overlap instead")
    return RoiResult(box, method, True, record, (warning,))


def _clamp_window(center: float, width: float, lo: float, hi: float) -> float:
    """Shift a window's centre so the window stays inside [lo, hi] when it fits."""
    if hi - lo <= width:
        return (lo + hi) / 2
    return float(np.clip(center, lo + width / 2, hi - width / 2))


def _first_row_above(view: _PetView, threshold: float) -> int | None:
    rows = np.nonzero((view.suv_top_down > threshold).any(axis=(1, 2)))[0]
    return int(rows[0]) if len(rows) else None


def _centroid_xy_mm(view: _PetView, rows: slice, threshold: float) -> tuple[float, float]:
    _, iy, ix = np.nonzero(view.suv_top_down[rows] > threshold)
    x_mm, y_mm = view.xy_mm(iy, ix)
    return float(x_mm.mean()), float(y_mm.mean())


def brain_peak_head_crop(ct, pet, suv_per_stored_value, p) -> RoiResult:
    """SNU: top of uptake → in-plane centroid of the slab below → window → brain-peak cut of n_slices below."""
    method = "brain_peak_head_crop"
    size_mm = (p["window_xy_mm"], p["window_xy_mm"], p["n_slices"] * p["slice_mm"])
    view = _pet_view(ct, pet, suv_per_stored_value)
    found, record = _head_found(view)
    top = _first_row_above(view, p["uptake_threshold_suv"])
    if not found or top is None:
        return _fallback(method, size_mm, ct, pet, record)
    slab_rows = max(1, round(p["slab_slices"] * p["slice_mm"] / view.grid.spacing_xyz_mm[2]))
    cx, cy = _centroid_xy_mm(view, slice(top, top + slab_rows), p["uptake_threshold_suv"])
    overlap = _overlap_box(ct, pet)
    lo, hi = np.asarray(overlap.corner_xyz_mm), np.asarray(overlap.corner_xyz_mm) + overlap.size_xyz_mm
    cx = _clamp_window(cx, p["window_xy_mm"], lo[0], hi[0])
    cy = _clamp_window(cy, p["window_xy_mm"], lo[1], hi[1])
    # z-profile inside the window, in the slice unit of the method (rows of the working grid are slice_mm thick)
    x_mm, y_mm = view.xy_mm(np.arange(view.grid.size_xyz[1]), np.arange(view.grid.size_xyz[0]))
    in_x = np.abs(x_mm - cx) <= p["window_xy_mm"] / 2
    in_y = np.abs(y_mm - cy) <= p["window_xy_mm"] / 2
    window = view.suv_top_down[:, in_y][:, :, in_x]
    profile = window.sum(axis=(1, 2))
    search_rows = int(HEAD_CHECK["search_depth_mm"] / view.grid.spacing_xyz_mm[2])
    peak_row = int(np.argmax(profile[:search_rows]))
    peak_index = peak_row * view.grid.spacing_xyz_mm[2] / p["slice_mm"]  # in slices of slice_mm
    top_mean = float(window[0].mean())
    anchored_top = top_mean > p["top_mean_threshold"] or peak_index <= p["peak_index_max"]
    z_top_mm = view.z_mm(0) + view.grid.spacing_xyz_mm[2] / 2 if anchored_top else view.z_mm(peak_row)
    box = Box((cx - size_mm[0] / 2, cy - size_mm[1] / 2, z_top_mm - size_mm[2]), size_mm)
    record.update({"top_uptake_z_mm": view.z_mm(top), "centroid_xy_mm": [cx, cy], "peak_z_mm": view.z_mm(peak_row),
                   "peak_index_slices": round(peak_index, 1), "top_slice_mean_suv": round(top_mean, 3),
                   "anchored": "top" if anchored_top else "peak"})
    return RoiResult(box, method, False, record, ())


def pet_threshold_head_neck_box(ct, pet, suv_per_stored_value, p) -> RoiResult:
    """BIGS2: superior head boundary by a PET threshold, axial centre from the superior slab, a fixed box below."""
    method = "pet_threshold_head_neck_box"
    size_mm = tuple(float(s) for s in p["size_mm"])
    view = _pet_view(ct, pet, suv_per_stored_value)
    found, record = _head_found(view)
    top = _first_row_above(view, p["threshold_suv"])
    if not found or top is None:
        return _fallback(method, size_mm, ct, pet, record)
    slab_rows = max(1, round(p["superior_slab_mm"] / view.grid.spacing_xyz_mm[2]))
    cx, cy = _centroid_xy_mm(view, slice(top, top + slab_rows), p["threshold_suv"])
    z_top_mm = view.z_mm(top) + p["margin_above_mm"]
    box = Box((cx - size_mm[0] / 2, cy - size_mm[1] / 2, z_top_mm - size_mm[2]), size_mm)
    record.update({"superior_boundary_z_mm": view.z_mm(top), "centre_xy_mm": [cx, cy]})
    return RoiResult(box, method, False, record, ())


def fixed_box(ct, pet, point_xyz_mm, p) -> RoiResult:
    if point_xyz_mm is None:
        raise RecipeError("ROI method 'fixed_box' needs a point (from a previous stage); none was given")
    return RoiResult(Box.around(point_xyz_mm, p["size_mm"]), "fixed_box", False,
                     {"point_xyz_mm": list(map(float, point_xyz_mm))}, ())


def locate_roi(method: str, *, ct: sitk.Image, pet: sitk.Image, suv_per_stored_value: float, params: dict,
               point_xyz_mm=None) -> RoiResult:
    p = check_params(method, params)
    if method == "brain_peak_head_crop":
        return brain_peak_head_crop(ct, pet, suv_per_stored_value, p)
    if method == "pet_threshold_head_neck_box":
        return pet_threshold_head_neck_box(ct, pet, suv_per_stored_value, p)
    if method == "fixed_box":
        return fixed_box(ct, pet, point_xyz_mm, p)
    return RoiResult(_overlap_box(ct, pet), "ct_extent", False, {}, ())
