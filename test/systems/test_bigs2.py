"""The BIGS2 recipe (SSIMH + SegResNet) end to end: random-weight MONAI SegResNetDS folds (deep supervision in
training) made here, exported by the torch route with export/specs/bigs2.json, the harmonisation reference added
by export/make_harmonisation_reference.py, and a head-and-neck phantom run through process.py's entry. Asserts
the structure (stage order, 200×200×310 mm box, 1 mm grid, 192³ windows, 5 folds averaged as logits, a valid mask
on the CT grid), not accuracy: the weights are random."""

import json
import shutil
import sys

import numpy as np
import onnx
import pytest
import SimpleITK as sitk
import torch
from conftest import REPO, SMALL_CT

from hnseg_infer.channels.build import build_input, model_grid
from hnseg_infer.channels.harmonise import swap_low_frequencies
from hnseg_infer.channels.intensity import apply_ops
from hnseg_infer.cli.main import container_main
from hnseg_infer.geometry.grid import Grid, sample
from hnseg_infer.io.images import load_case
from hnseg_infer.recipe.load import load_recipe
from hnseg_infer.roi.locate import locate_roi
from hnseg_infer.tools.phantom import make_phantom, write_case

sys.path.insert(0, str(REPO / "export"))
import make_bigs2_random  # noqa: E402
import make_harmonisation_reference  # noqa: E402
import to_onnx  # noqa: E402

pytestmark = pytest.mark.torch

OUTPUT_RELATIVE = "images/tumor-lymph-node-segmentation/output.mha"


def _images(case_dir):
    return (next((case_dir / "input/images" / kind).iterdir()) for kind in ("ct", "pet"))


@pytest.fixture(scope="module")
def bigs2(tmp_path_factory):
    """The exported, harmonised weights folder, a case and a reference subject (phantoms of other seeds)."""
    root = tmp_path_factory.mktemp("bigs2")
    folds = make_bigs2_random.random_state_dicts(root, folds=5)
    weights = root / "weights"
    assert to_onnx.main(make_bigs2_random.torch_route_argv(folds, weights, kwargs=make_bigs2_random.TINY_KWARGS)) == 0
    exported = json.loads((weights / "recipe.json").read_text())
    case = write_case(make_phantom(seed=3, fov="head-neck", **SMALL_CT), root / "case")
    reference = write_case(make_phantom(seed=11, fov="head-neck", **SMALL_CT), root / "reference")
    ref_ct, ref_pet = _images(reference)
    assert make_harmonisation_reference.main([str(ref_ct), "--pet", str(ref_pet), "--weights", str(weights)]) == 0
    return {"root": root, "weights": weights, "exported": exported, "case": case, "reference": reference,
            "folds": folds}


def test_segresnet_is_trained_with_deep_supervision_and_exported_without(bigs2):
    from monai.networks.nets import SegResNetDS

    network = SegResNetDS(**make_bigs2_random.TINY_KWARGS)
    network.load_state_dict(torch.load(bigs2["folds"][0], weights_only=True))
    network.train()
    assert len(network(torch.zeros(1, 2, 32, 32, 32))) == 2  # full and half resolution heads
    model = load_recipe(bigs2["weights"]).models[0]
    assert len(model.files) == 5
    for path in model.files:
        graph = onnx.load(str(path)).graph
        assert [o.name for o in graph.output] == ["logits"]
        assert [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim][1:] == [3, 192, 192, 192]
    proofs = model.provenance["proof"]
    assert len(proofs) == 5 and all(p["fp32"]["passed"] for p in proofs.values())


def test_recipe_is_bigs2s(bigs2):
    recipe = load_recipe(bigs2["weights"])
    (stage,) = recipe.stages
    (model,) = stage.models
    assert stage.roi.method == "pet_threshold_head_neck_box" and stage.roi.params["size_mm"] == (200.0, 200.0, 310.0)
    assert model.grid.spacing_xyz_mm == (1.0, 1.0, 1.0) and model.tiling.patch_size_zyx == (192, 192, 192)
    assert model.fold_average == "logits" and model.tiling.kind == "monai"
    assert model.tiling.gaussian and model.tiling.overlap == 0.25
    assert model.grid.orientation == "ras" and model.grid.transpose_forward == (2, 1, 0)
    assert model.head.labels == (0, 1, 2)
    ct, pet = model.channels
    assert [op.name for op in ct.ops] == ["spectrum_swap", "window", "sigmoid"]
    assert ct.ops[1].to == (0, 1) and ct.ops[0].radius == 3
    assert [op.name for op in pet.ops] == ["zscore", "sigmoid"]
    assert stage.postprocess.min_volume_mm3 == {1: 100.0, 2: 50.0}
    assert stage.postprocess.gtvn_max_distance_to_gtvp_mm == 100.0
    # the exported recipe had no harmonisation; the reference script added it first in the CT channel
    assert [op["op"] for op in bigs2["exported"]["models"][0]["channels"][0]["ops"]] == ["window", "sigmoid"]


def test_harmonisation_reference_is_the_reference_subjects_ct_on_the_model_grid(bigs2):
    recipe = load_recipe(bigs2["weights"])
    model = recipe.models[0]
    reference = model.channels[0].ops[0].spectrum
    assert reference.path == bigs2["weights"] / "reference_ct_dct.npz"
    assert reference.grid_size_zyx == (310, 200, 200) and reference.low_frequency_dct.shape == (310, 3, 3)
    assert recipe.to_dict()["stages"][0]["models"][0]["references"] == [
        {"file": "reference_ct_dct.npz", "sha256": reference.sha256}]
    ref_ct, ref_pet = _images(bigs2["reference"])
    record = model.provenance["harmonisation"]
    assert record["reference_ct"]["path"] == str(ref_ct) and record["grid_size_zyx"] == (310, 200, 200)  # frozen: a tuple
    # recomputed here: the reference's ROI, the model grid in it, the CT sampled there, each slice's 2-D DCT
    case = load_case(ref_ct, ref_pet)
    roi = locate_roi("pet_threshold_head_neck_box", ct=case.ct, pet=case.pet, suv_per_stored_value=1.0, params={})
    ct_zyx = sample(case.ct, model_grid(model, roi.box, case.ct_grid), interpolation="linear", fill_value=-1024.0)
    k = 200  # a slice through the neck
    n = 200  # the orthonormal DCT-II written out as a matrix
    c = np.sqrt(2 / n) * np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * np.arange(n)[:, None] / (2 * n))
    c[0] /= np.sqrt(2)
    assert np.allclose(reference.low_frequency_dct[k], (c @ ct_zyx[k].astype(np.float64) @ c.T)[:3, :3], atol=1e-6)


def test_case_ct_is_harmonised_after_sampling_and_before_normalisation(bigs2):
    model = load_recipe(bigs2["weights"]).models[0]
    case = load_case(*_images(bigs2["case"]))
    roi = locate_roi("pet_threshold_head_neck_box", ct=case.ct, pet=case.pet, suv_per_stored_value=1.0, params={})
    grid = model_grid(model, roi.box, case.ct_grid)
    channels = build_input(case, grid, model)
    raw = sample(case.ct, grid, interpolation="linear", fill_value=-1024.0)
    swapped = swap_low_frequencies(raw, model.channels[0].ops[0].spectrum.low_frequency_dct)
    expected = apply_ops(swapped, model.channels[0].ops[1:], suv_per_stored_value=1.0)
    assert np.allclose(channels[0], expected, atol=1e-6)
    assert not np.allclose(channels[0], apply_ops(raw, model.channels[0].ops[1:], suv_per_stored_value=1.0))


def test_end_to_end_through_process_py(bigs2):
    out, report_path = bigs2["root"] / "out", bigs2["root"] / "report.json"
    code = container_main(["--input", str(bigs2["case"] / "input"), "--output", str(out), "--weights",
                           str(bigs2["weights"]), "--report", str(report_path), "--device", "cpu"])
    report = json.loads(report_path.read_text())
    assert code == 0 and report["status"] == "ok", report.get("error")
    name = "bigs2_segresnet"
    expected = ["read_and_validate", "load_models", "locate_roi", f"{name}: sample_and_normalise",
                f"{name}: sliding_window", "restore_to_ct_and_decode", "postprocess", "write"]
    assert [s for s in report["stages_s"] if s in expected] == expected
    (stage,) = report["stages"]
    assert stage["roi"]["method"] == "pet_threshold_head_neck_box" and stage["roi"]["fell_back"] is False
    assert stage["roi"]["box"]["size_xyz_mm"] == [200.0, 200.0, 310.0]
    (model,) = stage["models"]
    assert model["grid"]["spacing_xyz_mm"] == [1.0, 1.0, 1.0] and model["grid"]["size_xyz"] == [200, 200, 310]
    assert model["grid"]["direction"] == [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0]  # RAS axes
    assert model["patch_size_zyx"] == [192, 192, 192] and model["folds"] == 5
    assert report["recipe"]["stages"][0]["models"][0]["references"][0]["file"] == "reference_ct_dct.npz"
    assert report["ct_only"] is False and not any("spectrum_swap" in w for w in report["warnings"])
    steps = {step["step"]: step["enabled"] for step in report["postprocess"]["steps"]}
    assert steps == {"min_volume": True, "keep_largest_gtvp": False, "gtvn_distance_to_gtvp": True}
    ct_path, _ = _images(bigs2["case"])
    ct, mask = sitk.ReadImage(str(ct_path)), sitk.ReadImage(str(out / OUTPUT_RELATIVE))
    assert mask.GetPixelID() == sitk.sitkUInt8 and Grid.of(mask).same_as(Grid.of(ct), tol=0.0)
    assert set(np.unique(sitk.GetArrayFromImage(mask)).tolist()) <= {0, 1, 2}
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [OUTPUT_RELATIVE]


def _copy_weights(bigs2, name):
    copy = bigs2["root"] / name
    shutil.copytree(bigs2["weights"], copy)
    return copy


def test_reference_without_pet_takes_the_box_at_the_top_of_the_ct(bigs2, capsys):
    weights = _copy_weights(bigs2, "weights_ct_top")
    ref_ct, _ = _images(bigs2["reference"])
    before = load_recipe(weights).models[0].channels[0].ops[0].spectrum.sha256
    assert make_harmonisation_reference.main([str(ref_ct), "--weights", str(weights), "--radius", "2"]) == 0
    assert "310 slices of 200×200, radius 2" in capsys.readouterr().out
    model = load_recipe(weights).models[0]
    ops = model.channels[0].ops
    assert [op.name for op in ops] == ["spectrum_swap", "window", "sigmoid"]  # replaced, not added twice
    assert ops[0].radius == 2 and ops[0].spectrum.sha256 != before
    assert model.provenance["harmonisation"]["roi"]["record"]["used"] == "ct_top"
    assert model.provenance["harmonisation"]["reference_pet"] is None


@pytest.mark.parametrize("argv,message", [
    (["--model", "nope"], "no model 'nope' with a CT channel"),
    (["--radius", "0"], "--radius must be an integer >= 1"),
])
def test_reference_script_errors_leave_the_folder_as_it_was(bigs2, capsys, argv, message):
    weights = _copy_weights(bigs2, f"weights_error_{argv[0][2:]}")
    before = {p.name: p.read_bytes() for p in weights.iterdir()}
    ref_ct, _ = _images(bigs2["reference"])
    assert make_harmonisation_reference.main([str(ref_ct), "--weights", str(weights), *argv]) == 2
    assert message in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in weights.iterdir()} == before


def test_reference_ct_that_cannot_be_read_is_an_error(bigs2, capsys):
    weights = _copy_weights(bigs2, "weights_missing_ct")
    assert make_harmonisation_reference.main([str(bigs2["root"] / "none.mha"), "--weights", str(weights)]) == 2
    assert "none.mha does not exist" in capsys.readouterr().err
