"""CT-only mode: a recipe with "pet_optional": true runs a case without PET (or with --ct-only) with every PET
channel zero-filled, PET-based ROI methods replaced by a box at the top of the CT, and the report saying so; any
other recipe keeps a missing PET an input error and refuses --ct-only (exit 2, nothing written)."""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from builders import model_entry, write_weights
from conftest import GC_OUTPUT, files_under, run_process, small_case, write_gc_input

OUTPUT_RELATIVE = str(GC_OUTPUT)

from hnseg_infer.channels.build import build_input, model_grid
from hnseg_infer.cli.main import container_main, main
from hnseg_infer.errors import RecipeError
from hnseg_infer.geometry.grid import IDENTITY, Grid
from hnseg_infer.io.images import load_case
from hnseg_infer.recipe.load import load_recipe
from hnseg_infer.roi.locate import locate_roi

pytestmark = pytest.mark.torch

# GTVp where the windowed CT > 0.05 (the lesion's 60 HU, not the body's 40 HU), whatever the PET channel holds
CT_MODEL = {"weight": [[0, 0], [100.0, 0], [0, 0]], "bias": [0, -5.0, -100.0]}
PET_ZSCORE_SIGMOID = {"source": "pet", "ops": [{"op": "suv"}, {"op": "zscore", "over": "all"}, {"op": "sigmoid"}]}


def _weights(folder, *, pet_optional, roi=None):
    entry = model_entry(channels=[{"source": "ct", "ops": [{"op": "window", "min": -1000, "max": 1000,
                                                                "to": [-1, 1]}]}, PET_ZSCORE_SIGMOID])
    extra = {"pet_optional": True} if pet_optional else {}
    return write_weights(folder, models=[entry], roi=roi, extra=extra, linear=CT_MODEL)


@pytest.fixture
def ct_only_weights(tmp_path):
    return _weights(tmp_path / "ct_only_weights", pet_optional=True)


@pytest.fixture
def pet_weights(tmp_path):
    return _weights(tmp_path / "pet_weights", pet_optional=False)


def _container(case_dir, out, weights, report, *extra):
    return container_main(["--input", str(case_dir), "--output", str(out), "--weights", str(weights),
                           "--report", str(report), "--device", "cpu", *extra])


def _without_pet(case_dir, *, keep_folder=False):
    shutil.rmtree(case_dir / "images" / "pet")
    if keep_folder:
        (case_dir / "images" / "pet").mkdir()
    return case_dir


@pytest.mark.parametrize("keep_folder", [False, True], ids=["no_pet_folder", "empty_pet_folder"])
def test_missing_pet_runs_ct_only_when_the_recipe_allows_it(case_dir, ct_only_weights, tmp_path, keep_folder):
    _without_pet(case_dir, keep_folder=keep_folder)
    out, report = tmp_path / "out", tmp_path / "report.json"
    assert _container(case_dir, out, ct_only_weights, report) == 0
    data = json.loads(report.read_text())
    assert data["status"] == "ok" and data["ct_only"] is True and data["recipe"]["pet_optional"] is True
    assert data["inputs"]["pet"] is None and data["inputs"]["pet_unit"] is None
    assert any(w.startswith(f"CT-only mode (no PET image in {case_dir / 'images' / 'pet'})")
               for w in data["warnings"]), data["warnings"]
    mask = sitk.ReadImage(str(out / OUTPUT_RELATIVE))
    ct = sitk.ReadImage(str(next((case_dir / "images/ct").iterdir())))
    assert mask.GetPixelID() == sitk.sitkUInt8 and Grid.of(mask).same_as(Grid.of(ct), tol=0.0)
    assert set(np.unique(sitk.GetArrayFromImage(mask)).tolist()) == {0, 1}  # the CT lesion, from the CT alone


def test_ct_only_flag_ignores_a_present_pet_and_gives_the_same_mask(case_dir, ct_only_weights, tmp_path):
    assert _container(case_dir, tmp_path / "a", ct_only_weights, tmp_path / "a.json", "--ct-only") == 0
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["ct_only"] is True
    assert any("CT-only mode (asked for with --ct-only; PET" in w and "not read" in w for w in data["warnings"])
    with_pet = _container(case_dir, tmp_path / "b", ct_only_weights, tmp_path / "b.json")
    assert with_pet == 0 and json.loads((tmp_path / "b.json").read_text())["ct_only"] is False
    _without_pet(case_dir)
    assert _container(case_dir, tmp_path / "c", ct_only_weights, tmp_path / "c.json") == 0
    a, c = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / x / OUTPUT_RELATIVE))) for x in "ac")
    assert np.array_equal(a, c)


def test_pet_channels_are_zeros_not_their_normalised_zero(tmp_path, ct_only_weights):
    ct, _ = small_case()
    sitk.WriteImage(ct, str(tmp_path / "ct.mha"))
    case = load_case(tmp_path / "ct.mha", None)
    spec = load_recipe(ct_only_weights).models[0]
    grid = model_grid(spec, Grid.of(ct).box().in_frame(IDENTITY), case.ct_grid)
    image = build_input(case, grid, spec)
    assert image.shape[0] == 2 and not image[1].any()  # sigmoid(z-score) of a zero PET would be 0.5
    assert image[0].min() < 0  # the CT channel is the CT's


def test_missing_pet_stays_an_input_error_for_a_pet_recipe(case_dir, pet_weights, tmp_path):
    _without_pet(case_dir)
    out, report = tmp_path / "output", tmp_path / "report.json"
    out.mkdir()
    result = run_process(case_dir, out, pet_weights, report)
    assert result.returncode == 2 and files_under(out) == []
    line = result.stderr.strip()
    assert line.startswith(f"hnseg: error: PET folder {case_dir / 'images' / 'pet'} does not exist: put exactly one "
                           f"PET image") and "recipe 'test' needs PET" in line and '"pet_optional": true' in line
    assert json.loads(report.read_text())["status"] == "error"


def test_ct_only_flag_on_a_pet_recipe_is_refused(case_dir, pet_weights, tmp_path):
    out, report = tmp_path / "output", tmp_path / "report.json"
    result = run_process(case_dir, out, pet_weights, report, "--ct-only")
    assert result.returncode == 2 and files_under(out) == []
    assert result.stderr.strip().startswith("hnseg: error: --ct-only: recipe 'test'")
    assert "does not allow CT-only mode" in result.stderr and "Traceback" not in result.stderr
    assert json.loads(report.read_text())["status"] == "error"


def test_hnseg_predict_without_pet(tmp_path, ct_only_weights, pet_weights, capsys):
    ct, _ = small_case()
    sitk.WriteImage(ct, str(tmp_path / "ct.mha"))
    args = ["predict", "--ct", str(tmp_path / "ct.mha"), "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "a.mha"), "--weights", str(ct_only_weights),
                 "--report", str(tmp_path / "a.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["warnings"][0].startswith("CT-only mode (no PET image given)")
    assert main([*args, "--out", str(tmp_path / "b.mha"), "--weights", str(pet_weights)]) == 2
    assert "no PET image given: pass --pet PET.mha" in capsys.readouterr().err
    assert not (tmp_path / "b.mha").exists()


def test_batch_runs_a_case_without_pet_with_a_ct_only_recipe(tmp_path, ct_only_weights):
    ct, pet = small_case()
    write_gc_input(tmp_path / "cases" / "A", ct, pet)
    write_gc_input(tmp_path / "cases" / "B", ct, None)
    assert main(["batch", "--input", str(tmp_path / "cases"), "--out", str(tmp_path / "masks"),
                 "--weights", str(ct_only_weights), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "masks" / "B.report.json").read_text())["ct_only"] is True
    assert json.loads((tmp_path / "masks" / "A.report.json").read_text())["ct_only"] is False


@pytest.mark.parametrize("method", ["pet_threshold_head_neck_box", "brain_peak_head_crop"])
def test_pet_roi_methods_use_a_box_at_the_top_of_the_ct(method):
    ct, _ = small_case()
    found = locate_roi(method, ct=ct, pet=None, suv_per_stored_value=1.0, params={})
    ct_box = Grid.of(ct).box().in_frame(IDENTITY)
    size = (200.0, 200.0, 310.0) if method == "pet_threshold_head_neck_box" else (256.0, 256.0, 336.0)
    assert found.method == method and found.fell_back and found.record["used"] == "ct_top"
    assert np.allclose(found.box.size_xyz_mm, size)
    assert np.isclose(found.box.corner_xyz_mm[2] + size[2], ct_box.corner_xyz_mm[2] + ct_box.size_xyz_mm[2])
    assert np.allclose(found.box.center_xyz_mm[:2], ct_box.center_xyz_mm[:2])
    assert "CT-only mode" in found.warnings[0] and "'ct_top'" in found.warnings[0]
    extent = locate_roi("ct_extent", ct=ct, pet=None, suv_per_stored_value=1.0, params={})
    assert np.allclose(extent.box.size_xyz_mm, ct_box.size_xyz_mm)


def test_ct_only_run_with_the_bigs2_roi_method(case_dir, tmp_path):
    weights = _weights(tmp_path / "w", pet_optional=True, roi={"method": "pet_threshold_head_neck_box"})
    _without_pet(case_dir)
    assert _container(case_dir, tmp_path / "out", weights, tmp_path / "r.json") == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["roi"]["record"]["ct_only"] is True and data["roi"]["fell_back"] is True
    assert any("finds the head on the PET" in w for w in data["warnings"])


def test_pet_optional_must_be_a_boolean_and_is_allowed_in_cascades(tmp_path, ct_only_weights):
    recipe = json.loads((ct_only_weights / "recipe.json").read_text())
    (ct_only_weights / "recipe.json").write_text(json.dumps({**recipe, "pet_optional": "yes"}))
    with pytest.raises(RecipeError, match="'pet_optional' must be bool"):
        load_recipe(ct_only_weights)
    stage = {"name": "only", "roi": recipe["roi"], "models": recipe["models"]}
    cascade = {"schema_version": 1, "name": "c", "pet_optional": True, "stages": [stage]}
    (ct_only_weights / "recipe.json").write_text(json.dumps(cascade))
    assert load_recipe(ct_only_weights).pet_optional is True
    assert load_recipe(write_weights(tmp_path / "plain")).pet_optional is False


def test_qc_picture_in_ct_only_mode_has_an_empty_pet_row(case_dir, ct_only_weights, tmp_path):
    _without_pet(case_dir)
    qc = tmp_path / "qc.png"
    assert _container(case_dir, tmp_path / "out", ct_only_weights, tmp_path / "r.json", "--qc", str(qc)) == 0
    assert qc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_torch_route_writes_pet_optional_when_asked(tmp_path):
    import torch
    from builders import torch_route_parser as _parser

    from hnseg_export import from_torch

    torch.save(torch.nn.Conv3d(2, 3, 1).state_dict(), tmp_path / "fold0.pt")
    spec = {key: value for key, value in model_entry(channels=[{"source": "ct"}, {"source": "pet"}]).items()
            if key != "files"}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    argv = ["--module", "torch.nn:Conv3d", "--kwargs", json.dumps({"in_channels": 2, "out_channels": 3,
                                                                   "kernel_size": 1}),
            "--state-dict", str(tmp_path / "fold0.pt"), "--model-spec", str(tmp_path / "spec.json")]
    from_torch.export(_parser().parse_args([*argv, "--out", str(tmp_path / "a"), "--pet-optional"]))
    from_torch.export(_parser().parse_args([*argv, "--out", str(tmp_path / "b")]))
    assert load_recipe(tmp_path / "a").pet_optional is True
    assert load_recipe(tmp_path / "b").pet_optional is False
    assert json.loads((tmp_path / "b" / "recipe.json").read_text())["pet_optional"] is False  # every default written


def test_library_refuses_a_case_without_pet_for_a_pet_recipe(tmp_path, pet_weights):
    from hnseg_infer.segmenter import Segmenter

    ct, _ = small_case()
    sitk.WriteImage(ct, str(tmp_path / "ct.mha"))
    with pytest.raises(RecipeError, match="needs PET"):
        Segmenter(load_recipe(pet_weights), device="cpu").predict_case(load_case(tmp_path / "ct.mha", None))
