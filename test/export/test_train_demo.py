"""export/train_demo.py --quick: two small phantoms, two iterations per model, into a temporary work folder. The
native folders must load where they came from (nnUNetPredictor, the MONAI route's Auto3DSeg reader), the assembled
weights folder must hold the three-stage cascade the runtime validates, and the training inputs must be the
inference inputs."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nnunetv2")
pytest.importorskip("monai")

from hnseg_infer.recipe.load import load_recipe  # noqa: E402

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(2)


def _train_demo():
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "export" / "train_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_demo")
    module = _train_demo()
    assert module.main(["--quick", "--work", str(root / "work"), "--out", str(root / "weights")]) == 0
    return {"module": module, "work": root / "work", "weights": root / "weights"}


def test_assembled_recipe_is_the_three_stage_cascade(quick_run):
    recipe = load_recipe(quick_run["weights"])
    assert [s.name for s in recipe.stages] == ["localise_head", "coarse", "fine"]
    assert [s.roi.method for s in recipe.stages] == ["ct_top", "labels_bbox", "labels_centroid_cube"]
    assert recipe.stages[2].roi.params["fallback"] == "brain_peak_head_crop"
    assert [[m.name for m in s.models] for s in recipe.stages] == [["localise_head"], ["coarse"],
                                                                   ["fine_nnunet", "fine_segresnetds"]]
    assert [m.head.labels for m in recipe.models] == [(0, 1), (0, 1, 2), (0, 1, 2), (0, 1, 2)]
    assert recipe.stages[2].postprocess.keep_largest_gtvp
    # the localiser (it only places the coarse box) tiles without overlap or mirroring; the others as nnU-Net does
    assert [(m.tiling.step_fraction, m.tiling.mirror_axes_zyx) for m in recipe.models[:3]] == [
        (1.0, ()), (0.5, (2,)), (0.5, (2,))]
    files = sorted(p.name for p in quick_run["weights"].iterdir())
    assert files == sorted(["recipe.json", *(f.name for m in recipe.models for f in m.files)])
    assert len(set(files)) == 5  # four distinct ONNX files
    fine_nnunet = recipe.models[2]
    assert [[op.name for op in c.ops] for c in fine_nnunet.channels] == [
        ["window"], ["window", "power"], ["window", "cbrt"], ["suv", "window"]]
    assert all(c.ops_before_sampling and c.interpolation == "bspline" for c in fine_nnunet.channels)


def test_native_nnunet_folders_load_in_nnunet(quick_run):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    folders = sorted((quick_run["work"] / "native" / "nnunet").glob("Dataset*/nnUNetTrainer__nnUNetPlans__3d_fullres"))
    assert len(folders) == 3
    for folder in folders:
        predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(folder), (0,))
        checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
        assert checkpoint["inference_allowed_mirroring_axes"] == (2,)
        predictor.network.load_state_dict(predictor.list_of_parameters[0])
        assert predictor.configuration_manager.normalization_schemes == ["NoNormalization"] * len(
            predictor.dataset_json["channel_names"])


def test_native_monai_checkpoint_reads_as_auto3dseg(quick_run):
    from hnseg_export.from_monai import read_auto3dseg

    path = quick_run["work"] / "native" / "monai" / "segresnetds_0" / "model" / "model.pt"
    model = read_auto3dseg([path], argparse.Namespace(trust_checkpoint=False, labels=[0, 1, 2], spacing_xyz_mm=None))
    assert model.network_class.endswith("SegResNetDS") and model.orientation == "ras"
    assert [[op["op"] for op in ops] for ops in model.channel_ops] == [["scale", "sigmoid"], ["min_over_std", "sigmoid"]]


def test_cached_inputs_are_the_inference_inputs(quick_run):
    """The cached localiser input of a case equals build_input on the ct_top box with the exported recipe's spec."""
    import SimpleITK as sitk

    from hnseg_infer.channels.build import build_input, model_grid
    from hnseg_infer.io.images import Case, detect_pet_unit
    from hnseg_infer.roi.locate import locate_roi
    from hnseg_infer.tools.phantom import make_phantom

    module = quick_run["module"]
    case = module.training_cases(1)[0]
    plan = module.quick_plan(module.model_plans()["localise_head"])
    cached = np.load(module.cache_dir(quick_run["work"], plan, True) / f"{case.name}.x.npy")
    phantom = make_phantom(seed=case.seed, fov=case.fov, pet_unit=case.pet_unit,
                           **module.acquisition(case, quick=True))
    ct = sitk.Cast(sitk.Round(phantom.ct), sitk.sitkInt16)
    hnseg_case = Case(ct, phantom.pet, Path("ct.mha"), Path("pet.mha"), detect_pet_unit(phantom.pet))
    recipe = load_recipe(quick_run["weights"])
    spec, stage = recipe.models[0], recipe.stages[0]
    box = locate_roi(stage.roi.method, ct=ct, pet=phantom.pet, suv_per_stored_value=1.0, params=stage.roi.params).box
    np.testing.assert_array_equal(cached, build_input(hnseg_case, model_grid(spec, box, hnseg_case.ct_grid), spec))
    log = json.loads((quick_run["work"] / "logs" / "summary.json").read_text())
    assert set(log) == {"localise_head", "coarse", "fine_nnunet", "fine_segresnetds"}
    assert all(np.isfinite(record["final_loss"]) for record in log.values())
