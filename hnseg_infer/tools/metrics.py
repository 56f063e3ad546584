"""HECKTOR evaluation: per-case metrics of a predicted label map against a reference, and their aggregate.

Labels: 0 background, 1 GTVp, 2 GTVn. Per case and label: Dice, voxel counts (for the aggregated Dice), HD95 and
normalised surface distance (NSD) at 2 mm; for GTVn also lesion detection (TP/FP/FN). Over cases: the HECKTOR
ranking metrics gtvp_dice_mean, gtvn_dscagg and gtvn_f1agg (DESIGN.md §6), with totals and means of the rest.
gtvp_dice_mean is HECKTOR 2025's "mean DSC across all patients": every case counts, and a case whose reference has
no GTVp scores 1 when the prediction has none and 0 when it has some (the per-case Dice convention below).

HD95 and NSD follow MONAI (`compute_hausdorff_distance(percentile=95)`, `compute_surface_dice` without
sub-voxels): a surface is the voxels that one binary erosion (6-neighbourhood) removes, distances are Euclidean in
mm between surface-voxel centres. Torch-free: numpy, scipy, cc3d and SimpleITK only.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from io import StringIO
from pathlib import Path
from typing import Sequence

import cc3d
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from hnseg_infer.errors import InputError
from hnseg_infer.geometry.grid import Grid
from hnseg_infer.io.atomic import write_bytes_atomic
from hnseg_infer.io.images import read_image

LABELS = {"gtvp": 1, "gtvn": 2}
NSD_TOLERANCE_MM = 2.0
# Distances exactly at the tolerance (common on isotropic grids) must count as within, whatever the rounding.
NSD_ROUNDING_MM = 1e-6
HD_PERCENTILE = 95.0
LESION_IOU_THRESHOLD = 0.3  # a match needs IoU strictly above this
MASK_SUFFIXES = (".nii.gz", ".mha", ".nii", ".nrrd")
MAX_NAMES_SHOWN = 5


@dataclass(frozen=True)
class LabelMetrics:
    """One label of one case. `hd95_mm` is None when either mask is empty (the distance is undefined);
    `nsd_2mm` is None when both are empty and 0.0 when only one is (no surface lies within tolerance), as MONAI."""

    intersection_voxels: int
    pred_voxels: int
    ref_voxels: int
    dice: float
    hd95_mm: float | None
    nsd_2mm: float | None


@dataclass(frozen=True)
class LesionCounts:
    """GTVn detection in one case: matched (TP), unmatched predicted (FP) and unmatched reference (FN) lesions."""

    tp: int
    fp: int
    fn: int


@dataclass(frozen=True)
class CaseMetrics:
    case: str
    voxel_volume_ml: float
    gtvp: LabelMetrics
    gtvn: LabelMetrics
    gtvn_lesions: LesionCounts

    def to_dict(self) -> dict:
        """One flat record: the CSV row and the JSON case entry."""
        row = {"case": self.case}
        for name in LABELS:
            m: LabelMetrics = getattr(self, name)
            row.update({f"{name}_dice": m.dice, f"{name}_pred_ml": m.pred_voxels * self.voxel_volume_ml,
                        f"{name}_ref_ml": m.ref_voxels * self.voxel_volume_ml,
                        f"{name}_hd95_mm": m.hd95_mm, f"{name}_nsd_2mm": m.nsd_2mm})
        row.update({f"gtvn_{k}": v for k, v in asdict(self.gtvn_lesions).items()})
        for name in LABELS:  # the counts, so that the aggregate can be recomputed from the table
            m = getattr(self, name)
            row.update({f"{name}_intersection_voxels": m.intersection_voxels,
                        f"{name}_pred_voxels": m.pred_voxels, f"{name}_ref_voxels": m.ref_voxels})
        return row


# --- per case, on arrays -------------------------------------------------------------------------------------


def dice(intersection: int, pred: int, ref: int) -> float:
    """2|P∩G| / (|P|+|G|); 1.0 when both are empty (nothing to find and nothing found is perfect agreement)."""
    return 1.0 if pred + ref == 0 else 2.0 * intersection / (pred + ref)


def union_box(a: np.ndarray, b: np.ndarray, *, margin: int = 1) -> tuple[slice, ...] | None:
    """Slices of the bounding box of a | b grown by `margin` voxels (clipped to the array); None when both are empty.
    Clipping is safe: scipy's erosion treats outside the array as background, as MONAI's zero padding does."""
    found = ndimage.find_objects((a | b).view(np.uint8))
    if not found:
        return None
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(found[0], a.shape))


def surface_distances_mm(pred: np.ndarray, ref: np.ndarray, *, spacing_zyx_mm) -> tuple[np.ndarray, np.ndarray]:
    """(pred→ref, ref→pred): for every surface voxel of one mask, the distance in mm to the nearest surface voxel
    of the other. Both masks must be non-empty. Cropped first: the transforms then cost the lesion's size, not
    the CT's."""
    box = union_box(pred, ref)
    pred, ref = pred[box], ref[box]
    pred_surface = pred & ~ndimage.binary_erosion(pred)
    ref_surface = ref & ~ndimage.binary_erosion(ref)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing_zyx_mm)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing_zyx_mm)[ref_surface]
    return to_ref, to_pred


def hd95_mm(to_ref: np.ndarray, to_pred: np.ndarray) -> float:
    """MONAI's HD95: the larger of the two directed 95th percentiles (linear interpolation, as torch.quantile),
    not the 95th percentile of both directions pooled."""
    return float(max(np.percentile(to_ref, HD_PERCENTILE), np.percentile(to_pred, HD_PERCENTILE)))


def nsd(to_ref: np.ndarray, to_pred: np.ndarray, *, tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    """Fraction of both surfaces (counted in voxels) lying within `tolerance_mm` of the other surface."""
    limit = tolerance_mm + NSD_ROUNDING_MM
    within = np.count_nonzero(to_ref <= limit) + np.count_nonzero(to_pred <= limit)
    return float(within / (to_ref.size + to_pred.size))


def label_metrics(pred: np.ndarray, ref: np.ndarray, *, spacing_zyx_mm) -> LabelMetrics:
    """Overlap and surface metrics of two boolean masks."""
    inter, n_pred, n_ref = (int(np.count_nonzero(m)) for m in (pred & ref, pred, ref))
    hd95 = surface = None
    if n_pred and n_ref:
        to_ref, to_pred = surface_distances_mm(pred, ref, spacing_zyx_mm=spacing_zyx_mm)
        hd95, surface = hd95_mm(to_ref, to_pred), nsd(to_ref, to_pred)
    elif n_pred or n_ref:
        surface = 0.0
    return LabelMetrics(inter, n_pred, n_ref, dice(inter, n_pred, n_ref), hd95, surface)


def match_lesions(pred: np.ndarray, ref: np.ndarray) -> LesionCounts:
    """Lesions are 26-connected components. A predicted lesion matches a reference lesion when IoU > 0.3, one to
    one, greedily by descending IoU (ties by lesion order, so the result is deterministic)."""
    if not pred.any() and not ref.any():
        return LesionCounts(0, 0, 0)
    pred_ids, n_pred = cc3d.connected_components(pred, connectivity=26, return_N=True)
    ref_ids, n_ref = cc3d.connected_components(ref, connectivity=26, return_N=True)
    pairs = _overlapping_pairs(pred_ids, ref_ids)
    matched_pred, matched_ref = set(), set()
    for p, r in pairs:
        if p not in matched_pred and r not in matched_ref:
            matched_pred.add(p)
            matched_ref.add(r)
    tp = len(matched_pred)
    return LesionCounts(tp, int(n_pred) - tp, int(n_ref) - tp)


def _overlapping_pairs(pred_ids: np.ndarray, ref_ids: np.ndarray) -> list[tuple[int, int]]:
    """(pred id, ref id) pairs with IoU above the threshold, best first. Sparse: only pairs that overlap."""
    both = (pred_ids > 0) & (ref_ids > 0)
    n_ref = int(ref_ids.max())
    codes, inter = np.unique(pred_ids[both].astype(np.int64) * (n_ref + 1) + ref_ids[both], return_counts=True)
    p, r = codes // (n_ref + 1), codes % (n_ref + 1)
    pred_sizes, ref_sizes = np.bincount(pred_ids.ravel()), np.bincount(ref_ids.ravel())
    iou = inter / (pred_sizes[p] + ref_sizes[r] - inter)
    keep = iou > LESION_IOU_THRESHOLD
    p, r, iou = p[keep], r[keep], iou[keep]
    return [(int(p[i]), int(r[i])) for i in np.lexsort((r, p, -iou))]


def evaluate_arrays(pred_zyx: np.ndarray, ref_zyx: np.ndarray, *, spacing_zyx_mm, case: str) -> CaseMetrics:
    """All metrics of one case from two label arrays (values in {0, 1, 2}) on the same grid."""
    box = union_box(pred_zyx > 0, ref_zyx > 0) or (slice(0, 0),) * 3  # everything happens inside the lesions' box
    pred_zyx, ref_zyx = pred_zyx[box], ref_zyx[box]
    per_label = {name: label_metrics(pred_zyx == v, ref_zyx == v, spacing_zyx_mm=spacing_zyx_mm)
                 for name, v in LABELS.items()}
    lesions = match_lesions(pred_zyx == LABELS["gtvn"], ref_zyx == LABELS["gtvn"])
    voxel_ml = float(np.prod(spacing_zyx_mm)) / 1000.0
    return CaseMetrics(case, voxel_ml, per_label["gtvp"], per_label["gtvn"], lesions)


# --- per case, from files ------------------------------------------------------------------------------------


def check_same_grid(pred: Grid, ref: Grid, *, pred_path: Path, ref_path: Path) -> None:
    """The same grid (Grid.mismatch); else an InputError naming both files and the first difference."""
    if (difference := pred.mismatch(ref)) is not None:
        raise InputError(f"prediction {pred_path} and reference {ref_path} are on different grids: {difference}: "
                         f"resample the prediction onto the reference grid with nearest-neighbour interpolation")


def label_array_zyx(image: sitk.Image, *, path: Path, role: str) -> np.ndarray:
    """The voxels as uint8 (z, y, x); an InputError naming the file when any value is outside {0, 1, 2}."""
    values = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(values.dtype, np.integer):  # min/max: two fast passes over a whole-body grid
        valid = values.min() >= 0 and values.max() <= 2
    else:
        valid = bool(np.all((values == 0) | (values == 1) | (values == 2)))
    if not valid:
        bad = np.unique(values[(values != 0) & (values != 1) & (values != 2)])
        raise InputError(f"{role} {path} holds label values {bad[:MAX_NAMES_SHOWN].tolist()}"
                         f"{' ...' if bad.size > MAX_NAMES_SHOWN else ''} outside {{0, 1, 2}} "
                         f"(0 background, 1 GTVp, 2 GTVn): relabel the mask")
    return values.astype(np.uint8)


def evaluate_files(pred_path: Path, ref_path: Path, *, case: str) -> CaseMetrics:
    """Read, check (same grid, labels in {0, 1, 2}) and score one case; distances use the reference spacing."""
    pred, ref = read_image(pred_path, "prediction"), read_image(ref_path, "reference")
    ref_grid = Grid.of(ref)
    check_same_grid(Grid.of(pred), ref_grid, pred_path=pred_path, ref_path=ref_path)
    return evaluate_arrays(label_array_zyx(pred, path=pred_path, role="prediction"),
                           label_array_zyx(ref, path=ref_path, role="reference"),
                           spacing_zyx_mm=ref_grid.spacing_xyz_mm[::-1], case=case)


def mask_stem(path: Path) -> str | None:
    """The case name: the file name without its image suffix; None for files that are not masks."""
    name = path.name
    suffix = next((s for s in MASK_SUFFIXES if name.lower().endswith(s)), None)
    return name[:-len(suffix)] if suffix and path.is_file() and not name.startswith(".") else None


def list_masks(folder: Path, *, role: str) -> dict[str, Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{role} folder {folder} does not exist")
    masks: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = mask_stem(path)
        if stem is None:
            continue  # other files (run reports, notes) may sit beside the masks
        if stem in masks:
            raise InputError(f"{role} folder {folder} holds two masks for case {stem} ({masks[stem].name}, "
                             f"{path.name}): keep one")
        masks[stem] = path
    if not masks:
        raise InputError(f"no {role} masks in {folder}: expected files ending in {', '.join(MASK_SUFFIXES)}")
    return masks


def _names(paths: list[Path]) -> str:
    shown = ", ".join(p.name for p in paths[:MAX_NAMES_SHOWN])
    return shown + (f" and {len(paths) - MAX_NAMES_SHOWN} more" if len(paths) > MAX_NAMES_SHOWN else "")


def pair_masks(pred_dir: Path, ref_dir: Path) -> list[tuple[str, Path, Path]]:
    """(case, prediction, reference) matched by file name without suffix; every file must have its partner.
    Two mask files (not folders) are one case, whatever their names (e.g. output.mha against <uuid>.mha)."""
    if mask_stem(Path(pred_dir)) and mask_stem(Path(ref_dir)):
        return [(mask_stem(Path(ref_dir)), Path(pred_dir), Path(ref_dir))]
    preds, refs = list_masks(pred_dir, role="prediction"), list_masks(ref_dir, role="reference")
    no_pred = [refs[c] for c in sorted(refs.keys() - preds.keys())]
    no_ref = [preds[c] for c in sorted(preds.keys() - refs.keys())]
    problems = ([f"no prediction in {pred_dir} for reference {_names(no_pred)}"] if no_pred else []) \
        + ([f"no reference in {ref_dir} for prediction {_names(no_ref)}"] if no_ref else [])
    if problems:
        raise InputError("; ".join(problems) + ": masks are paired by file name (without .mha/.nii.gz)")
    return [(case, preds[case], refs[case]) for case in sorted(refs)]


# --- over cases ----------------------------------------------------------------------------------------------


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def aggregated_dice(labels: Sequence[LabelMetrics]) -> float:
    """HECKTOR 2022 DSCagg = 2·Σ|P∩G| / Σ(|P|+|G|); 1.0 when every mask is empty, like the per-case Dice."""
    return dice(sum(m.intersection_voxels for m in labels), sum(m.pred_voxels for m in labels),
                sum(m.ref_voxels for m in labels))


def aggregate(cases: Sequence[CaseMetrics]) -> dict:
    """The ranking metrics first. gtvp_dice_mean (the official figure) averages the GTVp Dice over every case, a
    case without a reference GTVp scoring 1.0 if nothing was predicted and 0.0 otherwise;
    gtvp_dice_mean_cases_with_gtvp averages only the cases whose reference has a GTVp (None when none has).
    HD95/NSD means are over the cases where they are defined; F1agg = 2TP/(2TP+FP+FN), 1.0 when there are no
    lesions at all."""
    if not cases:
        raise ValueError("no cases to aggregate")
    with_gtvp = [c for c in cases if c.gtvp.ref_voxels > 0]
    tp, fp, fn = (sum(getattr(c.gtvn_lesions, k) for c in cases) for k in ("tp", "fp", "fn"))
    summary = {"gtvp_dice_mean": _mean(c.gtvp.dice for c in cases),
               "gtvn_dscagg": aggregated_dice([c.gtvn for c in cases]),
               "gtvn_f1agg": 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn),
               "gtvp_dice_mean_cases_with_gtvp": _mean(c.gtvp.dice for c in with_gtvp),
               "gtvp_dscagg": aggregated_dice([c.gtvp for c in cases]),
               "gtvn_tp": tp, "gtvn_fp": fp, "gtvn_fn": fn}
    for name in LABELS:
        summary[f"{name}_hd95_mm_mean"] = _mean(getattr(c, name).hd95_mm for c in cases)
        summary[f"{name}_nsd_2mm_mean"] = _mean(getattr(c, name).nsd_2mm for c in cases)
    summary.update({"n_cases": len(cases), "n_cases_without_gtvp": len(cases) - len(with_gtvp)})
    return summary


def summary_text(summary: dict) -> str:
    def f(value, digits=4):
        return "n/a" if value is None else f"{value:.{digits}f}"

    n_with_gtvp = summary["n_cases"] - summary["n_cases_without_gtvp"]
    return (f"hnseg evaluate: {summary['n_cases']} cases ({summary['n_cases_without_gtvp']} without GTVp)\n"
            f"  GTVp Dice mean {f(summary['gtvp_dice_mean'])} (all cases; no reference GTVp: 1 if none predicted, "
            f"else 0) | GTVn DSCagg {f(summary['gtvn_dscagg'])} | "
            f"GTVn F1agg {f(summary['gtvn_f1agg'])} (TP {summary['gtvn_tp']}, FP {summary['gtvn_fp']}, "
            f"FN {summary['gtvn_fn']})\n"
            f"  GTVp Dice mean over the {n_with_gtvp} cases with a reference GTVp "
            f"{f(summary['gtvp_dice_mean_cases_with_gtvp'])}\n"
            f"  HD95 mm: GTVp {f(summary['gtvp_hd95_mm_mean'], 2)}, GTVn {f(summary['gtvn_hd95_mm_mean'], 2)} | "
            f"NSD@2mm: GTVp {f(summary['gtvp_nsd_2mm_mean'])}, GTVn {f(summary['gtvn_nsd_2mm_mean'])}")


def _write_text(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())  # OutputError naming the file when it cannot be written


def csv_text(cases: Sequence[CaseMetrics]) -> str:
    """One row per case; undefined distances are empty cells."""
    rows = [c.to_dict() for c in cases]
    text = StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}
                     for r in rows)
    return text.getvalue()


def write_csv(cases: Sequence[CaseMetrics], path: Path) -> None:
    _write_text(path, csv_text(cases))


def write_json(cases: Sequence[CaseMetrics], summary: dict, path: Path) -> None:
    """{"cases": [...], "aggregate": {...}}; undefined values are null."""
    _write_text(path, json.dumps({"cases": [c.to_dict() for c in cases], "aggregate": summary}, indent=2) + "\n")


# ------------------------------------------------------------------------------ RTSTRUCT references (DICOM)

RTSTRUCT_SUFFIX = ".dcm"
DEFAULT_GT_ROI = "GTVp=GTVp,GTVn=GTVn"  # the names hnseg's own RTSTRUCTs use (AAPM TG-263)


def is_rtstruct_reference(gt: Path) -> bool:
    """--gt is an RTSTRUCT file, or a folder of <case>.dcm RTSTRUCTs (and no masks)."""
    gt = Path(gt)
    if gt.is_file():
        return gt.name.lower().endswith(RTSTRUCT_SUFFIX)
    return gt.is_dir() and any(p.name.lower().endswith(RTSTRUCT_SUFFIX) for p in gt.iterdir()) \
        and not any(mask_stem(p) for p in gt.iterdir())


def pair_rtstructs(pred: Path, gt: Path) -> list[tuple[str, Path, Path]]:
    """(case, prediction mask, RTSTRUCT): one mask and one file, or masks and <case>.dcm paired by name."""
    pred, gt = Path(pred), Path(gt)
    if gt.is_file():
        if mask_stem(pred) is None:
            raise InputError(f"--gt {gt} is one RTSTRUCT file, so --pred must be one mask, not {pred}")
        return [(mask_stem(pred), pred, gt)]
    refs = {p.name[:-len(RTSTRUCT_SUFFIX)]: p for p in sorted(gt.iterdir())
            if p.is_file() and p.name.lower().endswith(RTSTRUCT_SUFFIX)}
    preds = list_masks(pred, role="prediction")
    if missing := sorted(refs.keys() ^ preds.keys()):
        raise InputError(f"cases without a partner in {pred} (masks) and {gt} (<case>.dcm RTSTRUCTs): "
                         f"{', '.join(missing[:MAX_NAMES_SHOWN])}: name each RTSTRUCT after its mask")
    return [(case, preds[case], refs[case]) for case in sorted(refs)]


def evaluate_rtstruct(pred_path: Path, rt_path: Path, roi_mapping: str, *, case: str) -> CaseMetrics:
    """Score a mask against an RTSTRUCT's ROIs (chosen by `roi_mapping`, e.g. 'GTVp=GTV_P,GTVn=GTV_N*'),
    rasterised on the mask's grid: the CT grid the contours were drawn on."""
    from hnseg_infer.io.dicom_out import parse_roi_mapping, rasterise_rtstruct, read_rtstruct

    pred = read_image(pred_path, "prediction")
    grid = Grid.of(pred)
    ref_zyx = rasterise_rtstruct(read_rtstruct(rt_path), grid, parse_roi_mapping(roi_mapping), path=rt_path)
    return evaluate_arrays(label_array_zyx(pred, path=pred_path, role="prediction"), ref_zyx,
                           spacing_zyx_mm=grid.spacing_xyz_mm[::-1], case=case)
