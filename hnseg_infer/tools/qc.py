"""QC pictures: one PNG per case showing the segmentation where it matters, in patient orientation.

Layout: CT (top row) and PET (bottom row) in axial, coronal and sagittal slices through the view centre (the
largest lesion of the mask, else of the reference, else the PET's hottest voxel inside the CT), with GTVp/GTVn
contours of the mask (solid) and of the reference (dashed); on the right a coronal PET maximum-intensity
projection of the CT∩PET field with the ROI boxes of the run report and the view centre.

Every panel is sampled from the native images onto a small LPS-aligned display grid (identity direction, 1 mm),
so the CT's direction cosines never show. The slices go through the view centre; in their plane the window is
centred on the CT's field along an axis where the field is narrower than the window (a HECKTOR-2020-style crop of
~144 mm sits in the middle of its panels), else it follows the centre but stays inside the field. The ROI boxes'
names are moved down until none overlaps another (boxes larger than a small crop all clip to its corner).
Axial views are radiological (patient left on image
right, anterior up), coronal and sagittal views have superior up (sagittal: anterior on the left). Only the
display windows are resampled, never a whole volume at full resolution. Matplotlib is used through its object
API (Figure + Agg canvas), with no pyplot state.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import cc3d
import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Polygon

from hnseg_infer.errors import InputError
from hnseg_infer.geometry.grid import IDENTITY, Box, Grid, sample, sample_labels
from hnseg_infer.io.atomic import write_atomic
from hnseg_infer.labels import LABEL_NAMES

MASK_COLOURS = {1: "#ff2020", 2: "#2080ff"}  # solid
REFERENCE_COLOURS = {1: "#ffa000", 2: "#00d0c0"}  # dashed
BOX_COLOURS = ("#00a000", "#6040ff", "#a05000", "#008080", "#808000", "#404040")  # none like a contour colour
CENTRE_COLOUR = "#ff00ff"
CT_WINDOW_HU = (-200.0, 300.0)
PET_WINDOW_SUV = (0.0, 10.0)
VIEW_SIZE_MM = 200.0
VIEW_SPACING_MM = 1.0
MIP_SPACING_MM = 4.0
MIP_MAX_VOXELS = 6_000_000  # the MIP grid coarsens beyond this (whole-body scans)
FIGURE_SIZE_IN, DPI = (16.0, 8.0), 100  # 1600 × 800 px
BOX_LABEL_GID = "roi box label"  # the ROI box names, as tests find them
BOX_LABEL_STEP_PT = 4.0  # how far a box name moves down per try when it overlaps one placed before
BOX_LABEL_PAD_PT = 1.0  # the white patch around a box name, for reading it over the MIP and the box lines


@dataclass(frozen=True)
class ViewCentre:
    """Where the views are centred and why: `source` is "mask", "reference" or "pet peak"; for a lesion, its
    label and volume."""

    center_xyz_mm: tuple[float, float, float]
    source: str
    label: int | None = None
    volume_ml: float | None = None

    def describe(self) -> str:
        if self.label is None:
            return f"views through the {self.source}"
        return f"views through the largest {self.source} lesion ({LABEL_NAMES[self.label]}, {self.volume_ml:.1f} mL)"


def _largest_lesion(labels_zyx: np.ndarray, grid: Grid) -> tuple[np.ndarray, int, float] | None:
    """Centroid (physical xyz), label and volume (mL) of the largest 26-connected component of label 1 or 2
    (components of different labels are separate); None when there is none. Works on the bounding box only."""
    lesion = (labels_zyx == 1) | (labels_zyx == 2)
    bounds = []
    for axes in ((1, 2), (0, 2), (0, 1)):
        hit = np.flatnonzero(lesion.any(axis=axes))
        if hit.size == 0:
            return None
        bounds.append(slice(int(hit[0]), int(hit[-1]) + 1))
    crop = np.where(lesion[tuple(bounds)], labels_zyx[tuple(bounds)], 0).astype(np.uint8)
    largest = cc3d.largest_k(crop, k=1, connectivity=26) > 0
    index_zyx = np.argwhere(largest)
    label = int(crop[tuple(index_zyx[0])])
    centroid_xyz = (index_zyx.mean(axis=0) + [b.start for b in bounds])[::-1]
    volume_ml = len(index_zyx) * grid.voxel_volume_mm3 / 1000.0
    return grid.index_to_physical(centroid_xyz)[0], label, volume_ml


def view_centre(*, mask: sitk.Image, reference: sitk.Image | None, pet: sitk.Image, ct_grid: Grid) -> ViewCentre:
    """The physical point the slices go through: the centroid of the mask's largest lesion; if the mask is empty,
    of the reference's; if both are empty, the PET's hottest voxel inside the CT's field of view."""
    for source, image in (("mask", mask), ("reference", reference)):
        if image is None:
            continue
        found = _largest_lesion(sitk.GetArrayViewFromImage(image), Grid.of(image))
        if found is not None:
            point, label, volume_ml = found
            return ViewCentre(tuple(point.tolist()), source, label, volume_ml)
    pet_grid = Grid.of(pet)
    cropped = pet_grid.crop_to(ct_grid.box())
    sub, slices_zyx = cropped if cropped is not None else (pet_grid, (slice(None),) * 3)
    values = sitk.GetArrayViewFromImage(pet)[slices_zyx]
    peak_zyx = np.unravel_index(int(np.argmax(values)), values.shape)
    return ViewCentre(tuple(sub.index_to_physical(peak_zyx[::-1])[0].tolist()), "pet peak")


def box_name(stage: str, method: str, *, cascade: bool) -> str:
    """How the picture names an ROI: a cascade's by its stage, a single stage's by its ROI method."""
    return stage if cascade else f"roi ({method})" if method else "roi"


def boxes_of(rois) -> list[tuple[str, Box]]:
    """(name, box) of each ROI of a Prediction (its `rois`: StageRoi in stage order)."""
    return [(box_name(r.stage, r.roi.method, cascade=len(rois) > 1), r.roi.box) for r in rois]


def boxes_from_report(report: dict) -> list[tuple[str, Box]]:
    """(name, box) of each ROI in a run report: `report["stages"][i]["roi"]["box"]` for a cascade, else the
    single-stage `report["roi"]["box"]`. A report without ROI boxes gives []; a malformed box is an InputError."""
    if not isinstance(report, dict):
        raise InputError(f"the run report is a JSON {type(report).__name__}, expected an object")
    if isinstance(report.get("stages"), list):
        entries = [(box_name(str(s.get("name", f"stage {i + 1}")), "", cascade=True), s.get("roi"),
                    f"stages[{i}].roi.box") for i, s in enumerate(report["stages"]) if isinstance(s, dict)]
    elif isinstance(report.get("roi"), dict):
        roi = report["roi"]
        entries = [(box_name("main", str(roi.get("method", "")), cascade=False), roi, "roi.box")]
    else:
        return []
    boxes = []
    for name, roi, where in entries:
        if not isinstance(roi, dict) or "box" not in roi:
            continue
        try:
            boxes.append((name, Box.from_dict(roi["box"])))
        except (ValueError, TypeError) as exc:
            raise InputError(f"the run report's {where} is not a box ({exc}): expected the format of "
                             f"Box.to_dict") from exc
    return boxes


# ---------------------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class _View:
    """One display plane: its grid (one voxel thick), how to take the 2-D picture from the zyx array, the
    physical coordinates of its columns/rows, and the orientation letters (left, right, top, bottom)."""

    name: str
    grid: Grid
    take: tuple  # index into the zyx array giving (rows, columns)
    cols_mm: np.ndarray
    rows_mm: np.ndarray
    rows_down: bool  # True: row coordinate increases downwards (axial: anterior up)
    letters: tuple[str, str, str, str]

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """imshow extent (left, right, bottom, top) in mm, at the pixel edges."""
        h = VIEW_SPACING_MM / 2
        left, right = self.cols_mm[0] - h, self.cols_mm[-1] + h
        low, high = self.rows_mm[0] - h, self.rows_mm[-1] + h
        return (left, right, high, low) if self.rows_down else (left, right, low, high)


def window_centre(center_xyz_mm, field: Box) -> np.ndarray:
    """The in-plane centre (xyz mm) of the VIEW_SIZE_MM windows for an LPS-aligned `field`: per axis, the
    field's centre where the field is narrower than a window, else `center_xyz_mm` moved just enough for the window
    to stay inside the field (a point inside the field then stays in view)."""
    lo = np.asarray(field.corner_xyz_mm, dtype=np.float64)
    hi = lo + np.asarray(field.size_xyz_mm, dtype=np.float64)
    half = VIEW_SIZE_MM / 2
    inside = np.clip(np.asarray(center_xyz_mm, dtype=np.float64), lo + half, np.maximum(hi - half, lo + half))
    return np.where(hi - lo <= VIEW_SIZE_MM, (lo + hi) / 2, inside)


def _views(center_xyz_mm, field: Box) -> list[_View]:
    """Axial, coronal and sagittal planes through the centre, on LPS-aligned 1 mm grids of VIEW_SIZE_MM whose
    in-plane centre is `window_centre`."""
    c = np.asarray(center_xyz_mm, dtype=np.float64)
    in_plane = window_centre(c, field)
    w, s = VIEW_SIZE_MM, VIEW_SPACING_MM
    out = []
    for name, size, take, axes, rows_down, letters, through in (
            ("axial", (w, w, s), (0, slice(None), slice(None)), (0, 1), True, ("R", "L", "A", "P"), 2),
            ("coronal", (w, s, w), (slice(None), 0, slice(None)), (0, 2), False, ("R", "L", "S", "I"), 1),
            ("sagittal", (s, w, w), (slice(None), slice(None), 0), (1, 2), False, ("A", "P", "S", "I"), 0)):
        plane_centre = in_plane.copy()
        plane_centre[through] = c[through]  # the slice itself still goes through the view centre
        grid = Grid.covering(Box.around(plane_centre, size, IDENTITY), (s, s, s))
        coords = [np.asarray(grid.origin_xyz_mm[a]) + s * np.arange(grid.size_xyz[a]) for a in range(3)]
        out.append(_View(name, grid, take, coords[axes[0]], coords[axes[1]], rows_down, letters))
    return out


def _plane(image: sitk.Image, view: _View, *, labels: bool, fill: float = 0.0) -> np.ndarray:
    if labels:
        return sample_labels(image, view.grid)[view.take]
    return sample(image, view.grid, interpolation="linear", fill_value=fill)[view.take]


def _mip(pet: sitk.Image, field: Box) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Coronal maximum-intensity projection (rows z up, columns x) of the PET over `field`, and its extent."""
    spacing = max(MIP_SPACING_MM, float(np.cbrt(np.prod(field.size_xyz_mm) / MIP_MAX_VOXELS)))
    grid = Grid.covering(field, (spacing,) * 3)
    projection = sample(pet, grid, interpolation="linear", fill_value=0.0).max(axis=1)  # (z, x)
    box = grid.box()
    x0, z0 = box.corner_xyz_mm[0], box.corner_xyz_mm[2]
    return projection, (x0, x0 + box.size_xyz_mm[0], z0, z0 + box.size_xyz_mm[2])


def _lps_box(grid: Grid) -> Box:
    return grid.box().in_frame(IDENTITY)


# ---------------------------------------------------------------------------------------------------- drawing


def _volumes_ml(image: sitk.Image) -> dict[int, float]:
    array = sitk.GetArrayViewFromImage(image)
    voxel_ml = Grid.of(image).voxel_volume_mm3 / 1000.0
    return {label: float(np.count_nonzero(array == label)) * voxel_ml for label in LABEL_NAMES}


def _contours(ax, view: _View, labels_2d: np.ndarray, colours: dict, style: str, width: float) -> None:
    for label, colour in colours.items():
        binary = (labels_2d == label).astype(np.float32)
        if binary.any():
            ax.contour(view.cols_mm, view.rows_mm, binary, levels=[0.5], colors=[colour], linestyles=style,
                       linewidths=width)


def _letters(ax, letters, colour: str = "#ffff66") -> None:
    style = {"transform": ax.transAxes, "color": colour, "fontsize": 9, "fontweight": "bold"}
    left, right, top, bottom = letters
    ax.text(0.01, 0.5, left, ha="left", va="center", **style)
    ax.text(0.99, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.99, top, ha="center", va="top", **style)
    ax.text(0.5, 0.01, bottom, ha="center", va="bottom", **style)


def _box_outline_xz(box: Box) -> np.ndarray:
    """The box's projection onto the coronal (x, z) plane: the convex hull of its projected corners (Andrew's
    monotone chain), exact for any direction."""
    points = sorted(set(map(tuple, box.corners_xyz_mm()[:, [0, 2]].round(6).tolist())))

    def half(ordered):
        chain: list = []
        for p in ordered:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    return np.asarray(half(points) + half(points[::-1]) if len(points) > 2 else points, dtype=np.float64)


def _label_extent(label, renderer):
    """The display-space box of a box name with room for its background patch (BOX_LABEL_PAD_PT): the patch's
    own extent is only up to date after a draw."""
    return label.get_window_extent(renderer).padded(renderer.points_to_pixels(BOX_LABEL_PAD_PT + 1))


def _box_labels(ax, anchors) -> None:
    """Each ROI box's name at its (name, colour, (x, z) mm) anchor, moved down until it overlaps no name placed
    before it: on a small crop every box larger than the field clips to the same corner."""
    renderer = ax.figure.canvas.get_renderer()
    ax.apply_aspect()  # the axes' final place (imshow's equal aspect) before anything is measured
    placed = []
    for name, colour, xy in anchors:
        label = ax.annotate(f" {name}", xy=xy, xytext=(0, 0), textcoords="offset points", color=colour, fontsize=9,
                            ha="left", va="top", clip_on=True, annotation_clip=False, gid=BOX_LABEL_GID,
                            bbox={"facecolor": "white", "alpha": 0.7, "lw": 0, "pad": BOX_LABEL_PAD_PT})
        extent = _label_extent(label, renderer)
        step = 0
        while any(extent.overlaps(other) for other in placed) and step < 100:
            step += 1
            label.xyann = (0, -step * BOX_LABEL_STEP_PT)
            extent = _label_extent(label, renderer)
        placed.append(extent)


def _title(*, case: str, mask_ml: dict, reference_ml: dict | None, centre: ViewCentre, title: str) -> str:
    parts = [case] if case else []
    parts.append("mask " + ", ".join(f"{LABEL_NAMES[k]} {v:.1f} mL" for k, v in mask_ml.items()))
    if reference_ml is not None:
        parts.append("reference " + ", ".join(f"{LABEL_NAMES[k]} {v:.1f} mL" for k, v in reference_ml.items()))
    parts.append(centre.describe())
    if title:
        parts.append(title)
    return "  |  ".join(parts)


def _check_grid(image: sitk.Image, ct_grid: Grid, role: str, *, path: Path | None = None,
                ct_path: Path | None = None) -> None:
    grid = Grid.of(image)
    if grid.mismatch(ct_grid) is not None:
        named, ct_named = (f"{role} {path}" if path else f"the {role}"), (f"CT {ct_path}" if ct_path else "the CT")
        raise InputError(f"{named} is not on the grid of {ct_named} ({role} {grid.to_dict()}, CT "
                         f"{ct_grid.to_dict()}): pass the {role} made for this CT, or resample it onto the CT grid "
                         f"(nearest neighbour)")


def _save_atomic(fig: Figure, out_png: Path) -> None:
    write_atomic(out_png, lambda tmp: FigureCanvasAgg(fig).print_png(tmp),
                 hint="choose a QC picture path in a writable folder")


def draw_qc(*, out_png: Path, **kwargs) -> ViewCentre:
    """Write the QC picture of one case (`qc_figure`'s keywords) to `out_png`, atomically; the view centre."""
    fig, centre = qc_figure(**kwargs)
    _save_atomic(fig, out_png)
    return centre


def qc_figure(*, ct: sitk.Image, pet: sitk.Image, mask: sitk.Image, reference: sitk.Image | None = None,
              boxes: list[tuple[str, Box]] = (), title: str = "", case: str = "",
              suv_per_stored_value: float = 1.0) -> tuple[Figure, ViewCentre]:
    """The QC picture of one case and the view centre it used. `mask` and `reference` must be on the CT grid
    (InputError otherwise); the PET may be on any grid."""
    ct_grid = Grid.of(ct)
    _check_grid(mask, ct_grid, "mask")
    if reference is not None:
        _check_grid(reference, ct_grid, "reference")
    centre = view_centre(mask=mask, reference=reference, pet=pet, ct_grid=ct_grid)
    views = _views(centre.center_xyz_mm, _lps_box(ct_grid))  # the CT's field: the mask lies in it
    field = _lps_box(ct_grid).intersect(_lps_box(Grid.of(pet))) or _lps_box(Grid.of(pet))
    mip, mip_extent = _mip(pet, field)

    fig = Figure(figsize=FIGURE_SIZE_IN, dpi=DPI, facecolor="black")
    FigureCanvasAgg(fig)
    grid_spec = fig.add_gridspec(2, 4, left=0.005, right=0.995, bottom=0.06, top=0.93, wspace=0.02, hspace=0.04,
                                 width_ratios=(1, 1, 1, 1.15))
    for col, view in enumerate(views):
        ct_2d = _plane(ct, view, labels=False, fill=-1024.0)
        pet_2d = _plane(pet, view, labels=False) * np.float32(suv_per_stored_value)
        mask_2d = _plane(mask, view, labels=True)
        ref_2d = _plane(reference, view, labels=True) if reference is not None else None
        for row, (picture, cmap, window) in enumerate(((ct_2d, "gray", CT_WINDOW_HU),
                                                       (pet_2d, "gray_r", PET_WINDOW_SUV))):
            ax = fig.add_subplot(grid_spec[row, col], gid=f"{view.name} {'CT' if row == 0 else 'PET'}")
            ax.imshow(picture, cmap=cmap, vmin=window[0], vmax=window[1], extent=view.extent,
                      origin="upper" if view.rows_down else "lower", interpolation="nearest")
            _contours(ax, view, mask_2d, MASK_COLOURS, "solid", 1.6)
            if ref_2d is not None:  # on top, dashed: where both agree the mask's colour shows between the dashes
                _contours(ax, view, ref_2d, REFERENCE_COLOURS, "dashed", 1.2)
            ax.set_xticks([])
            ax.set_yticks([])
            _letters(ax, view.letters, "#ffff66" if row == 0 else "#a07800")
            ax.text(0.01, 0.99, f"{view.name} {'CT' if row == 0 else 'PET (SUV 0-10)'}", transform=ax.transAxes,
                    ha="left", va="top", color="white" if row == 0 else "black", fontsize=9,
                    bbox={"facecolor": "black" if row == 0 else "white", "alpha": 0.6, "lw": 0, "pad": 1})

    ax = fig.add_subplot(grid_spec[:, 3], gid="mip")
    ax.imshow(mip * np.float32(suv_per_stored_value), cmap="gray_r", vmin=PET_WINDOW_SUV[0], vmax=PET_WINDOW_SUV[1],
              extent=mip_extent, origin="lower", interpolation="bilinear")
    ax.set_xlim(mip_extent[0], mip_extent[1])
    ax.set_ylim(mip_extent[2], mip_extent[3])
    anchors = []
    for i, (name, box) in enumerate(boxes):
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        outline = _box_outline_xz(box)
        ax.add_patch(Polygon(outline, closed=True, fill=False, edgecolor=colour, linewidth=1.5))
        top_left = outline[np.lexsort((outline[:, 0], -outline[:, 1]))[0]]
        # a box wider or taller than the MIP (the localiser's whole-scan box) keeps its name in view
        top_left = (np.clip(top_left[0], *sorted(mip_extent[:2])), np.clip(top_left[1], *sorted(mip_extent[2:])))
        anchors.append((name, colour, top_left))
    _box_labels(ax, anchors)
    cx, _, cz = centre.center_xyz_mm
    ax.plot([cx], [cz], marker="+", markersize=14, markeredgewidth=2, color=CENTRE_COLOUR)
    ax.set_xticks([])
    ax.set_yticks([])
    _letters(ax, ("R", "L", "S", "I"), "#b08000")
    ax.text(0.01, 0.01, "PET MIP, ROI boxes", transform=ax.transAxes, ha="left", va="bottom",
            color="black", fontsize=9, bbox={"facecolor": "white", "alpha": 0.6, "lw": 0, "pad": 1})

    handles = [Line2D([], [], color=MASK_COLOURS[k], lw=2, label=f"{LABEL_NAMES[k]} (mask)") for k in LABEL_NAMES]
    if reference is not None:
        handles += [Line2D([], [], color=REFERENCE_COLOURS[k], lw=2, ls="--", label=f"{LABEL_NAMES[k]} (reference)")
                    for k in LABEL_NAMES]
    handles.append(Line2D([], [], color=CENTRE_COLOUR, marker="+", ls="", markersize=10, markeredgewidth=2,
                          label="view centre"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white",
               fontsize=10)
    fig.suptitle(_title(case=case, mask_ml=_volumes_ml(mask),
                        reference_ml=_volumes_ml(reference) if reference is not None else None,
                        centre=centre, title=title), color="white", fontsize=11)
    return fig, centre


def case_name(path: Path) -> str:
    """A file name without its image suffixes (`case.nii.gz` → `case`)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".mha", ".mhd", ".nii", ".nrrd", ".tif", ".tiff"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def draw_qc_files(*, ct: Path, pet: Path, mask: Path, reference: Path | None = None, report: Path | None = None,
                  out_png: Path, title: str = "") -> tuple[ViewCentre, float]:
    """`draw_qc` from files (the `hnseg qc` command); returns the view centre and the seconds it took.
    The PET unit is detected as in prediction. InputError names the file at fault and what to do."""
    from hnseg_infer.io.images import detect_pet_unit, read_image

    start = time.perf_counter()
    ct_image, pet_image = read_image(ct, "ct"), read_image(pet, "pet")
    mask_image = read_image(mask, "mask")
    reference_image = read_image(reference, "reference") if reference is not None else None
    ct_grid = Grid.of(ct_image)
    for path, image, role in ((mask, mask_image, "mask"), (reference, reference_image, "reference")):
        if image is not None:
            _check_grid(image, ct_grid, role, path=path, ct_path=ct)
    boxes: list[tuple[str, Box]] = []
    if report is not None:
        report = Path(report)
        if not report.is_file():
            raise InputError(f"run report {report} does not exist: pass the report.json written by hnseg predict "
                             f"--report, or leave out --report")
        try:
            boxes = boxes_from_report(json.loads(report.read_text()))
        except json.JSONDecodeError as exc:
            raise InputError(f"run report {report} is not valid JSON ({exc}): pass the report.json written by "
                             f"hnseg predict --report") from exc
        except InputError as exc:
            raise InputError(f"run report {report}: {exc}") from exc
    pet_unit = detect_pet_unit(pet_image)
    label = ("PET in SUV" if pet_unit.unit == "suv"
             else f"PET in Bq/mL, SUV estimated as value × {pet_unit.suv_per_stored_value:.3g}")
    centre = draw_qc(ct=ct_image, pet=pet_image, mask=mask_image, reference=reference_image, boxes=boxes,
                     out_png=out_png, title=" | ".join(t for t in (label, title) if t), case=case_name(mask),
                     suv_per_stored_value=pet_unit.suv_per_stored_value)
    return centre, time.perf_counter() - start
