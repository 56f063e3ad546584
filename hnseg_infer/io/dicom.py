"""DICOM series in: a CT or PET series folder → a SimpleITK volume (LPS, as ITK), and the PET's SUVbw factor.

pydicom reads the headers; this module groups them by series, orders the slices along their normal and checks the
geometry (missing, duplicate or unevenly spaced slices, mixed orientations, tilt: each an InputError naming the
files). SimpleITK's series reader then reads the pixels in that order (GDCM: compressed syntaxes, each file's own
rescale, which varies per slice in PET); on its own it would build a volume from an incomplete series with only a
warning. The SUV factor follows QIBA's vendor-neutral pseudo-code (FDG-PET/CT Profile, Appendix G); docs/dicom.md
lists the tags. Imported only when a folder is given as an image (pydicom is the optional `hnseg[dicom]` extra).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hnseg_infer.errors import InputError
from hnseg_infer.io.images import PetUnit, detect_pet_unit

try:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.valuerep import DA, DT, TM
except ImportError:  # pragma: no cover - the message below says how to get it
    pydicom = None

ORIENTATION_TOL = 1e-4  # direction cosines of all slices must agree to this
POSITION_TOL_MM = 0.01  # in-plane drift of slice positions (a gantry tilt or shear) beyond this is refused
SPACING_REL_TOL = 0.01  # slice gaps may differ from the median gap by this fraction
PHILIPS_SUV_FACTOR = (0x7053, 0x1000)  # Philips PET private group: SUVbw per stored value (CNTS)
PHILIPS_BQML_FACTOR = (0x7053, 0x1009)  # Philips: Bq/mL per stored value (CNTS)
GE_SCAN_DATETIME = (0x0009, 0x100D)  # GEMS_PETD_01: scan date-time of a post-processed series


def require_pydicom() -> None:
    if pydicom is None:
        raise InputError("reading a DICOM series needs pydicom, which is not installed: pip install 'hnseg[dicom]' "
                         "(or give the images as .mha/.nii.gz files)")


@dataclass(frozen=True)
class DicomSeries:
    """One series read from a folder: its headers (pixel data dropped) in volume order, i.e. with increasing
    position along the slice normal (the volume's third axis), and the files they came from."""

    folder: Path
    series_uid: str
    modality: str
    datasets: tuple
    files: tuple[Path, ...]

    @property
    def first(self):
        return self.datasets[0]


def list_series(folder: Path) -> dict[str, list[tuple[Path, object]]]:
    """{SeriesInstanceUID: [(file, header)]} of every DICOM image file in `folder` (not recursive); other files
    (DICOMDIR, notes) are skipped."""
    require_pydicom()
    series: dict[str, list[tuple[Path, object]]] = {}
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        uid = ds.get("SeriesInstanceUID")
        if uid is None or ("ImageOrientationPatient" not in ds and "PixelSpacing" not in ds):
            continue  # not an image (DICOMDIR, a structure set, ...)
        series.setdefault(str(uid), []).append((path, ds))
    return series


def _describe(uid: str, members) -> str:
    ds = members[0][1]
    return f"{uid} ({ds.get('Modality', '?')}, {len(members)} files, {str(ds.get('SeriesDescription', ''))!r})"


def select_series(folder: Path, role: str, series_uid: str | None) -> list[tuple[Path, object]]:
    series = list_series(folder)
    if not series:
        raise InputError(f"{role.upper()} folder {folder} holds no DICOM image files: give a folder with one DICOM "
                         f"series, or an image file (.mha, .nii.gz, ...)")
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(f"{role.upper()} series {series_uid} is not in {folder}; it holds: "
                             f"{'; '.join(_describe(u, m) for u, m in series.items())}")
        return series[series_uid]
    if len(series) > 1:
        raise InputError(f"{len(series)} series in {role.upper()} folder {folder}: "
                         f"{'; '.join(_describe(u, m) for u, m in series.items())}: select one with "
                         f"--{role}-series UID (Segmenter.predict({role}_series=UID))")
    return next(iter(series.values()))


def _axes(ds, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row direction, column direction, slice normal) of a slice, LPS unit vectors."""
    if "ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds:
        raise InputError(f"DICOM file {path} has no ImageOrientationPatient/ImagePositionPatient (0020,0037/0032): "
                         f"a volume cannot be placed in space without them")
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    row, col = iop[:3], iop[3:]
    return row, col, np.cross(row, col)


def order_slices(members: list[tuple[Path, object]], role: str, folder: Path) -> tuple[list, np.ndarray, float]:
    """Members sorted along the slice normal, the direction matrix (columns: row, column, normal) and the slice
    spacing in mm. Mixed orientations or pixel grids, duplicates, gantry tilt, missing or unevenly spaced slices
    are each an InputError naming the files."""
    if len(members) < 2:
        raise InputError(f"{role.upper()} series in {folder} has {len(members)} slice: a 3-D volume needs at least 2")
    path0, ds0 = members[0]
    row, col, normal = _axes(ds0, path0)
    for path, ds in members[1:]:
        r, c, _ = _axes(ds, path)
        if not (np.allclose(r, row, atol=ORIENTATION_TOL) and np.allclose(c, col, atol=ORIENTATION_TOL)):
            raise InputError(f"{role.upper()} series in {folder} mixes slice orientations ({path0.name}: "
                             f"{list(ds0.ImageOrientationPatient)}, {path.name}: {list(ds.ImageOrientationPatient)}): "
                             f"give one series with one orientation")
        if (ds.Rows, ds.Columns) != (ds0.Rows, ds0.Columns) or \
                not np.allclose([float(v) for v in ds.PixelSpacing], [float(v) for v in ds0.PixelSpacing]):
            raise InputError(f"{role.upper()} series in {folder} mixes pixel grids ({path0.name}: {ds0.Rows}x"
                             f"{ds0.Columns} at {list(ds0.PixelSpacing)} mm, {path.name}: {ds.Rows}x{ds.Columns} at "
                             f"{list(ds.PixelSpacing)} mm): give one series with one pixel grid")
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for _, ds in members])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    members, positions, along = [members[i] for i in order], positions[order], along[order]
    gaps = np.diff(along)
    if (gaps < POSITION_TOL_MM).any():
        i = int(np.argmax(gaps < POSITION_TOL_MM))
        raise InputError(f"{role.upper()} series in {folder} has two slices at the same position "
                         f"({members[i][0].name} and {members[i + 1][0].name}, {along[i]:.2f} mm along the normal): "
                         f"remove the duplicate")
    drift = positions - positions[0] - np.outer(along - along[0], normal)
    if np.abs(drift).max() > POSITION_TOL_MM:
        tilt = ds0.get("GantryDetectorTilt", None)
        raise InputError(f"{role.upper()} series in {folder} is sheared: slice positions drift by "
                         f"{np.abs(drift).max():.2f} mm in-plane (gantry tilt (0018,1120) {tilt}): a tilted "
                         f"acquisition is not supported; resample it to an orthogonal grid first")
    spacing = float(np.median(gaps))
    off = np.abs(gaps - spacing) > SPACING_REL_TOL * spacing
    if off.any():
        i = int(np.argmax(off))
        what = (f"{round(gaps[i] / spacing) - 1} missing slice(s)" if gaps[i] > 1.5 * spacing
                else "unevenly spaced slices")
        raise InputError(f"{role.upper()} series in {folder} has {what} between {members[i][0].name} and "
                         f"{members[i + 1][0].name} (gap {gaps[i]:.3f} mm, the others {spacing:.3f} mm): give the "
                         f"complete series")
    return members, np.column_stack([row, col, normal]), spacing


def _read_pixels(files: list[Path], role: str, folder: Path) -> sitk.Image:
    """The slices' values as one float32 volume, in the order given. SimpleITK's series reader (GDCM) decodes the
    pixel data (compressed transfer syntaxes included) and applies each file's own RescaleSlope/Intercept."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in files])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reader error"
        raise InputError(f"{role.upper()} series in {folder}: the pixel data cannot be decoded ({last[:200]}): "
                         f"check the files, or decompress the series (gdcmconv --raw)") from exc


def _whole_numbers(datasets) -> bool:
    """Every slice's values are integers: slope 1 and an integer intercept (a CT in HU, as scanners write it)."""
    return all(float(ds.get("RescaleSlope", 1.0)) == 1.0 and float(ds.get("RescaleIntercept", 0.0)).is_integer()
               for ds in datasets)


def read_series(folder: Path, role: str, series_uid: str | None = None) -> tuple[sitk.Image, DicomSeries]:
    """The series' volume (each slice rescaled by its own slope and intercept; a CT in whole HU becomes int16)
    and its headers in volume order. The geometry is the one checked here (order_slices), not GDCM's."""
    folder = Path(folder)
    members = select_series(folder, role, series_uid)
    members, direction, slice_mm = order_slices(members, role, folder)
    datasets = tuple(ds for _, ds in members)
    image = _read_pixels([p for p, _ in members], role, folder)
    if role == "ct" and _whole_numbers(datasets):
        extremes = sitk.MinimumMaximumImageFilter()
        extremes.Execute(image)
        if -32768 <= extremes.GetMinimum() and extremes.GetMaximum() <= 32767:
            image = sitk.Cast(image, sitk.sitkInt16)  # half the memory of float32, as an int16 .mha CT stays
    row_mm, col_mm = (float(v) for v in datasets[0].PixelSpacing)  # between rows (along y), columns (along x)
    image.SetSpacing((col_mm, row_mm, slice_mm))
    image.SetOrigin(tuple(float(v) for v in datasets[0].ImagePositionPatient))
    image.SetDirection(tuple(direction.ravel().tolist()))
    series = DicomSeries(folder, str(datasets[0].SeriesInstanceUID), str(datasets[0].get("Modality", "")),
                         datasets, tuple(p for p, _ in members))
    return image, series


# ------------------------------------------------------------------------------------------------------------ SUV

@dataclass
class DicomSuv:
    """The SUVbw factor from the tags (None where a tag is missing: the caller estimates it and warns), the tags
    used, and per-slice decay factors that bring a DecayCorrection NONE series to the scan start."""

    unit: str  # "bqml", "cnts" or "suv" (GML)
    suv_per_stored_value: float | None
    tags: dict = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    note: str = ""
    slice_decay_factors: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)


class _MissingTag(Exception):
    pass


def _tag(ds, keyword: str, tag: str, used: dict):
    value = ds.get(keyword)
    if value is None or value == "":
        raise _MissingTag(f"{keyword} {tag}")
    used[keyword] = str(value)
    return value


def _private_float(ds, tag: tuple[int, int]) -> float | None:
    element = ds.get(tag)
    if element is None or element.value in (None, b"", ""):
        return None
    value = element.value
    if isinstance(value, bytes):
        value = value.decode(errors="replace").strip("\x00 ")
    return float(value)


def _datetime(date: str, time: str) -> dt.datetime:
    return dt.datetime.combine(DA(date), TM(time))


def _acquisition_datetimes(datasets) -> list[dt.datetime] | None:
    out = []
    for ds in datasets:
        if ds.get("AcquisitionDateTime"):
            out.append(DT(ds.AcquisitionDateTime).replace(tzinfo=None))
        elif ds.get("AcquisitionDate") and ds.get("AcquisitionTime"):
            out.append(_datetime(ds.AcquisitionDate, ds.AcquisitionTime))
        else:
            return None
    return out


def _scan_datetime(datasets, used: dict) -> tuple[dt.datetime, list[dt.datetime] | None]:
    """QIBA: the series date-time, unless it is after the earliest acquisition (a post-processed series): then
    GE's private scan date-time, else the earliest acquisition date-time."""
    ds = datasets[0]
    series_dt = _datetime(_tag(ds, "SeriesDate", "(0008,0021)", used), _tag(ds, "SeriesTime", "(0008,0031)", used))
    acquisitions = _acquisition_datetimes(datasets)
    if acquisitions is None or series_dt <= min(acquisitions):
        return series_dt, acquisitions
    ge = ds.get(GE_SCAN_DATETIME)
    if ge is not None and ge.value:
        value = ge.value.decode() if isinstance(ge.value, bytes) else str(ge.value)
        used["GEPrivateScanDateTime"] = value
        return DT(value.strip()).replace(tzinfo=None), acquisitions
    used["EarliestAcquisitionDateTime"] = min(acquisitions).isoformat()
    return min(acquisitions), acquisitions


def _start_datetime(drug, series_date: str, scan: dt.datetime, used: dict) -> dt.datetime:
    """The injection: RadiopharmaceuticalStartDateTime, else the series date with RadiopharmaceuticalStartTime
    (a day earlier when that would be after the scan: the injection was before midnight)."""
    if drug.get("RadiopharmaceuticalStartDateTime"):
        used["RadiopharmaceuticalStartDateTime"] = str(drug.RadiopharmaceuticalStartDateTime)
        return DT(drug.RadiopharmaceuticalStartDateTime).replace(tzinfo=None)
    start = _datetime(series_date, _tag(drug, "RadiopharmaceuticalStartTime", "(0018,1072)", used))
    return start - dt.timedelta(days=1) if start > scan else start


def _bqml_factor(datasets, used: dict) -> tuple[float, str, np.ndarray | None]:
    """SUVbw per Bq/mL: weight / dose decayed to the time the voxels refer to (DecayCorrection)."""
    ds = datasets[0]
    weight_kg = float(_tag(ds, "PatientWeight", "(0010,1030)", used))
    if weight_kg <= 0:
        raise _MissingTag("PatientWeight (0010,1030) (0 kg)")
    sequence = _tag(ds, "RadiopharmaceuticalInformationSequence", "(0054,0016)", used)
    used.pop("RadiopharmaceuticalInformationSequence")
    drug = sequence[0]
    dose_bq = float(_tag(drug, "RadionuclideTotalDose", "(0018,1074)", used))
    half_life_s = float(_tag(drug, "RadionuclideHalfLife", "(0018,1075)", used))
    correction = str(_tag(ds, "DecayCorrection", "(0054,1102)", used)).upper()
    if correction == "ADMIN":  # voxels decay-corrected to the injection: the dose as injected
        return weight_kg * 1000.0 / dose_bq, "decay-corrected to the administration time (ADMIN)", None
    if correction not in ("START", "NONE"):
        raise _MissingTag(f"DecayCorrection (0054,1102) (unknown value {correction!r})")
    scan, acquisitions = _scan_datetime(datasets, used)
    start = _start_datetime(drug, ds.SeriesDate, scan, used)
    decay_s = (scan - start).total_seconds()
    used["decay_time_s"] = round(decay_s, 3)
    factor = weight_kg * 1000.0 / (dose_bq * 2.0 ** (-decay_s / half_life_s))
    if correction == "START":
        return factor, f"decay-corrected to the scan start (START), {decay_s:.0f} s after injection", None
    if acquisitions is None:
        raise _MissingTag("AcquisitionTime (0008,0032) of every slice (needed for DecayCorrection NONE)")
    # NONE: each slice holds the activity at its own acquisition; bring it to the scan start, then as START
    after_scan_s = np.array([(t - scan).total_seconds() for t in acquisitions])
    return factor, ("not decay-corrected (NONE): each slice brought to the scan start from its acquisition time, "
                    f"then {decay_s:.0f} s after injection"), 2.0 ** (after_scan_s / half_life_s)


def suv_from_tags(series: DicomSeries) -> DicomSuv:
    """QIBA's SUVbw factor (per rescaled stored value) from the PET series' tags."""
    used: dict = {}
    ds = series.first
    units = str(ds.get("Units", "")).upper()
    used["Units"] = units
    corrected = ds.get("CorrectedImage") or []  # one value is a str, several a MultiValue
    corrected = [str(v).upper() for v in ([corrected] if isinstance(corrected, str) else corrected)]
    if corrected:
        used["CorrectedImage"] = "\\".join(corrected)  # the DICOM multi-value separator
    try:
        suv = _suv_for_units(series, units, used)
    except _MissingTag as missing:
        suv = DicomSuv("bqml" if units != "GML" else "suv", None, used, missing=[str(missing)])
    if corrected and "ATTN" not in corrected:
        suv.warnings.append(f"PET {series.folder}: CorrectedImage (0028,0051) is {used['CorrectedImage']!r}, "
                            f"without ATTN: the image is not attenuation-corrected, so its SUV is not quantitative")
    return suv


def _suv_for_units(series: DicomSeries, units: str, used: dict) -> DicomSuv:
    """QIBA's branches by Units; _MissingTag names the first tag that is missing."""
    ds = series.first
    if units == "GML":
        return DicomSuv("suv", 1.0, used, note="Units GML: stored as SUVbw; used as it is")
    if units == "CNTS":
        philips_suv = _private_float(ds, PHILIPS_SUV_FACTOR)
        if philips_suv is not None:
            used["PhilipsSUVScaleFactor(7053,1000)"] = philips_suv
            return DicomSuv("cnts", philips_suv, used, note="Units CNTS: Philips SUV scale factor (7053,1000)")
        philips_bqml = _private_float(ds, PHILIPS_BQML_FACTOR)
        if philips_bqml is None:
            raise _MissingTag("Philips scale factor (7053,1000) or (7053,1009)")
        used["PhilipsActivityConcentrationScaleFactor(7053,1009)"] = philips_bqml
        factor, how, per_slice = _bqml_factor(series.datasets, used)
        return DicomSuv("cnts", factor * philips_bqml, used, note=f"Units CNTS: Bq/mL by the Philips factor "
                        f"(7053,1009), {how}", slice_decay_factors=per_slice)
    if units == "BQML":
        factor, how, per_slice = _bqml_factor(series.datasets, used)
        return DicomSuv("bqml", factor, used, note=f"Units BQML: SUVbw from the DICOM tags (QIBA), {how}",
                        slice_decay_factors=per_slice)
    raise _MissingTag(f"Units (0054,1001) (value {units!r}; expected BQML, CNTS or GML)")


def apply_slice_factors(pet: sitk.Image, factors_z: np.ndarray) -> sitk.Image:
    """The PET with slice k multiplied by factors_z[k] (its decay to the scan start), on the same grid."""
    array = sitk.GetArrayFromImage(pet).astype(np.float32) * factors_z.astype(np.float32)[:, None, None]
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(pet)  # the same grid: only the voxel values change
    return out


def dicom_pet_unit(pet: sitk.Image, series: DicomSeries, warnings: list[str]) -> tuple[sitk.Image, PetUnit]:
    """The PET (a NONE series decay-corrected slice by slice to the scan start) and its unit from the tags; where a
    tag is missing, the estimate from the voxels (detect_pet_unit) with a warning naming the tag."""
    suv = suv_from_tags(series)
    warnings.extend(suv.warnings)
    if suv.slice_decay_factors is not None:
        pet = apply_slice_factors(pet, suv.slice_decay_factors)
    estimate = detect_pet_unit(pet)
    if suv.suv_per_stored_value is None:
        warnings.append(f"PET {series.folder}: DICOM tag {suv.missing[0]} missing or unusable, so SUV cannot be "
                        f"computed from the tags: {estimate.note}")
        return pet, replace(estimate, dicom_tags=suv.tags)
    return pet, PetUnit(suv.unit, suv.suv_per_stored_value, estimate.p999, suv.note, source="dicom",
                        dicom_tags=suv.tags)
