"""The Segmenter: models loaded once and shared by every later case; predictions from paths or images; a frozen,
finished Prediction; `hnseg batch` with one load for the batch and the per-case extras; the uncertainty maps restored
as the mask is (a lone nnU-Net model in logit space)."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from builders import write_weights
from conftest import small_case, write_gc_input

import hnseg_infer.inference.onnx_engine as onnx_engine
import hnseg_infer.inference.openvino_engine as openvino_engine
from hnseg_infer import Segmenter
from hnseg_infer.cli.main import main
from hnseg_infer.geometry.grid import IDENTITY, Grid
from hnseg_infer.restore.ensemble import Ensemble, Member, OutputSpace


@pytest.fixture
def session_count(monkeypatch):
    """How many engines hnseg creates: onnxruntime sessions and model files read by OpenVINO."""
    created = []
    real = onnx_engine.ort.InferenceSession
    real_read = openvino_engine._read_onnx

    def counting(*args, **kwargs):
        created.append(args[0])
        return real(*args, **kwargs)

    def reading(path):
        created.append(path)
        return real_read(path)

    monkeypatch.setattr(onnx_engine.ort, "InferenceSession", counting)
    monkeypatch.setattr(openvino_engine, "_read_onnx", reading)
    return created


def two_model_weights(folder):
    from builders import model_entry

    return write_weights(folder, models=[model_entry(name="a", files=["a.onnx"]),
                                         model_entry(name="b", files=["b.onnx"], spacing_xyz_mm=[1.5, 2.0, 3.0])])


def test_predict_again_creates_no_session_and_reads_no_model_file(tmp_path, session_count):
    weights = two_model_weights(tmp_path / "weights")
    segmenter = Segmenter.from_weights(weights, device="cpu")
    assert len(session_count) == 2  # one per model file, at load
    for onnx in weights.glob("*.onnx"):
        onnx.unlink()  # a re-read would fail now
    ct, pet = small_case()
    first = segmenter.predict(ct, pet)
    second = segmenter.predict(ct, pet)
    assert len(session_count) == 2
    assert np.array_equal(sitk.GetArrayFromImage(first.mask), sitk.GetArrayFromImage(second.mask))
    assert sitk.GetArrayFromImage(first.mask).max() == 1  # the hot lesion is found: the case tests something
    assert "load_models" in first.report.data["stages_s"] and "load_models" not in second.report.data["stages_s"]


def test_paths_and_images_give_the_same_mask_and_a_finished_frozen_prediction(tmp_path):
    ct, pet = small_case()
    root = write_gc_input(tmp_path / "input", ct, pet)
    segmenter = Segmenter.from_weights(write_weights(tmp_path / "weights"), device="cpu")
    from_files = segmenter.predict(root / "images/ct/ct.mha", root / "images/pet/pet.mha")
    from_images = segmenter.predict(ct=ct, pet=pet)
    assert np.array_equal(sitk.GetArrayFromImage(from_files.mask), sitk.GetArrayFromImage(from_images.mask))
    report = from_images.report.data
    assert report["status"] == "ok" and report["total_s"] >= 0 and "pet_threshold: sliding_window" in report["stages_s"]
    assert report["inputs"]["ct"]["path"] == "<CT image given in memory>"
    assert [r.stage for r in from_images.rois] == ["main"] and from_images.crop["stage"] == "main"
    with pytest.raises(dataclasses.FrozenInstanceError):
        from_images.mask = None


def test_from_weights_takes_a_folder_holding_one_weights_folder(tmp_path):
    write_weights(tmp_path / "all" / "only")
    assert Segmenter.from_weights(tmp_path / "all", device="cpu").recipe.path == tmp_path / "all" / "only" / "recipe.json"


def test_batch_loads_the_models_once_and_writes_the_extras_per_case(tmp_path, session_count):
    ct, pet = small_case()
    for name in ("case_a", "case_b", "case_c"):
        write_gc_input(tmp_path / "cases" / name / "input", ct, pet)
    weights = two_model_weights(tmp_path / "weights")
    out = tmp_path / "out"
    code = main(["batch", "--input", str(tmp_path / "cases"), "--out", str(out), "--weights", str(weights),
                 "--device", "cpu", "--qc", "--sidecar"])
    assert code == 0
    assert len(session_count) == 2  # once for the batch, not once per case
    for name in ("case_a", "case_b", "case_c"):
        assert sitk.ReadImage(str(out / f"{name}.mha")).GetSize() == ct.GetSize()
        assert (out / f"{name}.qc.png").stat().st_size > 0
        assert json.loads((out / f"{name}.sidecar.json").read_text())["mask"] == str(out / f"{name}.mha")
        assert json.loads((out / f"{name}.report.json").read_text())["status"] == "ok"


def test_batch_with_a_broken_recipe_fails_before_any_case(tmp_path, capsys):
    ct, pet = small_case()
    write_gc_input(tmp_path / "cases" / "a" / "input", ct, pet)
    weights = write_weights(tmp_path / "weights")
    shutil.copy(weights / "recipe.json", weights / "recipe.bak")
    (weights / "recipe.json").write_text("{")
    assert main(["batch", "--input", str(tmp_path / "cases"), "--out", str(tmp_path / "out"),
                 "--weights", str(weights)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_lone_nnunet_model_maps_are_restored_in_logit_space_as_the_mask():
    """The uncertainty maps' probabilities decide as the mask does: for a lone nnU-Net model both interpolate
    log-probabilities; the plain mean of probabilities (what the passes did before) argmaxes differently here."""
    rng = np.random.default_rng(0)
    source = Grid((6, 5, 4), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0), IDENTITY)
    target = Grid((17, 13, 10), (1.0, 1.0, 1.0), (0.5, 0.5, 0.5), IDENTITY)
    logits = rng.normal(0, 4, (3, *source.size_zyx)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(axis=0)
    member = Member(1.0, list(p.astype(np.float32)), source, "nnunet")
    in_logits, plain = Ensemble(OutputSpace("labels"), in_logits=True), Ensemble(OutputSpace("labels"))
    labels = in_logits.decode([member], target)
    maps = in_logits.probabilities([member], target)
    assert np.allclose(sum(maps), 1.0, atol=1e-5)
    assert np.array_equal(np.argmax(np.stack(maps), axis=0), labels)
    assert not np.array_equal(np.argmax(np.stack(plain.probabilities([member], target)), axis=0), labels)
