"""Careless and hostile inputs (issue 18), one section per class: each refused with a clear one-line message naming
the file, the value and the fix (exit 2, nothing under /output), or handled with a warning; valid inputs pass."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import GC_OUTPUT, files_under, run_process, small_case, write_gc_input
from hnseg_infer.errors import InputError
from hnseg_infer.io.images import read_image


def _mha(tmp_path, name="ct.mha", *, spacing=(1.1, 1.3, 2.5)) -> tuple[Path, bytes]:
    ct, _ = small_case()
    ct.SetSpacing(spacing)
    path = tmp_path / name
    sitk.WriteImage(ct, str(path))  # uncompressed: the header is text, the voxels follow
    return path, path.read_bytes()


def _header_line(data: bytes, key: bytes, value: bytes) -> bytes:
    """The MetaImage `data` with the header line `key = ...` replaced (asserted to be there)."""
    start = data.index(key + b" = ")
    end = data.index(b"\n", start)
    return data[:start] + key + b" = " + value + data[end:]


def _refused(path, *fragments):
    with pytest.raises(InputError) as info:
        read_image(path, "ct")
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---- class 2: headers that lie, refused from the header before any voxel or model ----

def test_negative_spacing_is_refused_not_turned_into_a_flip(tmp_path):
    path, data = _mha(tmp_path)
    path.write_bytes(_header_line(data, b"ElementSpacing", b"1.1 -1.3 2.5"))
    assert sitk.ReadImage(str(path)).GetSpacing()[1] > 0  # what ITK alone makes of it: a silent flip
    _refused(path, "ElementSpacing = 1.1 -1.3 2.5", "must be positive")


@pytest.mark.parametrize("spacing", [(1e-6, 1.0, 1.0), (1.0, 1.0, 1e4)])
def test_absurd_spacing_is_refused_with_the_sane_range(tmp_path, spacing):
    path, _ = _mha(tmp_path, spacing=spacing)
    _refused(path, "spacing", "0.05 to 50 mm")


def test_a_direction_that_is_not_orthonormal_is_refused(tmp_path):
    path, data = _mha(tmp_path)
    path.write_bytes(_header_line(data, b"TransformMatrix", b"1 0.3 0 0 1 0 0 0 1"))
    _refused(path, "not orthonormal", "off by 0.3")


def test_an_oblique_orthonormal_direction_is_accepted(tmp_path):
    from builders import oblique_direction

    ct, _ = small_case(ct_direction=oblique_direction())
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    assert read_image(tmp_path / "ct.nii.gz", "ct").GetSize() == ct.GetSize()


@pytest.mark.parametrize("cut", ["dimsize", "truncated"])
def test_fewer_voxel_bytes_than_the_header_says_is_refused_as_truncated(tmp_path, cut):
    path, data = _mha(tmp_path)
    if cut == "dimsize":
        path.write_bytes(_header_line(data, b"DimSize", b"48 40 200"))
    else:
        path.write_bytes(data[:-1000])
    message = _refused(path, "is truncated", "DimSize = 48 40 2")
    assert "No such file" not in message


def test_a_truncated_compressed_file_says_why_in_one_line(tmp_path):
    ct, _ = small_case()
    path = tmp_path / "ct.mha"
    sitk.WriteImage(ct, str(path), useCompression=True)
    path.write_bytes(path.read_bytes()[:-200])
    message = _refused(path, "data not read completely", "cannot be read")
    assert "No such file" not in message and ".cxx" not in message


def test_a_missing_raw_file_is_named(tmp_path):
    ct, _ = small_case()
    sitk.WriteImage(ct, str(tmp_path / "ct.mhd"))
    (tmp_path / "ct.raw").unlink()
    message = _refused(tmp_path / "ct.mhd", "ct.raw", "missing")
    assert "No such file" not in message


def test_a_tiff_without_geometry_is_refused(tmp_path):
    ct, _ = small_case()
    sitk.WriteImage(sitk.Cast(ct, sitk.sitkInt16), str(tmp_path / "ct.tif"))
    _refused(tmp_path / "ct.tif", "TIFF", "no 3-D geometry", ".mha")


def test_upper_case_extensions_are_read(tmp_path):
    ct, _ = small_case()
    for name in ("CT.MHA", "CT.NII.GZ", "CT.NRRD"):
        sitk.WriteImage(ct, str(tmp_path / name.lower()))
        (tmp_path / name.lower()).rename(tmp_path / name)
        image = read_image(tmp_path / name, "ct")
        assert image.GetSize() == ct.GetSize() and np.allclose(image.GetOrigin(), ct.GetOrigin())


def test_does_not_exist_only_when_it_does_not(tmp_path):
    _refused(tmp_path / "absent.mha", "does not exist")
    (tmp_path / "folder.mha").mkdir()
    message = _refused(tmp_path / "folder.mha", "is a folder")
    assert "does not exist" not in message


def test_a_file_where_the_ct_folder_belongs_is_named_as_such(case_dir, weights_dir, tmp_path):
    for p in (case_dir / "images/ct").iterdir():
        p.unlink()
    (case_dir / "images/ct").rmdir()
    (case_dir / "images/ct").write_text("not a folder")
    out = tmp_path / "output"
    result = run_process(case_dir, out, weights_dir, tmp_path / "r.json")
    assert result.returncode == 2 and "is a file, not a folder" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and files_under(out) == []


def test_a_lying_header_is_one_line_on_stderr_and_nothing_written(case_dir, weights_dir, tmp_path):
    """MetaIO prints its own lines on the C++ stderr: captured into the one message."""
    ct_path = case_dir / "images/ct/ct.mha"
    sitk.WriteImage(sitk.ReadImage(str(ct_path)), str(ct_path), useCompression=True)
    ct_path.write_bytes(ct_path.read_bytes()[:-300])
    out = tmp_path / "output"
    result = run_process(case_dir, out, weights_dir, tmp_path / "r.json")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hnseg: error: CT image"), result.stderr
    assert files_under(out) == []


# ---- class 1: no silent wrong mask from a modality that is not what its folder says ----

def _load(ct, pet):
    from hnseg_infer.io.images import load_case

    return load_case(ct, pet)


def _cast(image, pixel_id, offset=0.0):
    return sitk.Cast(sitk.Cast(image, sitk.sitkFloat32) + offset, pixel_id)


def test_a_ct_stored_as_hu_plus_1024_is_corrected_with_a_warning():
    ct, pet = small_case()
    stored = _cast(ct, sitk.sitkUInt16, 1024.0)
    case = _load(stored, pet)
    assert np.array_equal(sitk.GetArrayFromImage(case.ct), sitk.GetArrayFromImage(ct).astype(np.int16))
    assert any("HU+1024" in w and "subtracted" in w for w in case.warnings), case.warnings


@pytest.mark.parametrize("window", ["uint8", "int8"])
def test_a_windowed_8_bit_ct_is_refused(window):
    ct, pet = small_case()
    hu = sitk.GetArrayFromImage(ct)
    if window == "uint8":  # a [-160, 240] HU window scaled to 0..255
        stored = np.clip((hu + 160) / 400 * 255, 0, 255).astype(np.uint8)
    else:
        stored = np.clip(hu / 4, -128, 127).astype(np.int8)
    image = sitk.GetImageFromArray(stored)
    image.CopyInformation(ct)
    with pytest.raises(InputError, match="does not look like a CT in Hounsfield units"):
        _load(image, pet)


def test_a_bqml_pet_in_uint16_is_not_taken_for_a_ct_plus_1024():
    ct, pet = small_case()
    with pytest.raises(InputError, match="does not look like a CT"):
        _load(_cast(pet * 5000.0, sitk.sitkUInt16), ct)


REFUSED_MIX = {"swapped": "does not look like a CT", "pet_twice": "does not look like a CT",
               "ct_twice": "is the same image as the CT", "another_ct": "holds the PET and not a second CT"}


@pytest.mark.parametrize("mix", list(REFUSED_MIX))
def test_swapped_or_duplicated_inputs_are_refused_before_any_model(case_dir, weights_dir, tmp_path, mix):
    ct_path, pet_path = case_dir / "images/ct/ct.mha", case_dir / "images/pet/pet.mha"
    ct_bytes, pet_bytes = ct_path.read_bytes(), pet_path.read_bytes()
    if mix in ("swapped", "pet_twice"):
        ct_path.write_bytes(pet_bytes)
    if mix in ("swapped", "ct_twice"):
        pet_path.write_bytes(ct_bytes)
    if mix == "another_ct":  # a CT, not bit-identical to this one (shifted by 1 mm)
        ct = sitk.ReadImage(str(ct_path))
        ct.SetOrigin([o + 1.0 for o in ct.GetOrigin()])
        sitk.WriteImage(ct, str(pet_path))
    out = tmp_path / "output"
    result = run_process(case_dir, out, weights_dir, tmp_path / "r.json")
    assert result.returncode == 2, result.stderr
    line, = result.stderr.strip().splitlines()
    assert REFUSED_MIX[mix] in line, line
    assert files_under(out) == []


def test_valid_cts_keep_passing():
    """Real CT ranges: int16 with padding -3024, float32 air -1000, a field with only lung as its lowest."""
    ct, pet = small_case()
    for image in (_cast(ct, sitk.sitkInt16), _cast(ct, sitk.sitkFloat32), ct * 0.35):  # lowest -350 HU: lung
        assert _load(image, pet).warnings == []


# ---- class 6: valid inputs wrongly refused; class 8: decided before allocating ----

def _pet_in_a_large_empty_field(pet, scale=1.0):
    """The PET pasted into a field 12x larger along x and y, 6x along z (mostly background zero)."""
    size = [s * f for s, f in zip(pet.GetSize(), (12, 12, 6))]
    origin = [o - s * n * (f - 1) / 2 for o, s, n, f in zip(pet.GetOrigin(), pet.GetSpacing(), pet.GetSize(),
                                                             (12, 12, 6))]
    field = sitk.Image(size, sitk.sitkFloat32)
    field.SetSpacing(pet.GetSpacing())
    field.SetOrigin(origin)
    return sitk.Resample(pet * scale, field, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)


@pytest.mark.parametrize("unit, scale", [("suv", 1.0), ("bqml", 5000.0)])
def test_a_pet_field_much_larger_than_the_ct_is_accepted_and_its_unit_found(unit, scale):
    from hnseg_infer.io.images import detect_pet_unit

    ct, pet = small_case()
    large = _pet_in_a_large_empty_field(pet, scale)
    assert detect_pet_unit(large).p999 == 0  # over the whole field the background hides the uptake
    case = _load(ct, large)
    assert case.pet_unit.unit == unit and case.pet_unit.p999 > 0.5 * scale
    if unit == "bqml":
        assert case.pet_unit.suv_per_stored_value == pytest.approx(1 / 5000.0, rel=0.2)


def test_a_pet_without_uptake_inside_the_ct_field_is_refused():
    ct, pet = small_case()
    empty = sitk.Image(pet.GetSize(), sitk.sitkFloat32)
    empty.CopyInformation(pet)
    with pytest.raises(InputError, match="no positive uptake inside the CT's field of view"):
        _load(ct, empty)


def test_a_tiny_ct_is_not_refused_as_constant():
    from builders import image_from_function

    ct = image_from_function(lambda p: np.where(np.linalg.norm(p - [2.0, 2.0, 2.0], axis=1) < 1.5, 40.0, -1000.0),
                             size_xyz=(3, 3, 3), spacing_xyz_mm=(2.0, 2.0, 2.0), origin_xyz_mm=(0.0, 0.0, 0.0),
                             direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    assert sitk.GetArrayViewFromImage(ct)[::4, ::4, ::4].min() == sitk.GetArrayViewFromImage(ct)[::4, ::4, ::4].max()
    _, pet = small_case()
    assert _load(ct, pet).ct.GetSize() == (3, 3, 3)
    blank = sitk.Image((3, 3, 3), sitk.sitkInt16) - 1000
    with pytest.raises(InputError, match="is constant"):
        _load(blank, pet)


def test_a_huge_header_is_refused_before_allocating(tmp_path):
    """DimSize 3000^3 float32 (100 GiB) behind a few compressed bytes: refused from the header, in a process that
    never grows beyond the interpreter and its libraries."""
    ct, _ = small_case()
    path = tmp_path / "ct.mha"
    sitk.WriteImage(ct, str(path), useCompression=True)
    path.write_bytes(_header_line(path.read_bytes(), b"DimSize", b"3000 3000 3000"))
    code = ("import resource, sys; from hnseg_infer.io.images import read_image\n"
            "try:\n    read_image(sys.argv[1], 'ct')\nexcept Exception as exc:\n    print(exc)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    message, peak_mib = result.stdout.strip().splitlines()
    assert "GiB of voxels" in message and "DimSize" in message, result.stdout + result.stderr
    assert int(peak_mib) < 400, peak_mib
