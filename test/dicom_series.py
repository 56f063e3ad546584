"""DICOM series written from SimpleITK images, with real tag layouts: a CT with rescale and per-slice positions, a
PET with its radiopharmaceutical sequence, units and decay correction (the SUV the image holds is known)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PositronEmissionTomographyImageStorage, generate_uid

F18_HALF_LIFE_S = 6586.2
INJECTION = dt.datetime(2026, 3, 14, 9, 30, 0)
SCAN_DELAY_S = 3600.0  # injection → series start
WEIGHT_KG, DOSE_BQ = 72.5, 350e6
SLICE_STEP_S = 20.0  # DecayCorrection NONE: slice k is acquired k × this after the series start
PHILIPS_SUV_PER_COUNT = 2.5e-4


def _study(**uids) -> dict:
    return {"study_uid": uids.get("study_uid") or generate_uid(), "frame_uid": uids.get("frame_uid") or generate_uid()}


def _base(sop_class, modality: str, study: dict, series_uid: str, k: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.Modality = sop_class, modality
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^HN", "HN001", "19600101", "M"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study["study_uid"], series_uid
    ds.FrameOfReferenceUID = study["frame_uid"]
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260314", "093000", "1", "A1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber, ds.InstanceNumber = (2 if modality == "PT" else 1), k + 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def _place(ds: Dataset, image: sitk.Image, k: int) -> None:
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*d[:, 0], *d[:, 1])]
    position = np.asarray(image.GetOrigin()) + d[:, 2] * spacing[2] * k
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # between rows (y), between columns (x)
    ds.SliceThickness = f"{spacing[2]:.6f}"
    ds.Rows, ds.Columns = image.GetSize()[1], image.GetSize()[0]


def _write(ds: Dataset, stored_yx: np.ndarray, folder: Path, name: str) -> Path:
    ds.PixelData = stored_yx.astype(np.uint16).tobytes()
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _names(n: int, shuffle: bool, seed: int = 0) -> list[str]:
    """File names; shuffled, so that neither the names nor the directory order give the slice order."""
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    return [f"IM{int(i):04d}.dcm" for i in order]


def write_ct_series(image: sitk.Image, folder: Path, *, study: dict | None = None, series_uid: str | None = None,
                    shuffle: bool = True, patient_position: str = "HFS") -> dict:
    """The CT image (HU) as one file per slice: stored = HU + 1024 (uint16), RescaleIntercept -1024. The study
    (study and frame-of-reference UIDs, to share with a PET)."""
    folder.mkdir(parents=True, exist_ok=True)
    study = study or _study()
    series_uid = series_uid or generate_uid()
    hu_zyx = np.round(sitk.GetArrayFromImage(image)).astype(np.int32)
    for k, name in enumerate(_names(hu_zyx.shape[0], shuffle)):
        ds = _base(CTImageStorage, "CT", study, series_uid, k)
        _place(ds, image, k)
        ds.PatientPosition = patient_position
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.SeriesDate, ds.SeriesTime = "20260314", "103000"
        _write(ds, np.clip(hu_zyx[k] + 1024, 0, 65535), folder, name)
    return study


def stored_per_suv(units: str, decay: str, k: int) -> float:
    """What one SUV is in the stored (rescaled) unit of slice k."""
    if units == "GML":
        return 1.0
    if units == "CNTS":
        return 1.0 / PHILIPS_SUV_PER_COUNT
    decay_s = {"START": SCAN_DELAY_S, "ADMIN": 0.0, "NONE": SCAN_DELAY_S + SLICE_STEP_S * k}[decay]
    return DOSE_BQ * 2.0 ** (-decay_s / F18_HALF_LIFE_S) / (WEIGHT_KG * 1000.0)  # Bq/mL per SUV


def write_pet_series(suv: sitk.Image, folder: Path, *, units: str = "BQML", decay: str = "START",
                     study: dict | None = None, series_uid: str | None = None, shuffle: bool = True,
                     drop: tuple[str, ...] = (), philips_tag: str = "1000", start_datetime: bool = False) -> dict:
    """The SUV image as a PET series in `units` (BQML, CNTS with a Philips scale factor, GML) with `decay`
    correction; each slice has its own RescaleSlope (as GE writes them). `drop`: tags left out."""
    folder.mkdir(parents=True, exist_ok=True)
    study = study or _study()
    series_uid = series_uid or generate_uid()
    suv_zyx = sitk.GetArrayFromImage(suv).astype(np.float64)
    scan = INJECTION + dt.timedelta(seconds=SCAN_DELAY_S)
    for k, name in enumerate(_names(suv_zyx.shape[0], shuffle, seed=1)):
        ds = _base(PositronEmissionTomographyImageStorage, "PT", study, series_uid, k)
        _place(ds, suv, k)
        ds.Units, ds.DecayCorrection, ds.CorrectedImage = units, decay, ["ATTN", "DECY"]
        ds.PatientWeight = f"{WEIGHT_KG}"
        ds.SeriesDate, ds.SeriesTime = scan.strftime("%Y%m%d"), scan.strftime("%H%M%S")
        acquired = scan + dt.timedelta(seconds=SLICE_STEP_S * k if decay == "NONE" else 0.0)
        ds.AcquisitionDate, ds.AcquisitionTime = acquired.strftime("%Y%m%d"), acquired.strftime("%H%M%S.%f")
        drug = Dataset()
        drug.Radiopharmaceutical = "Fluorodeoxyglucose"
        drug.RadionuclideTotalDose, drug.RadionuclideHalfLife = f"{DOSE_BQ:.0f}", f"{F18_HALF_LIFE_S}"
        drug.RadiopharmaceuticalStartTime = INJECTION.strftime("%H%M%S")
        if start_datetime:
            drug.RadiopharmaceuticalStartDateTime = INJECTION.strftime("%Y%m%d%H%M%S")
        ds.RadiopharmaceuticalInformationSequence = [drug]
        values = suv_zyx[k] * stored_per_suv(units, decay, k)
        slope = max(float(values.max()), 1e-6) / 65000.0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10e}", "0"
        if units == "CNTS":
            block = ds.private_block(0x7053, "Philips PET Private Group", create=True)
            if philips_tag == "1000":
                block.add_new(0x00, "DS", f"{PHILIPS_SUV_PER_COUNT}")
            else:  # (7053,1009): Bq/mL per count, then as BQML
                bqml_per_suv = stored_per_suv("BQML", decay, k)
                block.add_new(0x09, "DS", f"{PHILIPS_SUV_PER_COUNT * bqml_per_suv:.10e}")
        for keyword in drop:
            if keyword in ds:
                delattr(ds, keyword)
            elif keyword in drug:
                delattr(drug, keyword)
        _write(ds, np.round(values / slope), folder, name)
    return study


def read_back(folder: Path) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
