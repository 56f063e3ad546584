"""process.py as the container runs it: paths, exit codes, messages, and nothing half-written in /output."""

import json
import os
import subprocess
import sys

import numpy as np
import SimpleITK as sitk
from conftest import GC_OUTPUT, REPO, files_under, run_process, small_case

OUTPUT_RELATIVE = str(GC_OUTPUT)


def test_writes_the_mask_on_the_ct_grid_and_nothing_else(case_dir, weights_dir, tmp_path):
    out, report = tmp_path / "output", tmp_path / "report.json"
    result = run_process(case_dir, out, weights_dir, report)
    assert result.returncode == 0, result.stderr
    assert files_under(out) == ["images", "images/tumor-lymph-node-segmentation", OUTPUT_RELATIVE]
    mask = sitk.ReadImage(str(out / OUTPUT_RELATIVE))
    ct = sitk.ReadImage(str(next((case_dir / "images/ct").iterdir())))
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert mask.GetSize() == ct.GetSize() and mask.GetSpacing() == ct.GetSpacing()
    assert mask.GetOrigin() == ct.GetOrigin() and mask.GetDirection() == ct.GetDirection()
    values = set(np.unique(sitk.GetArrayFromImage(mask)).tolist())
    assert values == {0, 1}  # the hot lesion is found as GTVp
    data = json.loads(report.read_text())
    assert data["status"] == "ok" and data["labels"]["GTVp"]["components"] == 1
    assert data["inputs"]["pet_unit"]["unit"] == "suv" and data["provider"] == "OpenVINO CPU"  # auto, no GPU
    (model,) = data["backend"].values()
    assert model["backend"] == "openvino" and model["precision"] == "f32" and data["fallbacks"] == []
    assert "hnseg: ok" in result.stdout


def test_backend_option_and_variable_choose_the_engine(case_dir, weights_dir, tmp_path):
    """--backend onnxruntime gives the same mask on onnxruntime's CPU provider; HNSEG_BACKEND sets it too, and an
    unknown value is a one-line error (exit 2) that writes nothing."""
    masks = {}
    for backend in ("openvino", "onnxruntime"):
        out, report = tmp_path / backend, tmp_path / f"{backend}.json"
        result = run_process(case_dir, out, weights_dir, report, "--backend", backend)
        assert result.returncode == 0, result.stderr
        data = json.loads(report.read_text())
        (model,) = data["backend"].values()
        assert model["backend"] == backend
        masks[backend] = sitk.GetArrayFromImage(sitk.ReadImage(str(out / OUTPUT_RELATIVE)))
    assert data["provider"] == "CPUExecutionProvider"
    np.testing.assert_array_equal(masks["openvino"], masks["onnxruntime"])
    env = dict(os.environ, HNSEG_BACKEND="tensorflow")
    result = run_process(case_dir, tmp_path / "bad", weights_dir, None, env=env)
    assert result.returncode == 2 and files_under(tmp_path / "bad") == []
    assert result.stderr.strip().splitlines()[-1].startswith("hnseg: error:") and "unknown backend" in result.stderr


def test_qc_picture_is_drawn_beside_the_output_when_asked(case_dir, weights_dir, tmp_path):
    out, report, qc = tmp_path / "output", tmp_path / "report.json", tmp_path / "qc" / "case.png"
    result = run_process(case_dir, out, weights_dir, report, "--qc", str(qc))
    assert result.returncode == 0, result.stderr
    assert qc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and files_under(out)[-1] == OUTPUT_RELATIVE
    data = json.loads(report.read_text())
    assert data["qc_picture"] == str(qc) and "qc_picture" in data["stages_s"]
    # a picture that cannot be written fails the run before the mask is written
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    result = run_process(case_dir, tmp_path / "output2", weights_dir, None, "--qc", str(blocked / "qc.png"))
    assert result.returncode == 2 and files_under(tmp_path / "output2") == []
    assert f"cannot write {blocked / 'qc.png'}" in result.stderr


def test_environment_variables_set_the_paths(case_dir, weights_dir, tmp_path):
    env = dict(os.environ, HNSEG_INPUT=str(case_dir), HNSEG_OUTPUT=str(tmp_path / "o"),
               HNSEG_WEIGHTS=str(weights_dir), HNSEG_REPORT=str(tmp_path / "r.json"))
    result = subprocess.run([sys.executable, str(REPO / "process.py")], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o" / OUTPUT_RELATIVE).is_file() and (tmp_path / "r.json").is_file()


def test_weights_parent_folder_with_one_recipe_is_accepted(case_dir, weights_dir, tmp_path):
    result = run_process(case_dir, tmp_path / "out", weights_dir.parent)
    assert result.returncode == 0, result.stderr


# ---- bad input: each refused with exit 2, a one-line message naming the problem, and an empty output folder ----

def _replace_ct(case, image):
    ct_path = next((case / "images/ct").iterdir())
    ct_path.unlink()
    sitk.WriteImage(image, str(case / "images/ct" / "ct.mha"))


def empty_input(case, weights):
    for p in sorted(case.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()


def ct_missing(case, weights):
    next((case / "images/ct").iterdir()).unlink()


def pet_missing(case, weights):
    next((case / "images/pet").iterdir()).unlink()


def two_cts(case, weights):
    ct = next((case / "images/ct").iterdir())
    (case / "images/ct/second.mha").write_bytes(ct.read_bytes())


def ct_2d(case, weights):
    _replace_ct(case, sitk.Image([32, 32], sitk.sitkFloat32))


def ct_4d(case, weights):
    _replace_ct(case, sitk.Image([8, 8, 8, 2], sitk.sitkFloat32))


def ct_vector(case, weights):
    _replace_ct(case, sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3))


def ct_empty_file(case, weights):
    next((case / "images/ct").iterdir()).write_bytes(b"")


def ct_not_an_image(case, weights):
    next((case / "images/ct").iterdir()).write_text("this is not a MetaImage\n" * 10)


def ct_all_nan(case, weights):
    ct, _ = small_case()
    nan = sitk.GetImageFromArray(np.full(sitk.GetArrayFromImage(ct).shape, np.nan, np.float32))
    nan.CopyInformation(ct)
    _replace_ct(case, nan)


def pet_far_away(case, weights):
    pet_path = next((case / "images/pet").iterdir())
    pet = sitk.ReadImage(str(pet_path))
    pet.SetOrigin((5000.0, 0.0, 0.0))
    sitk.WriteImage(pet, str(pet_path))


def weights_missing(case, weights):
    for p in weights.iterdir():
        p.unlink()
    weights.rmdir()


def recipe_unknown_key(case, weights):
    recipe = json.loads((weights / "recipe.json").read_text())
    recipe["models"][0]["tile_size"] = [1, 2, 3]
    (weights / "recipe.json").write_text(json.dumps(recipe))


def recipe_model_file_missing(case, weights):
    (weights / "model.onnx").unlink()


def corrupt_onnx(case, weights):
    (weights / "model.onnx").write_bytes(os.urandom(2000))


BAD_INPUTS = {
    empty_input: "is empty",
    ct_missing: "no CT image",
    pet_missing: "no PET image",
    two_cts: "2 CT images",
    ct_2d: "2 dimensions",
    ct_4d: "4 dimensions",
    ct_vector: "3 components per voxel",
    ct_empty_file: "empty file",
    ct_not_an_image: "cannot be read",
    ct_all_nan: "NaN",
    pet_far_away: "do not overlap",
    weights_missing: "does not exist",
    recipe_unknown_key: "unknown key(s) ['tile_size']",
    recipe_model_file_missing: "model.onnx does not exist",
    corrupt_onnx: "model.onnx",
}


def pytest_generate_tests(metafunc):
    if "bad_input" in metafunc.fixturenames:
        metafunc.parametrize("bad_input", list(BAD_INPUTS), ids=[f.__name__ for f in BAD_INPUTS])


def test_bad_input_is_refused_cleanly(bad_input, case_dir, weights_dir, tmp_path):
    bad_input(case_dir, weights_dir)
    out, report = tmp_path / "output", tmp_path / "report.json"
    out.mkdir()
    result = run_process(case_dir, out, weights_dir, report)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hnseg: error: "), result.stderr
    assert BAD_INPUTS[bad_input] in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert files_under(out) == []


def test_the_container_path_imports_neither_matplotlib_nor_torch(case_dir, weights_dir, tmp_path):
    """Heavy libraries stay off process.py's path: matplotlib only for --qc, torch never."""
    code = ("import sys; from hnseg_infer.cli.main import container_main; "
            f"rc = container_main(['--input', {str(case_dir)!r}, '--output', {str(tmp_path / 'out')!r}, "
            f"'--weights', {str(weights_dir)!r}, '--report', {str(tmp_path / 'r.json')!r}, '--device', 'cpu']); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'torch', 'nnunetv2', 'monai'})); "
            "sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
