"""HECKTOR evaluation (hnseg_infer.tools.metrics and `hnseg evaluate`): analytic overlaps and lesion matching, the
aggregate computed by hand, HD95/NSD against MONAI's implementation, and the command with its errors."""

import csv
import json
import time
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from hnseg_infer.cli.main import main
from hnseg_infer.tools import metrics
from hnseg_infer.tools.metrics import aggregate, evaluate_arrays, label_metrics, match_lesions

SPACING_XYZ_MM = (0.98, 0.98, 3.0)  # a typical CT: fine in-plane, thick slices
SPACING_ZYX_MM = SPACING_XYZ_MM[::-1]
VOXEL_ML = 0.98 * 0.98 * 3.0 / 1000
# Measured on 24 random label pairs (both labels) at this spacing, at 1 mm isotropic and at 2.0×0.7×0.7 mm:
# |HD95 - MONAI| <= 7.1e-6 mm (MONAI keeps distances in float32), |NSD - MONAI| <= 2.9e-8 (float32 of the same
# ratio of surface-voxel counts: the counts agree exactly).
MONAI_HD95_TOL_MM, MONAI_NSD_TOL = 1e-4, 1e-6


def box_mask(shape_zyx, corner_zyx, size_zyx) -> np.ndarray:
    mask = np.zeros(shape_zyx, bool)
    mask[tuple(slice(c, c + s) for c, s in zip(corner_zyx, size_zyx))] = True
    return mask


def label_map(shape_zyx=(20, 40, 40), *, gtvp=(), gtvn=()) -> np.ndarray:
    """uint8 labels from boxes given as (corner_zyx, size_zyx)."""
    labels = np.zeros(shape_zyx, np.uint8)
    for value, boxes in ((1, gtvp), (2, gtvn)):
        for corner, size in boxes:
            labels[box_mask(shape_zyx, corner, size)] = value
    return labels


def row(*runs, length=40) -> np.ndarray:
    """A (1, 1, length) mask with the half-open x-runs [start, stop) set: lesions along a line (26-connected
    components are then exactly the runs)."""
    mask = np.zeros((1, 1, length), bool)
    for start, stop in runs:
        mask[0, 0, start:stop] = True
    return mask


# --- overlaps and conventions --------------------------------------------------------------------------------


def test_dice_of_two_shifted_cubes_is_exact():
    ref = label_map(gtvp=[((2, 5, 5), (10, 10, 10))])
    pred = label_map(gtvp=[((2, 5, 10), (10, 10, 10))])  # shifted by half its width along x: |P∩G| = 500
    case = evaluate_arrays(pred, ref, spacing_zyx_mm=SPACING_ZYX_MM, case="c")
    assert (case.gtvp.intersection_voxels, case.gtvp.pred_voxels, case.gtvp.ref_voxels) == (500, 1000, 1000)
    assert case.gtvp.dice == 0.5
    assert case.to_dict()["gtvp_ref_ml"] == pytest.approx(1000 * VOXEL_ML)


def test_identical_masks_have_zero_distance_and_full_surface_agreement():
    ref = label_map(gtvp=[((2, 5, 5), (6, 7, 8))])
    m = evaluate_arrays(ref, ref, spacing_zyx_mm=SPACING_ZYX_MM, case="c").gtvp
    assert (m.dice, m.hd95_mm, m.nsd_2mm) == (1.0, 0.0, 1.0)


def test_empty_conventions():
    """Both empty: Dice 1, HD95 and NSD undefined (None). One empty: Dice 0, HD95 None, NSD 0."""
    empty = np.zeros((6, 6, 6), bool)
    one = box_mask((6, 6, 6), (1, 1, 1), (2, 2, 2))
    assert label_metrics(empty, empty, spacing_zyx_mm=SPACING_ZYX_MM) == metrics.LabelMetrics(0, 0, 0, 1.0, None,
                                                                                               None)
    assert label_metrics(empty, one, spacing_zyx_mm=SPACING_ZYX_MM) == metrics.LabelMetrics(0, 0, 8, 0.0, None, 0.0)
    assert label_metrics(one, empty, spacing_zyx_mm=SPACING_ZYX_MM) == metrics.LabelMetrics(0, 8, 0, 0.0, None, 0.0)
    nothing = evaluate_arrays(np.zeros((4, 5, 6), np.uint8), np.zeros((4, 5, 6), np.uint8),
                              spacing_zyx_mm=SPACING_ZYX_MM, case="empty")
    assert nothing.gtvn_lesions == metrics.LesionCounts(0, 0, 0) and nothing.gtvp.dice == 1.0


# --- GTVn lesion detection -----------------------------------------------------------------------------------


@pytest.mark.parametrize("predicted, matched", [(29, False), (30, False), (31, True)])
def test_lesion_matches_only_above_iou_0_3(predicted, matched):
    ref = row((0, 100), length=100)  # one lesion of 100 voxels
    pred = row((0, predicted), length=100)  # inside it: IoU = predicted / 100
    expected = metrics.LesionCounts(1, 0, 0) if matched else metrics.LesionCounts(0, 1, 1)
    assert match_lesions(pred, ref) == expected


def test_two_predictions_on_one_reference_match_once():
    ref = row((0, 20))
    pred = row((0, 10), (12, 20))  # IoU 0.5 and 0.4, both above 0.3, separate lesions
    assert match_lesions(pred, ref) == metrics.LesionCounts(tp=1, fp=1, fn=0)


def test_one_prediction_bridging_two_references_matches_once():
    ref = row((0, 10), (12, 22))
    pred = row((0, 22))  # IoU 10/22 with each
    assert match_lesions(pred, ref) == metrics.LesionCounts(tp=1, fp=0, fn=1)


def test_matching_is_greedy_by_descending_iou():
    """B (first in raster order) overlaps R2 (IoU 4/13) and R1 (IoU 7/22, its best); A overlaps R1 (IoU 8/16).
    Taking A-R1 first leaves B-R2: two matches. Matching B to its best reference first would find one."""
    ref = row((0, 4), (6, 22))  # R2, R1
    pred = row((0, 13), (14, 22))  # B, A
    assert match_lesions(pred, ref) == metrics.LesionCounts(tp=2, fp=0, fn=0)


def test_lesions_are_26_connected():
    ref = np.zeros((2, 2, 2), bool)
    ref[0, 0, 0] = ref[1, 1, 1] = True  # corner-touching voxels: one lesion
    assert match_lesions(ref, ref) == metrics.LesionCounts(1, 0, 0)


# --- aggregate -----------------------------------------------------------------------------------------------


def three_cases():
    cube, small, smaller = (10, 10, 10), (3, 3, 3), (2, 2, 2)
    return [
        # GTVp shifted by half (Dice 0.5); GTVn found exactly (8 voxels)
        (label_map(gtvp=[((2, 5, 10), cube)], gtvn=[((2, 30, 30), smaller)]),
         label_map(gtvp=[((2, 5, 5), cube)], gtvn=[((2, 30, 30), smaller)])),
        # no GTVp in the reference, a false GTVp (0 in the official mean); a missed node of 27 voxels
        (label_map(gtvp=[((2, 5, 5), small)]), label_map(gtvn=[((2, 30, 30), small)])),
        # GTVp exact; a false node of 8 voxels
        (label_map(gtvp=[((2, 5, 5), cube)], gtvn=[((2, 30, 30), smaller)]), label_map(gtvp=[((2, 5, 5), cube)])),
    ]


def test_aggregate_by_hand():
    cases = [evaluate_arrays(p, r, spacing_zyx_mm=SPACING_ZYX_MM, case=str(i)) for i, (p, r) in
             enumerate(three_cases())]
    summary = aggregate(cases)
    assert list(summary)[:3] == ["gtvp_dice_mean", "gtvn_dscagg", "gtvn_f1agg"]
    # official: every case; case 1 has no reference GTVp but a predicted one, so it scores 0
    assert summary["gtvp_dice_mean"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert summary["gtvp_dice_mean_cases_with_gtvp"] == pytest.approx((0.5 + 1.0) / 2)
    assert summary["n_cases"] == 3 and summary["n_cases_without_gtvp"] == 1
    assert summary["gtvn_dscagg"] == pytest.approx(2 * 8 / ((8 + 8) + (0 + 27) + (8 + 0)))
    assert summary["gtvp_dscagg"] == pytest.approx(2 * (500 + 0 + 1000) / ((1000 + 1000) + (27 + 0) + (1000 + 1000)))
    assert (summary["gtvn_tp"], summary["gtvn_fp"], summary["gtvn_fn"]) == (1, 1, 1)
    assert summary["gtvn_f1agg"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    # HD95: GTVp defined in cases 0 and 2 (0 mm there); GTVn only in case 0 (0 mm). NSD: 0 where one is empty.
    assert summary["gtvp_hd95_mm_mean"] == pytest.approx(cases[0].gtvp.hd95_mm / 2)
    assert summary["gtvn_hd95_mm_mean"] == 0.0
    assert summary["gtvn_nsd_2mm_mean"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)


def test_aggregate_without_any_lesion_is_perfect_and_the_mean_over_gtvp_cases_undefined():
    empty = np.zeros((4, 4, 4), np.uint8)
    summary = aggregate([evaluate_arrays(empty, empty, spacing_zyx_mm=SPACING_ZYX_MM, case="a")])
    assert (summary["gtvp_dice_mean"], summary["gtvn_dscagg"], summary["gtvn_f1agg"]) == (1.0, 1.0, 1.0)
    assert summary["gtvp_dice_mean_cases_with_gtvp"] is None
    assert summary["gtvp_hd95_mm_mean"] is None


def test_official_gtvp_mean_counts_empty_references_as_one_or_zero():
    """HECKTOR 2025: the mean over all patients. A reference without GTVp scores 1 for an empty prediction and 0
    for any predicted GTVp, however small; the second figure ignores those cases."""
    cube, voxel = (10, 10, 10), (1, 1, 1)
    pairs = [(label_map(gtvp=[((2, 5, 10), cube)]), label_map(gtvp=[((2, 5, 5), cube)])),  # Dice 0.5
             (label_map(), label_map()),  # no GTVp anywhere: 1
             (label_map(gtvp=[((2, 5, 5), voxel)]), label_map()),  # one false voxel: 0
             (label_map(gtvn=[((2, 30, 30), voxel)]), label_map(gtvn=[((2, 30, 30), voxel)]))]  # nodes only: 1
    cases = [evaluate_arrays(p, r, spacing_zyx_mm=SPACING_ZYX_MM, case=str(i)) for i, (p, r) in enumerate(pairs)]
    assert [c.gtvp.dice for c in cases] == [0.5, 1.0, 0.0, 1.0]
    summary = aggregate(cases)
    assert summary["gtvp_dice_mean"] == pytest.approx((0.5 + 1.0 + 0.0 + 1.0) / 4)
    assert summary["gtvp_dice_mean_cases_with_gtvp"] == pytest.approx(0.5)
    assert summary["n_cases_without_gtvp"] == 3
    text = metrics.summary_text(summary)
    assert "GTVp Dice mean 0.6250 (all cases; no reference GTVp: 1 if none predicted, else 0)" in text
    assert "GTVp Dice mean over the 1 cases with a reference GTVp 0.5000" in text


# --- HD95 and NSD against MONAI ------------------------------------------------------------------------------


def random_labels(rng, shape_zyx=(16, 40, 44)) -> np.ndarray:
    """Two smooth random blobs (GTVp, GTVn), often touching the array border."""
    labels = np.zeros(shape_zyx, np.uint8)
    for value, fraction in ((1, 0.15), (2, 0.08)):
        field = ndimage.gaussian_filter(rng.standard_normal(shape_zyx), sigma=(1.0, 3.0, 3.0))
        labels[(field > np.quantile(field, 1 - fraction)) & (labels == 0)] = value
    return labels


def monai_hd95_nsd(pred, ref, spacing_zyx_mm):
    """MONAI's HD95 and NSD@2mm for labels 1 and 2, from one-hot (1, 3, z, y, x) tensors."""
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")

    def one_hot(labels):
        return torch.as_tensor(np.stack([labels == v for v in (0, 1, 2)])[None])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty classes
        hd = monai_metrics.compute_hausdorff_distance(one_hot(pred), one_hot(ref), percentile=95,
                                                      spacing=list(spacing_zyx_mm))
        nsd = monai_metrics.compute_surface_dice(one_hot(pred), one_hot(ref), class_thresholds=[2.0, 2.0],
                                                 spacing=list(spacing_zyx_mm))
    return hd[0].tolist(), nsd[0].tolist()


@pytest.mark.parametrize("seed", range(12))
def test_hd95_and_nsd_agree_with_monai(seed):
    rng = np.random.default_rng(seed)
    pred, ref = random_labels(rng), random_labels(rng)
    case = evaluate_arrays(pred, ref, spacing_zyx_mm=SPACING_ZYX_MM, case="r")
    (hd_p, hd_n), (nsd_p, nsd_n) = monai_hd95_nsd(pred, ref, SPACING_ZYX_MM)
    assert case.gtvp.hd95_mm == pytest.approx(hd_p, abs=MONAI_HD95_TOL_MM)
    assert case.gtvn.hd95_mm == pytest.approx(hd_n, abs=MONAI_HD95_TOL_MM)
    assert case.gtvp.nsd_2mm == pytest.approx(nsd_p, abs=MONAI_NSD_TOL)
    assert case.gtvn.nsd_2mm == pytest.approx(nsd_n, abs=MONAI_NSD_TOL)


def test_hd95_is_the_larger_directed_percentile_not_the_pooled_one():
    """Reference: a 3×20×20 slab; prediction: the same plus a 3×5×5 speck 40 mm away. The speck is 7 % of the
    predicted surface but 3.6 % of both surfaces pooled: only the directed 95th percentile reaches it."""
    ref = label_map((3, 40, 80), gtvp=[((0, 5, 5), (3, 20, 20))])
    pred = ref.copy()
    pred[:, 10:15, 65:70] = 1
    to_ref, to_pred = metrics.surface_distances_mm(pred == 1, ref == 1, spacing_zyx_mm=SPACING_ZYX_MM)
    pooled = np.percentile(np.concatenate([to_ref, to_pred]), 95)
    (hd_monai, _), _ = monai_hd95_nsd(pred, ref, SPACING_ZYX_MM)
    hd = evaluate_arrays(pred, ref, spacing_zyx_mm=SPACING_ZYX_MM, case="s").gtvp.hd95_mm
    assert hd == pytest.approx(hd_monai, abs=MONAI_HD95_TOL_MM)
    assert abs(hd - pooled) > 10.0


def test_empty_conventions_match_monai_nsd():
    ref = label_map((6, 8, 8), gtvp=[((1, 1, 1), (3, 3, 3))])
    empty = np.zeros_like(ref)
    _, (nsd_one_empty, nsd_both_empty) = monai_hd95_nsd(empty, ref, SPACING_ZYX_MM)
    case = evaluate_arrays(empty, ref, spacing_zyx_mm=SPACING_ZYX_MM, case="e")
    assert case.gtvp.nsd_2mm == nsd_one_empty == 0.0
    assert case.gtvn.nsd_2mm is None and np.isnan(nsd_both_empty)


def test_ct_sized_grid_is_cropped_before_distance_transforms(monkeypatch):
    shape = (400, 512, 512)
    ref = label_map(shape, gtvp=[((200, 240, 240), (12, 30, 30))], gtvn=[((210, 300, 330), (6, 12, 12))])
    pred = label_map(shape, gtvp=[((201, 244, 240), (12, 30, 28))], gtvn=[((211, 301, 331), (6, 12, 12))])
    shapes = []
    edt = ndimage.distance_transform_edt

    def recording_edt(mask, **kwargs):
        shapes.append(mask.shape)
        return edt(mask, **kwargs)

    monkeypatch.setattr(metrics.ndimage, "distance_transform_edt", recording_edt)
    start = time.perf_counter()
    case = evaluate_arrays(pred, ref, spacing_zyx_mm=(1.5, 0.98, 0.98), case="big")
    seconds = time.perf_counter() - start
    assert shapes == [(15, 36, 32)] * 2 + [(9, 15, 15)] * 2  # each label's union box + 1 voxel
    assert case.gtvn_lesions == metrics.LesionCounts(1, 0, 0)
    assert seconds < 20, f"{seconds:.1f} s for a 512×512×400 grid (about 1 s measured when idle)"


# --- the command ---------------------------------------------------------------------------------------------

OBLIQUE = tuple(np.array([[0.866025, -0.5, 0.0], [0.5, 0.866025, 0.0], [0.0, 0.0, 1.0]]).ravel())  # 30° about z
ORIGIN_XYZ_MM = (-120.5, 33.25, -410.0)


def write_mask(path, labels, *, origin=ORIGIN_XYZ_MM, spacing=SPACING_XYZ_MM):
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(OBLIQUE)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def folders(tmp_path):
    """pred/ and gt/ with the three hand-computed cases; suffixes differ between the folders."""
    for i, (pred, ref) in enumerate(three_cases()):
        write_mask(tmp_path / "pred" / f"case{i}.mha", pred)
        write_mask(tmp_path / "gt" / f"case{i}.nii.gz" if i == 1 else tmp_path / "gt" / f"case{i}.mha", ref)
    (tmp_path / "pred" / "case0.report.json").write_text("{}")  # as `hnseg batch` leaves it: not a mask
    return tmp_path / "pred", tmp_path / "gt"


def test_evaluate_command_writes_json_and_csv(folders, tmp_path, capsys):
    pred, gt = folders
    code = main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--csv", str(tmp_path / "out" / "cases.csv"),
                 "--json", str(tmp_path / "out" / "metrics.json")])
    assert code == 0
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    summary = report["aggregate"]
    assert list(summary)[:3] == ["gtvp_dice_mean", "gtvn_dscagg", "gtvn_f1agg"]
    assert summary["gtvp_dice_mean"] == pytest.approx(0.5)
    assert summary["gtvp_dice_mean_cases_with_gtvp"] == pytest.approx(0.75)
    assert summary["gtvn_dscagg"] == pytest.approx(16 / 51) and summary["gtvn_f1agg"] == pytest.approx(0.5)
    assert [c["case"] for c in report["cases"]] == ["case0", "case1", "case2"]
    assert report["cases"][1]["gtvp_hd95_mm"] is None and report["cases"][1]["gtvn_fn"] == 1
    with open(tmp_path / "out" / "cases.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["case0", "case1", "case2"]
    assert float(rows[0]["gtvp_dice"]) == 0.5 and float(rows[2]["gtvp_dice"]) == 1.0
    assert float(rows[0]["gtvp_ref_ml"]) == pytest.approx(1000 * VOXEL_ML, rel=1e-5)
    assert (rows[1]["gtvn_tp"], rows[1]["gtvn_fp"], rows[1]["gtvn_fn"]) == ("0", "0", "1")
    assert rows[1]["gtvp_hd95_mm"] == "" and float(rows[1]["gtvp_nsd_2mm"]) == 0.0
    out = capsys.readouterr().out
    assert "3 cases (1 without GTVp)" in out and "GTVp Dice mean 0.5000 (all cases" in out and "F1agg 0.5000" in out
    assert "over the 2 cases with a reference GTVp 0.7500" in out


def test_two_mask_files_are_one_case_whatever_their_names(folders, tmp_path):
    """As `make demo` scores process.py's output.mha against the phantom's <uuid>.mha reference."""
    pred, gt = folders
    out = tmp_path / "one.json"
    assert main(["evaluate", "--pred", str(pred / "case0.mha"), "--gt", str(gt / "case2.mha"), "--json", str(out)]) == 0
    (case,) = json.loads(out.read_text())["cases"]
    assert case["case"] == "case2"


def test_grid_within_tolerance_is_accepted(folders, tmp_path):
    pred, gt = folders
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / "case0.mha")))
    write_mask(pred / "case0.mha", labels, origin=(ORIGIN_XYZ_MM[0] + 5e-5, *ORIGIN_XYZ_MM[1:]))
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt)]) == 0


def run_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hnseg: error: ") and err.count("\n") == 1
    return err


def test_grid_mismatch_is_an_error_naming_both_files(folders, capsys):
    pred, gt = folders
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / "case2.mha")))
    write_mask(pred / "case2.mha", labels, origin=(ORIGIN_XYZ_MM[0] + 0.01, *ORIGIN_XYZ_MM[1:]))
    err = run_error(["evaluate", "--pred", str(pred), "--gt", str(gt)], capsys)
    assert str(pred / "case2.mha") in err and str(gt / "case2.mha") in err and "origin" in err


def test_spacing_mismatch_names_the_spacing(folders, capsys):
    pred, gt = folders
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / "case0.mha")))
    write_mask(pred / "case0.mha", labels, spacing=(0.98, 0.98, 2.0))
    err = run_error(["evaluate", "--pred", str(pred), "--gt", str(gt)], capsys)
    assert "spacing" in err and "case0.mha" in err


def test_missing_prediction_or_reference_is_an_error_naming_the_files(folders, capsys):
    pred, gt = folders
    (pred / "case1.mha").unlink()
    write_mask(pred / "extra.nii.gz", np.zeros((20, 40, 40), np.uint8))
    err = run_error(["evaluate", "--pred", str(pred), "--gt", str(gt)], capsys)
    assert "no prediction" in err and "case1.nii.gz" in err
    assert "no reference" in err and "extra.nii.gz" in err


def test_bad_label_values_are_an_error_naming_the_file(folders, capsys):
    pred, gt = folders
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / "case0.mha")))
    labels[0, 0, 0] = 3
    write_mask(pred / "case0.mha", labels)
    err = run_error(["evaluate", "--pred", str(pred), "--gt", str(gt)], capsys)
    assert str(pred / "case0.mha") in err and "[3]" in err


def test_empty_or_missing_folder_is_an_error(tmp_path, folders, capsys):
    _, gt = folders
    (tmp_path / "nothing").mkdir()
    assert "no prediction masks" in run_error(["evaluate", "--pred", str(tmp_path / "nothing"), "--gt", str(gt)],
                                              capsys)
    assert "does not exist" in run_error(["evaluate", "--pred", str(tmp_path / "absent"), "--gt", str(gt)], capsys)


def test_two_masks_for_one_case_are_an_error(folders, capsys):
    pred, gt = folders
    write_mask(pred / "case0.nii.gz", np.zeros((20, 40, 40), np.uint8))
    err = run_error(["evaluate", "--pred", str(pred), "--gt", str(gt)], capsys)
    assert "case0.mha" in err and "case0.nii.gz" in err
