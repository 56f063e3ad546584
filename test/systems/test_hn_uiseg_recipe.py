"""The HN-UISeg recipe end to end: a tiny random residual-encoder U-Net with dropout, exported through the torch
route with its stochastic twin (export/make_hn_uiseg_random.py), run by process.py on a head-and-neck phantom
with --uncertainty, and by `hnseg refine` with clicks. Structure only (random weights segment nothing)."""

import importlib.util
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from backend_parity import assert_backends_agree
from conftest import GC_OUTPUT, REPO, SMALL_PHANTOM, run_container

from hnseg_infer.cli.main import main
from hnseg_infer.geometry.grid import Box, Grid
from hnseg_infer.inference.stochastic import StochasticModel
from hnseg_infer.recipe.load import load_recipe
from hnseg_infer.tools.phantom import make_phantom, write_case
from hnseg_infer.uncertainty.passes import FILES

pytestmark = pytest.mark.torch

UNCERTAINTY = {"passes": 2, "dropout_rate": 0.05, "seed": 0,
               "augmentations": {"noise": {"std": 0.05}, "flip": {"axes_zyx": [0, 1, 2]},
                                 "rotation": {"max_degrees": 5}}}
PATCH_ZYX = [48, 64, 64]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("make_hn_uiseg_random", REPO / "export" / "make_hn_uiseg_random.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # the phantom's CT spacing stands for HN-UISeg's native CT spacing; small windows keep the test fast
    return module.make(tmp_path_factory.mktemp("hn_uiseg") / "weights", uncertainty=UNCERTAINTY,
                       spacing_xyz_mm=(3.0, 3.0, 3.0), patch_size_zyx=PATCH_ZYX)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("hn_uiseg_case")
    phantom = make_phantom(seed=3, fov="head-neck", **SMALL_PHANTOM)
    write_case(phantom, root / "case")
    images = root / "case" / "input" / "images"
    return {"root": root, "input": root / "case" / "input", "phantom": phantom,
            "ct": next((images / "ct").glob("*.mha")), "pet": next((images / "pet").glob("*.mha"))}


@pytest.fixture(scope="module")
def run(weights, case):
    root = case["root"]
    out, report, maps = root / "output", root / "report.json", root / "maps"
    code = run_container(case["input"], out, weights, report, "--uncertainty", maps)
    return {"code": code, "output": out, "mask": out / GC_OUTPUT,
            "report": json.loads(report.read_text()), "maps": maps, "ct": sitk.ReadImage(str(case["ct"]))}


def test_the_exported_recipe_is_hn_uisegs(weights):
    recipe = load_recipe(weights)
    (stage,) = recipe.stages
    assert stage.roi.method == "pet_threshold_head_neck_box"
    (model,) = stage.models
    assert [c.source for c in model.channels] == ["ct", "pet", "clicks_gtvp", "clicks_gtvn"]
    assert [op.to_json() for op in model.channels[0].ops] == [{"op": "clip", "min": -1024, "max": 3071}]
    assert [op.to_json() for op in model.channels[1].ops] == [{"op": "suv"}, {"op": "clip", "min": 0, "max": 50}]
    assert model.grid.spacing_xyz_mm == (3.0, 3.0, 3.0) and list(model.tiling.patch_size_zyx) == PATCH_ZYX
    assert model.tiling.step_fraction == 0.5 and model.tiling.gaussian and model.head.labels == (0, 1, 2)
    assert [f.name for f in model.stochastic_files] == ["hn_uiseg_fold0.stochastic.onnx"]
    twin = model.provenance["stochastic"]["hn_uiseg_fold0.stochastic.onnx"]
    assert twin["proof"]["torch_at_rate"]["passed"] and twin["proof"]["torch_without_dropout_at_rate_0"]["passed"]
    assert len(twin["sites"]) == 3 and {s["trained_rate"] for s in twin["sites"]} == {0.05}  # 2 encoder + 1 decoder
    assert recipe.pet_optional  # HN-UISeg also runs on CT alone
    config = recipe.uncertainty
    assert (config.passes, config.dropout_rate, config.seed) == (2, 0.05, 0)
    assert config.augmentations.kinds == ("noise", "flip", "rotation")


def test_process_py_writes_a_valid_mask_on_the_ct_grid(run):
    assert run["code"] == 0
    assert sorted(p.relative_to(run["output"]).as_posix() for p in run["output"].rglob("*") if p.is_file()) == [
        "images/tumor-lymph-node-segmentation/output.mha"]
    mask, ct = sitk.ReadImage(str(run["mask"])), run["ct"]
    assert mask.GetPixelID() == sitk.sitkUInt8 and Grid.of(mask).same_as(Grid.of(ct), tol=0)
    values = sitk.GetArrayFromImage(mask)
    assert set(np.unique(values)) <= {0, 1, 2}
    box = Box.from_dict(run["report"]["roi"]["box"])
    centres = Grid.of(ct).index_to_physical(np.argwhere(values > 0)[:, ::-1])
    assert np.all((centres >= box.corner_xyz_mm) & (centres <= np.add(box.corner_xyz_mm, box.size_xyz_mm)))


def test_stages_crop_and_grid_are_as_specified(run):
    report = run["report"]
    stages = list(report["stages_s"])
    expected = ["read_and_validate", "load_models", "locate_roi", "hn_uiseg: sample_and_normalise",
                "hn_uiseg: sliding_window", "restore_to_ct_and_decode", "postprocess", "uncertainty",
                "write_uncertainty", "write"]
    assert [s for s in stages if s in expected] == expected
    assert report["roi"]["method"] == "pet_threshold_head_neck_box"
    assert report["roi"]["box"]["size_xyz_mm"] == [200.0, 200.0, 310.0]
    (model,) = report["stages"][0]["models"]
    assert model["grid"]["spacing_xyz_mm"] == [3.0, 3.0, 3.0] and model["grid"]["size_xyz"] == [67, 67, 103]
    assert model["patch_size_zyx"] == PATCH_ZYX


def test_uncertainty_maps_are_on_the_ct_grid_and_in_range(run):
    ct_grid = Grid.of(run["ct"])
    assert sorted(p.name for p in run["maps"].iterdir()) == sorted(FILES)
    arrays = {}
    for name in FILES:
        image = sitk.ReadImage(str(run["maps"] / name))
        assert image.GetPixelID() == sitk.sitkFloat32 and Grid.of(image).same_as(ct_grid, tol=0)
        arrays[name] = sitk.GetArrayFromImage(image)
    entropy = arrays["entropy.mha"]
    assert entropy.min() >= 0 and entropy.max() <= np.float32(math.log(3)) and entropy.max() > 0
    for name in ("probabilities_gtvp.mha", "probabilities_gtvn.mha"):
        assert arrays[name].min() >= 0 and arrays[name].max() <= 1 + 1e-6
    assert (arrays["probabilities_gtvp.mha"] + arrays["probabilities_gtvn.mha"]).max() <= 1 + 1e-5
    # outside the ROI box: certain background
    box = Box.from_dict(run["report"]["roi"]["box"])
    inside = np.zeros(entropy.shape, bool)
    inside[ct_grid.crop_to(box)[1]] = True
    assert not entropy[~inside].any() and entropy[inside].any()


def test_the_report_summarises_the_passes_and_each_lesion(run):
    record = run["report"]["uncertainty"]
    assert record["passes"] == 2 and record["seed"] == 0 and record["dropout_rate"] == 0.05
    assert [d["pass"] for d in record["augmentations"]] == [0, 1]
    assert all(d["kind"] in ("noise", "flip", "rotation") for d in record["augmentations"])
    assert set(record["files"]) == set(FILES)
    assert 0 <= record["mean_entropy"]["roi"] <= math.log(3)
    labels = run["report"]["labels"]
    assert len(record["lesions"]) == labels["GTVp"]["components"] + labels["GTVn"]["components"]
    for lesion in record["lesions"]:
        assert 0 <= lesion["mean_entropy"] <= math.log(3) and lesion["voxels"] > 0


def test_openvino_runs_the_plain_fold_and_onnxruntime_the_twin(weights, run):
    """The fold (4 channels, dropout off) agrees across the backends; the twin runs on onnxruntime, with a line,
    because OpenVINO's CPU plugin computes its int64 hash in int32 and would change the masks (shown below)."""
    import openvino as ov

    (model,) = load_recipe(weights).models
    tiles = np.random.default_rng(5).standard_normal((2, 4, *PATCH_ZYX)).astype(np.float32)
    assert_backends_agree(model.files[0], tiles)
    report = run["report"]
    assert report["backend"]["hn_uiseg"]["backend"] == "openvino"
    assert report["backend"]["hn_uiseg"]["precision"] == "f32"
    assert any(line.startswith("stochastic twin hn_uiseg_fold0.stochastic.onnx runs on onnxruntime")
               for line in report["fallbacks"])
    twin_path, x = model.stochastic_files[0], tiles[:1]
    seeds, rate = np.array([123_456_789], np.int64), np.float32(0.05)
    exact = StochasticModel(twin_path, device="cpu").run(x, seeds, rate)
    compiled = ov.Core().compile_model(str(twin_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    on_openvino = compiled({"input": x, "dropout_seed": seeds, "dropout_rate": rate})[0]
    assert np.abs(on_openvino - exact).max() > 1e-2  # other masks: if OpenVINO computes int64 one day, use it


def test_ct_only_run_with_uncertainty(weights, case):
    root = case["root"]
    out, report, maps = root / "ct_only_out", root / "ct_only.json", root / "ct_only_maps"
    code = run_container(case["input"], out, weights, report, "--uncertainty", maps, "--ct-only")
    data = json.loads(report.read_text())
    assert code == 0 and data["ct_only"] and data["uncertainty"]["passes"] == 2
    entropy = sitk.ReadImage(str(maps / "entropy.mha"))
    assert Grid.of(entropy).same_as(Grid.of(sitk.ReadImage(str(case["ct"]))), tol=0)
    assert sitk.GetArrayViewFromImage(entropy).max() <= np.float32(math.log(3))


def test_refine_with_clicks_runs_end_to_end(weights, case):
    root = case["root"]
    centre = case["phantom"].tumour_center_xyz_mm
    clicks = root / "clicks.json"
    clicks.write_text(json.dumps({"clicks": [{"point_mm": list(centre), "label": "GTVp", "type": "positive"},
                                             {"point_mm": [centre[0] + 20, centre[1], centre[2]], "label": "GTVn",
                                              "type": "negative"}]}))
    out, report = root / "refined" / "mask.mha", root / "refine.json"
    code = main(["refine", "--ct", str(case["ct"]), "--pet", str(case["pet"]), "--clicks", str(clicks),
                 "--out", str(out), "--weights", str(weights), "--report", str(report), "--device", "cpu"])
    assert code == 0
    mask = sitk.ReadImage(str(out))
    assert Grid.of(mask).same_as(Grid.of(sitk.ReadImage(str(case["ct"]))), tol=0)
    data = json.loads(report.read_text())
    assert [c["label"] for c in data["clicks"]["clicks"]] == ["GTVp", "GTVn"] and "uncertainty" not in data
