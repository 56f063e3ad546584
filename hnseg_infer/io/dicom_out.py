"""DICOM out: the mask as a DICOM-SEG (highdicom) and as an RTSTRUCT (pydicom), both referencing the source CT
series, and an RTSTRUCT's ROIs rasterised back onto a grid (`hnseg evaluate --gt RTSTRUCT`).

The RTSTRUCT is written by hand: highdicom has no RT structure set, and rt-utils (the usual choice) is thinly
kept, needs OpenCV and re-reads the series from disk. Contours are skimage's marching squares at level 0.5 on
each CT slice, so a contour runs halfway between labelled and unlabelled voxel centres and a voxel centre lies
inside it exactly when the voxel is labelled; holes are inner contours, filled by the even-odd rule on reading.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hnseg_infer.errors import InputError, OutputError
from hnseg_infer.geometry.grid import Grid
from hnseg_infer.io.atomic import write_atomic
from hnseg_infer.io.dicom import DicomSeries, require_pydicom
from hnseg_infer.labels import GTVN, GTVP

# ROI names per AAPM TG-263; colours as RGB.
ROIS = ((GTVP, "GTVp", (255, 0, 0)), (GTVN, "GTVn", (0, 160, 255)))
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.2"  # RTReferencedStudySequence's ReferencedSOPClassUID
SLICE_TOLERANCE_VOXELS = 0.1  # a contour off a CT slice by more than this is refused on rasterising
PATIENT_STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                          "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")


def require_dicom_ct(ct_dicom: DicomSeries | None, option: str) -> DicomSeries:
    if ct_dicom is None:
        raise InputError(f"{option} needs the CT as a DICOM series (a folder of CT slices) to reference: give "
                         f"--ct DIR, or leave out {option}")
    return ct_dicom


def _version() -> str:
    from hnseg_infer._version import __version__

    return __version__


def _labels_zyx(mask: sitk.Image, ct: DicomSeries) -> np.ndarray:
    """The mask's labels, slice k on the CT's k-th slice (the mask is on the CT grid, built from the series)."""
    labels = sitk.GetArrayFromImage(mask)
    rows, cols = int(ct.first.Rows), int(ct.first.Columns)
    if labels.shape != (len(ct.datasets), rows, cols):
        raise OutputError(f"internal error: mask shape {labels.shape} is not the CT series' "
                          f"({len(ct.datasets)}, {rows}, {cols})")
    return labels


# ------------------------------------------------------------------------------------------------------- DICOM-SEG

def segment_descriptions():
    """GTVp and GTVn with SNOMED-CT coded terms; the algorithm is named as hnseg."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    algorithm = hd.AlgorithmIdentificationSequence(name="hnseg", version=_version(),
                                                   family=codes.cid7162.ArtificialIntelligence)
    category = codes.SCT.MorphologicallyAbnormalStructure
    types = {GTVP: Code("86049000", "SCT", "Malignant neoplasm, primary"),
             GTVN: Code("14799000", "SCT", "Neoplasm, metastatic")}
    return [hd.seg.SegmentDescription(segment_number=label, segment_label=name, segmented_property_category=category,
                                      segmented_property_type=types[label],
                                      algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                      algorithm_identification=algorithm,
                                      anatomic_regions=[codes.SCT.LymphNode] if label == GTVN else None)
            for label, name, _ in ROIS]


def write_dicom_seg(mask: sitk.Image, ct: DicomSeries, path: Path) -> None:
    """A binary DICOM-SEG of GTVp (segment 1) and GTVn (segment 2) on the CT series' slices, written atomically."""
    require_pydicom()
    import highdicom as hd

    labels = _labels_zyx(mask, ct)
    seg = hd.seg.Segmentation(
        source_images=list(ct.datasets), pixel_array=labels.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segment_descriptions(),
        series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="hnseg", manufacturer_model_name="hnseg", software_versions=_version(),
        device_serial_number="0", series_description="hnseg GTVp/GTVn", omit_empty_frames=True)
    write_atomic(Path(path), lambda tmp: seg.save_as(tmp), hint="check that the output folder is writable")


# -------------------------------------------------------------------------------------------------------- RTSTRUCT

def slice_contours_xy(labelled_yx: np.ndarray) -> list[np.ndarray]:
    """Closed contours (each [N, 2] in (x, y) voxel indices, last point not repeated) around the labelled
    voxels of one slice: outer boundaries and holes alike."""
    from skimage.measure import find_contours

    padded = np.pad(labelled_yx.astype(np.float32), 1)
    contours = find_contours(padded, 0.5)
    return [c[:-1, ::-1] - 1.0 for c in contours if len(c) > 3]


def _ds(**items):
    from pydicom.dataset import Dataset

    ds = Dataset()
    for keyword, value in items.items():
        setattr(ds, keyword, value)
    return ds


def _contour_sequence(labels_zyx: np.ndarray, label: int, ct: DicomSeries) -> list:
    spacing_x, spacing_y = float(ct.first.PixelSpacing[1]), float(ct.first.PixelSpacing[0])
    iop = np.asarray([float(v) for v in ct.first.ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]
    out = []
    for k, ds in enumerate(ct.datasets):
        if not (labels_zyx[k] == label).any():
            continue
        position = np.asarray([float(v) for v in ds.ImagePositionPatient])
        for xy in slice_contours_xy(labels_zyx[k] == label):
            points = position + np.outer(xy[:, 0] * spacing_x, row_dir) + np.outer(xy[:, 1] * spacing_y, col_dir)
            out.append(_ds(ContourImageSequence=[_ds(ReferencedSOPClassUID=ds.SOPClassUID,
                                                     ReferencedSOPInstanceUID=ds.SOPInstanceUID)],
                           ContourGeometricType="CLOSED_PLANAR", NumberOfContourPoints=len(points),
                           ContourData=[f"{v:.4f}" for v in points.ravel()]))
    return out


def build_rtstruct(mask: sitk.Image, ct: DicomSeries):
    """The RT structure set (a pydicom Dataset) with ROIs GTVp and GTVn in the CT's frame of reference."""
    require_pydicom()
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    labels = _labels_zyx(mask, ct)
    first, now = ct.first, dt.datetime.now()
    frame_uid = str(first.FrameOfReferenceUID)
    ds = _ds(SOPClassUID=RT_STRUCTURE_SET_STORAGE, SOPInstanceUID=generate_uid(), Modality="RTSTRUCT",
             SeriesInstanceUID=generate_uid(), SeriesNumber=901, InstanceNumber=1, Manufacturer="hnseg",
             SoftwareVersions=_version(), SeriesDescription="hnseg GTVp/GTVn", StructureSetLabel="hnseg",
             StructureSetName="hnseg GTVp/GTVn", StructureSetDate=now.strftime("%Y%m%d"),
             StructureSetTime=now.strftime("%H%M%S"), FrameOfReferenceUID=frame_uid)
    for keyword in PATIENT_STUDY_KEYWORDS:
        setattr(ds, keyword, first.get(keyword, ""))
    images = [_ds(ReferencedSOPClassUID=d.SOPClassUID, ReferencedSOPInstanceUID=d.SOPInstanceUID)
              for d in ct.datasets]
    series = _ds(SeriesInstanceUID=first.SeriesInstanceUID, ContourImageSequence=images)
    study = _ds(ReferencedSOPClassUID=STUDY_COMPONENT_MANAGEMENT, ReferencedSOPInstanceUID=first.StudyInstanceUID,
                RTReferencedSeriesSequence=[series])
    ds.ReferencedFrameOfReferenceSequence = [_ds(FrameOfReferenceUID=frame_uid, RTReferencedStudySequence=[study])]
    ds.StructureSetROISequence = [_ds(ROINumber=label, ReferencedFrameOfReferenceUID=frame_uid, ROIName=name,
                                      ROIGenerationAlgorithm="AUTOMATIC") for label, name, _ in ROIS]
    ds.ROIContourSequence = [_ds(ReferencedROINumber=label, ROIDisplayColor=list(colour),
                                 ContourSequence=_contour_sequence(labels, label, ct)) for label, _, colour in ROIS]
    ds.RTROIObservationsSequence = [_ds(ObservationNumber=label, ReferencedROINumber=label,
                                        RTROIInterpretedType="GTV", ROIInterpreter="") for label, _, _ in ROIS]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def write_rtstruct(mask: sitk.Image, ct: DicomSeries, path: Path) -> None:
    ds = build_rtstruct(mask, ct)
    write_atomic(Path(path), lambda tmp: ds.save_as(tmp, enforce_file_format=True),
                 hint="check that the output folder is writable")


# ------------------------------------------------------------------------------------- RTSTRUCT → labels on a grid

def read_rtstruct(path: Path):
    require_pydicom()
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same input error
        raise InputError(f"RTSTRUCT {path} cannot be read as DICOM ({exc}): give an RT structure set file") from exc
    if ds.get("Modality") != "RTSTRUCT" or "StructureSetROISequence" not in ds:
        raise InputError(f"{path} is not an RTSTRUCT (Modality {ds.get('Modality')!r}): give an RT structure set")
    return ds


def roi_names(ds) -> dict[int, str]:
    return {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}


def parse_roi_mapping(text: str) -> dict[int, list[str]]:
    """'GTVp=GTV_P,GTVn=GTV_N*' → {1: ['GTV_P'], 2: ['GTV_N*']} (shell patterns, case-insensitive)."""
    names = {name.lower(): label for label, name, _ in ROIS}
    mapping: dict[int, list[str]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, pattern = item.partition("=")
        if not sep or key.strip().lower() not in names or not pattern.strip():
            raise InputError(f"--gt-roi item {item!r} is not LABEL=PATTERN with LABEL GTVp or GTVn: e.g. "
                             f"--gt-roi 'GTVp=GTV_P,GTVn=GTV_N*'")
        mapping.setdefault(names[key.strip().lower()], []).append(pattern.strip())
    return mapping


def rasterise_rtstruct(ds, grid: Grid, mapping: dict[int, list[str]], *, path: Path) -> np.ndarray:
    """uint8 labels [z, y, x] on `grid`: each ROI whose name matches a label's patterns, filled slice by slice
    (even-odd: holes stay empty); a later label overwrites an earlier one where they overlap."""
    from skimage.draw import polygon

    names = roi_names(ds)
    contours = {int(c.ReferencedROINumber): c for c in ds.get("ROIContourSequence", [])}
    labels = np.zeros(grid.size_xyz[::-1], np.uint8)
    to_index = np.linalg.inv(np.asarray(grid.direction).reshape(3, 3) * np.asarray(grid.spacing_xyz_mm)[None, :])
    for label in sorted(mapping):
        numbers = [n for n, name in names.items()
                   if any(fnmatch.fnmatch(name.lower(), p.lower()) for p in mapping[label])]
        if not numbers:
            raise InputError(f"RTSTRUCT {path} has no ROI matching {mapping[label]} for label {label}; its ROIs: "
                             f"{', '.join(sorted(names.values()))}: fix --gt-roi")
        region = np.zeros_like(labels, dtype=bool)
        for number in numbers:
            roi = np.zeros_like(region)
            for contour in contours.get(number, _ds()).get("ContourSequence", []):
                points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
                index = (points - np.asarray(grid.origin_xyz_mm)) @ to_index.T
                k = float(np.median(index[:, 2]))
                if np.abs(index[:, 2] - round(k)).max() > SLICE_TOLERANCE_VOXELS or not 0 <= round(k) < labels.shape[0]:
                    raise InputError(f"RTSTRUCT {path}: a contour of ROI {names[number]!r} lies off the grid's "
                                     f"slices (slice index {k:.2f}): rasterise it on the CT it was drawn on")
                rr, cc = polygon(index[:, 1], index[:, 0], shape=labels.shape[1:])
                roi[round(k), rr, cc] ^= True  # even-odd: a contour inside another is a hole
            region |= roi
        labels[region] = label
    return labels
