"""MONAI export route and MONAI tiling, proven against MONAI itself.

- tiling: our tile starts and Gaussian are MONAI's (dense_patch_slices, compute_importance_map), and our sliding
  window over the exported ONNX reproduces monai.inferers.sliding_window_inference over the torch SegResNetDS;
- each Auto3DSeg normalize_mode as recipe ops equals the template's MONAI transforms;
- orientation "ras" + transpose_forward [2, 1, 0] lay a CT of any direction out as MONAI's Orientationd("RAS") does;
- end to end: an Auto3DSeg checkpoint (config resolved as the segresnet template saves it) exported, then hnseg's
  grid, channels, window and fold average against MONAI's own preprocessing + SlidingWindowInfererAdapt;
- a bundle folder; and the errors (each an ExportError, nothing left where --out was asked).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from backend_parity import assert_backends_agree
from builders import image_from_function, model_entry, signed_permutations, write_weights
from conftest import REPO, ct_values, pet_values

from hnseg_export import from_monai
from hnseg_infer.channels.build import build_input, model_grid
from hnseg_infer.channels.intensity import apply_ops, validate_ops
from hnseg_infer.errors import ExportError
from hnseg_infer.geometry.grid import Grid
from hnseg_infer.inference.onnx_engine import OnnxModel
from hnseg_infer.inference.runner import LoadedModel
from hnseg_infer.inference.sliding_window import (
    monai_gaussian_importance,
    monai_tile_starts_zyx,
    predict_sliding_window,
)
from hnseg_infer.io.images import Case, detect_pet_unit
from hnseg_infer.recipe.load import load_recipe
from hnseg_infer.roi.locate import locate_roi
from hnseg_infer.segmenter import Segmenter

monai = pytest.importorskip("monai")
from monai.bundle import ConfigParser  # noqa: E402
from monai.data.utils import compute_importance_map, dense_patch_slices  # noqa: E402
from monai.inferers import SlidingWindowInfererAdapt, sliding_window_inference  # noqa: E402
from monai.inferers.utils import _get_scan_interval  # noqa: E402
from monai.networks.nets import SegResNetDS  # noqa: E402
from monai.transforms import (  # noqa: E402
    Compose,
    ConcatItemsd,
    DeleteItemsd,
    EnsureTyped,
    Lambdad,
    LoadImage,
    LoadImaged,
    NormalizeIntensity,
    Orientation,
    Orientationd,
    ResampleToMatchd,
    ScaleIntensityRange,
    ScaleIntensityRanged,
    Spacingd,
)

pytestmark = pytest.mark.torch

torch.set_num_threads(2)
TINY_NET = {"_target_": "SegResNetDS", "init_filters": 4, "blocks_down": [1, 1, 1], "norm": "INSTANCE_NVFUSER",
            "in_channels": "@input_channels", "out_channels": "@output_classes", "dsdepth": 2}


# --------------------------------------------------------------------------------------------------- helpers

def auto3dseg_config(bundle_root: Path, **fill) -> dict:
    """The config a segresnet fold saves in model.pt: hyper_parameters.yaml (research-contributions
    auto3dseg/algorithm_templates/segresnet/configs) filled as algo.py fills it, resolved as
    Segmenter.parse_input_config resolves it, with paths made relative as Segmenter.config_with_relpath does."""
    config = {
        "bundle_root": str(bundle_root), "ckpt_path": "$@bundle_root + '/model'",
        "data_file_base_dir": "/data", "data_list_file_path": "/data/datalist.json", "modality": "ct", "fold": 0,
        "input_channels": 2, "output_classes": 3, "class_names": None, "class_index": None, "debug": False,
        "roi_size": [16, 16, 16], "auto_scale_allowed": True, "auto_scale_batch": True, "auto_scale_roi": False,
        "auto_scale_filters": False, "quick": False, "channels_last": True, "validate_final_original_res": True,
        "amp": True, "orientation_ras": True, "crop_foreground": True, "learning_rate": 2.0e-4,
        "batch_size": "@num_images_per_batch", "num_images_per_batch": 1, "num_epochs": 300, "sigmoid": False,
        "resample": True, "resample_resolution": [1.0, 1.0, 1.0], "crop_mode": "ratio", "normalize_mode": "range",
        "intensity_bounds": [-200.0, 300.0], "extra_modalities": {"image2": "pet"},
        "loss": {"_target_": "DiceCELoss", "include_background": True, "squared_pred": True, "smooth_nr": 0,
                 "smooth_dr": 1.0e-05, "softmax": "$not @sigmoid", "sigmoid": "$@sigmoid",
                 "to_onehot_y": "$not @sigmoid"},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": "@learning_rate", "weight_decay": 1.0e-5},
        "network": copy.deepcopy(TINY_NET),
        "finetune": {"enabled": False, "ckpt_name": "$@bundle_root + '/model/model.pt'"},
        "validate": {"enabled": False, "ckpt_name": "$@bundle_root + '/model/model.pt'", "save_mask": False},
        "infer": {"enabled": False, "ckpt_name": "$@bundle_root + '/model/model.pt'"},
    }
    config.update(fill)
    parser = ConfigParser(config)
    resolved = {}
    for key, value in config.items():  # Segmenter.parse_input_config's last loop
        if isinstance(value, dict) and "_target_" in value:
            resolved[key] = parser.get_parsed_content(key, instantiate=False).config
        elif "_target_" in str(value):
            resolved[key] = copy.deepcopy(value)
        else:
            resolved[key] = parser.get_parsed_content(key)
    for key, value in resolved.items():  # config_with_relpath
        if isinstance(value, str) and value.startswith(str(bundle_root)) and key != "bundle_root":
            resolved[key] = f"$@bundle_root + '/{Path(value).relative_to(bundle_root)}'"
    return resolved


def build_network(config: dict, seed: int) -> torch.nn.Module:
    kwargs = {k: v for k, v in config["network"].items() if k != "_target_"}
    kwargs["norm"] = "INSTANCE"  # what Segmenter.setup_model uses without apex
    torch.manual_seed(seed)
    network = SegResNetDS(**kwargs)
    with torch.no_grad():  # random affine norms and biases: the default init leaves them at 1 and 0
        for name, p in network.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return network.eval()


def write_checkpoint(path: Path, config: dict, *, seed: int) -> torch.nn.Module:
    network = build_network(config, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": network.state_dict(), "config": config, "epoch": 7, "best_metric": 0.5}, path)
    return network


def route(argv: list[str]) -> Path:
    """The monai route as to_onnx.py runs it (its common options added by hand)."""
    parser = argparse.ArgumentParser()
    from_monai.add_arguments(parser)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    return from_monai.export(parser.parse_args([str(a) for a in argv]))


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a staging folder was left behind"


# ---------------------------------------------------------------------------------------------------- tiling

@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.625, 0.7, 0.9])
def test_tile_starts_are_monais(overlap):
    for size in (5, 16, 17, 29, 37, 64, 100):
        for patch in (8, 16, 20):
            padded = max(size, patch)
            interval = _get_scan_interval((padded,), (patch,), 1, (overlap,))
            expected = [s[0].start for s in dense_patch_slices((padded,), (patch,), interval)]
            assert monai_tile_starts_zyx((size, 8, 8), (patch, 8, 8), overlap)[0] == expected, (size, patch)


@pytest.mark.parametrize("patch", [(16, 16, 16), (15, 21, 9), (96, 96, 64)])
def test_gaussian_is_monais_compute_importance_map(patch):
    expected = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125, dtype=torch.float32).numpy()
    np.testing.assert_allclose(monai_gaussian_importance(patch, 0.125), expected, rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """A random SegResNetDS (2 → 3, roi 16³) and its ONNX export through the route's exporter."""
    config = auto3dseg_config(Path("/fold0"))
    network = build_network(config, seed=0)
    folder = tmp_path_factory.mktemp("onnx")
    files, _ = from_monai.export_folds({"tiny": network}, folder, n_channels=2, patch_zyx=(16, 16, 16),
                                       head="softmax", source={"test": True})
    return network, OnnxModel(folder / files[0], device="cpu", threads=2)


@pytest.mark.parametrize("overlap, mode, tile_batch", [(0.625, "gaussian", 1), (0.25, "constant", 3)])
def test_sliding_window_matches_monai_sliding_window_inference(tiny_onnx, overlap, mode, tile_batch):
    network, onnx_model = tiny_onnx
    rng = np.random.default_rng(3)
    # sizes not multiples of the roi, the second axis shorter than it (MONAI pads it); smooth image-like values
    coarse = torch.from_numpy(rng.normal(size=(1, 2, 8, 4, 7)).astype(np.float32))
    volume = torch.nn.functional.interpolate(coarse, size=(37, 13, 29), mode="trilinear")[0].numpy()
    with torch.no_grad():
        expected = sliding_window_inference(torch.from_numpy(volume)[None], (16, 16, 16), tile_batch, network,
                                            overlap=overlap, mode=mode, sigma_scale=0.125)[0].numpy()
    ours = predict_sliding_window(onnx_model, volume, patch_zyx=(16, 16, 16), n_outputs=3, tiling="monai",
                                  overlap=overlap, gaussian=mode == "gaussian", tile_batch=tile_batch)
    assert ours.shape == expected.shape == (3, 37, 13, 29)
    assert np.abs(ours - expected).max() < 1e-3
    assert (ours.argmax(0) == expected.argmax(0)).all()
    # and nnU-Net's tiling is measurably another computation on the same network
    nnunet = predict_sliding_window(onnx_model, volume, patch_zyx=(16, 16, 16), n_outputs=3, step_fraction=0.5)
    assert np.abs(nnunet - expected).max() > 1e-3


# ------------------------------------------------------------------------------------------- normalisation

def _template_transform(mode: str, bounds):
    """segmenter.py DataTransformBuilder.get_normalize_transforms, one key, with the real MONAI classes."""
    if mode == "range":
        scale = ScaleIntensityRange(a_min=bounds[0], a_max=bounds[1], b_min=-1, b_max=1, clip=False)
        return lambda x: torch.sigmoid(scale(x))
    if mode == "meanstd":
        return NormalizeIntensity(nonzero=True, channel_wise=True)
    if mode == "meanstdtanh":
        normalise = NormalizeIntensity(nonzero=True, channel_wise=True)
        return lambda x: 3 * torch.tanh(normalise(x) / 3)
    return lambda x: torch.sigmoid((x - x.min()) / x.std())  # "pet"


@pytest.mark.parametrize("mode", ["range", "meanstd", "meanstdtanh", "pet"])
def test_normalize_modes_are_the_templates_transforms(mode):
    rng = np.random.default_rng(5)
    image = np.where(rng.random((1, 12, 10, 8)) < 0.2, 0, rng.normal(40, 300, (1, 12, 10, 8))).astype(np.float32)
    group = from_monai._auto3dseg_mode(mode, [-200.0, 300.0], key="image", path=Path("x"), notes=[])
    ours = apply_ops(image[0], validate_ops(group.ops, source="ct", where=mode), suv_per_stored_value=1.0)
    expected = np.asarray(_template_transform(mode, [-200.0, 300.0])(torch.from_numpy(image.copy())))[0]
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=1e-5)
    assert np.abs(ours - image[0]).max() > 0.1  # it did normalise


# --------------------------------------------------------------------------------------------- orientation

def _nifti(image: sitk.Image, path: Path) -> sitk.Image:
    sitk.WriteImage(image, str(path))
    return sitk.ReadImage(str(path))  # what the file holds, as MONAI's reader will see it


def _pixdim_ras(ct: sitk.Image) -> list[float]:
    """The CT's spacing along the physical x, y, z axes (a signed-permutation direction)."""
    d = np.abs(np.asarray(ct.GetDirection()).reshape(3, 3))
    return [float(ct.GetSpacing()[int(np.argmax(d[a]))]) for a in range(3)]


CT_SIZE, CT_SPACING = (24, 20, 14), (1.1, 1.3, 2.5)


def ct_asymmetric(points):
    """conftest's body and lesion plus a ramp along x, y and z, so that any flip or swap of axes shows."""
    return ct_values(points) + points @ np.array([5.0, -3.0, 7.0])


def pet_asymmetric(points):
    return np.maximum(pet_values(points) + 0.01 * (points @ np.array([1.0, -2.0, 3.0]) + 50), 0)


def _case(tmp_path: Path, direction) -> tuple[Path, Path, sitk.Image, sitk.Image]:
    d = np.asarray(direction).reshape(3, 3)
    origin = np.array([0.0, 0.0, 10.0]) - d @ (np.asarray(CT_SPACING) * (np.asarray(CT_SIZE) - 1) / 2)
    grid = dict(size_xyz=CT_SIZE, spacing_xyz_mm=CT_SPACING, origin_xyz_mm=tuple(origin), direction=direction)
    ct = _nifti(image_from_function(ct_asymmetric, **grid), tmp_path / "ct.nii.gz")
    pet = _nifti(image_from_function(pet_asymmetric, **grid), tmp_path / "pet.nii.gz")
    return tmp_path / "ct.nii.gz", tmp_path / "pet.nii.gz", ct, pet


def _layout(tmp_path: Path, ct: sitk.Image, pet: sitk.Image, *, orientation: str, spacing) -> np.ndarray:
    """build_input on the CT's own extent, then transpose_forward [2, 1, 0]: the array the network receives."""
    spec = load_recipe(write_weights(tmp_path / orientation, models=[model_entry(
        orientation=orientation, spacing_xyz_mm=list(spacing), transpose_forward=[2, 1, 0],
        channels=[{"source": "ct"}])])).models[0]
    case = Case(ct, pet, ct_path=Path("ct"), pet_path=Path("pet"), pet_unit=detect_pet_unit(pet))
    box = locate_roi("ct_extent", ct=ct, pet=pet, suv_per_stored_value=1.0, params={}).box
    return build_input(case, model_grid(spec, box, Grid.of(ct)), spec).transpose(0, 3, 2, 1)


@pytest.mark.parametrize("index", [0, 7, 13, 21, 30, 44])  # 6 is RAS itself, left out: its two layouts agree
def test_ras_and_ct_orientations_lay_out_arrays_as_monai(tmp_path, index):
    """"ras" = LoadImage + Orientationd("RAS") (orientation_ras: true); "ct" = LoadImage alone (false)."""
    ct_path, _, ct, pet = _case(tmp_path, signed_permutations()[index])
    loaded = LoadImage(image_only=True, ensure_channel_first=True)(str(ct_path))
    ras = _layout(tmp_path, ct, pet, orientation="ras", spacing=_pixdim_ras(ct))
    np.testing.assert_allclose(ras, np.asarray(Orientation(axcodes="RAS")(loaded)), atol=1e-3)
    own = _layout(tmp_path, ct, pet, orientation="ct", spacing=CT_SPACING)
    np.testing.assert_allclose(own, np.asarray(loaded), atol=1e-3)
    assert own.shape != ras.shape or np.abs(own - ras).max() > 50  # the two layouts are not the same array


# ------------------------------------------------------------------------------------------ Auto3DSeg route

@pytest.fixture(scope="module")
def auto3dseg(tmp_path_factory):
    """Two folds of one Auto3DSeg config (CT range + PET 'pet' extra modality, RAS, resample), exported."""
    root = tmp_path_factory.mktemp("auto3dseg")
    ct_path, pet_path, ct, pet = _case(root, signed_permutations()[21])
    config = auto3dseg_config(root / "segresnet_0", resample_resolution=_pixdim_ras(ct))
    networks = [write_checkpoint(root / f"segresnet_{k}" / "model" / "model.pt", config, seed=10 + k)
                for k in range(2)]
    out = route([root / "segresnet_0/model/model.pt", root / "segresnet_1/model/model.pt", "--out", root / "w"])
    return {"out": out, "config": config, "networks": networks, "ct": ct, "pet": pet, "ct_path": ct_path,
            "pet_path": pet_path, "root": root}


def test_auto3dseg_recipe_reproduces_the_template(auto3dseg):
    recipe = load_recipe(auto3dseg["out"])
    (spec,) = recipe.models
    config = auto3dseg["config"]
    assert (spec.grid.orientation, spec.grid.transpose_forward) == ("ras", (2, 1, 0))
    assert spec.tiling.patch_size_zyx == (16, 16, 16)
    assert list(spec.grid.spacing_xyz_mm) == config["resample_resolution"]
    tiling = spec.tiling
    assert (tiling.kind, tiling.overlap, tiling.gaussian, tiling.tile_batch) == ("monai", 0.625, True, 1)
    assert spec.head.type == "softmax" and spec.head.labels == (0, 1, 2) and spec.fold_average == "probabilities"
    assert [c.source for c in spec.channels] == ["ct", "pet"] and len(spec.files) == 2
    assert [op.name for op in spec.channels[0].ops] == ["scale", "sigmoid"]
    assert [op.name for op in spec.channels[1].ops] == ["suv", "min_over_std", "sigmoid"]
    source = spec.provenance["source"]
    assert source["kind"] == "auto3dseg" and source["network"]["kwargs"]["norm"] == "INSTANCE"
    assert any("Spacingd" in note for note in source["notes"])
    assert all(p["fp32"]["passed"] for p in spec.provenance["proof"].values())


def test_openvino_runs_the_segresnetds_folds_as_onnxruntime(auto3dseg):
    """Auto3DSeg SegResNetDS folds: OpenVINO (f32) and onnxruntime on the same tiles."""
    (spec,) = load_recipe(auto3dseg["out"]).models
    tiles = np.random.default_rng(4).standard_normal((2, 2, *spec.tiling.patch_size_zyx)).astype(np.float32)
    for path in spec.files:
        assert_backends_agree(path, tiles, head=spec.head.type)


def test_auto3dseg_end_to_end_against_monai(auto3dseg):
    """hnseg's grid, channels, window and fold average vs the template's transforms + SlidingWindowInfererAdapt."""
    spec = load_recipe(auto3dseg["out"]).models[0]
    ct, pet = auto3dseg["ct"], auto3dseg["pet"]
    case = Case(ct, pet, ct_path=auto3dseg["ct_path"], pet_path=auto3dseg["pet_path"], pet_unit=detect_pet_unit(pet))
    box = locate_roi("ct_extent", ct=ct, pet=pet, suv_per_stored_value=1.0, params={}).box
    grid = model_grid(spec, box, Grid.of(ct))
    ours = LoadedModel.load(spec, device="cpu").probabilities(build_input(case, grid, spec))

    config, keys = auto3dseg["config"], ["image", "image2"]
    pixdim = np.asarray(config["resample_resolution"])
    low, high = config["intensity_bounds"]
    transforms = Compose([  # DataTransformBuilder(..., extra_modalities={"image2": "pet"}), no label
        LoadImaged(keys=keys, ensure_channel_first=True, image_only=True),
        EnsureTyped(keys=keys, data_type="tensor", dtype=torch.float),
        Orientationd(keys=["image"], axcodes="RAS"),
        Spacingd(keys=["image"], pixdim=pixdim, mode=["bilinear"], dtype=torch.float, min_pixdim=pixdim * 0.75,
                 max_pixdim=pixdim * 1.25),
        ResampleToMatchd(keys="image2", key_dst="image", dtype=np.float32),
        ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=-1, b_max=1, clip=False),
        Lambdad(keys="image", func=lambda x: torch.sigmoid(x)),
        Lambdad(keys="image2", func=lambda x: torch.sigmoid((x - x.min()) / x.std())),
        ConcatItemsd(keys=keys, name="image"), DeleteItemsd(keys=["image2"])])
    data = transforms({"image": str(auto3dseg["ct_path"]), "image2": str(auto3dseg["pet_path"])})["image"]
    inferer = SlidingWindowInfererAdapt(roi_size=config["roi_size"], sw_batch_size=1, overlap=0.625, mode="gaussian")
    with torch.no_grad():
        folds = [torch.softmax(inferer(torch.as_tensor(data)[None], network), 1)[0].numpy()
                 for network in auto3dseg["networks"]]
    expected = np.mean(folds, axis=0).transpose(0, 3, 2, 1)  # MONAI [K, x, y, z] (RAS) → our [K, z, y, x]
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() < 1e-3
    assert (ours.argmax(0) == expected.argmax(0)).mean() > 0.999
    assert np.abs(folds[0] - folds[1]).max() > 1e-2  # the folds are different networks: both were used
    # and the whole hnseg pipeline runs the recipe: a mask on exactly the CT's grid
    mask = Segmenter(load_recipe(auto3dseg["out"]), device="cpu").predict_case(case).mask
    assert Grid.of(mask).same_as(Grid.of(ct), tol=0.0) and mask.GetPixelID() == sitk.sitkUInt8


# ---------------------------------------------------------------------------------------------------- bundle

BUNDLE = {
    "imports": ["$import torch"], "bundle_root": ".", "device": "$torch.device('cpu')",
    "network_def": {"_target_": "SegResNet", "spatial_dims": 3, "init_filters": 4, "in_channels": 2,
                    "out_channels": 2, "blocks_down": [1, 1], "blocks_up": [1], "norm": "INSTANCE"},
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": ["ct", "pet"]},
        {"_target_": "EnsureChannelFirstd", "keys": ["ct", "pet"]},
        {"_target_": "Orientationd", "keys": ["ct", "pet"], "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": ["ct", "pet"], "pixdim": [2.0, 2.0, 3.0], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "ct", "a_min": -1000, "a_max": 1000, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "NormalizeIntensityd", "keys": "pet", "nonzero": True},
        {"_target_": "ConcatItemsd", "keys": ["ct", "pet"], "name": "image"},
        {"_target_": "EnsureTyped", "keys": "image"}]},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 4, "overlap": 0.5,
                "mode": "gaussian"},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
        {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5}]},
}


def write_bundle(folder: Path, config: dict = BUNDLE, *, state_dict=None) -> Path:
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    if state_dict is None:
        state_dict = ConfigParser(copy.deepcopy(BUNDLE)).get_parsed_content("network_def").state_dict()
    torch.save(state_dict, folder / "models" / "model.pt")
    return folder


def test_bundle_route_end_to_end_through_to_onnx(tmp_path):
    spec_file = REPO / "export" / "to_onnx.py"
    module_spec = importlib.util.spec_from_file_location("to_onnx", spec_file)
    to_onnx = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(to_onnx)
    bundle = write_bundle(tmp_path / "bundle")
    assert to_onnx.main(["monai", str(bundle), "--out", str(tmp_path / "w"), "--regions", "1,2", "2",
                         "--fp16"]) == 0
    (spec,) = load_recipe(tmp_path / "w").models
    assert (spec.grid.orientation, spec.grid.spacing_xyz_mm) == ("ras", (2.0, 2.0, 3.0))
    assert spec.tiling.patch_size_zyx == (16, 16, 16)
    tiling = spec.tiling
    assert (tiling.kind, tiling.overlap, tiling.tile_batch, tiling.gaussian) == ("monai", 0.5, 4, True)
    window = {"op": "window", "min": -1000.0, "max": 1000.0, "to": [0.0, 1.0]}
    assert [op.to_json() for op in spec.channels[0].ops] == [window]
    assert [op.to_json() for op in spec.channels[1].ops] == [{"op": "suv"}, {"op": "zscore", "over": "nonzero"}]
    assert spec.head.type == "sigmoid" and spec.head.regions == ((1, 2), (2,)) and spec.head.region_labels == (1, 2)
    assert spec.files[0].name.endswith(".fp16.onnx") and "fp16" in spec.provenance["proof"][spec.files[0].name]


# ---------------------------------------------------------------------------------------------------- errors

def _bundle_with(changes: dict) -> dict:
    """BUNDLE with {"a/b/0/c": value} set."""
    config = copy.deepcopy(BUNDLE)
    for path, value in changes.items():
        target = config
        *parents, last = path.split("/")
        for key in parents:
            target = target[int(key) if key.isdigit() else key]
        target[int(last) if last.isdigit() else last] = value
    return config


@pytest.mark.parametrize("config, argv, message", [
    (_bundle_with({"network_def/_target_": "UNet"}), ["--regions", "1", "2"], "supported: monai.networks.nets"),
    (_bundle_with({"preprocessing/transforms/5": {"_target_": "Lambdad", "keys": "pet", "func": "$lambda x: x"}}),
     ["--regions", "1", "2"], "transform Lambdad has no recipe equivalent"),
    (_bundle_with({"preprocessing/transforms/7": {"_target_": "NormalizeIntensityd", "keys": "image"}}),
     ["--regions", "1", "2"], "cannot be taken per channel"),  # one z-score over the concatenated ct and pet
    (BUNDLE, [], "needs the labels each output covers: pass --regions"),
    (BUNDLE, ["--regions", "1", "2", "--channel-sources", "ct"], "takes 2 input channel(s)"),
    (_bundle_with({"inferer/sigma_scale": 0.25}), ["--regions", "1", "2"], "sigma_scale 0.25"),
    (_bundle_with({"preprocessing/transforms/3/mode": ["bilinear", "nearest"]}), ["--regions", "1", "2"],
     "with mode \\['nearest'\\]"),  # the PET resampled nearest-neighbour
])
def test_bundle_errors(tmp_path, config, argv, message):
    bundle = write_bundle(tmp_path / "bundle", config)
    with pytest.raises(ExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        route([bundle, "--out", tmp_path / "w", *argv])
    assert_nothing_left(tmp_path / "w")


@pytest.fixture(scope="module")
def fold_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("folds")
    return root, auto3dseg_config(root / "segresnet_0")


def _checkpoints(root: Path, configs: list[dict], *, state_dict_edit=None) -> list[Path]:
    paths = []
    for k, config in enumerate(configs):
        path = root / f"fold{k}" / "model.pt"
        network = build_network(config, seed=k)  # a SegResNetDS whatever the config's _target_ says
        state_dict = network.state_dict()
        if state_dict_edit:
            state_dict_edit(state_dict)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": state_dict, "config": config}, path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("change, argv, message", [
    (lambda c: {**c, "network": {**c["network"], "_target_": "UNet"}}, [], "supported: monai.networks.nets"),
    ("missing", [], r"1 missing: encoder.conv_init.weight"),
    ("folds", [], "differ in \\['intensity_bounds'\\]"),
    (lambda c: {**c, "normalize_mode": "zscore_robust"}, [], "normalize_mode 'zscore_robust' .*has no recipe"),
    (lambda c: {**c, "input_channels": 3, "extra_modalities": {}, "normalize_mode": "pet",
                "network": {**c["network"], "in_channels": 3}},
     ["--channel-sources", "ct", "pet", "pet"], "normalize_mode 'pet' takes its statistics over all 3 channels"),
    (lambda c: {**c, "custom_data_transforms": [{"key": "normalize_transforms", "path": ".", "transform": {}}]}, [],
     "custom_data_transforms"),
    (lambda c: {**c, "resample": False}, [], "pass --spacing-xyz-mm"),
    (lambda c: {**c, "sigmoid": True, "class_index": [[1, 2], [2], [0]]}, [], "non-empty sets of hnseg labels 1"),
    (lambda c: {**c, "roi_size": [16, 16, 10]}, [], "cannot export SegResNetDS"),  # fails inside the staged export
])
def test_auto3dseg_errors(tmp_path, fold_config, change, argv, message):
    root, config = fold_config
    configs, edit = [config], None
    if change == "missing":
        edit = lambda sd: sd.pop(next(iter(sd)))  # noqa: E731
    elif change == "folds":
        configs = [config, {**config, "intensity_bounds": [-100.0, 200.0]}]
    else:
        configs = [change(config)]
    paths = _checkpoints(tmp_path, configs, state_dict_edit=edit)
    with pytest.raises(ExportError, match=message):
        route([*paths, "--out", tmp_path / "w", *argv])
    assert_nothing_left(tmp_path / "w")


def test_numpy_values_in_a_checkpoint_need_trust(tmp_path, fold_config):
    config = {**fold_config[1], "intensity_bounds": [np.float64(-200.0), np.float64(300.0)]}  # as numpy stats give
    (path,) = _checkpoints(tmp_path, [config])
    with pytest.raises(ExportError, match=r"numpy\S*scalar\): if you trust the file, pass --trust-checkpoint"):
        route([path, "--out", tmp_path / "w"])
    assert_nothing_left(tmp_path / "w")
    (spec,) = load_recipe(route([path, "--out", tmp_path / "w", "--trust-checkpoint"])).models
    assert spec.channels[0].ops[0].to_json() == {"op": "scale", "factor": 2 / 500, "offset": -1 + 200 * 2 / 500}


@pytest.mark.parametrize("sigmoid, class_index, labels, regions, expected", [
    (False, None, [0, 1, 2], None, {"type": "softmax", "labels": [0, 1, 2]}),
    (False, None, [0, 2, 1], None, {"type": "softmax", "labels": [0, 2, 1]}),  # a dataset with 1 = node, 2 = tumour
    (True, [[1, 2], [2]], [0, 1, 2], None, {"type": "sigmoid", "regions": [[1, 2], [2]], "region_labels": [1, 2]}),
    (True, [[1], [2]], [0, 2, 1], None, {"type": "sigmoid", "regions": [[2], [1]], "region_labels": [2, 1]}),
    (True, None, [0, 1, 2], ["1,2", "2"], {"type": "sigmoid", "regions": [[1, 2], [2]], "region_labels": [1, 2]}),
])
def test_heads_map_training_labels_to_gtvp_and_gtvn(sigmoid, class_index, labels, regions, expected):
    n_outputs = len(class_index or regions or labels)
    assert from_monai._head(sigmoid=sigmoid, n_outputs=n_outputs, class_index=class_index, labels=labels,
                            regions=regions, where="x") == expected


@pytest.mark.parametrize("sigmoid, class_index, labels, n_outputs, message", [
    (False, None, [0, 1, 2], 4, "4 softmax outputs but --labels maps 3"),
    (False, None, [0, 1, 1], 3, "must be distinct"),
    (False, [[1], [2]], [0, 1, 2], 2, "with a softmax head is not supported"),
    (True, [[2], [1, 2]], [0, 1, 2], 2, "region 0 \\[2\\] leaves \\[\\]"),  # region 0 wholly painted over
])
def test_heads_that_cannot_be_decoded(sigmoid, class_index, labels, n_outputs, message):
    with pytest.raises(ExportError, match=message):
        from_monai._head(sigmoid=sigmoid, n_outputs=n_outputs, class_index=class_index, labels=labels,
                         regions=None, where="x")


def test_a_plain_state_dict_is_not_taken_for_a_checkpoint(tmp_path, fold_config):
    path = tmp_path / "model.pt"
    torch.save(build_network(fold_config[1], seed=0).state_dict(), path)
    with pytest.raises(ExportError, match="not an Auto3DSeg segresnet checkpoint"):
        route([path, "--out", tmp_path / "w"])
    assert_nothing_left(tmp_path / "w")
