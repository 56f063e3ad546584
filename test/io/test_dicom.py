"""DICOM series in: geometry (oblique, feet-first, shuffled files), the refusals (missing, duplicate, uneven slices,
mixed orientations, tilt, several series), and SUVbw from the tags for each unit and decay correction."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("pydicom")

from builders import image_from_function, oblique_direction  # noqa: E402
from conftest import REPO, pet_values, small_case  # noqa: E402
from dicom_series import write_ct_series, write_pet_series  # noqa: E402

from hnseg_infer.errors import InputError  # noqa: E402
from hnseg_infer.io.dicom import read_series  # noqa: E402
from hnseg_infer.io.images import load_case  # noqa: E402

FEET_FIRST = (-1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0)  # FFS: rows run to the patient's right, slices go feet-wards


def textured_suv(points):
    """The conftest PET (SUV 10 lesion, SUV 1 body) with a smooth texture, so voxels do not share a few values."""
    return pet_values(points) * (1.0 + 0.3 * np.sin(points[:, 0] / 7.0) * np.cos(points[:, 2] / 5.0))


def small_pet():
    return image_from_function(textured_suv, size_xyz=(24, 22, 8), spacing_xyz_mm=(4.0, 4.0, 3.5),
                               origin_xyz_mm=(-46.0, -42.0, -2.0), direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def small_ct(direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)):
    return small_case(ct_direction=direction)[0]


@pytest.mark.parametrize("direction", [(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), FEET_FIRST, oblique_direction()],
                         ids=["identity", "feet-first", "oblique"])
def test_ct_series_comes_back_on_its_grid(tmp_path, direction):
    ct = small_ct(direction)
    write_ct_series(ct, tmp_path / "ct", shuffle=True, patient_position="FFS" if direction == FEET_FIRST else "HFS")
    image, series = read_series(tmp_path / "ct", "ct")
    assert image.GetPixelID() == sitk.sitkInt16  # whole HU stay int16
    assert image.GetSize() == ct.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), ct.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), ct.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(image.GetDirection(), direction, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), np.round(sitk.GetArrayFromImage(ct)))
    # the headers are in volume order: positions increase along the normal, whatever the file names said
    normal = np.asarray(direction).reshape(3, 3)[:, 2]
    along = [np.dot([float(v) for v in ds.ImagePositionPatient], normal) for ds in series.datasets]
    assert np.all(np.diff(along) > 0) and [p.name for p in series.files] != sorted(p.name for p in series.files)


def test_missing_slice_is_an_error_naming_the_neighbours(tmp_path):
    write_ct_series(small_ct(), tmp_path / "ct")
    _, series = read_series(tmp_path / "ct", "ct")
    before, after = series.files[4].name, series.files[6].name
    series.files[5].unlink()
    with pytest.raises(InputError, match=f"1 missing slice.*between {before} and {after}.*gap 5.000 mm"):
        read_series(tmp_path / "ct", "ct")


def test_duplicate_and_uneven_slices_are_errors(tmp_path):
    import pydicom

    write_ct_series(small_ct(), tmp_path / "ct")
    _, series = read_series(tmp_path / "ct", "ct")
    shutil.copy(series.files[3], tmp_path / "ct" / "copy.dcm")
    ds = pydicom.dcmread(tmp_path / "ct" / "copy.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "ct" / "copy.dcm")
    with pytest.raises(InputError, match="two slices at the same position"):
        read_series(tmp_path / "ct", "ct")
    (tmp_path / "ct" / "copy.dcm").unlink()
    ds = pydicom.dcmread(series.files[-1])
    position = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [position[0], position[1], position[2] + 1.0]  # 3.5 mm after its neighbour, not 2.5
    ds.save_as(series.files[-1])
    with pytest.raises(InputError, match="unevenly spaced slices.*gap 3.500 mm, the others 2.500 mm"):
        read_series(tmp_path / "ct", "ct")


def test_mixed_orientation_and_tilt_are_errors(tmp_path):
    import pydicom

    write_ct_series(small_ct(), tmp_path / "ct")
    _, series = read_series(tmp_path / "ct", "ct")
    ds = pydicom.dcmread(series.files[2])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(series.files[2])
    with pytest.raises(InputError, match="mixes slice orientations"):
        read_series(tmp_path / "ct", "ct")
    write_ct_series(small_ct(), tmp_path / "tilted")
    for k, path in enumerate(read_series(tmp_path / "tilted", "ct")[1].files):  # y shifts 0.5 mm per slice
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1]) + 0.5 * k,
                                   float(ds.ImagePositionPatient[2])]
        ds.GantryDetectorTilt = "11.3"
        ds.save_as(path)
    with pytest.raises(InputError, match=r"sheared.*gantry tilt \(0018,1120\) 11.3"):
        read_series(tmp_path / "tilted", "ct")


def test_several_series_in_a_folder_are_listed_and_one_can_be_selected(tmp_path):
    ct = small_ct()
    write_ct_series(ct, tmp_path / "ct", series_uid="1.2.3.4.1")
    write_ct_series(small_ct(oblique_direction()), tmp_path / "other", series_uid="1.2.3.4.2")
    for path in (tmp_path / "other").iterdir():
        path.rename(tmp_path / "ct" / f"b_{path.name}")
    with pytest.raises(InputError, match=r"2 series in CT folder .*1\.2\.3\.4\.1 \(CT, 20 files.*1\.2\.3\.4\.2 .*"
                                         r"select one with --ct-series UID"):
        read_series(tmp_path / "ct", "ct")
    image, series = read_series(tmp_path / "ct", "ct", "1.2.3.4.2")
    assert series.series_uid == "1.2.3.4.2" and image.GetDirection() == pytest.approx(oblique_direction(), abs=1e-6)
    with pytest.raises(InputError, match="series 9.9 is not in"):
        read_series(tmp_path / "ct", "ct", "9.9")


def _suv_error(case, suv_image) -> float:
    """Largest relative error of the case's SUV (stored × factor) against the phantom's, where SUV > 0.5."""
    got = sitk.GetArrayFromImage(case.pet).astype(np.float64) * case.pet_unit.suv_per_stored_value
    want = sitk.GetArrayFromImage(suv_image).astype(np.float64)
    body = want > 0.5
    return float(np.abs(got[body] / want[body] - 1.0).max())


@pytest.mark.parametrize("units, decay, philips_tag, unit, start_datetime", [
    ("BQML", "START", "", "bqml", False), ("BQML", "START", "", "bqml", True), ("BQML", "ADMIN", "", "bqml", False),
    ("BQML", "NONE", "", "bqml", False), ("CNTS", "START", "1000", "cnts", False),
    ("CNTS", "START", "1009", "cnts", False), ("GML", "START", "", "suv", False)])
def test_suv_from_dicom_tags_matches_the_phantom(tmp_path, units, decay, philips_tag, unit, start_datetime):
    suv = small_pet()
    study = write_ct_series(small_ct(), tmp_path / "ct")
    write_pet_series(suv, tmp_path / "pet", units=units, decay=decay, study=study, philips_tag=philips_tag,
                     start_datetime=start_datetime)
    case = load_case(tmp_path / "ct", tmp_path / "pet")
    assert _suv_error(case, suv) < 0.005
    report = case.pet_unit.to_dict()
    assert report["source"] == "dicom" and report["unit"] == unit and report["dicom_tags"]["Units"] == units
    if units == "BQML":
        assert report["dicom_tags"]["DecayCorrection"] == decay and "PatientWeight" in report["dicom_tags"]
        assert ("RadiopharmaceuticalStartDateTime" in report["dicom_tags"]) == start_datetime
    assert not case.warnings


def test_the_factor_is_not_the_voxel_estimate(tmp_path):
    """The tags give the exact SUV where the median-uptake estimate is off (here the body is not SUV 1)."""
    suv = sitk.Cast(small_pet() * 2.0, sitk.sitkFloat32)  # body at SUV 2
    study = write_ct_series(small_ct(), tmp_path / "ct")
    write_pet_series(suv, tmp_path / "pet", study=study)
    case = load_case(tmp_path / "ct", tmp_path / "pet")
    assert _suv_error(case, suv) < 0.005
    from hnseg_infer.io.images import detect_pet_unit

    estimate = detect_pet_unit(case.pet)
    assert abs(estimate.suv_per_stored_value / case.pet_unit.suv_per_stored_value - 1) > 0.3


@pytest.mark.parametrize("dropped, named", [("PatientWeight", r"PatientWeight \(0010,1030\)"),
                                            ("RadionuclideTotalDose", r"RadionuclideTotalDose \(0018,1074\)"),
                                            ("RadionuclideHalfLife", r"RadionuclideHalfLife \(0018,1075\)"),
                                            ("DecayCorrection", r"DecayCorrection \(0054,1102\)")])
def test_a_missing_tag_falls_back_to_the_estimate_with_a_warning(tmp_path, dropped, named):
    study = write_ct_series(small_ct(), tmp_path / "ct")
    write_pet_series(small_pet(), tmp_path / "pet", study=study, drop=(dropped,))
    case = load_case(tmp_path / "ct", tmp_path / "pet")
    assert case.pet_unit.source == "estimate" and case.pet_unit.unit == "bqml"
    assert "estimated" in case.pet_unit.note
    assert len(case.warnings) == 1
    assert pytest.approx(case.pet_unit.suv_per_stored_value) == \
        load_case(tmp_path / "ct", sitk.Cast(case.pet, sitk.sitkFloat32)).pet_unit.suv_per_stored_value
    import re

    assert re.search(f"DICOM tag {named} missing", case.warnings[0])


def test_pydicom_is_not_imported_for_image_files(case_dir):
    """The container path (files, no DICOM) does not import pydicom or highdicom."""
    code = ("import sys; from hnseg_infer.cli import main; from hnseg_infer.io.images import load_case; "
            f"load_case('{next((case_dir / 'images/ct').iterdir())}', '{next((case_dir / 'images/pet').iterdir())}'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydicom', 'highdicom', 'skimage')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def _edit_all(folder, edit):
    import pydicom

    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path)


def _times(ds, series_date, series_time, acquisition_time, start_time):
    ds.SeriesDate, ds.SeriesTime = series_date, series_time
    ds.AcquisitionDate, ds.AcquisitionTime = series_date, acquisition_time
    ds.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartTime = start_time


@pytest.mark.parametrize("case", ["midnight", "post-processed", "post-processed-ge"])
def test_qiba_scan_and_start_times(tmp_path, case):
    """The injection before midnight and the scan after it; a post-processed series (series time after the
    acquisition): the earliest acquisition time, or GE's private scan date-time when present."""
    suv = small_pet()
    study = write_ct_series(small_ct(), tmp_path / "ct")
    write_pet_series(suv, tmp_path / "pet", study=study)  # injection 09:30:00, scan 10:30:00
    if case == "midnight":
        _edit_all(tmp_path / "pet", lambda ds: _times(ds, "20260315", "005000", "005000", "235000"))
    else:
        def edit(ds):
            _times(ds, "20260314", "123000", "103000", "093000")  # re-saved two hours later
            if case == "post-processed-ge":
                _times(ds, "20260314", "123000", "110000", "093000")  # acquisition times that must not be used
                ds.private_block(0x0009, "GEMS_PETD_01", create=True).add_new(0x0D, "DT", "20260314103000")
        _edit_all(tmp_path / "pet", edit)
    case_ = load_case(tmp_path / "ct", tmp_path / "pet")
    assert _suv_error(case_, suv) < 0.005
    tags = case_.pet_unit.dicom_tags
    assert tags["decay_time_s"] == 3600.0
    assert ("EarliestAcquisitionDateTime" in tags) == (case == "post-processed")
    assert ("GEPrivateScanDateTime" in tags) == (case == "post-processed-ge")


def test_a_pet_without_attenuation_correction_is_warned(tmp_path):
    study = write_ct_series(small_ct(), tmp_path / "ct")
    write_pet_series(small_pet(), tmp_path / "pet", study=study)
    _edit_all(tmp_path / "pet", lambda ds: setattr(ds, "CorrectedImage", ["DECY"]))
    case = load_case(tmp_path / "ct", tmp_path / "pet")
    assert case.pet_unit.source == "dicom"
    assert len(case.warnings) == 1 and "CorrectedImage (0028,0051) is 'DECY', without ATTN" in case.warnings[0]


def test_without_pydicom_a_dicom_folder_is_a_clear_error(tmp_path):
    """As in the container image, which does not carry pydicom: exit 2's one line says what to install."""
    write_ct_series(small_ct(), tmp_path / "ct")
    code = ("import sys; sys.modules['pydicom'] = None\n"  # makes `import pydicom` fail
            "from hnseg_infer.errors import InputError\nfrom hnseg_infer.io.images import load_case\n"
            f"try:\n    load_case('{tmp_path / 'ct'}', None)\nexcept InputError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert "reading a DICOM series needs pydicom, which is not installed: pip install 'hnseg[dicom]'" in out.stdout
