"""MONAI SegResNet/SegResNetDS: Auto3DSeg checkpoints (one per fold) or a MONAI bundle → ONNX + recipe.

    to_onnx.py monai FOLD0/model.pt [FOLD1/model.pt ...] --out DIR    Auto3DSeg segresnet checkpoints
    to_onnx.py monai BUNDLE_DIR --out DIR                             configs/inference.json|yaml + models/model.pt

An Auto3DSeg checkpoint is what the segresnet algorithm template's Segmenter.checkpoint_save writes: a dict
{"state_dict", "config", "epoch", "best_metric"} whose config is the resolved hyper_parameters.yaml
(Project-MONAI/research-contributions auto3dseg/algorithm_templates/segresnet/scripts/segmenter.py and
configs/hyper_parameters.yaml). The config says how the network was fed (DataTransformBuilder there):
Orientationd(axcodes="RAS") when orientation_ras, Spacingd(resample_resolution) when resample, per image key a
normalize_mode (the main image's, then extra_modalities'), and the window is config["sliding_inferrer"] or
SlidingWindowInfererAdapt(roi_size, overlap=0.625, mode="gaussian"). A bundle says it in network_def,
preprocessing, inferer and postprocessing. A bundle's config is code (its "$" expressions run): export only
bundles you trust.

The network is rebuilt from the config with the real monai class, loaded strictly, exported and proven. The
recipe reproduces: the grid (orientation "ras" for Orientationd RAS, "lps" for LPS, else the image's own axes "ct";
spacing = pixdim; MONAI arrays are [C, x, y, z], hence transpose_forward [2, 1, 0] and the patch = roi_size in that
order), each channel's normalisation as recipe ops, the head (softmax labels or sigmoid regions mapped to GTVp=1 /
GTVn=2) and the window (tiling "monai", the inferer's overlap and blending). A transform the recipe cannot express
is an ExportError naming it. What remains approximate is written to the provenance as `notes`: MONAI's Spacingd
keeps an axis whose spacing is within its min/max_pixdim of the target, statistics (z-score, "pet") are taken over
the model's input grid (the ROI box) rather than the whole image, and CropForeground only moves the tiles.
"""

from __future__ import annotations

import inspect
import json
import pickle
import pydoc
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hnseg_infer.errors import ExportError
from hnseg_infer.io.atomic import file_sha256

from .onnx_export import (
    SHOWN,
    check_roi_and_postprocess,
    export_folds,
    json_object,
    load_strictly,
    staged_weights,
    write_recipe,
)

NETWORK_CLASSES = ("monai.networks.nets.segresnet_ds.SegResNetDS", "monai.networks.nets.segresnet.SegResNet")
INFERER_CLASSES = ("monai.inferers.inferer.SlidingWindowInferer", "monai.inferers.inferer.SlidingWindowInfererAdapt")
# segmenter.py's window when the config has no sliding_inferrer
AUTO3DSEG_WINDOW = {"overlap": 0.625, "mode": "gaussian", "sigma_scale": 0.125, "sw_batch_size": 1,
                    "padding_mode": "constant", "cval": 0.0}
AUTO3DSEG_MODES = ("none", "range", "ct", "meanstd", "mri", "meanstdtanh", "pet")
BUNDLE_CONFIGS = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
BUNDLE_WEIGHTS = "models/model.pt"
IMAGE_KEY = "image"  # the key MONAI's evaluators feed to the network
TRANSPOSE_XYZ = [2, 1, 0]  # grid axes (z, y, x) → MONAI's array order (x, y, z)
# Bundle transforms that neither move voxels nor change values on our path (loading, typing, bookkeeping).
NEUTRAL_TRANSFORMS = ("LoadImaged", "EnsureChannelFirstd", "EnsureTyped", "ToTensord", "ToDeviced", "DeleteItemsd",
                      "Identityd", "EnsureSameShaped", "ResampleToMatchd")
MAPPED_TRANSFORMS = ("Orientationd", "Spacingd", "ScaleIntensityRanged", "NormalizeIntensityd", "ScaleIntensityd",
                     "ConcatItemsd", "CastToTyped (float)", "CropForegroundd")


def add_arguments(parser) -> None:
    parser.add_argument("sources", nargs="+", type=Path, metavar="CHECKPOINT_OR_BUNDLE",
                        help="Auto3DSeg segresnet checkpoints (model.pt, one per fold, sharing their config) or one "
                             "MONAI bundle folder")
    parser.add_argument("--channel-sources", nargs="+", choices=("ct", "pet", "zero"), default=["ct", "pet"],
                        help="the hnseg source of each network input channel, in the network's order (default: ct "
                             "pet)")
    parser.add_argument("--labels", nargs="+", type=int, default=[0, 1, 2], metavar="LABEL",
                        help="the hnseg label (0 background, 1 GTVp, 2 GTVn) of each training label value 0, 1, ... "
                             "(default: 0 1 2, HECKTOR's values)")
    parser.add_argument("--regions", nargs="+", default=None, metavar="L[,L]",
                        help="sigmoid bundles: the hnseg labels each output channel covers, e.g. 1 2 or 1,2 2 "
                             "(Auto3DSeg checkpoints take them from class_index)")
    parser.add_argument("--pet-values", choices=("suv", "stored"), default="suv",
                        help="what the PET channel held in training: SUV (default: inputs in Bq/mL are converted to "
                             "SUV first) or the stored values as they are")
    parser.add_argument("--spacing-xyz-mm", nargs=3, type=float, default=None, metavar=("X", "Y", "Z"),
                        help="only for a model trained without resampling (resample: false): the spacing of its "
                             "training images")
    parser.add_argument("--roi", default='{"method": "ct_extent"}', metavar="JSON",
                        help='the recipe\'s ROI as JSON (default {"method": "ct_extent"}: the whole CT, as MONAI '
                             'predicts)')
    parser.add_argument("--postprocess", default="{}", metavar="JSON",
                        help="the recipe's post-processing as JSON (default {}: none)")
    parser.add_argument("--tile-batch", type=int, default=None,
                        help="tiles per network call (default: the inferer's sw_batch_size)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load checkpoints that hold arbitrary Python objects (torch.load weights_only=False): "
                             "only for files you trust")
    parser.add_argument("--name", default=None, help="recipe and model name (default: monai_<network class>)")


@dataclass
class Group:
    """Channels that went through the same transforms (one image key): their recipe ops so far, and the name of a
    transform that took statistics over all of the key's channels at once (exact only for a single channel)."""

    ops: list[dict] = field(default_factory=list)
    joint_statistics: str | None = None
    interpolation: str = "bilinear"  # Spacingd's mode for the key; only bilinear is the recipe's "linear"


@dataclass
class MonaiModel:
    """Everything the recipe needs, read from an Auto3DSeg config or a bundle; channels without their sources."""

    kind: str
    network_class: str
    network_kwargs: dict
    networks: dict[str, torch.nn.Module]
    channel_ops: list[list[dict]]
    head: dict
    orientation: str
    spacing_xyz_mm: list[float]
    roi_size: list[int]
    overlap: float
    gaussian: bool
    sw_batch_size: int
    files: list[dict]
    notes: list[str]


def export(args) -> Path:
    roi, postprocess = _roi_and_postprocess(args.roi, args.postprocess)
    sources = [Path(s) for s in args.sources]
    if len(sources) == 1 and sources[0].is_dir():
        model = read_bundle(sources[0], args)
    elif any(s.is_dir() for s in sources):
        raise ExportError(f"{[str(s) for s in sources if s.is_dir()]}: a bundle folder is exported alone; pass "
                          f"either one bundle folder or Auto3DSeg checkpoint files")
    else:
        model = read_auto3dseg(sources, args)
    channels = _channels(model.channel_ops, args.channel_sources, pet_values=args.pet_values)
    name = args.name or f"monai_{model.network_class.rsplit('.', 1)[-1].lower()}"
    tile_batch = args.tile_batch if args.tile_batch is not None else model.sw_batch_size
    if tile_batch < 1:
        raise ExportError(f"--tile-batch must be >= 1, got {tile_batch}")
    source = {"route": "monai", "kind": model.kind, "files": model.files,
              "network": {"class": model.network_class, "kwargs": _jsonable(model.network_kwargs)},
              "notes": model.notes, "torch": torch.__version__, "monai": _monai_version()}
    with staged_weights(args.out, overwrite=args.overwrite) as staging:
        files, provenance = export_folds(model.networks, staging, n_channels=len(channels), patch_zyx=model.roi_size,
                                         head=model.head["type"], fp16=args.fp16, source=source)
        entry = {"name": name, "files": files, "spacing_xyz_mm": model.spacing_xyz_mm,
                 "orientation": model.orientation, "transpose_forward": TRANSPOSE_XYZ,
                 "patch_size_zyx": model.roi_size, "channels": channels, "head": model.head,
                 "fold_average": "probabilities", "tiling": "monai", "overlap": model.overlap,
                 "gaussian": model.gaussian, "mirror_axes_zyx": [], "tile_batch": tile_batch,
                 "provenance": provenance}
        write_recipe(staging, name=name, description=f"MONAI {model.network_class.rsplit('.', 1)[-1]} from "
                     f"{'an Auto3DSeg checkpoint' if model.kind == 'auto3dseg' else 'a bundle'} "
                     f"({len(files)} fold(s)), exported by the monai route",
                     roi=roi, models=[entry], postprocess=postprocess)
    return Path(args.out)


# ------------------------------------------------------------------------------------------- Auto3DSeg checkpoints

def read_auto3dseg(paths: list[Path], args) -> MonaiModel:
    """Folds: every checkpoint's config must give the same settings (network, grid, normalisation, head, window)."""
    checkpoints = [_auto3dseg_checkpoint(path, trust=args.trust_checkpoint) for path in paths]
    settings = [_auto3dseg_settings(checkpoint["config"], path) for path, checkpoint in zip(paths, checkpoints)]
    for path, other in zip(paths[1:], settings[1:]):
        if differing := sorted(key for key in settings[0] if _jsonable(settings[0][key]) != _jsonable(other[key])):
            raise ExportError(f"{path} and {paths[0]} differ in {differing} "
                              f"({_difference(settings[0], other, differing)}): folds of one model must share their "
                              f"config; export them as separate models")
    s = settings[0]
    networks = {f"fold{i}": _network(s["network_class"], s["network_kwargs"], checkpoint["state_dict"], path)
                for i, (path, checkpoint) in enumerate(zip(paths, checkpoints))}
    notes = []
    orientation = "ras" if s["orientation_ras"] else "ct"
    spacing = _auto3dseg_spacing(s, args.spacing_xyz_mm, paths[0], notes)
    channel_ops = _auto3dseg_channels(s, paths[0], notes)
    if s["crop_foreground"] and not s["extra_modalities"]:
        notes.append("Auto3DSeg cropped the image to its foreground (> 0, margin 10) before the window; hnseg runs "
                     "the window over the ROI box, so only the tile positions differ")
    head = _head(sigmoid=s["sigmoid"], n_outputs=s["output_classes"], class_index=s["class_index"],
                 labels=args.labels, regions=None, where=f"{paths[0]} config")
    window = s["window"]
    return MonaiModel("auto3dseg", s["network_class"], s["network_kwargs"], networks, channel_ops, head,
                      orientation, spacing, list(s["roi_size"]), window["overlap"], window["mode"] == "gaussian",
                      window["sw_batch_size"], [_file_record(p) for p in paths], notes)


def _auto3dseg_checkpoint(path: Path, *, trust: bool) -> dict:
    checkpoint = _torch_load(path, trust=trust)
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict)
            and isinstance(checkpoint.get("config"), dict)):
        keys = sorted(checkpoint)[:SHOWN] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ExportError(f"{path} is not an Auto3DSeg segresnet checkpoint (a dict with 'state_dict' and 'config', "
                          f"as Segmenter.checkpoint_save writes; found {keys}): pass the model.pt of an Auto3DSeg "
                          f"segresnet fold, or a MONAI bundle folder")
    return checkpoint


def _auto3dseg_settings(config: dict, path: Path) -> dict:
    """The config values that define the network and the recipe, resolved, with segmenter.py's defaults
    (Segmenter.parse_input_config) for keys the config leaves out."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(dict(config))

    def value(key, default):
        try:
            return parser.get_parsed_content(key, instantiate=False) if key in parser.config else default
        except Exception as error:  # a "$" expression or "@" reference of the config; any failure means the same
            raise ExportError(f"{path}: config key {key!r} cannot be resolved ({type(error).__name__}: {error})") \
                from error

    if "network" not in parser.config:
        raise ExportError(f"{path}: the checkpoint's config has no 'network' section: not an Auto3DSeg segresnet "
                          f"checkpoint")
    if value("custom_data_transforms", []):
        raise ExportError(f"{path}: config custom_data_transforms {value('custom_data_transforms', [])} replace "
                          f"Auto3DSeg's own transforms and cannot be expressed as recipe ops; supported: the built-in "
                          f"normalize_modes {list(AUTO3DSEG_MODES)}")
    modality = str(value("modality", "mri")).lower()
    settings = {
        "roi_size": _ints(value("roi_size", [128, 128, 128]), 3, "roi_size", path),
        "orientation_ras": bool(value("orientation_ras", False)),
        "resample": bool(value("resample", False)),
        "resample_resolution": value("resample_resolution", [1.0, 1.0, 1.0]),
        "normalize_mode": value("normalize_mode", "range" if modality == "ct" else "meanstd"),
        "intensity_bounds": value("intensity_bounds", [-250, 250]),
        "extra_modalities": dict(value("extra_modalities", {}) or {}),
        "cache_image_int16": bool(value("cache_image_int16", False)),
        "crop_foreground": bool(value("crop_foreground", True)),
        "sigmoid": bool(value("sigmoid", False)),
        "class_index": value("class_index", None),
        "input_channels": value("input_channels", None),
        "output_classes": value("output_classes", None),
    }
    component = parser.get_parsed_content("network", instantiate=False)
    settings["network_class"], kwargs = _component(component, "network", path, NETWORK_CLASSES)
    settings["network_kwargs"] = _segmenter_network_kwargs(kwargs, settings, anisotropic=bool(
        value("anisotropic_scales", False)), network_class=settings["network_class"])
    settings["window"] = _auto3dseg_window(parser, settings["roi_size"], path)
    n_out = settings["network_kwargs"].get("out_channels")
    if settings["output_classes"] is None or (n_out is not None and n_out != settings["output_classes"]):
        settings["output_classes"] = n_out
    return settings


def _segmenter_network_kwargs(kwargs: dict, settings: dict, *, anisotropic: bool, network_class: str) -> dict:
    """As Segmenter.setup_model: apex's INSTANCE_NVFUSER norm is InstanceNorm3d (same parameters and maths; the
    segmenter itself falls back to it without apex), and anisotropic_scales gives SegResNetDS the resolution."""
    from monai.networks.layers.factories import split_args

    kwargs = dict(kwargs)
    norm_name, norm_args = split_args(kwargs.get("norm", ""))
    if str(norm_name).upper() == "INSTANCE_NVFUSER":
        kwargs["norm"] = "INSTANCE" if not norm_args else ["INSTANCE", norm_args]
    if anisotropic and network_class.endswith("SegResNetDS") and "resolution" not in kwargs:
        kwargs["resolution"] = list(settings["resample_resolution"])
    return kwargs


def _auto3dseg_window(parser, roi_size: list[int], path: Path) -> dict:
    if "sliding_inferrer" not in parser.config or parser.config["sliding_inferrer"] is None:
        return dict(AUTO3DSEG_WINDOW)
    component = parser.get_parsed_content("sliding_inferrer", instantiate=False)
    _, kwargs = _component(component, "sliding_inferrer", path, INFERER_CLASSES)
    return _window(kwargs, roi_size, f"{path} config sliding_inferrer")


def _auto3dseg_spacing(s: dict, spacing_arg, path: Path, notes: list[str]) -> list[float]:
    if not s["resample"]:
        if spacing_arg is None:
            raise ExportError(f"{path}: the model was trained without resampling (config resample: false), at its "
                              f"images' own spacing, which the checkpoint does not record: pass --spacing-xyz-mm X Y "
                              f"Z (the training images' spacing; the config's resample_resolution is "
                              f"{s['resample_resolution']})")
        notes.append(f"trained without resampling; the spacing {list(spacing_arg)} mm was given by the user")
        return [float(v) for v in spacing_arg]
    if spacing_arg is not None:
        raise ExportError(f"--spacing-xyz-mm {list(spacing_arg)}: the model was trained resampled to "
                          f"resample_resolution {s['resample_resolution']} ({path}); leave the option out")
    spacing = _positive(s["resample_resolution"], 3, "resample_resolution", path)
    notes.append("MONAI's Spacingd (min_pixdim/max_pixdim = 0.75/1.25 × pixdim in Auto3DSeg) keeps an axis whose "
                 f"native spacing is within that range; hnseg resamples every axis to {spacing} mm")
    return spacing


def _auto3dseg_channels(s: dict, path: Path, notes: list[str]) -> list[list[dict]]:
    """DataTransformBuilder.get_normalize_transforms: the main image's normalize_mode on each of its channels, then
    one channel per extra modality with its own mode; ConcatItemsd in that order."""
    extra = s["extra_modalities"]
    n_image = (s["input_channels"] or s["network_kwargs"].get("in_channels", 1)) - len(extra)
    if n_image < 1:
        raise ExportError(f"{path}: input_channels {s['input_channels']} leaves no channel for the main image next "
                          f"to extra_modalities {list(extra)}")
    groups = [(IMAGE_KEY, n_image, s["normalize_mode"])] + [(key, 1, mode) for key, mode in extra.items()]
    channels = []
    for key, count, mode in groups:
        group = _auto3dseg_mode(mode, s["intensity_bounds"], key=key, path=path, notes=notes)
        if key == IMAGE_KEY and s["cache_image_int16"]:
            notes.append("cache_image_int16: Auto3DSeg truncated the main image to int16 before normalising (< 1 "
                         "unit for CT in HU); hnseg does not")
        channels += _expand(group, count, key=key, where=f"{path} config")
    return channels


def _auto3dseg_mode(mode: str, bounds, *, key: str, path: Path, notes: list[str]) -> Group:
    """One normalize_mode as recipe ops (segmenter.py DataTransformBuilder.get_normalize_transforms)."""
    if mode == "none":
        return Group()
    if mode in ("range", "ct"):  # ScaleIntensityRanged(bounds → [-1, 1], clip=False), then sigmoid
        if bounds is None:
            bounds = [-250, 250]
            notes.append("intensity_bounds missing: Auto3DSeg assumed [-250, 250], and so does the recipe")
        lo, hi = (float(b) for b in _numbers(bounds, 2, "intensity_bounds", path))
        scale = _scale_range(lo, hi, -1.0, 1.0, clip=False, where=f"{path} intensity_bounds")
        return Group(scale + [{"op": "sigmoid"}])
    if mode in ("meanstd", "mri"):  # NormalizeIntensityd(nonzero=True, channel_wise=True)
        notes.append(f"{key}: z-score over the non-zero voxels of the model's input grid (the ROI box); MONAI took "
                     f"it over the whole image")
        return Group([{"op": "zscore", "over": "nonzero"}])
    if mode == "meanstdtanh":  # ... then 3·tanh(x/3) = 6·sigmoid(2x/3) − 3
        notes.append(f"{key}: z-score over the non-zero voxels of the model's input grid (the ROI box); MONAI took "
                     f"it over the whole image")
        return Group([{"op": "zscore", "over": "nonzero"}, {"op": "scale", "factor": 2 / 3}, {"op": "sigmoid"},
                      {"op": "scale", "factor": 6.0, "offset": -3.0}])
    if mode == "pet":  # sigmoid((x − x.min()) / x.std()) over all of the key's channels
        notes.append(f"{key}: min and std over the model's input grid (the ROI box); MONAI took them over the whole "
                     f"image")
        return Group([{"op": "min_over_std"}, {"op": "sigmoid"}], joint_statistics="normalize_mode 'pet'")
    raise ExportError(f"{path}: normalize_mode {mode!r} (image key {key!r}) has no recipe equivalent; supported: "
                      f"{', '.join(AUTO3DSEG_MODES)}")


# -------------------------------------------------------------------------------------------------- MONAI bundles

def read_bundle(folder: Path, args) -> MonaiModel:
    from monai.bundle import ConfigParser

    config_file = next((folder / name for name in BUNDLE_CONFIGS if (folder / name).is_file()), None)
    if config_file is None:
        raise ExportError(f"{folder} is not a MONAI bundle: none of {list(BUNDLE_CONFIGS)} exists; pass a bundle "
                          f"folder or Auto3DSeg checkpoint files")
    weights = folder / BUNDLE_WEIGHTS
    if not weights.is_file():
        raise ExportError(f"{folder}: bundle weights {BUNDLE_WEIGHTS} not found (a TorchScript model.ts cannot be "
                          f"rebuilt): save the network's state_dict there")
    parser = ConfigParser()
    try:
        parser.read_config(str(config_file))
    except Exception as error:  # JSON/YAML syntax errors of several libraries
        raise ExportError(f"{config_file} cannot be read ({type(error).__name__}: {error}): fix the file") from error
    parser["bundle_root"] = str(folder)
    for key in ("network_def", "preprocessing", "inferer"):
        if key not in parser.config:
            raise ExportError(f"{config_file}: no {key!r}; a bundle for export needs network_def, preprocessing, "
                              f"inferer and postprocessing")
    network_class, network_kwargs = _component(_parsed(parser, "network_def", config_file), "network_def",
                                               config_file, NETWORK_CLASSES)
    state_dict = _bundle_state_dict(_torch_load(weights, trust=args.trust_checkpoint), weights)
    networks = {"fold0": _network(network_class, network_kwargs, state_dict, weights)}
    notes = []
    geometry, groups = _bundle_preprocessing(parser, config_file, notes)
    if "spacing" not in geometry:
        if args.spacing_xyz_mm is None:
            raise ExportError(f"{config_file}: the preprocessing has no Spacingd, so the model runs at each image's "
                              f"own spacing: pass --spacing-xyz-mm X Y Z (its training images' spacing)")
        geometry["spacing"] = [float(v) for v in args.spacing_xyz_mm]
        notes.append(f"no Spacingd; the spacing {geometry['spacing']} mm was given by the user")
    elif args.spacing_xyz_mm is not None:
        raise ExportError(f"--spacing-xyz-mm {list(args.spacing_xyz_mm)}: {config_file} resamples to "
                          f"{geometry['spacing']} mm (Spacingd); leave the option out")
    _, inferer_kwargs = _component(_parsed(parser, "inferer", config_file), "inferer", config_file, INFERER_CLASSES)
    roi_size = _ints(inferer_kwargs.get("roi_size"), 3, "inferer roi_size", config_file)
    window = _window(inferer_kwargs, roi_size, f"{config_file} inferer")
    n_in = network_kwargs.get("in_channels", 1)
    channel_ops = _bundle_channels(groups, n_in, config_file)
    sigmoid = _bundle_activation(parser, config_file)
    head = _head(sigmoid=sigmoid, n_outputs=network_kwargs.get("out_channels", 2), class_index=None,
                 labels=args.labels, regions=args.regions, where=str(config_file))
    return MonaiModel("bundle", network_class, network_kwargs, networks, channel_ops, head,
                      geometry.get("orientation", "ct"), geometry["spacing"], roi_size, window["overlap"],
                      window["mode"] == "gaussian", window["sw_batch_size"],
                      [_file_record(config_file), _file_record(weights)], notes)


def _bundle_state_dict(loaded, path: Path) -> dict:
    """A plain state_dict, or one under 'model'/'state_dict' (CheckpointSaver / CheckpointLoader's load_dict)."""
    if isinstance(loaded, dict) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return loaded
    for key in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            return loaded[key]
    raise ExportError(f"{path} holds neither a state_dict nor one under 'model'/'state_dict' "
                      f"({type(loaded).__name__}): save network.state_dict() there")


def _bundle_preprocessing(parser, config_file: Path, notes: list[str]) -> tuple[dict, dict[str, list[Group]]]:
    """Walk preprocessing#transforms, keeping the geometry and, per data key, its channel groups with their ops."""
    transforms = parser.config["preprocessing"].get("transforms") if isinstance(
        parser.config["preprocessing"], dict) else None
    if not isinstance(transforms, list):
        raise ExportError(f"{config_file}: preprocessing must be a Compose with a 'transforms' list")
    geometry, groups = {}, {}
    for i in range(len(transforms)):
        item = f"preprocessing#transforms#{i}"
        class_path, kwargs = _component(_parsed(parser, item, config_file), item, config_file, None)
        _apply_transform(class_path.rsplit(".", 1)[-1], kwargs, geometry, groups,
                         where=f"{config_file} {item} ({class_path.rsplit('.', 1)[-1]})", notes=notes)
    if IMAGE_KEY not in groups:
        raise ExportError(f"{config_file}: no preprocessing transform produces {IMAGE_KEY!r}, the network's input")
    return geometry, groups


def _apply_transform(name: str, kwargs: dict, geometry: dict, groups: dict[str, list[Group]], *, where: str,
                     notes: list[str]) -> None:
    keys = [kwargs["keys"]] if isinstance(kwargs.get("keys"), str) else list(kwargs.get("keys") or [])
    for key in keys:
        groups.setdefault(key, [Group()])
    if name in NEUTRAL_TRANSFORMS:
        return
    if name == "CastToTyped" and "float" in str(kwargs.get("dtype")):
        return
    if name == "Orientationd":
        _set_geometry(geometry, "orientation", {"RAS": "ras", "LPS": "lps"}.get(str(kwargs.get("axcodes")).upper()),
                      where, f"axcodes {kwargs.get('axcodes')!r}: the recipe's grids are along RAS, LPS or the "
                      f"image's own axes")
    elif name == "Spacingd":
        _set_geometry(geometry, "spacing", _spacing(kwargs, where, notes), where, "")
        modes = kwargs.get("mode", "bilinear")
        modes = list(modes) if isinstance(modes, (list, tuple)) else [modes] * len(keys)
        for key, mode in zip(keys, modes):
            for group in groups[key]:
                group.interpolation = str(getattr(mode, "value", mode)).lower()
    elif name == "CropForegroundd":
        notes.append(f"{where}: MONAI cropped to the foreground before the window; hnseg runs the window over the "
                     f"ROI box, so only the tile positions differ")
    elif name == "ConcatItemsd":
        if kwargs.get("dim", 0) != 0:
            raise ExportError(f"{where}: concatenation along dim {kwargs.get('dim')}; only channels (dim 0) are "
                              f"supported")
        groups[kwargs["name"]] = [Group(list(g.ops), g.joint_statistics, g.interpolation) for key in keys for g in groups[key]]
    elif name in ("ScaleIntensityRanged", "NormalizeIntensityd", "ScaleIntensityd"):
        for key in keys:
            for group in groups[key]:
                ops, joint = _intensity_ops(name, kwargs, where)
                group.ops += ops
                group.joint_statistics = group.joint_statistics or joint
                if joint and len(groups[key]) > 1:
                    raise ExportError(f"{where}: statistics over all channels of {key!r} at once (channel_wise "
                                      f"false) cannot be taken per channel; set channel_wise: true")
    else:
        raise ExportError(f"{where}: transform {name} has no recipe equivalent; supported: "
                          f"{', '.join(MAPPED_TRANSFORMS)}, and the neutral {', '.join(NEUTRAL_TRANSFORMS)}")


def _set_geometry(geometry: dict, key: str, value, where: str, why: str) -> None:
    if value is None:
        raise ExportError(f"{where}: {why}")
    if key in geometry and geometry[key] != value:
        raise ExportError(f"{where}: {key} {value} differs from an earlier transform's {geometry[key]}: the image "
                          f"keys must share one grid")
    geometry[key] = value


def _spacing(kwargs: dict, where: str, notes: list[str]) -> list[float]:
    pixdim = kwargs.get("pixdim")
    spacing = [float(p) for p in (pixdim if isinstance(pixdim, (list, tuple)) else [pixdim] * 3)]
    if len(spacing) != 3 or any(p <= 0 for p in spacing):
        raise ExportError(f"{where}: pixdim {pixdim} must be 3 positive spacings (a non-positive entry keeps the "
                          f"image's own spacing, which a recipe cannot)")
    if kwargs.get("min_pixdim") is not None or kwargs.get("max_pixdim") is not None:
        notes.append(f"{where}: Spacingd keeps an axis whose spacing is within min_pixdim/max_pixdim; hnseg "
                     f"resamples every axis to {spacing} mm")
    return spacing


def _intensity_ops(name: str, kwargs: dict, where: str) -> tuple[list[dict], str | None]:
    """(recipe ops, name of the joint statistic or None) for one intensity transform on one channel group."""
    if name == "ScaleIntensityRanged":
        return _scale_range(float(kwargs["a_min"]), float(kwargs["a_max"]), kwargs.get("b_min"), kwargs.get("b_max"),
                            clip=bool(kwargs.get("clip", False)), where=where), None
    channel_wise = bool(kwargs.get("channel_wise", False))
    if name == "ScaleIntensityd":
        if kwargs.get("factor") is not None or kwargs.get("minv") is None or kwargs.get("maxv") is None:
            raise ExportError(f"{where}: only the min-max form (minv, maxv, no factor) is supported")
        return [{"op": "minmax", "to": [float(kwargs["minv"]), float(kwargs["maxv"])]}], \
            None if channel_wise else f"{name}(channel_wise=False)"
    subtrahend, divisor, nonzero = kwargs.get("subtrahend"), kwargs.get("divisor"), bool(kwargs.get("nonzero"))
    if subtrahend is None and divisor is None:
        return [{"op": "zscore", "over": "nonzero" if nonzero else "all"}], \
            None if channel_wise else f"{name}(channel_wise=False)"
    if nonzero or subtrahend is None or divisor is None or not all(
            isinstance(v, (int, float)) for v in (subtrahend, divisor)):
        raise ExportError(f"{where}: NormalizeIntensityd with subtrahend {subtrahend!r} and divisor {divisor!r} "
                          f"(nonzero {nonzero}): only both as numbers, nonzero false, is supported")
    return [{"op": "scale", "factor": 1.0 / float(divisor), "offset": -float(subtrahend) / float(divisor)}], None


def _bundle_channels(groups: dict[str, list[Group]], n_in: int, where: Path) -> list[list[dict]]:
    image = groups[IMAGE_KEY]
    if bad := sorted({g.interpolation for g in image} - {"bilinear"}):
        raise ExportError(f"{where}: Spacingd resamples input images with mode {bad}; the recipe samples them "
                          f"linearly (bilinear)")
    if len(image) == n_in:
        return [_expand(g, 1, key=IMAGE_KEY, where=str(where))[0] for g in image]
    if len(image) == 1:
        return _expand(image[0], n_in, key=IMAGE_KEY, where=str(where))
    raise ExportError(f"{where}: {IMAGE_KEY!r} is made of {len(image)} image keys but the network takes {n_in} "
                      f"channels: the channels of each key cannot be told apart")


def _bundle_activation(parser, where: Path) -> bool:
    """True for sigmoid, False for softmax: the Activationsd of postprocessing."""
    post = parser.config.get("postprocessing")
    transforms = post.get("transforms", []) if isinstance(post, dict) else []
    for i, transform in enumerate(transforms):
        if isinstance(transform, dict) and str(transform.get("_target_", "")).endswith("Activationsd"):
            kwargs = _parsed(parser, f"postprocessing#transforms#{i}", where).resolve_args()
            if bool(kwargs.get("softmax")) != bool(kwargs.get("sigmoid")):
                return bool(kwargs.get("sigmoid"))
    raise ExportError(f"{where}: postprocessing has no Activationsd with softmax or sigmoid, so the head is "
                      f"unknown: add one (e.g. {{\"_target_\": \"Activationsd\", \"keys\": \"pred\", \"softmax\": "
                      f"true}})")


# ------------------------------------------------------------------------------------------------- shared pieces

def _component(component, item: str, where, allowed: tuple[str, ...] | None) -> tuple[str, dict]:
    """(class path, constructor kwargs with the class's defaults filled) of a resolved config component."""
    class_path = component.resolve_module_name() if hasattr(component, "resolve_module_name") else None
    if not class_path:
        raise ExportError(f"{where}: {item!r} is not a component with a '_target_' class")
    if allowed is not None and class_path not in allowed:
        raise ExportError(f"{where}: {item!r} is {class_path}; supported: {', '.join(allowed)}")
    kwargs = dict(component.resolve_args())
    signature = inspect.signature(pydoc.locate(class_path))
    try:
        bound = signature.bind_partial(**kwargs)
    except TypeError as error:
        raise ExportError(f"{where}: {item!r} arguments {sorted(kwargs)} do not fit {class_path} ({error})") from error
    bound.apply_defaults()
    arguments = {}
    for name, value in bound.arguments.items():  # **kwargs flattened, *args dropped
        kind = signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        elif kind != inspect.Parameter.VAR_POSITIONAL:
            arguments[name] = value
    return class_path, arguments


def _parsed(parser, item: str, where):
    try:
        return parser.get_parsed_content(item, instantiate=False)
    except Exception as error:  # references and "$" expressions of the config
        raise ExportError(f"{where}: {item!r} cannot be resolved ({type(error).__name__}: {error})") from error


def _network(class_path: str, kwargs: dict, state_dict: dict, path: Path) -> torch.nn.Module:
    """The real monai class built from the config's kwargs, with the weights loaded strictly."""
    try:
        network = pydoc.locate(class_path)(**kwargs)
    except Exception as error:  # the constructor validates its arguments with several exception types
        raise ExportError(f"{path}: {class_path} cannot be built from the config's arguments {_jsonable(kwargs)} "
                          f"({type(error).__name__}: {error})") from error
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from DistributedDataParallel
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return load_strictly(network, state_dict, source=f"{path}: the weights ({class_path} built from the config)",
                         fix="The checkpoint and its config disagree")


def _window(kwargs: dict, roi_size: list[int], where: str) -> dict:
    """The inferer's overlap, blending and batch; refuse what the recipe's monai tiling cannot reproduce."""
    inferer_roi = kwargs.get("roi_size", roi_size)
    if inferer_roi is not None and list(inferer_roi) != list(roi_size):
        raise ExportError(f"{where}: roi_size {list(inferer_roi)} differs from the model's roi_size {roi_size}")
    overlap = kwargs.get("overlap", 0.25)
    if not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise ExportError(f"{where}: overlap {overlap!r}; the recipe takes one overlap in [0, 1) for every axis")
    mode = str(getattr(kwargs.get("mode", "constant"), "value", kwargs.get("mode", "constant")))
    if mode not in ("gaussian", "constant"):
        raise ExportError(f"{where}: blending mode {mode!r}; supported: gaussian, constant")
    if mode == "gaussian" and kwargs.get("sigma_scale", 0.125) != 0.125:
        raise ExportError(f"{where}: sigma_scale {kwargs.get('sigma_scale')!r}; the recipe's MONAI Gaussian has "
                          f"sigma_scale 0.125")
    padding = str(getattr(kwargs.get("padding_mode", "constant"), "value", kwargs.get("padding_mode", "constant")))
    if padding != "constant" or float(kwargs.get("cval", 0.0)) != 0.0:
        raise ExportError(f"{where}: padding {padding!r} with cval {kwargs.get('cval')}; the recipe pads small "
                          f"images with zeros (padding_mode constant, cval 0)")
    return {"overlap": float(overlap), "mode": mode, "sw_batch_size": int(kwargs.get("sw_batch_size", 1))}


def _head(*, sigmoid: bool, n_outputs: int, class_index, labels: list[int], regions, where: str) -> dict:
    """softmax: output k is training label k → labels[k]; sigmoid: output k covers the labels of class_index[k]
    (or --regions), painted in order, each region as the one label no later region covers."""
    if not sigmoid:
        if class_index:
            raise ExportError(f"{where}: class_index {class_index} with a softmax head is not supported (Auto3DSeg "
                              f"trains class_index models with sigmoid)")
        if n_outputs > len(labels):
            raise ExportError(f"{where}: the network has {n_outputs} softmax outputs but --labels maps {len(labels)} "
                              f"label values ({labels}): give one hnseg label per training label value")
        mapped = list(labels[:n_outputs])
        if len(set(mapped)) != len(mapped) or not set(mapped) <= {0, 1, 2} or 0 not in mapped:
            raise ExportError(f"{where}: --labels {labels} maps the {n_outputs} outputs to {mapped}; they must be "
                              f"distinct hnseg labels 0, 1 (GTVp), 2 (GTVn), including 0")
        return {"type": "softmax", "labels": mapped}
    covered = _sigmoid_regions(class_index, labels, regions, where)
    if len(covered) != n_outputs:
        raise ExportError(f"{where}: the network has {n_outputs} sigmoid outputs but {len(covered)} regions are "
                          f"given ({covered})")
    region_labels = []
    for k, region in enumerate(covered):
        own = set(region) - {label for later in covered[k + 1:] for label in later}
        if len(own) != 1:
            raise ExportError(f"{where}: region {k} {sorted(region)} leaves {sorted(own)} to paint after the later "
                              f"regions {covered[k + 1:]}; decoding needs exactly one label per region")
        region_labels.append(own.pop())
    return {"type": "sigmoid", "regions": [sorted(r) for r in covered], "region_labels": region_labels}


def _sigmoid_regions(class_index, labels: list[int], regions, where: str) -> list[set[int]]:
    if class_index:
        try:
            covered = [{labels[int(v)] for v in index} for index in class_index]
        except (IndexError, TypeError, ValueError) as error:
            raise ExportError(f"{where}: class_index {class_index} names label values that --labels {labels} does "
                              f"not map") from error
    elif regions:
        try:
            covered = [{int(v) for v in str(region).split(",")} for region in regions]
        except ValueError as error:
            raise ExportError(f"--regions {regions}: give label lists such as 1 2 or 1,2 2") from error
    else:
        raise ExportError(f"{where}: a sigmoid head needs the labels each output covers: pass --regions (e.g. 1 2)")
    if any(not region or not region <= {1, 2} for region in covered):
        raise ExportError(f"{where}: sigmoid regions {[sorted(r) for r in covered]} must be non-empty sets of hnseg "
                          f"labels 1 (GTVp) and 2 (GTVn)")
    return covered


def _expand(group: Group, count: int, *, key: str, where: str) -> list[list[dict]]:
    if count > 1 and group.joint_statistics:
        raise ExportError(f"{where}: {group.joint_statistics} takes its statistics over all {count} channels of "
                          f"{key!r} at once; the recipe normalises each channel on its own")
    return [list(group.ops) for _ in range(count)]


def _channels(channel_ops: list[list[dict]], sources: list[str], *, pet_values: str) -> list[dict]:
    if len(sources) != len(channel_ops):
        raise ExportError(f"the network takes {len(channel_ops)} input channel(s) but --channel-sources names "
                          f"{len(sources)} ({' '.join(sources)}): give one source (ct, pet, zero) per channel")
    return [{"source": source, "interpolation": "linear",
             "ops": ([{"op": "suv"}] if source == "pet" and pet_values == "suv" else []) + ops}
            for source, ops in zip(sources, channel_ops)]


def _scale_range(a_min: float, a_max: float, b_min, b_max, *, clip: bool, where: str) -> list[dict]:
    """ScaleIntensityRange: (x − a_min)/(a_max − a_min) · (b_max − b_min) + b_min, clipped to [b_min, b_max]."""
    if a_max == a_min:
        raise ExportError(f"{where}: a_min == a_max == {a_min}: an empty intensity range")
    b_lo, b_hi = (0.0, 1.0) if b_min is None or b_max is None else (float(b_min), float(b_max))
    if clip:
        if a_max < a_min or b_hi <= b_lo or b_min is None:
            raise ExportError(f"{where}: clipped range [{a_min}, {a_max}] → [{b_min}, {b_max}] must increase on "
                              f"both sides")
        return [{"op": "window", "min": a_min, "max": a_max, "to": [b_lo, b_hi]}]
    factor = (b_hi - b_lo) / (a_max - a_min)
    return [{"op": "scale", "factor": factor, "offset": b_lo - a_min * factor}]


def _torch_load(path: Path, *, trust: bool):
    if not Path(path).is_file():
        raise ExportError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as error:
        if trust:
            raise ExportError(f"{path} cannot be read as a torch checkpoint ({error})") from error
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        raise ExportError(f"{path} holds Python objects beyond tensors and plain values ("
                          f"{found.group(1) if found else 'refused by torch.load weights_only=True'}): if you trust "
                          f"the file, pass --trust-checkpoint") from error
    except (RuntimeError, EOFError, OSError) as error:
        raise ExportError(f"{path} cannot be read as a torch checkpoint ({type(error).__name__}: {error})") from error


def _roi_and_postprocess(roi_text: str, postprocess_text: str) -> tuple[dict, dict]:
    """Checked before the slow export: a typo costs seconds."""
    roi, postprocess = json_object(roi_text, "--roi"), json_object(postprocess_text, "--postprocess")
    check_roi_and_postprocess(roi, postprocess)
    return roi, postprocess


def _numbers(value, n: int, key: str, where) -> list[float]:
    if not (isinstance(value, (list, tuple)) and len(value) == n
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ExportError(f"{where}: {key} must be {n} numbers, got {value!r}")
    return [float(v) for v in value]


def _positive(value, n: int, key: str, where) -> list[float]:
    numbers = _numbers(value, n, key, where)
    if any(v <= 0 for v in numbers):
        raise ExportError(f"{where}: {key} must be positive, got {value!r}")
    return numbers


def _ints(value, n: int, key: str, where) -> list[int]:
    numbers = _positive(value, n, key, where)
    if any(v != int(v) for v in numbers):
        raise ExportError(f"{where}: {key} must be whole numbers, got {value!r}")
    return [int(v) for v in numbers]


def _difference(a: dict, b: dict, keys: list[str]) -> str:
    return "; ".join(f"{k}: {_jsonable(a[k])} vs {_jsonable(b[k])}" for k in keys[:SHOWN])


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _file_record(path: Path) -> dict:
    return {"file": str(path), "sha256": file_sha256(path)}


def _monai_version() -> str:
    import monai

    return monai.__version__
