"""Parity of the demo's fine nnU-Net model: hnseg vs nnUNetPredictor run from the same results folder, on the same
cases and the same region, as label agreement (Dice per label) on the CT voxels.

The region is each case's fine ROI as hnseg's cascade found it (from the run reports bench/eval_demo.py wrote),
cut from the native CT on whole voxels. nnU-Net gets what its user would give it: the four channels [x, x², x^(1/3),
y] computed on those native CT voxels (the PET first put onto them by the recipe's `pet_to_ct` interpolation, since
nnU-Net needs one grid), then its own preprocessing (resampling to 1 mm), sliding window and logit resampling back.
hnseg runs the exported ONNX model through its own path (the recipe's resampling, its sliding window, its restore)
onto the same voxels.

    .venv/bin/python bench/eval_demo.py                 # writes the cases and run reports first
    .venv/bin/python bench/parity_demo_nnunet.py [--results NNUNET_RESULTS_FOLDER] [--work /tmp/hnseg-eval]

--results defaults to the fine nnU-Net folder export/train_demo.py leaves in its --work folder (/tmp/hnseg-train).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parent.parent
TRAIN_WORK = Path("/tmp/hnseg-train")  # export/train_demo.py --work: the native models weights/demo came from
sys.path.insert(0, str(ROOT))
from hnseg_infer.channels.build import build_input, model_grid  # noqa: E402
from hnseg_infer.channels.intensity import apply_ops  # noqa: E402
from hnseg_infer.geometry.grid import Box, Grid  # noqa: E402
from hnseg_infer.inference.runner import LoadedModel  # noqa: E402
from hnseg_infer.io.images import discover_inputs, load_case  # noqa: E402
from hnseg_infer.recipe.load import load_recipe  # noqa: E402
from hnseg_infer.restore.ensemble import Ensemble  # noqa: E402
from hnseg_infer.tools.metrics import dice  # noqa: E402


def fine_roi(report: dict) -> Box:
    (stage,) = [s for s in report["stages"] if s["name"] == "fine"]
    return Box.from_dict(stage["roi"]["box"])


def hnseg_labels(model: LoadedModel, grid: Grid, image_czyx: np.ndarray, target: Grid) -> np.ndarray:
    """Our labels from the model-grid input, restored onto `target` (the CT voxels of the region, or the model grid)."""
    ensemble = Ensemble.for_models((model.spec,))
    return ensemble.decode([ensemble.member(model.spec, model.probabilities(image_czyx), grid)], target)


def native_channels(case, spec, region: Grid, pet_to_ct: str) -> np.ndarray:
    """nnU-Net's input as its user would make it: the channels on the native CT voxels of `region`, the PET put
    there first by `pet_to_ct` interpolation (nnU-Net needs one grid)."""
    ct = sitk.Resample(case.ct, region.reference_image(), sitk.Transform(), sitk.sitkNearestNeighbor, -1024.0,
                       sitk.sitkFloat32)  # the native CT voxels (the region lies on the CT's lattice)
    pet = sitk.Resample(case.pet, region.reference_image(), sitk.Transform(), INTERPOLATORS[pet_to_ct], 0.0,
                        sitk.sitkFloat32)
    sources = {"ct": sitk.GetArrayFromImage(ct), "pet": sitk.GetArrayFromImage(pet)}
    return np.stack([apply_ops(sources[c.source], c.ops, suv_per_stored_value=case.pet_unit.suv_per_stored_value)
                     for c in spec.channels])


def nnunet_labels(predictor, channels_czyx: np.ndarray, spacing_xyz_mm) -> np.ndarray:
    """nnUNetPredictor's labels on the input's own grid (its resampling to the model spacing and back included)."""
    properties = {"spacing": [float(v) for v in spacing_xyz_mm[::-1]]}
    return np.asarray(predictor.predict_single_npy_array(channels_czyx, properties, None, None, False), np.uint8)


INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}


def make_predictor(results: Path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(results), None)
    return predictor


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=TRAIN_WORK / "native" / "nnunet" / "Dataset963_DemoHNFineNnunet"
                        / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "demo")
    parser.add_argument("--model", default="fine_nnunet", help="the recipe model exported from --results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hnseg-eval"))
    parser.add_argument("--cases", type=int, default=None, help="only the first N cases")
    parser.add_argument("--level", choices=("pipeline", "model"), default="pipeline",
                        help="pipeline (default): from the native voxels to the CT voxels, each its own way; model: "
                             "the same model-grid input to both, labels compared on the model grid")
    parser.add_argument("--pet-to-ct", choices=tuple(INTERPOLATORS), default=None,
                        help="how nnU-Net's PET channel is put on the CT voxels first (pipeline level; default: the "
                             "recipe model's pet_to_ct)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    (spec,) = [m for m in load_recipe(args.weights).models if m.name == args.model]
    model = LoadedModel.load(spec, device="cpu")
    predictor = make_predictor(args.results)
    predictor.use_mirroring = bool(spec.tiling.mirror_axes_zyx)
    pet_to_ct = args.pet_to_ct or spec.grid.pet_to_ct
    rows, totals = [], {1: [0, 0, 0], 2: [0, 0, 0]}
    for report_path in sorted((args.work / "pred").glob("*.report.json"))[:args.cases]:
        name = report_path.name.removesuffix(".report.json")
        case = load_case(*discover_inputs(args.work / "cases" / name / "input"))
        region, _ = case.ct_grid.crop_to(fine_roi(json.loads(report_path.read_text())))
        grid = model_grid(spec, region.box(), case.ct_grid)
        image_czyx = build_input(case, grid, spec)
        if args.level == "model":  # the same input; on the model grid nnU-Net's resampling is the identity
            ours = hnseg_labels(model, grid, image_czyx, grid)
            theirs = nnunet_labels(predictor, image_czyx, grid.spacing_xyz_mm)
        else:
            ours = hnseg_labels(model, grid, image_czyx, region)
            native = native_channels(case, spec, region, pet_to_ct)
            theirs = nnunet_labels(predictor, native, region.spacing_xyz_mm)
        row = [name]
        for label in (1, 2):
            a, b = ours == label, theirs == label
            counts = (int((a & b).sum()), int(a.sum()), int(b.sum()))
            totals[label] = [t + c for t, c in zip(totals[label], counts)]
            row.append(dice(*counts))
        row.append(float((ours == theirs).mean()))
        rows.append(row)
        voxels = ", ".join(f"{label_name} {int((ours == label).sum())}/{int((theirs == label).sum())}"
                           for label, label_name in ((1, "GTVp"), (2, "GTVn")))
        print(f"{name}: Dice GTVp {row[1]:.4f}, GTVn {row[2]:.4f}, voxel agreement {row[3]:.6f} (voxels hnseg/"
              f"nnU-Net: {voxels})", flush=True)
    print(f"\n{len(rows)} cases ({args.level} level); Dice per label (hnseg vs nnUNetPredictor, voxels pooled over "
          f"cases): "
          f"GTVp {dice(*totals[1]):.4f}, GTVn {dice(*totals[2]):.4f} (nnU-Net's voxels: GTVp {totals[1][2]}, GTVn "
          f"{totals[2][2]}); "
          f"lowest per case: GTVp {min(r[1] for r in rows):.4f}, GTVn {min(r[2] for r in rows):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
