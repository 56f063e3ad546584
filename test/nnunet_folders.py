"""nnU-Net v2 trained model folders built in the test: plans.json, dataset.json and fold_k/checkpoint_final.pth with
random weights, in the layout and with the keys nnUNetPredictor.initialize_from_trained_model_folder reads.

The networks are small (3 stages, 4-16 features) so that export and prediction take seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHITECTURES = {
    "PlainConvUNet": ("dynamic_network_architectures.architectures.unet.PlainConvUNet", "n_conv_per_stage"),
    "ResidualEncoderUNet": ("dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                            "n_blocks_per_stage"),
}
CT_PROPERTIES = {"max": 300.0, "mean": 60.0, "median": 55.0, "min": -200.0, "percentile_00_5": -150.0,
                 "percentile_99_5": 250.0, "std": 70.0}
PET_PROPERTIES = {"max": 30.0, "mean": 6.0, "median": 5.0, "min": 0.0, "percentile_00_5": 0.5,
                  "percentile_99_5": 25.0, "std": 4.0}


def plans_dict(*, architecture: str, patch_size, spacing, transpose_forward=(0, 1, 2),
               normalization=("CTNormalization", "ZScoreNormalization"), features=(4, 8, 16)) -> dict:
    """A plans.json for one 3d_fullres configuration; `patch_size` and `spacing` in the network's axis order.
    Stage 0 convolves in-plane only (as nnU-Net plans anisotropic data); each further stage halves the size."""
    class_name, blocks_key = ARCHITECTURES[architecture]
    n = len(features)
    arch_kwargs = {"n_stages": n, "features_per_stage": list(features),
                   "conv_op": "torch.nn.modules.conv.Conv3d",
                   "kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * (n - 1),
                   "strides": [[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * (n - 2),
                   blocks_key: [1] + [2] * (n - 1) if architecture == "ResidualEncoderUNet" else [2] * n,
                   "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
                   "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                   "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                   "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    backward = [list(transpose_forward).index(i) for i in range(3)]
    return {
        "dataset_name": "Dataset900_TestHN", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing), "original_median_shape_after_transp": [40, 40, 40],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": list(transpose_forward),
        "transpose_backward": backward, "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": CT_PROPERTIES, "1": PET_PROPERTIES},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": list(patch_size), "median_image_size_in_voxels": [40, 40, 40],
            "spacing": list(spacing), "normalization_schemes": list(normalization),
            "use_mask_for_norm": [False] * len(normalization),
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": {"network_class_name": class_name, "arch_kwargs": arch_kwargs,
                             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": False}},
    }


def dataset_dict(*, regions: bool = False) -> dict:
    labels = ({"background": 0, "GTVp+GTVn": [1, 2], "GTVn": 2} if regions
              else {"background": 0, "GTVp": 1, "GTVn": 2})
    dataset = {"channel_names": {"0": "CT", "1": "PET"}, "labels": labels, "numTraining": 4, "file_ending": ".mha"}
    if regions:
        dataset["regions_class_order"] = [1, 2]
    return dataset


def build_network(plans: dict, dataset: dict):
    """The network exactly as nnU-Net's predictor builds it (deep supervision off)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration("3d_fullres")
    n_out = plans_manager.get_label_manager(dataset).num_segmentation_heads
    return nnUNetTrainer.build_network_architecture(plans_manager, configuration, len(dataset["channel_names"]),
                                                    n_out, enable_deep_supervision=False)


def write_results_folder(root: Path, *, architecture: str = "PlainConvUNet", folds=(0, 1), patch_size=(16, 32, 32),
                         spacing=(3.0, 2.0, 2.0), transpose_forward=(0, 1, 2), regions: bool = False,
                         mirror_axes=(0, 1, 2), seed: int = 0, features=(4, 8, 16),
                         normalization=("CTNormalization", "ZScoreNormalization")) -> Path:
    """root/Dataset900_TestHN/nnUNetTrainer__nnUNetPlans__3d_fullres with one random-weight checkpoint per fold."""
    plans = plans_dict(architecture=architecture, patch_size=patch_size, spacing=spacing,
                       transpose_forward=transpose_forward, normalization=normalization, features=features)
    dataset = dataset_dict(regions=regions)
    folder = Path(root) / "Dataset900_TestHN" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))
    for fold in folds:
        torch.manual_seed(seed + fold)
        network = build_network(plans, dataset)
        with torch.no_grad():  # non-trivial norms, so that a mishandled affine parameter shows
            for name, parameter in network.named_parameters():
                if "norm" in name:
                    parameter.add_(0.2 * torch.randn_like(parameter))
        (folder / f"fold_{fold}").mkdir()
        torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                    "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": fold,
                                  "dataset_json": dataset},
                    "inference_allowed_mirroring_axes": tuple(mirror_axes) if mirror_axes else None,
                    "current_epoch": 1},
                   folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def preprocessed(predictor, case_files) -> "np.ndarray":
    """The case as nnU-Net's own preprocessor makes it (crop, normalise, resample, transpose)."""
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _, _ = preprocessor.run_case([str(p) for p in case_files], None, predictor.plans_manager,
                                       predictor.configuration_manager, predictor.dataset_json)
    return data


def balance_classes(results: Path, case_files) -> None:
    """Shift each fold's output biases by minus its mean logits on the case, so that every label wins somewhere:
    a random network otherwise predicts one label nearly everywhere and a Dice of it says little."""
    import numpy as np
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(results), None)
    data = preprocessed(predictor, case_files)
    data = data[:, :: max(1, data.shape[1] // 32)]  # every few slices: the mean needs no more
    data = np.pad(data, [(0, 0)] + [(0, -n % 16) for n in data.shape[1:]])  # whole strides of the deepest stage
    for fold, network_weights in zip(sorted(results.glob("fold_*")), predictor.list_of_parameters):
        predictor.network.load_state_dict(network_weights)
        with torch.no_grad():
            mean_logits = predictor.network(torch.from_numpy(data[None])).mean(dim=(0, 2, 3, 4))
        checkpoint = torch.load(fold / "checkpoint_final.pth", weights_only=False)
        bias = max((k for k in checkpoint["network_weights"] if "seg_layers" in k and k.endswith("bias")),
                   key=lambda k: int(k.split("seg_layers.")[1].split(".")[0]))
        checkpoint["network_weights"][bias] -= mean_logits
        torch.save(checkpoint, fold / "checkpoint_final.pth")
