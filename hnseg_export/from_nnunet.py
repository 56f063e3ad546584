"""nnU-Net v2: a trained model folder (plans.json, dataset.json, fold_k/checkpoint) → one ONNX per fold + recipe.

The network is rebuilt by nnU-Net itself (nnUNetPredictor.initialize_from_trained_model_folder: the trainer's
build_network_architecture, deep supervision off), so any architecture nnU-Net can build is exported as it runs
there. The recipe reproduces nnUNetPredictor: the configuration's spacing and patch, transpose_forward, per-channel
normalisation with the dataset's foreground statistics, the checkpoint's mirroring axes, step 0.5, Gaussian
weighting, fold logits averaged, softmax labels or sigmoid regions in regions_class_order.

The recipe model resamples as nnUNetPredictor does (`"resampling": "nnunet"`): every channel on the CT's voxels
(the PET interpolated there by --pet-to-ct, as the user's dataset conversion did), normalised there, resampled to
the model grid by nnU-Net's rule (cubic; in-plane cubic and nearest across slices more than 3x thicker than the
pixels), and back linearly by the same rule (in logit space, as nnU-Net, when the model is alone in its stage; in
an ensemble its probabilities). Known, small differences: the image borders are mirrored where nnU-Net repeats
the edge, and a `use_mask_for_norm` z-score is taken over the channel's non-zero voxels (nnU-Net: the non-zero
region of all channels). The end-to-end parity test and bench/parity_demo_nnunet.py measure what these cost.
"""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

from hnseg_infer.channels.intensity import validate_ops
from hnseg_infer.errors import ExportError
from hnseg_infer.io.atomic import file_sha256

from .onnx_export import check_roi_and_postprocess, export_folds, json_object, staged_weights, write_recipe

DEFAULT_CHECKPOINT = "checkpoint_final.pth"
# dataset.json channel name (lower case) → hnseg channel source
CHANNEL_SOURCES = {"ct": "ct", "pet": "pet", "pt": "pet", "suv": "pet", "fdg": "pet", "fdg-pet": "pet"}
# nnU-Net resampling order of the image data → our interpolation of the native image
INTERPOLATION_BY_ORDER = {1: "linear", 3: "bspline"}


def add_arguments(parser) -> None:
    parser.add_argument("results_dir", type=Path,
                        help="nnU-Net trained model folder (e.g. .../Dataset001_X/nnUNetTrainer__nnUNetPlans__"
                             "3d_fullres) holding plans.json, dataset.json and fold_k/<checkpoint>")
    parser.add_argument("--folds", nargs="+", default=None,
                        help="folds to export (default: every fold_k holding the checkpoint)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"checkpoint file name ({DEFAULT_CHECKPOINT})")
    parser.add_argument("--channel-sources", nargs="+", choices=("ct", "pet", "zero"), default=None,
                        help="the hnseg source of each input channel, in dataset.json order (default: from "
                             "channel_names: CT → ct, PET/PT → pet)")
    parser.add_argument("--pet-values", choices=("suv", "stored"), default="suv",
                        help="what the PET channel held in training: SUV (default: inputs in Bq/mL are converted "
                             "to SUV first) or the stored values as they are")
    parser.add_argument("--pet-to-ct", choices=("linear", "bspline"), default="linear",
                        help="how the training data's PET was put on the CT grid before nnU-Net saw it (default "
                             "linear); inference does the same")
    parser.add_argument("--channel-ops", default=None, metavar="JSON",
                        help="what made each training input channel from its source before nnU-Net saw it: a JSON "
                             "list with one list of recipe ops per channel (e.g. [[{\"op\": \"power\", "
                             "\"exponent\": 2}]] for a squared CT), applied before the plans' normalisation")
    parser.add_argument("--roi", default='{"method": "ct_extent"}',
                        help="the recipe's ROI as JSON (default: the whole CT, as nnU-Net predicts)")
    parser.add_argument("--tile-batch", type=int, default=2, help="tiles per network call (default 2)")
    parser.add_argument("--no-mirroring", action="store_true", help="no mirroring test-time augmentation")
    parser.add_argument("--name", default=None, help="recipe name (default: dataset and configuration)")


def export(args) -> Path:
    results = Path(args.results_dir)
    roi = json_object(args.roi, "--roi")
    check_roi_and_postprocess(roi, {})
    if args.tile_batch < 1:
        raise ExportError(f"--tile-batch must be >= 1, got {args.tile_batch}")
    folds = _check_folder(results, args.folds, args.checkpoint)
    predictor = _load_predictor(results, folds, args.checkpoint)
    plans, config = predictor.plans_manager, predictor.configuration_manager
    if config.previous_stage_name is not None:
        raise ExportError(f"{results}: configuration {_configuration_name(predictor)!r} is a cascade stage that takes "
                          f"the segmentation of {config.previous_stage_name!r} as input; export a 3d_fullres or "
                          f"3d_lowres model instead")
    name = args.name or f"{plans.dataset_name}_{_configuration_name(predictor)}".lower()
    networks = {}
    for fold, parameters in zip(folds, predictor.list_of_parameters):
        network = copy.deepcopy(predictor.network)
        network.load_state_dict(parameters)
        networks[fold] = network.eval()
    channels = _channels(predictor, args.channel_sources, args.pet_values,
                         _channel_ops(args.channel_ops))
    head = _head(predictor.label_manager)
    with staged_weights(args.out, overwrite=args.overwrite) as staging:
        files, provenance = export_folds(networks, staging, n_channels=len(channels),
                                         patch_zyx=tuple(config.patch_size), head=head["type"], fp16=args.fp16,
                                         source=_source(results, folds, args.checkpoint, predictor))
        model = {"name": name, "files": files, "spacing_xyz_mm": _spacing_xyz_mm(config.spacing,
                                                                                 plans.transpose_forward),
                 "orientation": "ct", "transpose_forward": list(plans.transpose_forward),
                 "patch_size_zyx": list(config.patch_size), "channels": channels, "head": head,
                 "fold_average": "logits", "step_fraction": 0.5,
                 "mirror_axes_zyx": [] if args.no_mirroring else list(predictor.allowed_mirroring_axes or ()),
                 "tile_batch": args.tile_batch, "gaussian": True, "grid_spacing": "fit_roi",
                 "resampling": "nnunet", "pet_to_ct": args.pet_to_ct,
                 "provenance": {**provenance, "notes": _resampling_notes(config)}}
        write_recipe(staging, name=name, roi=roi, models=[model], postprocess={},
                     description=f"nnU-Net v2 {predictor.trainer_name} {plans.plans_name} "
                                 f"{_configuration_name(predictor)}, folds {', '.join(folds)}, from {results}")
    return Path(args.out)


def _check_folder(results: Path, folds, checkpoint: str) -> list[str]:
    """The fold folder names to export; names the missing piece before nnU-Net fails on it with a bare
    FileNotFoundError."""
    for required in ("plans.json", "dataset.json"):
        if not (results / required).is_file():
            raise ExportError(f"{results / required} not found: pass the nnU-Net trained model folder (the one "
                              f"holding plans.json, dataset.json and fold_0 ...), not the dataset or results root")
    try:
        dataset = json.loads((results / "dataset.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{results / 'dataset.json'} is not valid JSON ({error}): restore it from the "
                          f"nnU-Net_raw dataset folder") from error
    values = {v for name, value in dataset.get("labels", {}).items() if name != "ignore"
              for v in (value if isinstance(value, list) else [value])}
    if not values <= {0, 1, 2}:
        raise ExportError(f"{results / 'dataset.json'}: labels {dataset.get('labels')} use values {sorted(values)}; "
                          f"hnseg writes HECKTOR's 0 background, 1 GTVp, 2 GTVn: retrain with those values")
    found = _fold_names(results, folds, checkpoint)
    if not found:
        raise ExportError(f"{results}: no fold_*/{checkpoint}: pass --checkpoint (e.g. checkpoint_best.pth) or "
                          f"train a fold first")
    return found


def _fold_names(results: Path, folds, checkpoint: str) -> list[str]:
    if folds is None:
        return sorted(p.parent.name for p in results.glob(f"fold_*/{checkpoint}"))
    names = [f"fold_{f}" for f in folds]
    for name in names:
        if not (results / name / checkpoint).is_file():
            raise ExportError(f"{results / name / checkpoint} not found: check --folds and --checkpoint")
    return names


def _load_predictor(results: Path, folds: list[str], checkpoint: str):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                device=torch.device("cpu"), perform_everything_on_device=False, verbose=False,
                                allow_tqdm=False)
    use_folds = [int(f[len("fold_"):]) if f != "fold_all" else "all" for f in folds]
    try:
        predictor.initialize_from_trained_model_folder(str(results), use_folds, checkpoint_name=checkpoint)
    except (KeyError, AttributeError, RuntimeError, ValueError, TypeError, EOFError, pickle.UnpicklingError) as error:
        # Unpickling/EOF: a damaged checkpoint; KeyError: one without network_weights/trainer_name;
        # AttributeError: trainer class not found; RuntimeError: weights that do not fit the network of the plans.
        raise ExportError(f"{results}: nnU-Net could not rebuild the trained network ({type(error).__name__}: "
                          f"{str(error)[:300]}): check that plans.json matches the checkpoints and that a custom "
                          f"trainer class is importable (installed in nnunetv2.training.nnUNetTrainer)") from error
    return predictor


def _configuration_name(predictor) -> str:
    for name in predictor.plans_manager.available_configurations:
        configuration = predictor.plans_manager.get_configuration(name).configuration
        if configuration == predictor.configuration_manager.configuration:
            return name
    return "unknown"


def _spacing_xyz_mm(spacing_network_order, transpose_forward) -> list[float]:
    """The configuration's spacing is in the network's axis order; the recipe's is x, y, z of the CT's axes."""
    spacing_zyx = [0.0] * 3
    for network_axis, array_axis in enumerate(transpose_forward):
        spacing_zyx[array_axis] = float(spacing_network_order[network_axis])
    return spacing_zyx[::-1]


def _channel_ops(text: str | None) -> list | None:
    if text is None:
        return None
    try:
        ops = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExportError(f"--channel-ops is not valid JSON ({exc}): give a list of op lists, one per channel") from exc
    if not isinstance(ops, list) or not all(isinstance(channel, list) for channel in ops):
        raise ExportError(f"--channel-ops must be a JSON list of op lists (one per channel), got {text!r}")
    return ops


def _channels(predictor, sources, pet_values: str, channel_ops: list | None = None) -> list[dict]:
    names = predictor.dataset_json.get("channel_names", predictor.dataset_json.get("modality", {}))
    names = [str(names[k]) for k in sorted(names, key=int)]
    if sources is None:
        unknown = [n for n in names if n.lower() not in CHANNEL_SOURCES]
        if unknown:
            raise ExportError(f"dataset.json channel_names {names}: cannot tell the source of {unknown}; pass "
                              f"--channel-sources with one of ct/pet/zero per channel, in order")
        sources = [CHANNEL_SOURCES[n.lower()] for n in names]
    if len(sources) != len(names):
        raise ExportError(f"--channel-sources gives {len(sources)} sources but dataset.json has {len(names)} "
                          f"channels {names}")
    config, plans = predictor.configuration_manager, predictor.plans_manager
    order = config.configuration.get("resampling_fn_data_kwargs", {}).get("order", 3)
    interpolation = INTERPOLATION_BY_ORDER.get(order, "bspline")
    if channel_ops is not None and len(channel_ops) != len(names):
        raise ExportError(f"--channel-ops gives {len(channel_ops)} op lists but dataset.json has {len(names)} "
                          f"channels {names}")
    channels = []
    for index, (name, source) in enumerate(zip(names, sources)):
        scheme = config.normalization_schemes[index]
        given = channel_ops[index] if channel_ops is not None else []
        made = [op.to_json() for op in validate_ops(given, source=source, where=f"--channel-ops[{index}] ({name})")]
        converts = source == "pet" and pet_values == "suv" and not any(op["op"] == "suv" for op in made)
        ops = [{"op": "suv"}] * converts + made
        ops += _normalisation(scheme, config.use_mask_for_norm[index],
                              plans.foreground_intensity_properties_per_channel.get(str(index)), name)
        channels.append({"source": source, "interpolation": interpolation, "ops": ops, "ops_before_sampling": True})
    return channels


def _resampling_notes(config) -> list[str]:
    """Where the configuration's resampling differs from nnU-Net's default rule, which hnseg reproduces."""
    notes = []
    for key, orders in (("resampling_fn_data_kwargs", (1, 3)), ("resampling_fn_probabilities_kwargs", (1,))):
        kwargs = config.configuration.get(key, {})
        if kwargs.get("force_separate_z") is not None or kwargs.get("order_z", 0) != 0 \
                or kwargs.get("order", orders[-1]) not in orders:
            notes.append(f"{key} {kwargs}: hnseg resamples by nnU-Net's default rule (order {orders[-1]}, nearest "
                         f"across slices > 3x thicker than the pixels); expect small differences")
    return notes


def _normalisation(scheme: str, use_mask: bool, properties: dict | None, channel: str) -> list[dict]:
    """nnU-Net's normalisation scheme as recipe ops (default_normalization_schemes.py)."""
    if scheme == "CTNormalization":
        if not properties:
            raise ExportError(f"plans.json has no foreground_intensity_properties_per_channel for channel {channel!r}"
                              f", which CTNormalization needs: re-run nnUNetv2_plan_and_preprocess")
        return [{"op": "nnunet_ct", **{k: float(properties[k])
                                       for k in ("percentile_00_5", "percentile_99_5", "mean", "std")}}]
    if scheme == "ZScoreNormalization":
        return [{"op": "zscore", "over": "nonzero" if use_mask else "all"}]
    if scheme == "RescaleTo01Normalization":
        return [{"op": "minmax", "to": [0.0, 1.0]}]
    if scheme == "NoNormalization":
        return []
    raise ExportError(f"channel {channel!r} uses normalisation {scheme!r}, which hnseg cannot reproduce (supported: "
                      f"CTNormalization, ZScoreNormalization, RescaleTo01Normalization, NoNormalization)")


def _head(label_manager) -> dict:
    """softmax over all labels, or sigmoid regions painted in regions_class_order (values checked beforehand)."""
    if label_manager.has_regions:
        regions = [sorted(r) if isinstance(r, (list, tuple)) else [int(r)] for r in label_manager.foreground_regions]
        return {"type": "sigmoid", "regions": regions, "region_labels": list(label_manager.regions_class_order)}
    return {"type": "softmax", "labels": [int(v) for v in label_manager.all_labels]}


def _source(results: Path, folds: list[str], checkpoint: str, predictor) -> dict:
    from importlib.metadata import version

    return {"route": "nnunet", "nnunetv2": version("nnunetv2"), "results_dir": str(results.resolve()),
            "trainer": predictor.trainer_name,
            "plans": predictor.plans_manager.plans_name, "configuration": _configuration_name(predictor),
            "labels": predictor.dataset_json.get("labels"),
            "sha256": {name: file_sha256(results / name) for name in
                       ("plans.json", "dataset.json", *[f"{f}/{checkpoint}" for f in folds])}}


