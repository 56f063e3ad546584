"""Reading an image file's header once and validating it before any voxel is allocated.

SimpleITK hides what a header says in a few cases that matter: a negative MetaImage spacing becomes a flipped
direction, and a truncated file or a missing .raw reads as "No such file or directory" (with the real reason
printed by MetaIO on the C++ stderr). So the MetaImage header text is read here too, ITK's native stderr is
captured into the message, and the reader is chosen by the lower-cased extension (`CASE.MHA`).
`check_header` takes anything with SimpleITK's geometry getters (an image or a reader that has read the image
information), so every reader (files, DICOM series) validates the same way.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hnseg_infer.errors import InputError

# A CT or PET voxel of a human is within this (mm); beyond it the header is wrong (1e-6 mm, 1e4 mm).
SPACING_RANGE_MM = (0.05, 50.0)
ORTHONORMAL_TOLERANCE = 1e-3  # headers store direction cosines with ~6 digits
# Beyond this a case cannot run within grand-challenge's 16 GiB: refused from the header, before reading.
MAX_IMAGE_BYTES = 4 * 1024 ** 3
IMAGE_IO_BY_SUFFIX = {".mha": "MetaImageIO", ".mhd": "MetaImageIO", ".nii": "NiftiImageIO",
                      ".nii.gz": "NiftiImageIO", ".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO",
                      ".tif": "TIFFImageIO", ".tiff": "TIFFImageIO"}
METAIMAGE_BYTES = {"MET_UCHAR": 1, "MET_CHAR": 1, "MET_USHORT": 2, "MET_SHORT": 2, "MET_UINT": 4, "MET_INT": 4,
                   "MET_ULONG": 8, "MET_LONG": 8, "MET_ULONG_LONG": 8, "MET_LONG_LONG": 8, "MET_FLOAT": 4,
                   "MET_DOUBLE": 8}


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


@contextmanager
def captured_native_stderr():
    """Collect what C++ libraries print on file descriptor 2 (MetaIO, ITK warnings) into `lines` instead of the
    terminal: the one-line rule, and the real reason of a failed read for the message."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        sys.stderr.flush()  # what Python buffered before goes where it was meant to
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(line.strip() for line in sink.read().decode(errors="replace").splitlines() if line.strip())


def one_line(text: str, limit: int = 400) -> str:
    """A library's multi-line message as one line, without its source-file prefixes."""
    parts = [re.sub(r"^(Exception thrown in SimpleITK \S+: )?\S+\.(cxx|h|cpp):\d+:$", "", p.strip())
             for p in text.splitlines()
             if not p.strip().startswith("Reason:")]  # errno left over from an unrelated call: misleading
    joined = " ".join(p for p in parts if p)
    joined = re.sub(r"(ITK ERROR|sitk::ERROR): (\w+\(0x[0-9a-f]+\): )?", "", joined)
    return joined if len(joined) <= limit else joined[:limit] + "..."


def check_file(path: Path, role: str) -> None:
    """The path names a readable, non-empty file; otherwise the error says which of those it is not."""
    label = f"{role.upper()} image {path}"
    if not path.exists():
        raise InputError(f"{label} does not exist")
    if path.is_dir():
        raise InputError(f"{label} is a folder, not a file: give the image file itself")
    if not os.access(path, os.R_OK):
        raise InputError(f"{label} is not readable by this user (permission denied): make it readable (chmod a+r)")
    if path.stat().st_size == 0:
        raise InputError(f"{label} is an empty file (0 bytes): re-export the image")


def metaimage_header(path: Path) -> dict[str, str]:
    """The `Key = value` lines of a MetaImage header, up to ElementDataFile (the voxels follow it in a .mha)."""
    fields: dict[str, str] = {}
    with open(path, "rb") as f:
        for raw in iter(lambda: f.readline(4096), b""):
            key, sep, value = raw.decode("latin-1").partition("=")
            if not sep:
                break
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
    return fields


def check_metaimage(path: Path, role: str) -> None:
    """What ITK would hide: a negative ElementSpacing, a missing data file, fewer voxel bytes than DimSize."""
    label = f"{role.upper()} image {path}"
    fields = metaimage_header(path)
    for key in ("ElementSpacing", "ElementSize"):
        values = _numbers(fields.get(key, ""))
        if any(v <= 0 for v in values):
            raise InputError(f"{label} has {key} = {fields[key]} in its header: a spacing must be positive (mm); "
                             f"a flipped axis belongs in TransformMatrix, not in the spacing sign")
    data_file = fields.get("ElementDataFile", "")
    if data_file and data_file != "LOCAL" and not data_file.startswith("LIST"):
        data_path = path.parent / data_file
        if not data_path.is_file():
            raise InputError(f"{label} names its voxel file {data_file} (ElementDataFile), which is missing: put "
                             f"{data_path} beside the header, or convert the pair to one .mha file")
    size, element = _numbers(fields.get("DimSize", "")), METAIMAGE_BYTES.get(fields.get("ElementType", ""))
    compressed = fields.get("CompressedData", "False").lower() == "true"
    if not size or element is None or compressed or data_file.startswith("LIST") or not data_file:
        return
    channels = int((_numbers(fields.get("ElementNumberOfChannels", "1")) or [1])[0])
    expected = int(np.prod(size)) * element * channels
    if data_file == "LOCAL":
        with open(path, "rb") as f:
            stored = path.stat().st_size - _header_length(f)
    else:
        stored = (path.parent / data_file).stat().st_size
    if stored < expected:
        raise InputError(f"{label} is truncated: its header (DimSize = {fields['DimSize']}, "
                         f"{fields['ElementType']}) needs {expected} bytes of voxels but the file holds {stored}: "
                         f"copy or export it again")


def _header_length(f) -> int:
    while line := f.readline(4096):
        if line.decode("latin-1").split("=")[0].strip() == "ElementDataFile":
            return f.tell()
    return f.tell()


def _numbers(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split()]
    except ValueError:
        return []


def read_header(path: Path, role: str) -> sitk.ImageFileReader:
    """A reader for `path` that has read and validated its header (no voxels yet); InputError otherwise."""
    check_file(path, role)
    suffix = _suffix(path)
    if suffix in (".mha", ".mhd"):
        check_metaimage(path, role)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    if suffix in IMAGE_IO_BY_SUFFIX:
        reader.SetImageIO(IMAGE_IO_BY_SUFFIX[suffix])  # by the lower-cased name: ITK's own lookup is case-sensitive
    _run(reader.ReadImageInformation, path, role)
    check_header(reader, role, path)
    return reader


def read_voxels(reader: sitk.ImageFileReader, path: Path, role: str) -> sitk.Image:
    return _run(reader.Execute, path, role)


def _run(step, path: Path, role: str):
    try:
        with captured_native_stderr() as native:
            return step()
    except RuntimeError as exc:
        reason = one_line("\n".join(native + [str(exc)]))
        raise InputError(f"{role.upper()} image {path} cannot be read as a medical image ({reason}): provide a "
                         f"valid .mha, .nii(.gz) or .nrrd file") from exc


def check_header(image, role: str, path: Path) -> None:
    """A 3-D scalar volume of sane geometry, from a SimpleITK image or a reader after ReadImageInformation:
    at least 2 voxels per axis, spacing within SPACING_RANGE_MM, an orthonormal direction, a size that fits in
    memory, and (TIFF) a geometry at all."""
    label = f"{role.upper()} image {path}"
    dimension, size = image.GetDimension(), list(image.GetSize())
    components = (image.GetNumberOfComponentsPerPixel() if isinstance(image, sitk.Image)
                  else image.GetNumberOfComponents())
    if dimension != 3:
        raise InputError(f"{label} has {dimension} dimensions (size {size}): expected a 3-D volume")
    if components != 1:
        raise InputError(f"{label} has {components} components per voxel: expected a scalar (grey-value) volume")
    if min(size) < 2:
        raise InputError(f"{label} has size {size}: a 3-D volume needs at least 2 voxels along every axis")
    spacing = list(image.GetSpacing())
    low, high = SPACING_RANGE_MM
    if not all(low <= s <= high for s in spacing):
        raise InputError(f"{label} has spacing {[float(f'{s:.6g}') for s in spacing]} mm: a CT or PET voxel is "
                         f"{low:g} to {high:g} mm; fix the spacing in its header")
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    error = float(np.abs(direction.T @ direction - np.eye(3)).max())
    if error > ORTHONORMAL_TOLERANCE:
        raise InputError(f"{label} has a direction matrix {direction.round(4).ravel().tolist()} that is not "
                         f"orthonormal (off by {error:.3g}): its columns must be perpendicular unit vectors; fix "
                         f"its header (scale belongs in the spacing)")
    n_bytes = int(np.prod(size, dtype=np.int64)) * _bytes_per_voxel(image.GetPixelID())
    if n_bytes > MAX_IMAGE_BYTES:
        raise InputError(f"{label} has size {size} ({n_bytes / 1024 ** 3:.1f} GiB of voxels), beyond "
                         f"{MAX_IMAGE_BYTES / 1024 ** 3:.0f} GiB: check its DimSize, or crop it")
    if _suffix(path) in (".tif", ".tiff"):
        raise InputError(f"{label} is a TIFF, which holds no 3-D geometry (ITK reads origin "
                         f"{list(image.GetOrigin())}, slice spacing {spacing[2]:g} mm): the PET could not be placed "
                         f"on the CT; convert it with its scanner geometry to .mha, .nii.gz or .nrrd")


def _bytes_per_voxel(pixel_id: int) -> int:
    return {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkFloat64: 8,
            sitk.sitkUInt64: 8, sitk.sitkInt64: 8}.get(pixel_id, 4)
