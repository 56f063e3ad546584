"""calibration.json (inference/calibration.py, `hnseg calibrate`): written from measured runs, read back only where
it fits (this machine, the same model files and engine), seeding the budget planner's costs and said in the report;
a file that is not a calibration is refused."""

import json

import pytest
from builders import model_entry, write_weights
from conftest import small_case, write_gc_input

from hnseg_infer.cli.main import main
from hnseg_infer.errors import RecipeError
from hnseg_infer.inference.calibration import CALIBRATION_FILE, machine
from hnseg_infer.segmenter import Segmenter


@pytest.fixture
def calibrated(tmp_path):
    models = [model_entry(name=name, files=[f"{name}.onnx"], patch_size_zyx=[8, 8, 8]) for name in ("a", "b")]
    weights = write_weights(tmp_path / "w", models=models)
    case = write_gc_input(tmp_path / "case", *small_case())
    ct, pet = case / "images" / "ct" / "ct.mha", case / "images" / "pet" / "pet.mha"
    code = main(["calibrate", "--weights", str(weights), "--ct", str(ct), "--pet", str(pet), "--device", "cpu",
                 "--backend", "onnxruntime", "--repeats", "1"])
    assert code == 0
    return weights, ct, pet


def test_calibrate_writes_each_models_cost_and_a_segmenter_is_seeded_by_it(calibrated):
    weights, ct, pet = calibrated
    body = json.loads((weights / CALIBRATION_FILE).read_text())
    assert body["machine"] == machine() and sorted(body["models"]) == ["a", "b"]
    assert all(entry["seconds_per_tile"] > 0 and len(entry["sha256"]) == 1 for entry in body["models"].values())
    segmenter = Segmenter.from_weights(weights, device="cpu", backend="onnxruntime")
    assert segmenter.seconds_per_tile == {name: e["seconds_per_tile"] for name, e in body["models"].items()}
    budget = segmenter.predict(ct, pet, time_budget_s=600).report.data["budget"]
    assert budget["calibration"] == {"file": str(weights / CALIBRATION_FILE), "used": ["a", "b"]}
    assert Segmenter.from_weights(weights, device="cpu", backend="onnxruntime").predict(
        ct, pet).report.data["budget"] is None  # without a budget nothing is said


def test_a_calibration_from_elsewhere_or_for_other_files_is_ignored_and_said(calibrated):
    weights, _, _ = calibrated
    path = weights / CALIBRATION_FILE
    body = json.loads(path.read_text())
    other = {**body, "machine": {**body["machine"], "cpu": "another CPU"}}
    path.write_text(json.dumps(other))
    segmenter = Segmenter.from_weights(weights, device="cpu", backend="onnxruntime")
    assert segmenter.seconds_per_tile == {} and "another CPU" in segmenter.calibration["ignored"]
    body["models"]["b"]["sha256"] = ["0" * 64]
    body["models"]["a"]["engine"]["backend"] = "openvino"
    path.write_text(json.dumps(body))
    calibration = Segmenter.from_weights(weights, device="cpu", backend="onnxruntime").calibration
    assert calibration["used"] == [] and set(calibration["ignored"]) == {"a", "b"}


@pytest.mark.parametrize("content", ["not json", json.dumps({"schema": 2, "machine": {}, "models": {}}),
                                     json.dumps({"models": {}})])
def test_a_file_that_is_not_a_calibration_is_refused(tmp_path, content):
    weights = write_weights(tmp_path / "w")
    (weights / CALIBRATION_FILE).write_text(content)
    with pytest.raises(RecipeError, match="is not an hnseg calibration"):
        Segmenter.from_weights(weights, device="cpu", backend="onnxruntime")
