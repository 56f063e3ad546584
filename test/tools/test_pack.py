"""`hnseg pack-model` (tools/pack.py): the tarball holds recipe.json and exactly the files the recipe names, and
process.py runs from it unpacked as grand-challenge unpacks it into /opt/ml/model; symbolic links, files outside the
folder, missing files and files changed after the recipe was loaded are refused with nothing written."""

import json
import shutil
import tarfile

import numpy as np
import pytest
import SimpleITK as sitk
from builders import model_entry, save_linear_model, write_weights
from conftest import GC_OUTPUT, REPO, files_under, run_process

from hnseg_infer.channels.harmonise import low_frequency_block, save_reference
from hnseg_infer.cli import main as cli
from hnseg_infer.errors import RecipeError
from hnseg_infer.recipe.load import load_recipe, resolve_weights
from hnseg_infer.tools.pack import pack_recipe

REFERENCE = "references/ct_dct.npz"  # in a sub-folder: members keep their path relative to recipe.json


def full_weights(folder):
    """A recipe naming every kind of file: a fold model, its stochastic twin and a harmonisation reference; plus
    files the recipe does not name (notes, an engine folder) that must stay out of the tarball."""
    channels = [{"source": "ct", "ops": [{"op": "spectrum_swap", "reference": REFERENCE, "radius": 2},
                                         {"op": "window", "min": -1000, "max": 1000, "to": [-1, 1]}]},
                {"source": "pet", "ops": [{"op": "suv"}]}]
    save_linear_model(folder / "model.stochastic.onnx", [[0, 0], [0, 2.0], [0, 0]], [0, -10.0, -10.0])
    reference_zyx = np.random.default_rng(3).normal(0, 100, (6, 16, 16))
    save_reference(folder / REFERENCE, low_frequency_block(reference_zyx, 2), reference_zyx.shape)
    write_weights(folder, models=[model_entry(channels=channels, stochastic_files=["model.stochastic.onnx"])])
    (folder / "notes.txt").write_text("not named by the recipe")
    (folder / "model.trt").mkdir()  # a prebuilt TensorRT engine folder
    (folder / "model.trt" / "stamp.json").write_text("{}")
    return folder


def pack(folder, out) -> int:
    return cli.main(["pack-model", str(folder), "--out", str(out)])


def test_tarball_holds_exactly_the_named_files_and_process_runs_from_it(tmp_path, case_dir, capsys):
    weights = full_weights(tmp_path / "weights")
    out = tmp_path / "upload" / "model.tar.gz"
    assert pack(weights, out) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"hnseg pack-model: wrote {out}: 4 files, ") and " MiB (" in line
    with tarfile.open(out) as tar:
        assert tar.getnames() == ["recipe.json", "model.onnx", "model.stochastic.onnx", REFERENCE]
        assert all(m.isfile() and m.uid == 0 and m.mode == 0o644 for m in tar.getmembers())
        model_dir = tmp_path / "opt" / "ml" / "model"  # as grand-challenge extracts it
        tar.extractall(model_dir, filter="data")
    for name in ("recipe.json", "model.onnx", "model.stochastic.onnx", REFERENCE):
        assert (model_dir / name).read_bytes() == (weights / name).read_bytes()

    runs = {}
    for name, folder in (("folder", weights), ("tarball", model_dir)):
        result = run_process(case_dir, tmp_path / name, folder, tmp_path / f"{name}.json")
        assert result.returncode == 0, result.stderr
        assert files_under(tmp_path / name) == ["images", "images/tumor-lymph-node-segmentation", str(GC_OUTPUT)]
        runs[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / GC_OUTPUT)))
        recipe = json.loads((tmp_path / f"{name}.json").read_text())["recipe"]
        runs[name + " hashes"] = (recipe["sha256"], recipe["stages"][0]["models"][0])
    assert runs["folder"].any() and np.array_equal(runs["folder"], runs["tarball"])
    assert runs["folder hashes"] == runs["tarball hashes"]


def test_the_budget_calibration_travels_with_the_weights(tmp_path):
    weights = full_weights(tmp_path / "weights")
    (weights / "calibration.json").write_text('{"schema": 1, "machine": {}, "models": {}}\n')
    packed = pack_recipe(load_recipe(weights), tmp_path / "model.tar.gz")
    with tarfile.open(packed.out) as tar:
        assert tar.getnames() == ["recipe.json", "calibration.json", "model.onnx", "model.stochastic.onnx",
                                  REFERENCE]


def test_process_finds_the_unpacked_tarball_at_opt_ml_model_else_the_bundled_weights(tmp_path, monkeypatch):
    model_dir = tmp_path / "opt" / "ml" / "model"
    monkeypatch.setattr(cli, "GC_MODEL_DIR", model_dir)
    assert cli.default_weights() == cli.BUNDLED_WEIGHTS == REPO / "weights"  # the image's /opt/app/weights
    assert load_recipe(resolve_weights(cli.default_weights())).name == "demo-cascade"
    assert pack(write_weights(tmp_path / "w"), tmp_path / "m.tar.gz") == 0
    with tarfile.open(tmp_path / "m.tar.gz") as tar:
        tar.extractall(model_dir, filter="data")
    assert cli.default_weights() == model_dir


def assert_refused(tmp_path, folder, capsys, *fragments):
    out = tmp_path / "upload" / "model.tar.gz"
    assert pack(folder, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hnseg: error: ")
    for fragment in fragments:
        assert fragment in err
    assert not (tmp_path / "upload").exists()  # nothing half-written, not even the folder


def test_symbolic_link_is_refused(tmp_path, capsys):
    weights = full_weights(tmp_path / "weights")
    elsewhere = tmp_path / "elsewhere.onnx"
    shutil.move(weights / "model.onnx", elsewhere)
    (weights / "model.onnx").symlink_to(elsewhere)
    assert load_recipe(weights)  # the recipe itself loads through the link
    assert_refused(tmp_path, weights, capsys, f"{weights / 'model.onnx'} is a symbolic link", "cp --dereference")


def test_symbolic_link_to_a_folder_is_refused(tmp_path, capsys):
    weights = full_weights(tmp_path / "weights")
    shutil.move(weights / "references", tmp_path / "shared_references")
    (weights / "references").symlink_to(tmp_path / "shared_references")
    assert_refused(tmp_path, weights, capsys, f"{weights / 'references'} is a symbolic link")


def test_file_outside_the_folder_is_refused(tmp_path, capsys):
    save_linear_model(tmp_path / "outside.onnx", [[0, 0], [0, 2.0], [0, 0]], [0, -10.0, -10.0])
    weights = write_weights(tmp_path / "weights", models=[model_entry(files=["../outside.onnx"])])
    assert_refused(tmp_path, weights, capsys, "outside the weights folder", "outside.onnx")


def test_missing_file_is_refused(tmp_path, capsys):
    weights = full_weights(tmp_path / "weights")
    (weights / "model.stochastic.onnx").unlink()
    assert_refused(tmp_path, weights, capsys, "model.stochastic.onnx does not exist")


def test_file_changed_after_the_recipe_was_loaded_is_refused(tmp_path):
    weights = full_weights(tmp_path / "weights")
    recipe = load_recipe(weights)
    with open(weights / "model.onnx", "ab") as f:  # e.g. an export still writing, or an edit by hand
        f.write(b"\0")
    out = tmp_path / "upload" / "model.tar.gz"
    with pytest.raises(RecipeError, match=r"model.onnx changed after the recipe was loaded \(sha256 [0-9a-f]{64} "):
        pack_recipe(recipe, out)
    assert not (tmp_path / "upload").exists()
    assert pack_recipe(load_recipe(weights), out).out == out  # loaded again, the changed file is what is checked
