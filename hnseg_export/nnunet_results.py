"""nnU-Net v2 trained model folders: plans.json, dataset.json and fold_k/checkpoint_final.pth, in the layout and with
the keys nnUNetPredictor.initialize_from_trained_model_folder reads (and export/to_onnx.py nnunet exports).

Used by the tests (random weights, test/nnunet_folders.py) and by export/train_demo.py (trained weights): the plans
hold one 3d_fullres configuration whose network dynamic_network_architectures builds from `arch_kwargs`, exactly as
nnU-Net's trainer and predictor build it.
"""

from __future__ import annotations

import json
from pathlib import Path

ARCHITECTURES = {
    "PlainConvUNet": ("dynamic_network_architectures.architectures.unet.PlainConvUNet", "n_conv_per_stage"),
    "ResidualEncoderUNet": ("dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                            "n_blocks_per_stage"),
}
CONFIGURATION = "3d_fullres"
TRAINER = "nnUNetTrainer"
PLANS_NAME = "nnUNetPlans"


def arch_kwargs(*, architecture: str, features, kernel_sizes, strides, blocks_per_stage,
                conv_per_stage_decoder=None) -> dict:
    """The plans' `arch_kwargs` of a PlainConvUNet / ResidualEncoderUNet (InstanceNorm, LeakyReLU, no dropout);
    `kernel_sizes` and `strides` in the network's axis order, one per stage."""
    _, blocks_key = ARCHITECTURES[architecture]
    n = len(features)
    if not (len(kernel_sizes) == len(strides) == len(blocks_per_stage) == n):
        raise ValueError(f"{n} stages need {n} kernel sizes, strides and block counts, got {len(kernel_sizes)}, "
                         f"{len(strides)}, {len(blocks_per_stage)}")
    return {"n_stages": n, "features_per_stage": list(features), "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [list(k) for k in kernel_sizes], "strides": [list(s) for s in strides],
            blocks_key: list(blocks_per_stage),
            "n_conv_per_stage_decoder": list(conv_per_stage_decoder or [1] * (n - 1)), "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}


UNUSED_INTENSITY_PROPERTIES = {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0, "percentile_00_5": -1.0,
                               "percentile_99_5": 1.0, "std": 1.0}  # placeholders: only CTNormalization reads them


def plans_dict(*, dataset_name: str, architecture: str, network_kwargs: dict, patch_size, spacing, normalization,
               intensity_properties: dict | None = None, transpose_forward=(0, 1, 2), batch_size: int = 2,
               median_shape=(40, 40, 40), resampling_order: int = 3) -> dict:
    """A plans.json with one 3d_fullres configuration; `patch_size`, `spacing` and `median_shape` in the network's
    axis order; `normalization` one scheme per input channel (e.g. "CTNormalization", "NoNormalization");
    `intensity_properties` the foreground statistics per channel index ("0", "1", ...) CTNormalization reads."""
    class_name, _ = ARCHITECTURES[architecture]
    backward = [list(transpose_forward).index(i) for i in range(3)]
    properties = dict(intensity_properties or {})
    for index, scheme in enumerate(normalization):
        if str(index) in properties:
            continue
        if scheme == "CTNormalization":
            raise ValueError(f"channel {index} (CTNormalization) needs its foreground intensity_properties")
        # nnUNetPredictor's preprocessor looks the entry up for every channel, even where its scheme does not use it
        properties[str(index)] = dict(UNUSED_INTENSITY_PROPERTIES)
    data_kwargs = {"is_seg": False, "order": resampling_order, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": dataset_name, "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": list(spacing), "original_median_shape_after_transp": list(median_shape),
        "image_reader_writer": "SimpleITKIO", "transpose_forward": list(transpose_forward),
        "transpose_backward": backward, "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": properties,
        "configurations": {CONFIGURATION: {
            "data_identifier": f"{PLANS_NAME}_{CONFIGURATION}", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": batch_size, "patch_size": list(patch_size), "median_image_size_in_voxels": list(median_shape),
            "spacing": list(spacing), "normalization_schemes": list(normalization),
            "use_mask_for_norm": [False] * len(normalization),
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": data_kwargs,
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": {"network_class_name": class_name, "arch_kwargs": network_kwargs,
                             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": False}},
    }


def dataset_dict(*, channel_names, labels: dict, num_training: int = 4, regions_class_order=None) -> dict:
    """dataset.json: `channel_names` in input order, `labels` name → value (or list of values for a region)."""
    dataset = {"channel_names": {str(i): str(name) for i, name in enumerate(channel_names)}, "labels": dict(labels),
               "numTraining": num_training, "file_ending": ".mha"}
    if regions_class_order is not None:
        dataset["regions_class_order"] = list(regions_class_order)
    return dataset


def build_network(plans: dict, dataset: dict, *, deep_supervision: bool = False):
    """The network exactly as nnU-Net's trainer (deep supervision on) or predictor (off) builds it."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration(CONFIGURATION)
    n_out = plans_manager.get_label_manager(dataset).num_segmentation_heads
    return nnUNetTrainer.build_network_architecture(plans_manager, configuration, len(dataset["channel_names"]),
                                                    n_out, enable_deep_supervision=deep_supervision)


def results_folder(root: Path, dataset_name: str) -> Path:
    """root/<dataset_name>/nnUNetTrainer__nnUNetPlans__3d_fullres, as nnU-Net names its trained model folders."""
    return Path(root) / dataset_name / f"{TRAINER}__{PLANS_NAME}__{CONFIGURATION}"


def write_results_folder(folder: Path, *, plans: dict, dataset: dict, fold_weights: dict, mirror_axes=(0, 1, 2),
                         current_epoch: int = 1, extra: dict | None = None) -> Path:
    """plans.json, dataset.json and fold_<k>/checkpoint_final.pth for each fold k → state dict in `fold_weights`;
    `mirror_axes` (network order) are the checkpoint's inference_allowed_mirroring_axes (None or () for none);
    `extra` adds keys to each checkpoint (e.g. a training log)."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))
    for fold, state_dict in fold_weights.items():
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save({"network_weights": state_dict, "trainer_name": TRAINER,
                    "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": fold,
                                  "dataset_json": dataset},
                    "inference_allowed_mirroring_axes": tuple(mirror_axes) if mirror_axes else None,
                    "current_epoch": current_epoch, **(extra or {})},
                   folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder
