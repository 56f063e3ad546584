"""nnU-Net v2 trained model folders built in the test: plans.json, dataset.json and fold_k/checkpoint_final.pth with
random weights, in the layout and with the keys nnUNetPredictor.initialize_from_trained_model_folder reads.

The networks are small (3 stages, 4-16 features) so that export and prediction take seconds on a CPU. The folder
writer itself is hnseg_export.nnunet_results (export/train_demo.py writes its trained models with it too).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hnseg_export import nnunet_results
from hnseg_export.nnunet_results import ARCHITECTURES, build_network  # noqa: F401 - used by tests and bench

DATASET_NAME = "Dataset900_TestHN"
CT_PROPERTIES = {"max": 300.0, "mean": 60.0, "median": 55.0, "min": -200.0, "percentile_00_5": -150.0,
                 "percentile_99_5": 250.0, "std": 70.0}
PET_PROPERTIES = {"max": 30.0, "mean": 6.0, "median": 5.0, "min": 0.0, "percentile_00_5": 0.5,
                  "percentile_99_5": 25.0, "std": 4.0}


def plans_dict(*, architecture: str, patch_size, spacing, transpose_forward=(0, 1, 2),
               normalization=("CTNormalization", "ZScoreNormalization"), features=(4, 8, 16)) -> dict:
    """A plans.json for one 3d_fullres configuration; `patch_size` and `spacing` in the network's axis order.
    Stage 0 convolves in-plane only (as nnU-Net plans anisotropic data); each further stage halves the size."""
    n = len(features)
    network_kwargs = nnunet_results.arch_kwargs(
        architecture=architecture, features=features, kernel_sizes=[[1, 3, 3]] + [[3, 3, 3]] * (n - 1),
        strides=[[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * (n - 2),
        blocks_per_stage=[1] + [2] * (n - 1) if architecture == "ResidualEncoderUNet" else [2] * n)
    return nnunet_results.plans_dict(dataset_name=DATASET_NAME, architecture=architecture,
                                     network_kwargs=network_kwargs, patch_size=patch_size, spacing=spacing,
                                     normalization=normalization, transpose_forward=transpose_forward,
                                     intensity_properties={"0": CT_PROPERTIES, "1": PET_PROPERTIES})


def dataset_dict(*, regions: bool = False) -> dict:
    labels = ({"background": 0, "GTVp+GTVn": [1, 2], "GTVn": 2} if regions
              else {"background": 0, "GTVp": 1, "GTVn": 2})
    return nnunet_results.dataset_dict(channel_names=("CT", "PET"), labels=labels,
                                       regions_class_order=[1, 2] if regions else None)


def write_results_folder(root: Path, *, architecture: str = "PlainConvUNet", folds=(0, 1), patch_size=(16, 32, 32),
                         spacing=(3.0, 2.0, 2.0), transpose_forward=(0, 1, 2), regions: bool = False,
                         mirror_axes=(0, 1, 2), seed: int = 0, features=(4, 8, 16),
                         normalization=("CTNormalization", "ZScoreNormalization")) -> Path:
    """root/Dataset900_TestHN/nnUNetTrainer__nnUNetPlans__3d_fullres with one random-weight checkpoint per fold."""
    plans = plans_dict(architecture=architecture, patch_size=patch_size, spacing=spacing,
                       transpose_forward=transpose_forward, normalization=normalization, features=features)
    dataset = dataset_dict(regions=regions)
    folder = nnunet_results.results_folder(root, DATASET_NAME)
    if folder.exists():
        raise FileExistsError(f"{folder} exists")
    weights = {}
    for fold in folds:
        torch.manual_seed(seed + fold)
        network = build_network(plans, dataset)
        with torch.no_grad():  # non-trivial norms, so that a mishandled affine parameter shows
            for name, parameter in network.named_parameters():
                if "norm" in name:
                    parameter.add_(0.2 * torch.randn_like(parameter))
        weights[fold] = network.state_dict()
    return nnunet_results.write_results_folder(folder, plans=plans, dataset=dataset, fold_weights=weights,
                                               mirror_axes=mirror_axes)


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
