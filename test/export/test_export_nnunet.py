"""The nnU-Net route against nnU-Net itself: results folders built here (PlainConvUNet and ResidualEncoderUNet,
random weights, 2 folds), exported by export/to_onnx.py's nnunet route, then
(a) our sliding window over the exported ONNX files on nnU-Net's own preprocessed input vs
    nnUNetPredictor.predict_logits_from_preprocessed_data (same tiles, Gaussian, mirroring, fold averaging);
(b) our whole pipeline from the image files vs nnUNetPredictor from the same files (label Dice per label).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend_parity import assert_backends_agree  # noqa: E402
from builders import image_from_function  # noqa: E402
from nnunet_folders import balance_classes, preprocessed, write_results_folder  # noqa: E402

from hnseg_export import from_nnunet  # noqa: E402
from hnseg_infer.errors import ExportError, HnsegError  # noqa: E402
from hnseg_infer.inference.onnx_engine import OnnxModel  # noqa: E402
from hnseg_infer.inference.sliding_window import predict_sliding_window  # noqa: E402
from hnseg_infer.recipe.load import load_recipe  # noqa: E402
from hnseg_infer.segmenter import Segmenter  # noqa: E402

pytestmark = pytest.mark.torch

# A CT with permuted, flipped axes, anisotropic voxels and an offset origin; PET on the CT grid, as nnU-Net needs.
CT_DIRECTION = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
CT_SIZE_XYZ, CT_SPACING_XYZ_MM, CT_ORIGIN_XYZ_MM = (30, 44, 40), (2.9, 1.7, 2.3), (61.0, -35.0, 44.0)
LESIONS_MM = [((60.0, 10.0, 0.0), 14.0, 8.0), ((35.0, 25.0, -20.0), 9.0, 4.0)]  # centre, radius, SUV


def _ct(points):
    body = np.linalg.norm((points[:, :2] - [40.0, 15.0]) / [45.0, 35.0], axis=1) < 1
    bone = np.abs(np.linalg.norm(points[:, :2] - [40.0, 15.0], axis=1) - 20.0) < 3
    return np.where(bone & body, 700.0, np.where(body, 30.0, -1000.0))


def _pet(points):
    body = np.linalg.norm((points[:, :2] - [40.0, 15.0]) / [45.0, 35.0], axis=1) < 1
    value = np.where(body, 1.0, 0.0)
    for centre, radius, suv in LESIONS_MM:
        value = np.where(np.linalg.norm(points - centre, axis=1) < radius, suv, value)
    return value


def _case_files(folder: Path, size_xyz, spacing_xyz_mm) -> tuple[Path, Path]:
    geometry = dict(size_xyz=size_xyz, spacing_xyz_mm=spacing_xyz_mm, origin_xyz_mm=CT_ORIGIN_XYZ_MM,
                    direction=CT_DIRECTION)
    paths = folder / "case_0000.mha", folder / "case_0001.mha"
    sitk.WriteImage(image_from_function(_ct, **geometry), str(paths[0]))
    sitk.WriteImage(image_from_function(_pet, **geometry), str(paths[1]))
    return paths


@pytest.fixture(scope="module")
def case_files(tmp_path_factory) -> tuple[Path, Path]:
    return _case_files(tmp_path_factory.mktemp("case"), CT_SIZE_XYZ, CT_SPACING_XYZ_MM)


@pytest.fixture(scope="module")
def thick_slice_case_files(tmp_path_factory) -> tuple[Path, Path]:
    """The same scene with slices 4.5x thicker than the finest pixels: nnU-Net resamples it "separate z"."""
    return _case_files(tmp_path_factory.mktemp("thick"), (56, 70, 15), (1.6, 1.1, 4.95))


def _export(results: Path, out: Path, *extra: str) -> Path:
    parser = argparse.ArgumentParser()
    from_nnunet.add_arguments(parser)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    return from_nnunet.export(parser.parse_args([str(results), "--out", str(out), *extra]))


def _predictor(results: Path, *, fp32_accumulators: bool, monkeypatch=None):
    from nnunetv2.inference import predict_from_raw_data as nnunet_predict
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    if fp32_accumulators:
        # nnU-Net sums tiles into float16 arrays (and a float16 Gaussian) even on the CPU; with float32 in their
        # place it computes the same average exactly, which is what a 1e-3 comparison needs.
        monkeypatch.setattr(torch, "half", torch.float32)
        monkeypatch.setattr(nnunet_predict, "compute_gaussian",
                            functools.partial(compute_gaussian.__wrapped__, dtype=torch.float32))
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(results), None)
    return predictor


ARCHITECTURES = {
    # architecture → (transpose_forward, spacing and patch in the network's axis order)
    "PlainConvUNet": ((0, 1, 2), (3.0, 2.0, 2.0), (16, 32, 32)),
    "ResidualEncoderUNet": ((1, 2, 0), (2.0, 2.0, 3.0), (32, 32, 16)),
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def exported(request, tmp_path_factory, case_files):
    transpose, spacing, patch = ARCHITECTURES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    results = write_results_folder(root / "nnUNet_results", architecture=request.param, patch_size=patch,
                                   spacing=spacing, transpose_forward=transpose)
    balance_classes(results, case_files)
    weights = _export(results, root / "weights")
    return request.param, results, weights


def test_recipe_carries_the_plans(exported):
    architecture, results, weights = exported
    transpose, spacing_network, patch = ARCHITECTURES[architecture]
    (model,) = load_recipe(weights).models
    plans = json.loads((results / "plans.json").read_text())
    assert model.grid.transpose_forward == transpose
    assert model.tiling.patch_size_zyx == patch  # network order, as the recipe defines it
    spacing_zyx = [0.0] * 3
    for network_axis, array_axis in enumerate(transpose):
        spacing_zyx[array_axis] = spacing_network[network_axis]
    assert model.grid.spacing_xyz_mm == tuple(spacing_zyx[::-1])
    assert model.tiling.mirror_axes_zyx == (0, 1, 2) and model.tiling.step_fraction == 0.5
    assert model.fold_average == "logits"
    assert [c.source for c in model.channels] == ["ct", "pet"]
    ct_op = model.channels[0].ops[0]
    stats = plans["foreground_intensity_properties_per_channel"]["0"]
    assert ct_op.name == "nnunet_ct" and ct_op.mean == stats["mean"] and ct_op.std == stats["std"]
    assert [op.to_json() for op in model.channels[1].ops] == [{"op": "suv"}, {"op": "zscore", "over": "all"}]
    assert model.head.labels == (0, 1, 2)
    proofs = model.provenance["proof"]
    assert sorted(proofs) == ["fold_0.onnx", "fold_1.onnx"]
    assert all(p["fp32"]["passed"] and p["fp32"]["max_abs_logit_diff"] < 1e-3 for p in proofs.values())


def test_openvino_runs_the_folds_as_onnxruntime(exported):
    """PlainConvUNet and ResidualEncoderUNet folds: OpenVINO (f32) and onnxruntime on the same tiles."""
    (model,) = load_recipe(exported[2]).models
    tiles = np.random.default_rng(3).standard_normal((2, 2, *model.tiling.patch_size_zyx)).astype(np.float32)
    for path in model.files:
        assert_backends_agree(path, tiles, head=model.head.type)


def _our_logits(weights: Path, data_czyx: np.ndarray) -> np.ndarray:
    """Fold-averaged logits of our sliding window over the exported files, in the network's axis order."""
    (spec,) = load_recipe(weights).models
    folds = [OnnxModel(f, device="cpu") for f in spec.files]
    logits = [predict_sliding_window(fold, data_czyx, n_outputs=spec.head.n_outputs,
                                     mirror_axes_zyx=spec.tiling.mirror_axes_zyx, **spec.tiling.window())
              for fold in folds]
    return np.mean(logits, axis=0)


def test_logits_equal_nnunet_predictor_on_its_preprocessed_input(exported, case_files, monkeypatch):
    _, results, weights = exported
    predictor = _predictor(results, fp32_accumulators=True, monkeypatch=monkeypatch)
    data = preprocessed(predictor, case_files)
    assert any(s < p for s, p in zip(data.shape[1:], predictor.configuration_manager.patch_size)) or \
        any(s % p for s, p in zip(data.shape[1:], predictor.configuration_manager.patch_size))
    reference = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).float().numpy()
    ours = _our_logits(weights, data)
    assert ours.shape == reference.shape
    print(f"max |Δlogit| {np.abs(ours - reference).max():.2e} (logits up to {np.abs(reference).max():.1f})")
    assert np.abs(ours - reference).max() < 1e-3
    assert (ours.argmax(0) == reference.argmax(0)).mean() > 0.999


def test_as_shipped_nnunet_differs_by_its_float16_sums(exported, case_files):
    """Unpatched, nnU-Net sums tiles into float16 arrays: where the Gaussian weights are tiny (image borders, down to
    6e-8) its logits are quantised coarsely. The labels still agree; the difference is nnU-Net's rounding."""
    _, results, weights = exported
    predictor = _predictor(results, fp32_accumulators=False)
    data = preprocessed(predictor, case_files)
    reference = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).float().numpy()
    ours = _our_logits(weights, data)
    diff = np.abs(ours - reference)
    agreement = (ours.argmax(0) == reference.argmax(0)).mean()
    print(f"as shipped: max |Δlogit| {diff.max():.3f}, median {np.median(diff):.1e}, 99th percentile "
          f"{np.percentile(diff, 99):.3f}, argmax agreement {agreement:.4f}")
    assert np.median(diff) < 1e-2
    assert agreement > 0.98


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


@pytest.mark.parametrize("case", ["case_files", "thick_slice_case_files"])
def test_end_to_end_labels_match_nnunet_predictor(exported, case, tmp_path, request):
    architecture, results, weights = exported
    case_files = request.getfixturevalue(case)
    predictor = _predictor(results, fp32_accumulators=False)
    (tmp_path / "nnunet").mkdir()
    predictor.predict_from_files_sequential([[str(p) for p in case_files]], str(tmp_path / "nnunet"),
                                            save_probabilities=False, overwrite=True,
                                            folder_with_segs_from_prev_stage=None)
    reference = sitk.ReadImage(str(tmp_path / "nnunet" / "case.mha"))
    ours = Segmenter(load_recipe(weights), device="cpu").predict(case_files[0], case_files[1]).mask
    for key in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(ours, key)(), getattr(reference, key)(), atol=1e-6)
    ours_zyx, reference_zyx = sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(reference)
    dice = {label: _dice(ours_zyx == label, reference_zyx == label) for label in (1, 2)}
    volumes = {label: int((reference_zyx == label).sum()) for label in (1, 2)}
    print(f"{architecture}, {case}: Dice per label {dice}, nnU-Net voxels per label {volumes}, "
          f"agreement {(ours_zyx == reference_zyx).mean():.4f}")
    assert all(v > 100 for v in volumes.values())  # both labels present: the Dice values mean something
    # random weights: the labels are speckle, so every boundary voxel counts (a trained model's Dice is higher)
    assert all(d > 0.98 for d in dice.values())
    assert (ours_zyx == reference_zyx).mean() > 0.985


def test_regions_become_a_sigmoid_head(tmp_path):
    results = write_results_folder(tmp_path / "r", regions=True, folds=(0,))
    (model,) = load_recipe(_export(results, tmp_path / "w")).models
    assert model.head.type == "sigmoid"
    assert model.head.regions == ((1, 2), (2,)) and model.head.region_labels == (1, 2)


def test_channel_ops_come_before_the_plans_normalisation(tmp_path):
    """Inputs the user computed before nnU-Net (x², a PET window) are rebuilt from the native image, then
    normalised as the plans say; a PET channel that converts to SUV itself is not converted twice."""
    results = write_results_folder(tmp_path / "r", folds=(0,))
    ops = [[{"op": "window", "min": -110, "max": 190, "to": [-1, 1]}, {"op": "power", "exponent": 2}],
           [{"op": "suv"}, {"op": "window", "min": 0, "max": 20, "to": [0, 1]}]]
    (model,) = load_recipe(_export(results, tmp_path / "w", "--channel-ops", json.dumps(ops))).models
    ct, pet = ([op.to_json() for op in channel.ops] for channel in model.channels)
    assert ct[:2] == ops[0] and ct[2]["op"] == "nnunet_ct" and len(ct) == 3
    assert pet[:2] == ops[1] and pet[2] == {"op": "zscore", "over": "all"} and len(pet) == 3
    for bad, message in (("[[]]", "gives 1 op lists but dataset.json has 2"), ("[[{\"op\": \"cube\"}], []]",
                         "unknown op 'cube'"), ("{", "--channel-ops is not valid JSON")):
        with pytest.raises(HnsegError, match=message):
            _export(results, tmp_path / "w2", "--channel-ops", bad)
        assert not (tmp_path / "w2").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "plans.json").unlink(), "plans.json not found"),
    (lambda r: (r / "dataset.json").write_text("{"), "dataset.json is not valid JSON"),
    (lambda r: (r / "plans.json").write_text("{"), "could not rebuild"),
    (lambda r: (r / "fold_0" / "checkpoint_final.pth").unlink(), "fold_0/checkpoint_final.pth not found"),
    (lambda r: (r / "fold_1" / "checkpoint_final.pth").write_bytes(b"not a checkpoint"), "could not rebuild"),
    (lambda r: _edit(r / "dataset.json", labels={"background": 0, "GTVp": 1, "GTVn": 2, "other": 3}),
     "labels"),
    (lambda r: _edit(r / "dataset.json", channel_names={"0": "CT", "1": "MR"}), "--channel-sources"),
    (lambda r: _edit_config(r, normalization_schemes=["CTNormalization", "MyNormalization"]), "MyNormalization"),
])
def test_bad_folders_fail_clearly_and_write_nothing(tmp_path, damage, message):
    results = write_results_folder(tmp_path / "r", folds=(0, 1))
    damage(results)
    with pytest.raises(ExportError, match=message):
        _export(results, tmp_path / "w", "--folds", "0", "1")
    assert not (tmp_path / "w").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".w")]


def _edit(path: Path, **changes) -> None:
    content = json.loads(path.read_text())
    content.update(changes)
    path.write_text(json.dumps(content))


def _edit_config(results: Path, **changes) -> None:
    plans = json.loads((results / "plans.json").read_text())
    plans["configurations"]["3d_fullres"].update(changes)
    (results / "plans.json").write_text(json.dumps(plans))


def test_command_line_route_exports_and_fails_with_exit_2(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "export"))
    import to_onnx

    results = write_results_folder(tmp_path / "r", folds=(0,))
    assert to_onnx.main(["nnunet", str(results), "--out", str(tmp_path / "w"), "--fp16"]) == 0
    (model,) = load_recipe(tmp_path / "w").models
    assert [f.name for f in model.files] == ["fold_0.fp16.onnx"]
    assert model.provenance["proof"]["fold_0.fp16.onnx"]["fp16"]["passed"]
    assert to_onnx.main(["nnunet", str(tmp_path / "missing"), "--out", str(tmp_path / "w2")]) == 2
    assert "plans.json not found" in capsys.readouterr().err and not (tmp_path / "w2").exists()
    assert to_onnx.main(["nnunet", str(results), "--out", str(tmp_path / "w3"), "--tile-batch", "0"]) == 2
    assert "--tile-batch must be >= 1" in capsys.readouterr().err and not (tmp_path / "w3").exists()


def test_plans_give_every_channel_intensity_statistics():
    """Channels whose scheme reads no statistics get placeholder entries (nnUNetPredictor's preprocessor looks one
    up for every channel); CTNormalization without its statistics is refused."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from hnseg_export import nnunet_results

    kwargs = nnunet_results.arch_kwargs(architecture="PlainConvUNet", features=(4, 8), kernel_sizes=[[3, 3, 3]] * 2,
                                        strides=[[1, 1, 1], [2, 2, 2]], blocks_per_stage=(1, 1))
    plans = nnunet_results.plans_dict(dataset_name="Dataset999_X", architecture="PlainConvUNet", network_kwargs=kwargs,
                                      patch_size=(16, 16, 16), spacing=(1.0, 1.0, 1.0),
                                      normalization=["NoNormalization", "ZScoreNormalization"])
    properties = PlansManager(plans).foreground_intensity_properties_per_channel
    assert set(properties) == {"0", "1"} and properties["0"]["std"] == 1.0
    with pytest.raises(ValueError, match="channel 0 \\(CTNormalization\\) needs its foreground intensity_properties"):
        nnunet_results.plans_dict(dataset_name="Dataset999_X", architecture="PlainConvUNet", network_kwargs=kwargs,
                                  patch_size=(16, 16, 16), spacing=(1.0, 1.0, 1.0), normalization=["CTNormalization"])
