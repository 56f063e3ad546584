"""Reading, validating and writing images: the edges of the pipeline.

Inputs are discovered by globbing (grand-challenge layout: `images/ct/*`, `images/pet/*`), read through
SimpleITK, checked (3-D, scalar, finite, PET overlapping CT), and the PET unit (SUV or Bq/mL) is detected.
The output is validated against the CT grid and written atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hnseg_infer.errors import InputError, MissingPetError, OutputError
from hnseg_infer.geometry.grid import Grid
from hnseg_infer.io.atomic import write_atomic
from hnseg_infer.io.header import check_header, read_header, read_voxels
from hnseg_infer.io.plausibility import check_ct, check_pet, pet_within
from hnseg_infer.labels import LABEL_VALUES

IMAGE_SUFFIXES = (".mha", ".mhd", ".nii", ".nii.gz", ".nrrd", ".tif", ".tiff")
# A few non-finite voxels (scanner padding, a bad slice) are repaired; beyond this fraction the image is refused.
MAX_NONFINITE_FRACTION = 0.01
FILL_VALUE = {"ct": -1024.0, "pet": 0.0}
# FDG PET stored in Bq/mL has tissue values in the thousands; SUV images rarely exceed ~100 even in the bladder.
BQML_P999_THRESHOLD = 300.0
MIN_OVERLAP_FRACTION_WARN = 0.5
PET_FIELD_RATIO = 8


def is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and not name.startswith(".") and name.endswith(IMAGE_SUFFIXES)


def is_dicom_folder(folder: Path) -> bool:
    """A folder of DICOM files (*.dcm) and no image file: a series, read by io/dicom.py."""
    files = list(folder.iterdir()) if folder.is_dir() else []
    return any(p.name.lower().endswith(".dcm") for p in files) and not any(is_image_file(p) for p in files)


def find_single_image(folder: Path, role: str) -> Path:
    """The one image file in `folder`; an InputError naming the folder when there are none or several (a
    MissingPetError when the PET folder is absent or holds no image: a CT-only recipe may go on without it)."""
    def missing(message: str) -> InputError:
        return MissingPetError(message, folder=folder) if role == "pet" else InputError(message)

    if folder.exists() and not folder.is_dir():
        raise InputError(f"{role.upper()} folder {folder} is a file, not a folder: put the image inside a folder "
                         f"{folder.name}/")
    if not folder.is_dir():
        raise missing(f"{role.upper()} folder {folder} does not exist: put exactly one {role.upper()} image "
                      f"({', '.join(IMAGE_SUFFIXES)}) there")
    try:
        files = sorted(p for p in folder.iterdir() if is_image_file(p))
    except PermissionError as exc:
        raise InputError(f"{role.upper()} folder {folder} cannot be listed by this user ({exc.strerror}): make it "
                         f"readable (chmod a+rx)") from exc
    if not files:
        raise missing(f"no {role.upper()} image in {folder}: expected exactly one file ending in "
                      f"{', '.join(IMAGE_SUFFIXES)}")
    if len(files) > 1:
        raise InputError(f"{len(files)} {role.upper()} images in {folder} ({', '.join(p.name for p in files)}): "
                         f"expected exactly one; remove the extra files")
    return files[0]


def discover_inputs(input_dir: Path) -> tuple[Path, Path]:
    """(ct_path, pet_path) from a grand-challenge input folder: INPUT/images/ct/* and INPUT/images/pet/*."""
    input_dir = Path(input_dir)
    if input_dir.exists() and not input_dir.is_dir():
        raise InputError(f"input folder {input_dir} is a file, not a folder: pass --input DIR holding images/ct "
                         f"and images/pet")
    if not input_dir.is_dir():
        raise InputError(f"input folder {input_dir} does not exist: pass --input DIR holding images/ct and images/pet")
    if not any(input_dir.iterdir()):
        raise InputError(f"input folder {input_dir} is empty: expected images/ct/<file>.mha and images/pet/<file>.mha")
    images = input_dir / "images"
    return find_single_image(images / "ct", "ct"), find_single_image(images / "pet", "pet")


def read_image(path: Path, role: str) -> sitk.Image:
    """Read a 3-D scalar image, its header validated before the voxels are read (io/header.py); InputError with
    the file name for anything else. Integer images keep their type (an int16 whole-body CT is half the memory of
    float32); floats become float32."""
    path = Path(path)
    reader = read_header(path, role)
    return check_image(read_voxels(reader, path, role), role, path)


def check_image(image: sitk.Image, role: str, path: Path) -> sitk.Image:
    """A 3-D scalar volume of sane geometry (`check_header`; `path` names it in messages); float64 becomes
    float32. Every reader (files, in-memory images, DICOM series) ends here."""
    check_header(image, role, path)
    if image.GetPixelID() == sitk.sitkFloat64:
        image = sitk.Cast(image, sitk.sitkFloat32)
    return image


def _image(source: "Path | str | sitk.Image", role: str, series_uid: str | None = None):
    """(image, the name messages and the report give it, its DicomSeries or None): a file read from its path, a
    DICOM series folder (io/dicom.py; pydicom is imported only then), or an image given in memory."""
    if isinstance(source, sitk.Image):
        name = Path(f"<{role.upper()} image given in memory>")
        return check_image(source, role, name), name, None
    if Path(source).is_dir():
        from hnseg_infer.io.dicom import read_series

        image, series = read_series(Path(source), role, series_uid)
        return check_image(image, role, Path(source)), Path(source), series
    return read_image(Path(source), role), Path(source), None


def repair_nonfinite(image: sitk.Image, *, role: str, path: Path, warnings: list[str]) -> sitk.Image:
    """Replace a few NaN/inf voxels by the role's fill value (reported); refuse an image that is mostly broken."""
    if image.GetPixelID() != sitk.sitkFloat32:
        return image  # integer voxels are always finite
    array = sitk.GetArrayViewFromImage(image)
    bad = ~np.isfinite(array)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return image
    fraction = n_bad / bad.size
    if fraction > MAX_NONFINITE_FRACTION:
        raise InputError(f"{role.upper()} image {path} has {n_bad} of {bad.size} voxels ({fraction:.1%}) that are "
                         f"NaN or infinite (limit {MAX_NONFINITE_FRACTION:.0%}): check the conversion of this image")
    fixed = np.where(bad, FILL_VALUE[role], array).astype(np.float32)
    repaired = sitk.GetImageFromArray(fixed)
    repaired.CopyInformation(image)  # same grid, repaired voxels
    warnings.append(f"{role.upper()} {path.name}: replaced {n_bad} non-finite voxels by {FILL_VALUE[role]}")
    return repaired


@dataclass(frozen=True)
class PetUnit:
    """The detected PET unit and the factor that turns the stored values into (estimated) SUV."""

    unit: str  # "suv" or "bqml"
    suv_per_stored_value: float
    p999: float
    note: str
    source: str = "estimate"  # "estimate" (from the voxels) or "dicom" (from the series' tags, io/dicom.py)
    dicom_tags: dict | None = None  # the DICOM tags read for the factor, when the PET is a DICOM series

    def to_dict(self) -> dict:
        out = {"unit": self.unit, "suv_per_stored_value": self.suv_per_stored_value,
               "p99_9": round(self.p999, 4), "note": self.note, "source": self.source}
        return out if self.dicom_tags is None else {**out, "dicom_tags": self.dicom_tags}


def detect_pet_unit(pet: sitk.Image, ct_grid: Grid | None = None) -> PetUnit:
    """SUV or Bq/mL, from the 99.9th percentile of uptake.

    With `ct_grid`, a PET field much larger than the CT's (less than 1/PET_FIELD_RATIO of its voxels inside the
    CT's field) is measured inside the CT's field only: its mostly empty background would pull the percentile
    to zero. Other pairs are measured over the whole PET, as before (the committed masks depend on it).
    For Bq/mL the injected dose and weight are not in the image, so SUV is estimated by taking the median
    uptake inside the body (voxels above 5 % of the 99.9th percentile) as SUV 1; the report says so."""
    values = sitk.GetArrayViewFromImage(pet)
    if ct_grid is not None:
        within = pet_within(pet, ct_grid)
        values = within if within.size * PET_FIELD_RATIO < values.size else values
    p999 = float(np.percentile(values, 99.9))
    if p999 <= BQML_P999_THRESHOLD:
        return PetUnit("suv", 1.0, p999, "values look like SUV (99.9th percentile <= "
                                         f"{BQML_P999_THRESHOLD:g}); used as they are")
    body = values[values > 0.05 * p999]
    median = float(np.median(body))
    return PetUnit("bqml", 1.0 / median, p999,
                   f"values look like Bq/mL (99.9th percentile {p999:.0f} > {BQML_P999_THRESHOLD:g}); SUV estimated "
                   f"as value / {median:.1f} (median body uptake taken as SUV 1)")


@dataclass
class Case:
    """One validated PET/CT study, on its native grids. In CT-only mode `pet`, `pet_path` and `pet_unit` are None."""

    ct: sitk.Image
    pet: sitk.Image | None
    ct_path: Path
    pet_path: Path | None
    pet_unit: PetUnit | None
    warnings: list[str] = field(default_factory=list)
    ct_dicom: object | None = None  # the CT's DicomSeries (io/dicom.py) when it was read from one: SEG/RTSTRUCT
    pet_dicom: object | None = None

    @property
    def ct_only(self) -> bool:
        return self.pet is None

    @property
    def suv_per_stored_value(self) -> float:
        """The PET's SUV factor (1 in CT-only mode, where no PET voxel is read)."""
        return self.pet_unit.suv_per_stored_value if self.pet_unit is not None else 1.0

    @property
    def ct_grid(self) -> Grid:
        return Grid.of(self.ct)

    @property
    def pet_grid(self) -> Grid | None:
        return Grid.of(self.pet) if self.pet is not None else None


def check_overlap(ct_grid: Grid, pet_grid: Grid, *, ct_path: Path, pet_path: Path, warnings: list[str]) -> None:
    """PET and CT must share physical space; partial overlap is common (different z-ranges) and only warned."""
    ct_box, pet_box = ct_grid.box(), pet_grid.box()
    common = ct_box.intersect(pet_box)
    if common is None:
        raise InputError(
            f"PET {pet_path.name} (centre {pet_box.center_xyz_mm.round(1).tolist()} mm) and CT {ct_path.name} "
            f"(centre {ct_box.center_xyz_mm.round(1).tolist()} mm) do not overlap in physical space: check that "
            f"both come from the same study and that their origins/directions were exported correctly")
    fraction = float(np.prod(common.size_xyz_mm) / np.prod(ct_box.size_xyz_mm))
    if fraction < MIN_OVERLAP_FRACTION_WARN:
        warnings.append(f"PET covers only {fraction:.0%} of the CT volume; outside it the PET channel is 0")


def load_case(ct: "Path | str | sitk.Image", pet: "Path | str | sitk.Image | None", *, ct_series: str | None = None,
              pet_series: str | None = None) -> Case:
    """Read (or take) and validate a PET/CT pair, each a path, a DICOM series folder (`*_series`: which series of
    a folder holding several) or a SimpleITK image; without `pet` the CT alone (CT-only mode)."""
    warnings: list[str] = []
    ct, ct_path, ct_dicom = _image(ct, "ct", ct_series)
    ct = repair_nonfinite(ct, role="ct", path=ct_path, warnings=warnings)
    ct = check_ct(ct, ct_path, warnings)
    if pet is None:
        return Case(ct, None, ct_path, None, None, warnings, ct_dicom=ct_dicom)
    pet, pet_path, pet_dicom = _image(pet, "pet", pet_series)
    pet = repair_nonfinite(pet, role="pet", path=pet_path, warnings=warnings)
    check_overlap(Grid.of(ct), Grid.of(pet), ct_path=ct_path, pet_path=pet_path, warnings=warnings)
    check_pet(pet, ct, pet_path)
    if pet_dicom is not None:
        from hnseg_infer.io.dicom import dicom_pet_unit

        pet, pet_unit = dicom_pet_unit(pet, pet_dicom, warnings)
    else:
        pet_unit = detect_pet_unit(pet, Grid.of(ct))
    return Case(ct, pet, ct_path, pet_path, pet_unit, warnings, ct_dicom=ct_dicom, pet_dicom=pet_dicom)


def validate_mask(mask: sitk.Image, ct_grid: Grid) -> None:
    """The output contract: uint8, values within {0, 1, 2}, exactly the CT's grid."""
    if mask.GetPixelID() != sitk.sitkUInt8:
        raise OutputError(f"internal error: output mask is {mask.GetPixelIDTypeAsString()}, expected uint8")
    voxels = sitk.GetArrayViewFromImage(mask)
    if voxels.max(initial=0) > max(LABEL_VALUES):  # uint8: the max says it (np.unique takes ~1 s on a CT grid)
        raise OutputError(f"internal error: output mask holds values {np.unique(voxels).tolist()}, expected a "
                          f"subset of {{0,1,2}}")
    if Grid.of(mask).mismatch(ct_grid, tol=0.0) is not None:
        raise OutputError(f"internal error: output grid {Grid.of(mask).to_dict()} differs from the CT grid "
                          f"{ct_grid.to_dict()}")


def write_image_atomic(image: sitk.Image, path: Path) -> None:
    """Write compressed, atomically (io/atomic.py): no partial file or new folder survives an error."""
    write_atomic(path, lambda tmp: sitk.WriteImage(image, tmp, useCompression=True),
                 hint="check that the output folder is writable")
