"""ROI location: pure functions from the native CT/PET to a physical box (mm, LPS axes) and a record.

All methods look at the PET in SUV on an LPS-aligned working grid over the CT∩PET overlap, its rows ordered from
the most superior slice down (superior = physical +z whatever the CT's direction), so flipped or permuted CTs give
the same box. The head methods first decide whether a head is in view at all:

  a head = the largest 26-connected region of SUV > `brain_suv` in the top `search_depth_mm` of the overlap is
  brain-sized (>= `min_volume_ml`, >= `min_width_mm` wide in x and y) AND it is enclosed by bone on the CT: of
  `n_rays` in-plane rays cast from its centre (on three axial levels, the median is used), at least
  `min_skull_fraction` meet bone (HU > `bone_hu`) before air (HU < `air_hu`) or the image edge.

A hot sarcoma can be as large and hot as a brain, but no skull surrounds it (rays leave the limb through soft
tissue, at most a few cross the femur); the heart is surrounded by air-filled lungs. Without a head the method
falls back to a box of its own size centred on the CT/PET overlap, intersected with the CT, and says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import cc3d
import numpy as np
import SimpleITK as sitk
from scipy.ndimage import map_coordinates

from hnseg_infer.errors import InputError, RecipeError
from hnseg_infer.geometry.grid import IDENTITY, Box, Grid, sample

WORK_SPACING_XY_MM = 4.0  # the PET search grid in-plane; boxes are in mm, so nothing finer is needed
WORK_SLICE_MM = 3.0  # the PET search grid's slice thickness (the brain-peak crop uses its own `slice_mm`)
RAY_SPACING_MM = 2.0  # CT sampling along the skull rays (a 5 mm skull still shows after linear interpolation)
HEAD_CHECK = {"brain_suv": 3.0, "min_volume_ml": 200.0, "min_width_mm": 90.0, "search_depth_mm": 300.0,
              "bone_hu": 250.0, "air_hu": -400.0, "n_rays": 16, "ray_length_mm": 160.0, "min_skull_fraction": 0.7}

POSITIVE_KEYS = {"slab_slices", "window_xy_mm", "n_slices", "slice_mm", "superior_slab_mm"}
NON_NEGATIVE_KEYS = {"margin_mm"}


@dataclass(frozen=True)
class RoiResult:
    box: Box  # LPS-aligned physical box
    method: str
    fell_back: bool  # True when the method's anatomy (a head) was not found and the fallback box was used
    record: dict  # JSON-serialisable: what was found
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class StageLabels:
    """What a cascade stage hands to the next: its labels on its own grid, and its ROI."""

    name: str
    labels_zyx: np.ndarray
    grid: Grid
    box: Box


# ---------------------------------------------------------------------------------------------------- parameters

def _check_value(method: str, key: str, value, default):
    """A parameter value of the default's kind: a number, or a list of 3 positive numbers (a size in mm)."""
    where = f"ROI method {method!r} parameter {key!r}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RecipeError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, str):  # a fallback method
        if value not in IMAGE_METHODS:
            raise RecipeError(f"{where} must be one of {IMAGE_METHODS}, got {value!r}")
        return value
    if isinstance(default, list):
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)):
            raise RecipeError(f"{where} must be 3 positive numbers (x, y, z mm), got {value!r}")
        return [float(v) for v in value]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
        raise RecipeError(f"{where} must be a number, got {value!r}")
    if key in POSITIVE_KEYS and value <= 0:
        raise RecipeError(f"{where} must be positive, got {value!r}")
    if key in NON_NEGATIVE_KEYS and value < 0:
        raise RecipeError(f"{where} must be >= 0, got {value!r}")
    return int(value) if isinstance(default, int) else float(value)


def check_params(method: str, params: dict) -> dict:
    """The method's parameters with defaults filled; RecipeError for an unknown method or key or a bad value."""
    if method not in METHODS:
        raise RecipeError(f"unknown ROI method {method!r}; known methods: {', '.join(METHODS)}")
    defaults = METHODS[method].defaults
    if unknown := set(params) - set(defaults):
        raise RecipeError(f"ROI method {method!r}: unknown key(s) {sorted(unknown)}; allowed keys: "
                          f"{sorted(defaults)}")
    return {key: _check_value(method, key, params.get(key, default), default) for key, default in defaults.items()}


def box_size_mm(method: str, params: dict) -> tuple[float, float, float] | None:
    """The box size (x, y, z mm) a method always gives when it finds its anatomy (checked `params`); None for
    methods whose box size depends on the images or labels."""
    return METHODS[method].fixed_size_mm(params)


# ------------------------------------------------------------------------------------------------ the PET view

@dataclass(frozen=True)
class _PetView:
    """The PET in SUV on an LPS-aligned working grid, rows ordered from the most superior slice down."""

    suv_top_down: np.ndarray  # [row from the top, y, x]
    grid: Grid  # the working grid (its z index ascends inferior → superior)

    @property
    def slice_mm(self) -> float:
        return self.grid.spacing_xyz_mm[2]

    def rows_in(self, depth_mm: float) -> int:
        return max(1, round(depth_mm / self.slice_mm))

    def z_mm(self, row: float) -> float:
        """Physical z of a top-down row's centre."""
        return float(self.grid.origin_xyz_mm[2] + (self.grid.size_xyz[2] - 1 - row) * self.slice_mm)

    def z_top_edge_mm(self, row: int) -> float:
        return self.z_mm(row) + self.slice_mm / 2

    def x_mm(self, ix) -> np.ndarray:
        return self.grid.origin_xyz_mm[0] + np.asarray(ix) * self.grid.spacing_xyz_mm[0]

    def y_mm(self, iy) -> np.ndarray:
        return self.grid.origin_xyz_mm[1] + np.asarray(iy) * self.grid.spacing_xyz_mm[1]


def overlap_box(ct: sitk.Image, pet: sitk.Image | None) -> Box:
    """The CT∩PET region as an LPS-aligned box (the CT's extent in CT-only mode, `pet` None)."""
    if pet is None:
        return Grid.of(ct).box().in_frame(IDENTITY)
    common = Grid.of(ct).box().in_frame(IDENTITY).intersect(Grid.of(pet).box().in_frame(IDENTITY))
    if common is None:
        raise InputError("PET and CT do not overlap in physical space: check both images' origins and directions")
    return common


def _pet_view(ct: sitk.Image, pet: sitk.Image, suv_per_stored_value: float, slice_mm: float) -> _PetView:
    grid = Grid.covering(overlap_box(ct, pet), (WORK_SPACING_XY_MM, WORK_SPACING_XY_MM, slice_mm))
    suv_zyx = sample(pet, grid, interpolation="linear", fill_value=0.0) * np.float32(suv_per_stored_value)
    return _PetView(suv_zyx[::-1], grid)


# ------------------------------------------------------------------------------------------------ head finding

@dataclass(frozen=True)
class _Head:
    brain_top_down: np.ndarray  # bool [row, y, x] over the search rows: the brain-like hot region
    found: bool
    record: dict


def _ct_axial_slice(ct: sitk.Image, view: _PetView, z_mm: float) -> tuple[np.ndarray, Grid]:
    """The CT (HU, [y, x]) on one axial plane of the overlap at RAY_SPACING_MM, LPS-aligned."""
    box = view.grid.box()
    plane = Box((box.corner_xyz_mm[0], box.corner_xyz_mm[1], z_mm - 0.5),
                (box.size_xyz_mm[0], box.size_xyz_mm[1], 1.0))
    grid = Grid.covering(plane, (RAY_SPACING_MM, RAY_SPACING_MM, 1.0))
    return sample(ct, grid, interpolation="linear", fill_value=-1024.0)[0], grid


def _skull_ray_fraction(hu_yx: np.ndarray, grid: Grid, center_xy_mm) -> float:
    """Fraction of in-plane rays from a point that meet bone before air or the image edge."""
    angles = np.linspace(0, 2 * np.pi, HEAD_CHECK["n_rays"], endpoint=False)
    steps_mm = np.arange(0, HEAD_CHECK["ray_length_mm"], RAY_SPACING_MM)
    x_mm = center_xy_mm[0] + np.cos(angles)[:, None] * steps_mm  # [ray, step]
    y_mm = center_xy_mm[1] + np.sin(angles)[:, None] * steps_mm
    ix = (x_mm - grid.origin_xyz_mm[0]) / grid.spacing_xyz_mm[0]
    iy = (y_mm - grid.origin_xyz_mm[1]) / grid.spacing_xyz_mm[1]
    hu = map_coordinates(hu_yx, [iy, ix], order=1, mode="constant", cval=-1024.0)
    first_bone = _first_step(hu > HEAD_CHECK["bone_hu"])
    first_air = _first_step(hu < HEAD_CHECK["air_hu"])
    return float(np.mean(first_bone < first_air))


def _first_step(hit_ray_step: np.ndarray) -> np.ndarray:
    """Per ray, the first step where `hit` holds (the number of steps where it never does)."""
    return np.where(hit_ray_step.any(axis=1), np.argmax(hit_ray_step, axis=1), hit_ray_step.shape[1])


def _skull_fraction(ct: sitk.Image, view: _PetView, region_top_down: np.ndarray) -> float:
    """Median over three axial levels of the region (its middle and ± a quarter of its height) of the fraction of
    rays from the region's in-plane centre that meet bone first."""
    rows = np.nonzero(region_top_down.any(axis=(1, 2)))[0]
    fractions = []
    for q in (0.25, 0.5, 0.75):
        row = int(rows[0] + round(q * (rows[-1] - rows[0])))
        iy, ix = np.nonzero(region_top_down[row])
        if len(ix) == 0:
            continue
        hu_yx, grid = _ct_axial_slice(ct, view, view.z_mm(row))
        fractions.append(_skull_ray_fraction(hu_yx, grid, (float(view.x_mm(ix).mean()), float(view.y_mm(iy).mean()))))
    return float(np.median(fractions)) if fractions else 0.0


def _find_head(ct: sitk.Image, view: _PetView) -> _Head:
    """Is a brain in view: a large, wide hot region in the top of the overlap, enclosed by a skull on the CT?"""
    rows = view.rows_in(HEAD_CHECK["search_depth_mm"])
    hot = view.suv_top_down[:rows] > HEAD_CHECK["brain_suv"]
    if not hot.any():
        return _Head(hot, False, {"largest_hot_volume_ml": 0.0, "head_check": HEAD_CHECK})
    region = cc3d.largest_k(hot, k=1, connectivity=26) > 0
    zz, yy, xx = np.nonzero(region)
    volume_ml = len(zz) * view.grid.voxel_volume_mm3 / 1000
    width_x_mm = float((np.ptp(xx) + 1) * view.grid.spacing_xyz_mm[0])
    width_y_mm = float((np.ptp(yy) + 1) * view.grid.spacing_xyz_mm[1])
    skull = _skull_fraction(ct, view, region)
    brain_sized = volume_ml >= HEAD_CHECK["min_volume_ml"] and min(width_x_mm, width_y_mm) >= HEAD_CHECK["min_width_mm"]
    found = brain_sized and skull >= HEAD_CHECK["min_skull_fraction"]
    record = {"largest_hot_volume_ml": round(volume_ml, 1), "largest_hot_width_xy_mm": [width_x_mm, width_y_mm],
              "largest_hot_top_z_mm": view.z_top_edge_mm(int(zz.min())), "skull_ray_fraction": round(skull, 3),
              "brain_sized": bool(brain_sized), "head_check": HEAD_CHECK}
    return _Head(region, found, record)


def _head_component(view: _PetView, head: _Head, threshold_suv: float) -> np.ndarray:
    """The connected region of SUV > threshold (over the search rows) that holds the brain: the head and whatever
    joins it. Scanning it, not the whole slice, for the top keeps raised hands and stray hot voxels out."""
    rows = head.brain_top_down.shape[0]
    labels = cc3d.connected_components(view.suv_top_down[:rows] > threshold_suv, connectivity=26)
    in_brain = labels[head.brain_top_down]
    in_brain = in_brain[in_brain > 0]
    if len(in_brain) == 0:  # threshold above the brain's uptake: the brain region itself
        return head.brain_top_down
    return labels == np.bincount(in_brain).argmax()


def _centroid_xy_mm(view: _PetView, region_top_down: np.ndarray, rows: slice) -> tuple[float, float]:
    _, iy, ix = np.nonzero(region_top_down[rows])
    return float(view.x_mm(ix).mean()), float(view.y_mm(iy).mean())


# ------------------------------------------------------------------------------------------------- the methods

def _fallback(method: str, size_mm, ct: sitk.Image, pet: sitk.Image, record: dict) -> RoiResult:
    overlap = overlap_box(ct, pet)
    box = Box.around(overlap.center_xyz_mm, size_mm).intersect(Grid.of(ct).box().in_frame(IDENTITY)) or overlap
    why = (f"largest region above SUV {HEAD_CHECK['brain_suv']:g} in the top {HEAD_CHECK['search_depth_mm']:g} mm: "
           f"{record.get('largest_hot_volume_ml', 0.0):g} mL (a brain needs >= {HEAD_CHECK['min_volume_ml']:g} mL, "
           f">= {HEAD_CHECK['min_width_mm']:g} mm wide), skull around it on "
           f"{record.get('skull_ray_fraction', 0.0):.0%} of rays (a head needs >= "
           f"{HEAD_CHECK['min_skull_fraction']:.0%})")
    warning = (f"ROI method {method!r} found no head in view ({why}); used instead a "
               f"{[round(s, 1) for s in box.size_xyz_mm]} mm box centred on the CT/PET overlap at "
               f"{box.center_xyz_mm.round(1).tolist()} mm (the method's {list(size_mm)} mm box clipped to the CT)")
    record = {**record, "fallback": "box of the method's size centred on the CT/PET overlap, clipped to the CT"}
    return RoiResult(box, method, True, record, (warning,))


def _clamp_window(center: float, width: float, lo: float, hi: float) -> float:
    """Shift a window's centre so the window stays inside [lo, hi] when it fits (centred when it does not)."""
    if hi - lo <= width:
        return (lo + hi) / 2
    return float(np.clip(center, lo + width / 2, hi - width / 2))


def _window_profile(view: _PetView, cx_mm: float, cy_mm: float, width_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The PET in the in-plane window ([row, y, x]) and its z-profile of sums (per top-down row)."""
    in_x = np.abs(view.x_mm(np.arange(view.grid.size_xyz[0])) - cx_mm) <= width_mm / 2
    in_y = np.abs(view.y_mm(np.arange(view.grid.size_xyz[1])) - cy_mm) <= width_mm / 2
    window = view.suv_top_down[:, in_y][:, :, in_x]
    return window, window.sum(axis=(1, 2))


def brain_peak_head_crop(ct: sitk.Image, pet: sitk.Image, suv_per_stored_value: float, p: dict) -> RoiResult:
    """SNU: top of uptake → in-plane centroid of the slab below → window → brain-peak cut of n_slices.

    The working rows are `slice_mm` thick, so slab, peak index and box height count the method's slices. The top
    of uptake is the top of the above-threshold region that holds the brain (not any stray voxel). The box is
    anchored at that top when the top slice's mean uptake (in the window) exceeds `top_mean_threshold` or the
    brain peak lies within `peak_index_max` slices of the top; otherwise its superior end is at the peak."""
    method = "brain_peak_head_crop"
    size_mm = (p["window_xy_mm"], p["window_xy_mm"], p["n_slices"] * p["slice_mm"])
    view = _pet_view(ct, pet, suv_per_stored_value, p["slice_mm"])
    head = _find_head(ct, view)
    if not head.found:
        return _fallback(method, size_mm, ct, pet, head.record)
    region = _head_component(view, head, p["uptake_threshold_suv"])
    top_row = int(np.nonzero(region.any(axis=(1, 2)))[0][0])
    cx, cy = _centroid_xy_mm(view, region, slice(top_row, top_row + p["slab_slices"]))
    overlap = overlap_box(ct, pet)
    lo, hi = np.asarray(overlap.corner_xyz_mm), np.asarray(overlap.corner_xyz_mm) + overlap.size_xyz_mm
    cx = _clamp_window(cx, p["window_xy_mm"], lo[0], hi[0])
    cy = _clamp_window(cy, p["window_xy_mm"], lo[1], hi[1])
    window, profile = _window_profile(view, cx, cy, p["window_xy_mm"])
    peak_row = int(np.argmax(profile[:region.shape[0]]))  # the brain peak, within the search depth
    top_mean_suv = float(window[0].mean())
    anchored_top = top_mean_suv > p["top_mean_threshold"] or peak_row <= p["peak_index_max"]
    z_top_mm = view.z_top_edge_mm(top_row) if anchored_top else view.z_mm(peak_row)
    box = Box((cx - size_mm[0] / 2, cy - size_mm[1] / 2, z_top_mm - size_mm[2]), size_mm)
    record = {**head.record, "top_uptake_z_mm": view.z_top_edge_mm(top_row), "centroid_xy_mm": [cx, cy],
              "peak_z_mm": view.z_mm(peak_row), "peak_index_slices": peak_row,
              "top_slice_mean_suv": round(top_mean_suv, 4), "anchored": "top" if anchored_top else "peak",
              "superior_z_mm": z_top_mm}
    return RoiResult(box, method, False, record, ())


def pet_threshold_head_neck_box(ct: sitk.Image, pet: sitk.Image, suv_per_stored_value: float, p: dict) -> RoiResult:
    """BIGS2: superior head boundary by a PET threshold, axial centre from the superior slab, a fixed box below."""
    method = "pet_threshold_head_neck_box"
    size_mm = tuple(p["size_mm"])
    view = _pet_view(ct, pet, suv_per_stored_value, WORK_SLICE_MM)
    head = _find_head(ct, view)
    if not head.found:
        return _fallback(method, size_mm, ct, pet, head.record)
    region = _head_component(view, head, p["threshold_suv"])
    top_row = int(np.nonzero(region.any(axis=(1, 2)))[0][0])
    cx, cy = _centroid_xy_mm(view, region, slice(top_row, top_row + view.rows_in(p["superior_slab_mm"])))
    z_top_mm = view.z_top_edge_mm(top_row) + p["margin_above_mm"]
    box = Box((cx - size_mm[0] / 2, cy - size_mm[1] / 2, z_top_mm - size_mm[2]), size_mm)
    record = {**head.record, "superior_boundary_z_mm": view.z_top_edge_mm(top_row), "centre_xy_mm": [cx, cy],
              "superior_z_mm": z_top_mm}
    return RoiResult(box, method, False, record, ())


def ct_top(ct: sitk.Image, p: dict) -> RoiResult:
    """SJTU's localiser input: a box of `size_mm` whose top is the CT's most superior edge, centred in-plane on
    the CT (the whole axial field of view for a 512 mm size)."""
    ct_box = Grid.of(ct).box().in_frame(IDENTITY)
    size = np.asarray(p["size_mm"])
    center = ct_box.center_xyz_mm
    z_top = ct_box.corner_xyz_mm[2] + ct_box.size_xyz_mm[2]
    box = Box((center[0] - size[0] / 2, center[1] - size[1] / 2, z_top - size[2]), tuple(size.tolist()))
    return RoiResult(box, "ct_top", False, {"superior_z_mm": round(float(z_top), 3)}, ())


def _label_points_xyz_mm(previous: StageLabels) -> np.ndarray:
    """Physical centres of the previous stage's labelled voxels (N, 3)."""
    index_zyx = np.argwhere(previous.labels_zyx > 0)
    return previous.grid.index_to_physical(index_zyx[:, ::-1])


def labels_bbox(previous: StageLabels, p: dict) -> RoiResult:
    """The bounding box of the previous stage's labels, grown by `margin_mm` (and by half a voxel, so that it holds
    whole voxels). Without labels: the previous stage's own ROI, with a warning."""
    if not previous.labels_zyx.any():
        warning = (f"ROI method 'labels_bbox': stage {previous.name!r} labelled nothing; used its own ROI "
                   f"{previous.box.to_dict()['size_xyz_mm']} mm instead")
        return RoiResult(previous.box, "labels_bbox", True, {"from_stage": previous.name, "labelled_voxels": 0},
                         (warning,))
    points = _label_points_xyz_mm(previous)
    grow = p["margin_mm"] + max(previous.grid.spacing_xyz_mm) / 2  # the grid's axes may be permuted
    lo, hi = points.min(axis=0) - grow, points.max(axis=0) + grow
    return RoiResult(Box(tuple(lo.tolist()), tuple((hi - lo).tolist())), "labels_bbox", False,
                     {"from_stage": previous.name, "labelled_voxels": len(points)}, ())


def labels_centroid_cube(ct: sitk.Image, pet: sitk.Image, suv_per_stored_value: float, previous: StageLabels,
                         p: dict) -> RoiResult:
    """SJTU's fine ROI: a box of `size_mm` centred on the centroid of the previous stage's labels. With
    `contain_labels`, the box moves the least distance that holds all the labelled voxels' centres, along each axis
    where they fit (a node far below a large tumour pulls the centroid little). Without labels: the `fallback`
    image method (its default parameters), with a warning."""
    if previous.labels_zyx.any():
        points = _label_points_xyz_mm(previous)
        centroid = points.mean(axis=0)
        center = centroid
        if p["contain_labels"]:
            half = np.asarray(p["size_mm"]) / 2
            lo, hi = points.min(axis=0), points.max(axis=0)
            center = np.where(hi - lo <= 2 * half, np.clip(centroid, hi - half, lo + half), centroid)
        record = {"from_stage": previous.name, "centroid_xyz_mm": centroid.round(3).tolist(),
                  "shift_to_contain_labels_mm": (center - centroid).round(3).tolist()}
        return RoiResult(Box.around(center, p["size_mm"]), "labels_centroid_cube", False, record, ())
    found = locate_roi(p["fallback"], ct=ct, pet=pet, suv_per_stored_value=suv_per_stored_value, params={})
    warning = (f"ROI method 'labels_centroid_cube': stage {previous.name!r} labelled nothing; used ROI method "
               f"{p['fallback']!r} instead")
    record = {"from_stage": previous.name, "fallback": p["fallback"], "fallback_record": found.record}
    return RoiResult(found.box, "labels_centroid_cube", True, record, (warning, *found.warnings))


def ct_extent(ct: sitk.Image, pet: sitk.Image | None) -> RoiResult:
    """The CT's physical extent intersected with the PET's (the CT's alone in CT-only mode)."""
    return RoiResult(overlap_box(ct, pet), "ct_extent", False, {}, ())


def ct_only_box(method: str, ct: sitk.Image, p: dict) -> RoiResult:
    """CT-only mode for a method that needs the PET: a box of the method's size at the top of the CT (`ct_top`)."""
    size_mm = box_size_mm(method, p)
    found = ct_top(ct, {"size_mm": list(size_mm)})
    warning = (f"CT-only mode: ROI method {method!r} finds the head on the PET; used instead a "
               f"{[round(s, 1) for s in size_mm]} mm box whose top is the CT's top, centred in-plane on the CT "
               f"(as 'ct_top')")
    record = {"ct_only": True, "used": "ct_top", "size_mm": list(size_mm), **found.record}
    return RoiResult(found.box, method, True, record, (warning,))


# ------------------------------------------------------------------------------------------------ the registry

@dataclass(frozen=True)
class RoiMethod:
    """One ROI method: its parameters' defaults (each also the kind of value it takes), what it needs, the box size
    it always gives when it finds its anatomy (None: the size depends on the images or labels), and how it finds its
    box: `find(ct, pet, suv_per_stored_value, previous, params)`."""

    name: str
    defaults: Mapping[str, object]
    find: Callable[..., RoiResult]
    needs_pet: bool = False  # finds the head on the PET: CT-only mode uses `ct_only_box`
    needs_previous: bool = False  # reads the labels of the cascade stage before
    fixed_size_mm: Callable[[dict], tuple[float, float, float] | None] = lambda p: None


def _size(p: dict) -> tuple[float, float, float]:
    return tuple(p["size_mm"])


METHODS: dict[str, RoiMethod] = {m.name: m for m in (
    RoiMethod("brain_peak_head_crop",
              MappingProxyType({"uptake_threshold_suv": 0.5, "slab_slices": 20, "window_xy_mm": 256.0,
                                "n_slices": 112, "slice_mm": 3.0, "top_mean_threshold": 0.1, "peak_index_max": 50}),
              lambda ct, pet, suv, previous, p: brain_peak_head_crop(ct, pet, suv, p), needs_pet=True,
              fixed_size_mm=lambda p: (p["window_xy_mm"], p["window_xy_mm"], p["n_slices"] * p["slice_mm"])),
    RoiMethod("pet_threshold_head_neck_box",
              MappingProxyType({"threshold_suv": 1.0, "superior_slab_mm": 50.0, "size_mm": [200.0, 200.0, 310.0],
                                "margin_above_mm": 10.0}),
              lambda ct, pet, suv, previous, p: pet_threshold_head_neck_box(ct, pet, suv, p), needs_pet=True,
              fixed_size_mm=_size),
    RoiMethod("ct_extent", MappingProxyType({}), lambda ct, pet, suv, previous, p: ct_extent(ct, pet)),
    RoiMethod("ct_top", MappingProxyType({"size_mm": [512.0, 512.0, 384.0]}),
              lambda ct, pet, suv, previous, p: ct_top(ct, p), fixed_size_mm=_size),
    RoiMethod("labels_bbox", MappingProxyType({"margin_mm": 10.0}),
              lambda ct, pet, suv, previous, p: labels_bbox(previous, p), needs_previous=True),
    RoiMethod("labels_centroid_cube",
              MappingProxyType({"size_mm": [144.0, 144.0, 144.0], "fallback": "brain_peak_head_crop",
                                "contain_labels": False}),
              labels_centroid_cube, needs_previous=True, fixed_size_mm=_size),
)}
NEEDS_PREVIOUS_STAGE = tuple(name for name, m in METHODS.items() if m.needs_previous)
NEEDS_PET = tuple(name for name, m in METHODS.items() if m.needs_pet)
IMAGE_METHODS = tuple(name for name, m in METHODS.items() if not m.needs_previous)


def locate_roi(method: str, *, ct: sitk.Image, pet: sitk.Image | None, suv_per_stored_value: float, params: dict,
               previous: StageLabels | None = None) -> RoiResult:
    """The ROI box (physical, LPS-aligned) of a recipe's ROI method; `params` are checked and defaults filled.
    The `labels_*` methods read `previous`, the labels of the cascade stage before. Without a PET (CT-only mode)
    the PET methods give `ct_only_box`."""
    p = check_params(method, params)
    if METHODS[method].needs_previous and previous is None:
        raise RecipeError(f"ROI method {method!r} needs the labels of a previous cascade stage; use it in a later "
                          f"stage, not the first")
    if pet is None and METHODS[method].needs_pet:
        return ct_only_box(method, ct, p)
    return METHODS[method].find(ct, pet, suv_per_stored_value, previous, p)
