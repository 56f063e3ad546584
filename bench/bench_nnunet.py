"""Benchmark: nnUNetPredictor (PyTorch, CPU) vs hnseg (CPU: its default backend, OpenVINO, and onnxruntime) on the
same nnU-Net model folder and case.

Both run end to end from the same image files in a fresh process each (so each peak resident memory is its own):
nnU-Net:  nnUNetPredictor.initialize_from_trained_model_folder + predict_from_files_sequential (read, crop, normalise,
          resample, sliding window, resample logits back, write the mask).
hnseg:    load_recipe + predict_files + write the mask, from the weights folder export/to_onnx.py nnunet wrote.

Model: an nnU-Net v2 results folder written here (PlainConvUNet, 5 stages of 16-256 features, 2 folds, random
weights with balanced class biases), until the trained demo model exists (issue 4). Case: a synthetic head-and-neck
PET/CT (CT 512×512 at 0.98×0.98×2 mm), the PET resampled onto the CT grid beforehand, since nnU-Net needs its
channels on one grid. Agreement: Dice per label of hnseg's mask against nnU-Net's.

    .venv/bin/python bench/bench_nnunet.py [--repeats 1] [--mirror] [--keep DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "test")]
import machine  # noqa: E402  (bench/)

from hnseg_infer.tools.phantom import make_phantom  # noqa: E402

FEATURES = (16, 32, 64, 128, 256)
PATCH_ZYX, SPACING_ZYX_MM = (48, 128, 128), (3.0, 2.0, 2.0)


def write_case(folder: Path) -> list[Path]:
    phantom = make_phantom(seed=11, fov="head-neck")
    pet_on_ct = sitk.Resample(phantom.pet, phantom.ct, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    paths = [folder / "case_0000.mha", folder / "case_0001.mha"]
    sitk.WriteImage(sitk.Cast(phantom.ct, sitk.sitkInt16), str(paths[0]))
    sitk.WriteImage(pet_on_ct, str(paths[1]))
    return paths


def peak_rss_mib() -> float:
    """This process's own peak resident memory (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def route_nnunet(results: Path, weights: Path, case: list[Path], out: Path) -> Path:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(2)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, device=torch.device("cpu"),
                                perform_everything_on_device=False, verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(results), None)
    out.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential([[str(p) for p in case]], str(out), save_probabilities=False,
                                            overwrite=True, folder_with_segs_from_prev_stage=None)
    return out / "case.mha"


def route_hnseg(results: Path, weights: Path, case: list[Path], out: Path, backend: str = "auto") -> Path:
    from hnseg_infer.recipe.load import load_recipe
    from hnseg_infer.segmenter import Segmenter

    mask = Segmenter(load_recipe(weights), device="cpu", backend=backend).predict(case[0], case[1]).mask
    out.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(mask, str(out / "case.mha"), useCompression=True)
    return out / "case.mha"


def route_hnseg_onnxruntime(results: Path, weights: Path, case: list[Path], out: Path) -> Path:
    return route_hnseg(results, weights, case, out, backend="onnxruntime")


# "hnseg": the default CPU backend (OpenVINO where installed); "hnseg-ort": onnxruntime, as before OpenVINO
ROUTES = {"nnunet": route_nnunet, "hnseg": route_hnseg, "hnseg-ort": route_hnseg_onnxruntime}


def _child(name, args, queue):
    try:
        start = time.perf_counter()
        path = ROUTES[name](*args)
        queue.put((time.perf_counter() - start, peak_rss_mib(), str(path)))
    except BaseException:
        queue.put(None)  # the parent must not wait for a result that will never come
        raise


def measure(name: str, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(name, args, queue))
    process.start()
    result = queue.get()
    process.join()
    if result is None or process.exitcode:
        raise SystemExit(f"route {name} failed (exit {process.exitcode})")
    return result


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def build_model(folder: Path, case: list[Path], mirror: bool) -> tuple[Path, Path]:
    # imported here: the routes' fresh processes re-import this module, and hnseg's must not load torch
    from nnunet_folders import balance_classes, write_results_folder

    from hnseg_export import from_nnunet

    results = write_results_folder(folder / "nnUNet_results", features=FEATURES, patch_size=PATCH_ZYX,
                                   spacing=SPACING_ZYX_MM, mirror_axes=(0, 1, 2) if mirror else ())
    balance_classes(results, case)
    parser = argparse.ArgumentParser()
    from_nnunet.add_arguments(parser)
    for flag in ("--fp16", "--overwrite"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("--out", type=Path)
    weights = from_nnunet.export(parser.parse_args([str(results), "--out", str(folder / "weights")]))
    return results, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--mirror", action="store_true", help="mirroring TTA on all 3 axes (8x the network work)")
    parser.add_argument("--keep", type=Path, default=None, help="work here instead of a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        case = write_case(folder)
        ct = sitk.ReadImage(str(case[0]))
        print(machine.describe())
        print(f"case: CT {ct.GetSize()} @ {np.round(ct.GetSpacing(), 2).tolist()} mm, PET on the CT grid")
        start = time.perf_counter()
        results, weights = build_model(folder, case, args.mirror)
        print(f"model: PlainConvUNet features {FEATURES}, patch {PATCH_ZYX} at {SPACING_ZYX_MM} mm (z, y, x), 2 folds, "
              f"mirroring {'on' if args.mirror else 'off'}; export + proof {time.perf_counter() - start:.0f} s")
        runs = {name: [] for name in ROUTES}
        masks = {}
        for repeat in range(args.repeats):
            for name in ROUTES:  # interleaved, so drift in machine load hits both alike
                wall, rss, path = measure(name, results, weights, case, folder / f"{name}-{repeat}")
                runs[name].append((wall, rss))
                masks[name] = sitk.GetArrayFromImage(sitk.ReadImage(path))
        print(f"{'route':9} {'wall s (median)':>16} {'peak RSS MiB (max)':>19}")
        summary = {}
        for name, values in runs.items():
            summary[name] = (statistics.median(v[0] for v in values), max(v[1] for v in values))
            print(f"{name:9} {summary[name][0]:16.1f} {summary[name][1]:19.0f}")
        reference, ours = masks["nnunet"], masks["hnseg"]
        dices = {label: dice(ours == label, reference == label) for label in (1, 2)}
        print(f"hnseg / nnU-Net: wall {summary['hnseg'][0] / summary['nnunet'][0]:.2f}x (goal <= 0.5), peak memory "
              f"{summary['hnseg'][1] / summary['nnunet'][1]:.2f}x (goal <= 0.5); Dice vs nnU-Net's labels: GTVp "
              f"{dices[1]:.4f}, GTVn {dices[2]:.4f} (nnU-Net voxels {int((reference == 1).sum())}, "
              f"{int((reference == 2).sum())}); voxel agreement {(ours == reference).mean():.5f}; "
              f"{args.repeats} repeat(s), 2 cores")
        ort = masks["hnseg-ort"]
        print(f"hnseg (default backend) / hnseg-ort: wall {summary['hnseg'][0] / summary['hnseg-ort'][0]:.2f}x, peak "
              f"memory {summary['hnseg'][1] / summary['hnseg-ort'][1]:.2f}x; hnseg-ort / nnU-Net: wall "
              f"{summary['hnseg-ort'][0] / summary['nnunet'][0]:.2f}x; voxel agreement of the two hnseg masks "
              f"{(ours == ort).mean():.6f}; hnseg-ort Dice vs nnU-Net: GTVp {dice(ort == 1, reference == 1):.4f}, "
              f"GTVn {dice(ort == 2, reference == 2):.4f}")


if __name__ == "__main__":
    main()
