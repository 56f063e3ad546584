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
