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


def test_a_raw_file_shorter_than_its_header_says_is_refused(tmp_path):
    ct, _ = small_case()
    sitk.WriteImage(ct, str(tmp_path / "ct.mhd"))
    raw = tmp_path / "ct.raw"
    raw.write_bytes(raw.read_bytes()[:-4])
    _refused(tmp_path / "ct.mhd", "is truncated")


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
    # VmHWM: this process's peak (ru_maxrss would carry the forking pytest's over the exec)
    code = ("import sys; from hnseg_infer.io.images import read_image\n"
            "try:\n    read_image(sys.argv[1], 'ct')\nexcept Exception as exc:\n    print(exc)\n"
            "print(next(int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    message, peak_mib = result.stdout.strip().splitlines()
    assert "GiB of voxels" in message and "DimSize" in message, result.stdout + result.stderr
    assert int(peak_mib) < 400, peak_mib


# ---- class 3: after any run the output folder holds exactly one valid mask from this run, or nothing ----

def _stale(out):
    socket = (out / GC_OUTPUT).parent
    socket.mkdir(parents=True)
    (out / GC_OUTPUT).write_bytes(b"an earlier run's mask")
    (socket / ".partial-killed.mha").write_bytes(b"half a mask")
    return socket


def test_a_failed_run_leaves_neither_an_earlier_mask_nor_a_partial_file(case_dir, weights_dir, tmp_path):
    out = tmp_path / "output"
    socket = _stale(out)
    (case_dir / "images/ct/ct.mha").unlink()
    result = run_process(case_dir, out, weights_dir, tmp_path / "r.json")
    assert result.returncode == 2, result.stderr
    assert list(socket.iterdir()) == []


def test_a_successful_run_leaves_exactly_its_own_mask_readable_by_all(case_dir, weights_dir, tmp_path):
    out = tmp_path / "output"
    _stale(out)
    result = run_process(case_dir, out, weights_dir, tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    assert files_under(out) == ["images", str(GC_OUTPUT.parent), str(GC_OUTPUT)]
    assert sitk.ReadImage(str(out / GC_OUTPUT)).GetSize() == (48, 40, 20)
    assert (out / GC_OUTPUT).stat().st_mode & 0o777 == 0o644
    import json
    assert any("left in" in w and ".partial-killed.mha" in w for w in json.loads((tmp_path / "r.json").read_text())
               ["warnings"])


def test_the_mask_mode_follows_the_umask(tmp_path):
    from hnseg_infer.io.atomic import write_bytes_atomic

    old = os.umask(0o027)
    try:
        write_bytes_atomic(tmp_path / "a.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("where", ["report_inside_output", "output_is_a_file", "output_parent_is_a_file"])
def test_output_paths_that_cannot_work_are_refused_before_anything_runs(case_dir, weights_dir, tmp_path, where):
    out, report = tmp_path / "output", tmp_path / "r.json"
    if where == "report_inside_output":
        report = out / "report.json"
    elif where == "output_is_a_file":
        out.write_text("a file")
    else:
        (tmp_path / "file").write_text("a file")
        out = tmp_path / "file" / "output"
    result = run_process(case_dir, out, weights_dir, report)
    assert result.returncode == 2, result.stderr
    line, = result.stderr.strip().splitlines()
    assert {"report_inside_output": "inside the output folder", "output_is_a_file": "is a file, not a folder",
            "output_parent_is_a_file": "is a file, not a folder"}[where] in line, line
    assert "Timing" not in result.stdout and not report.exists()
    assert files_under(out) == [] if out.is_dir() else True


# ---- class 4: the mask is the product: a report or summary that cannot be written is a warning, never exit 1 ----

def test_a_report_that_cannot_be_written_is_a_warning_with_the_mask_in_place(case_dir, weights_dir, tmp_path):
    (tmp_path / "file").write_text("a file")
    out = tmp_path / "output"
    result = run_process(case_dir, out, weights_dir, tmp_path / "file" / "report.json")
    assert result.returncode == 0, result.stderr
    line, = result.stderr.strip().splitlines()
    assert line.startswith("hnseg: warning: run report not written") and "report.json" in line, line
    assert result.stdout.startswith("hnseg: ok") and (out / GC_OUTPUT).is_file()


def test_a_closed_stdout_is_not_a_failure(case_dir, weights_dir, tmp_path):
    out = tmp_path / "output"
    cmd = [sys.executable, "process.py", "--input", str(case_dir), "--output", str(out), "--weights",
           str(weights_dir), "--report", str(tmp_path / "r.json"), "--device", "cpu"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parents[2])
    process.stdout.close()  # the reader went away before the summary line
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=300) == 0, stderr
    assert stderr == "" and (out / GC_OUTPUT).is_file()


def test_file_names_the_terminal_cannot_encode_or_that_hold_control_characters(case_dir, weights_dir, tmp_path):
    ct = case_dir / "images/ct/ct.mha"
    (case_dir / "images/ct/é\n\x1b[31mred.mha").write_bytes(ct.read_bytes())
    out = tmp_path / "output"
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    result = run_process(case_dir, out, weights_dir, tmp_path / "r.json", env=env)
    assert result.returncode == 2, result.stderr
    line, = result.stderr.strip().splitlines()
    assert "2 CT images" in line and "\\n\\x1b[31mred.mha" in line and "\\xe9" in line, line


# ---- class 4 and 5 as the image runs: a non-root user, HOME unwritable, a /tmp/hnseg of someone else ----

NOBODY = 65534


def _as_nobody_possible() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run process.py as nobody"
    import shutil
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux)"
    probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
                            "-c", "import SimpleITK, onnxruntime"], capture_output=True)
    return None if probe.returncode == 0 else "this Python cannot run as nobody"


@pytest.fixture
def shared_tmp():
    """A folder every user may read (pytest's tmp_path is private to root)."""
    import shutil
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="hnseg-hostile-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def _run_as_nobody(case, out, weights, report):
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "process.py", "--input", str(case), "--output", str(out), "--weights", str(weights),
           "--device", "cpu", "--report", str(report)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=300,
                          env={**os.environ, "HOME": "/nonexistent"})


@pytest.mark.skipif(_as_nobody_possible() is not None, reason=str(_as_nobody_possible()))
def test_as_a_non_root_user_with_someone_elses_folders(shared_tmp):
    from builders import write_weights

    ct, pet = small_case()
    case = write_gc_input(shared_tmp / "input", ct, pet)
    weights = write_weights(shared_tmp / "weights")
    for p in [shared_tmp, *shared_tmp.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    theirs = shared_tmp / "root-owned"  # like a /tmp/hnseg made by another user, or an /output not mounted for us
    theirs.mkdir(mode=0o755)
    out = shared_tmp / "output"
    out.mkdir()
    out.chmod(0o777)  # mkdir applies the umask

    refused = _run_as_nobody(case, theirs / "output", weights, shared_tmp / "r.json")
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    line = lines[0]
    assert "may not write in" in line and str(theirs) in line, line

    ok = _run_as_nobody(case, out, weights, theirs / "hnseg" / "report.json")
    assert ok.returncode == 0, ok.stderr
    lines = ok.stderr.strip().splitlines()  # onnxruntime's telemetry and ITK stay silent; only the report warning
    assert len(lines) == 1 and lines[0].startswith("hnseg: warning: run report not written"), ok.stderr
    assert (out / GC_OUTPUT).stat().st_uid == NOBODY

    weights.chmod(0o700)
    unreadable = _run_as_nobody(case, out, weights, theirs / "r.json")
    assert unreadable.returncode == 2, unreadable.stderr
    line, = unreadable.stderr.strip().splitlines()  # the error, and on its line that the report was not written
    assert "weights" in line and "cannot be read by this user" in line and "run report not written" in line, line
    assert not (out / GC_OUTPUT).exists()  # the earlier run's mask is gone: it is not this run's result


def test_pet_values_near_float32s_maximum_are_refused_in_one_line(case_dir, weights_dir, tmp_path):
    pet_path = case_dir / "images/pet/pet.mha"
    pet = sitk.ReadImage(str(pet_path))
    values = sitk.GetArrayFromImage(pet)
    values[values > 5] = 3.0e38
    broken = sitk.GetImageFromArray(values)
    broken.CopyInformation(pet)
    sitk.WriteImage(broken, str(pet_path))
    result = run_process(case_dir, tmp_path / "output", weights_dir, tmp_path / "r.json")
    assert result.returncode == 2, result.stderr
    line, = result.stderr.strip().splitlines()
    assert "beyond any uptake" in line and "3e+38" in line, line


# ---- class 7: weights that changed: each model file's sha256 recorded in the recipe and verified on load ----

def _weights_with_hashes(folder):
    import json

    from builders import write_weights

    from hnseg_infer.io.atomic import file_sha256

    weights = write_weights(folder)
    recipe = json.loads((weights / "recipe.json").read_text())
    recipe["models"][0]["sha256"] = [file_sha256(weights / "model.onnx")]
    (weights / "recipe.json").write_text(json.dumps(recipe))
    return weights


def test_a_model_file_replaced_by_another_of_the_same_signature_is_refused(case_dir, tmp_path, monkeypatch):
    from builders import save_linear_model

    from hnseg_infer.errors import RecipeError
    from hnseg_infer.recipe.load import SKIP_HASH_CHECK_ENV, load_recipe

    weights = _weights_with_hashes(tmp_path / "weights")
    assert load_recipe(weights).stages[0].models[0].sha256  # as exported: loads
    save_linear_model(weights / "model.onnx", [[0, 0], [0, 3.0], [0, 0]], [0, -10.0, -10.0])  # same inputs/outputs
    with pytest.raises(RecipeError, match="model.onnx has sha256 .* but the recipe records") as info:
        load_recipe(weights)
    assert SKIP_HASH_CHECK_ENV in str(info.value)
    result = run_process(case_dir, tmp_path / "output", weights, tmp_path / "r.json")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "model.onnx has sha256" in result.stderr and files_under(tmp_path / "output") == []
    monkeypatch.setenv(SKIP_HASH_CHECK_ENV, "1")  # the documented way to run weights edited on purpose
    assert load_recipe(weights).stages[0].models[0].files[0].name == "model.onnx"


def test_recipes_written_by_the_runtime_record_and_round_trip_the_hashes(tmp_path):
    from hnseg_infer.io.atomic import file_sha256
    from hnseg_infer.recipe.load import load_recipe
    from hnseg_infer.recipe.parse import parse_recipe

    repo = Path(__file__).resolve().parents[2]
    demo = load_recipe(repo / "weights/demo")  # the shipped weights record their hashes, and they hold
    for stage, raw in zip(demo.stages, demo.to_json()["stages"]):
        for model, entry in zip(stage.models, raw["models"]):
            assert entry["sha256"] == [file_sha256(f) for f in model.files]
    assert parse_recipe(demo.to_json(), demo.path) == demo  # the form every exporter writes (write_recipe)
