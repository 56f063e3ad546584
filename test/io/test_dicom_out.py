"""DICOM out: DICOM-SEG and RTSTRUCT written from a mask on a DICOM CT, read back (highdicom, pydicom) and rasterised
on the CT grid, for identity, feet-first and oblique CTs; and `hnseg predict` from DICOM series to both."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("highdicom")

from builders import image_from_function, oblique_direction  # noqa: E402
from conftest import LESION_CENTER_XYZ_MM, small_case  # noqa: E402
from dicom_series import write_ct_series, write_pet_series  # noqa: E402
from test_dicom import FEET_FIRST, small_pet  # noqa: E402

from hnseg_infer.cli.main import main  # noqa: E402
from hnseg_infer.errors import InputError  # noqa: E402
from hnseg_infer.geometry.grid import Grid  # noqa: E402
from hnseg_infer.io.dicom import read_series  # noqa: E402
from hnseg_infer.io.dicom_out import (  # noqa: E402
    build_rtstruct,
    parse_roi_mapping,
    rasterise_rtstruct,
    write_dicom_seg,
    write_rtstruct,
)

DIRECTIONS = {"identity": (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), "feet-first": FEET_FIRST, "oblique": oblique_direction()}


def two_lesions(points):
    """GTVp: a ball with a hole (a ring on each slice); GTVn: a smaller ball beside it."""
    r = np.linalg.norm(points - LESION_CENTER_XYZ_MM, axis=1)
    node = np.linalg.norm(points - (LESION_CENTER_XYZ_MM + [-20.0, 6.0, 0.0]), axis=1)
    return np.where((r < 9.0) & (r > 3.5), 1, np.where(node < 5.0, 2, 0))


def dicom_ct_and_mask(tmp_path, direction):
    write_ct_series(small_case(ct_direction=direction)[0], tmp_path / "ct")
    ct, series = read_series(tmp_path / "ct", "ct")
    grid = Grid.of(ct)
    mask = sitk.Cast(image_from_function(two_lesions, size_xyz=grid.size_xyz, spacing_xyz_mm=grid.spacing_xyz_mm,
                                         origin_xyz_mm=grid.origin_xyz_mm, direction=grid.direction), sitk.sitkUInt8)
    return ct, series, mask


def dice(a, b) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("name", DIRECTIONS)
def test_dicom_seg_reads_back_onto_the_ct_grid(tmp_path, name):
    import highdicom as hd

    _, series, mask = dicom_ct_and_mask(tmp_path, DIRECTIONS[name])
    write_dicom_seg(mask, series, tmp_path / "seg.dcm")
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["GTVp", "GTVn"]
    assert seg.FrameOfReferenceUID == series.first.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    labels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in series.datasets],
                                               combine_segments=True, skip_overlap_checks=True)
    want = sitk.GetArrayFromImage(mask)
    for label in (1, 2):
        assert (want == label).sum() > 50
        assert dice(labels == label, want == label) >= 0.99


def rasterise_with_matplotlib(ds, ct: sitk.Image, roi_name: str) -> np.ndarray:
    """An independent rasteriser (matplotlib's point-in-polygon at voxel centres, even-odd), not the package's."""
    from matplotlib.path import Path as PolygonPath

    number = next(int(r.ROINumber) for r in ds.StructureSetROISequence if r.ROIName == roi_name)
    contours = next(c for c in ds.ROIContourSequence if int(c.ReferencedROINumber) == number).ContourSequence
    size_x, size_y, size_z = ct.GetSize()
    yy, xx = np.mgrid[:size_y, :size_x]
    centres_xy = np.stack([xx.ravel(), yy.ravel()], axis=1)
    out = np.zeros((size_z, size_y, size_x), bool)
    for contour in contours:
        points = np.asarray(contour.ContourData, float).reshape(-1, 3)
        index = np.array([ct.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in points])
        k = int(round(index[0, 2]))
        assert np.abs(index[:, 2] - k).max() < 1e-3  # every contour lies on a CT slice
        inside = PolygonPath(index[:, :2]).contains_points(centres_xy).reshape(size_y, size_x)
        out[k] ^= inside
    return out


@pytest.mark.parametrize("name", DIRECTIONS)
def test_rtstruct_reads_back_onto_the_ct_grid(tmp_path, name):
    import pydicom

    ct, series, mask = dicom_ct_and_mask(tmp_path, DIRECTIONS[name])
    write_rtstruct(mask, series, tmp_path / "rt.dcm")
    ds = pydicom.dcmread(tmp_path / "rt.dcm")
    assert ds.Modality == "RTSTRUCT" and ds.FrameOfReferenceUID == series.first.FrameOfReferenceUID
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["GTVp", "GTVn"]
    referenced = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == series.series_uid and len(referenced.ContourImageSequence) == 20
    want = sitk.GetArrayFromImage(mask)
    grid = Grid.of(ct)
    ours = rasterise_rtstruct(ds, grid, {1: ["GTVp"], 2: ["GTVn"]}, path=tmp_path / "rt.dcm")
    for label, name_ in ((1, "GTVp"), (2, "GTVn")):
        theirs = rasterise_with_matplotlib(ds, ct, name_)
        assert dice(theirs, want == label) >= 0.95
        assert dice(ours == label, want == label) >= 0.95
    assert not (ours[want == 1] == 0).all() and (ours[want == 0] == 0).mean() > 0.99


def test_the_hole_stays_a_hole(tmp_path):
    """Each GTVp slice through the centre is a ring: two contours, the inner one a hole on reading back."""
    ct, series, mask = dicom_ct_and_mask(tmp_path, DIRECTIONS["identity"])
    ds = build_rtstruct(mask, series)
    labels = rasterise_rtstruct(ds, Grid.of(ct), {1: ["GTVp"]}, path=tmp_path / "rt.dcm")
    centre = np.round(ct.TransformPhysicalPointToContinuousIndex(tuple(LESION_CENTER_XYZ_MM))).astype(int)
    assert labels[centre[2], centre[1], centre[0]] == 0  # the hole
    assert sitk.GetArrayFromImage(mask)[centre[2], centre[1], centre[0]] == 0


def test_roi_mapping_and_its_errors(tmp_path):
    assert parse_roi_mapping("GTVp=GTV_P,GTVn=GTV_N*") == {1: ["GTV_P"], 2: ["GTV_N*"]}
    with pytest.raises(InputError, match="LABEL=PATTERN"):
        parse_roi_mapping("GTVx=A")
    ct, series, mask = dicom_ct_and_mask(tmp_path, DIRECTIONS["identity"])
    with pytest.raises(InputError, match=r"no ROI matching \['PTV\*'\].*its ROIs: GTVn, GTVp"):
        rasterise_rtstruct(build_rtstruct(mask, series), Grid.of(ct), {1: ["PTV*"]}, path=tmp_path / "rt.dcm")


def test_predict_from_dicom_series_writes_mask_seg_and_rtstruct(tmp_path, weights_dir):
    import highdicom as hd

    ct_image, _ = small_case()
    suv = small_pet()
    study = write_ct_series(ct_image, tmp_path / "ct")
    write_pet_series(suv, tmp_path / "pet", study=study)
    out, report = tmp_path / "out", tmp_path / "out" / "report.json"
    code = main(["predict", "--ct", str(tmp_path / "ct"), "--pet", str(tmp_path / "pet"), "--out",
                 str(out / "mask.mha"), "--out-dicom-seg", str(out / "seg.dcm"), "--out-rtstruct",
                 str(out / "rt.dcm"), "--report", str(report), "--weights", str(weights_dir), "--device", "cpu"])
    assert code == 0
    data = json.loads(report.read_text())
    assert data["inputs"]["pet_unit"]["source"] == "dicom" and data["inputs"]["pet_unit"]["unit"] == "bqml"
    assert data["inputs"]["ct"]["dicom_files"] == 20 and data["dicom_seg"] and data["rtstruct"]
    mask = sitk.ReadImage(str(out / "mask.mha"))
    assert Grid.of(mask).mismatch(Grid.of(ct_image), tol=1e-5) is None
    labels = sitk.GetArrayFromImage(mask)
    assert (labels > 0).sum() > 20
    # the same case from the images themselves (PET already in SUV): the same mask
    code = main(["predict", "--ct", str(_write(ct_image, tmp_path / "ct.mha")), "--pet",
                 str(_write(suv, tmp_path / "pet.mha")), "--out", str(tmp_path / "ref.mha"), "--weights",
                 str(weights_dir), "--device", "cpu"])
    assert code == 0
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ref.mha")))
    assert dice(labels > 0, reference > 0) >= 0.99
    seg = hd.seg.segread(out / "seg.dcm")
    _, series = read_series(tmp_path / "ct", "ct")
    from_seg = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in series.datasets], combine_segments=True,
                                                 skip_overlap_checks=True)
    np.testing.assert_array_equal(from_seg, labels)


def _write(image, path):
    sitk.WriteImage(image, str(path))
    return path


def test_dicom_outputs_need_a_dicom_ct(tmp_path, weights_dir, capsys):
    ct_image, pet = small_case()
    code = main(["predict", "--ct", str(_write(ct_image, tmp_path / "ct.mha")), "--pet",
                 str(_write(pet, tmp_path / "pet.mha")), "--out", str(tmp_path / "out" / "mask.mha"),
                 "--out-rtstruct", str(tmp_path / "out" / "rt.dcm"), "--weights", str(weights_dir),
                 "--device", "cpu"])
    assert code == 2
    assert "--out-rtstruct" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_ct_series_option_selects_one_of_several(tmp_path, weights_dir, capsys):
    ct_image, _ = small_case()
    study = write_ct_series(ct_image, tmp_path / "ct", series_uid="1.2.826.0.1.1")
    write_ct_series(ct_image, tmp_path / "second", study=study, series_uid="1.2.826.0.1.2")
    for path in (tmp_path / "second").iterdir():
        path.rename(tmp_path / "ct" / f"b_{path.name}")
    write_pet_series(small_pet(), tmp_path / "pet", study=study)
    args = ["predict", "--ct", str(tmp_path / "ct"), "--pet", str(tmp_path / "pet"), "--out",
            str(tmp_path / "out" / "mask.mha"), "--weights", str(weights_dir), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 series in CT folder" in err and "1.2.826.0.1.1" in err and "--ct-series UID" in err
    assert not (tmp_path / "out").exists()
    assert main(args + ["--ct-series", "1.2.826.0.1.2"]) == 0


def test_evaluate_against_an_rtstruct_with_an_roi_mapping(tmp_path, capsys):
    """`hnseg evaluate --gt RTSTRUCT --gt-roi`: a planning system's names (GTV_P, GTV_N1) and an ROI that must not
    match (PTV); the mask the RTSTRUCT came from scores 1, a mask without its GTVn scores 0 for GTVn."""
    import pydicom

    ct, series, mask = dicom_ct_and_mask(tmp_path, DIRECTIONS["oblique"])
    ds = build_rtstruct(mask, series)
    ds.StructureSetROISequence[0].ROIName, ds.StructureSetROISequence[1].ROIName = "GTV_P", "GTV_N1"
    extra = pydicom.Dataset()
    extra.ROINumber, extra.ROIName = 3, "PTV_70"
    ds.StructureSetROISequence.append(extra)
    ds.save_as(tmp_path / "case1.dcm", enforce_file_format=True)
    _write(mask, tmp_path / "case1.mha")
    args = ["evaluate", "--pred", str(tmp_path / "case1.mha"), "--gt", str(tmp_path / "case1.dcm"),
            "--gt-roi", "GTVp=GTV_P,GTVn=GTV_N*", "--json", str(tmp_path / "m.json")]
    assert main(args) == 0
    case = json.loads((tmp_path / "m.json").read_text())["cases"][0]
    assert case["gtvp_dice"] == 1.0 and case["gtvn_dice"] == 1.0
    no_node = sitk.BinaryThreshold(mask, 1, 1, 1, 0)  # GTVp kept, GTVn dropped
    _write(sitk.Cast(no_node, sitk.sitkUInt8), tmp_path / "case1.mha")
    assert main(args) == 0
    case = json.loads((tmp_path / "m.json").read_text())["cases"][0]
    assert case["gtvp_dice"] == 1.0 and case["gtvn_dice"] == 0.0
    capsys.readouterr()
    assert main(args[:-4] + ["--gt-roi", "GTVp=GTV_P,GTVn=LN*"]) == 2
    assert "no ROI matching ['LN*'] for label 2; its ROIs: GTV_N1, GTV_P, PTV_70" in capsys.readouterr().err
    # a folder of <case>.dcm against a folder of <case>.mha
    (tmp_path / "gt").mkdir(), (tmp_path / "pred").mkdir()
    (tmp_path / "case1.dcm").rename(tmp_path / "gt" / "case1.dcm")
    _write(mask, tmp_path / "pred" / "case1.mha")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--gt-roi",
                 "GTVp=gtv_p,GTVn=gtv_n*", "--json", str(tmp_path / "m.json")]) == 0
    case = json.loads((tmp_path / "m.json").read_text())["cases"][0]
    assert case["case"] == "case1" and case["gtvp_dice"] == 1.0 and case["gtvn_dice"] == 1.0


def test_batch_reads_dicom_case_folders_and_writes_seg_and_rtstruct(tmp_path, weights_dir, capsys):
    """CASE/images/{ct,pet}/*.dcm is a DICOM case; a case of .mha files cannot have DICOM outputs (that case
    fails, the batch exits 2, the DICOM case is written)."""
    import pydicom

    ct_image, pet = small_case()
    study = write_ct_series(ct_image, tmp_path / "cases" / "dicom_case" / "images" / "ct")
    write_pet_series(small_pet(), tmp_path / "cases" / "dicom_case" / "images" / "pet", study=study)
    from conftest import write_gc_input

    write_gc_input(tmp_path / "cases" / "mha_case", ct_image, pet)
    out = tmp_path / "out"
    code = main(["batch", "--input", str(tmp_path / "cases"), "--out", str(out), "--dicom-seg", "--rtstruct",
                 "--weights", str(weights_dir), "--device", "cpu"])
    assert code == 2
    assert "mha_case" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["dicom_case.mha", "dicom_case.report.json",
                                                      "dicom_case.rtstruct.dcm", "dicom_case.seg.dcm",
                                                      "manifest.csv", "mha_case.report.json"]
    assert pydicom.dcmread(out / "dicom_case.seg.dcm").Modality == "SEG"
    report = json.loads((out / "dicom_case.report.json").read_text())
    assert report["inputs"]["pet_unit"]["source"] == "dicom"
