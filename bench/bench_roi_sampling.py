"""Benchmark: read → ROI → model-grid sampling, hnseg's route against the naive route, in one run.

hnseg:  read CT and PET → locate the head-and-neck box on the native PET → sample CT and PET straight onto the
        model grid (1 mm, 200×200×310 mm box): one interpolation, only the voxels the model needs.
naive:  read CT and PET → resample the whole PET onto the whole CT grid → crop both to the box → resample the crop
        onto the model grid (as many hand-written containers do).

Each route runs in a fresh process so its peak resident memory is its own. Case: a synthetic whole-body PET/CT
(CT 512×512×~500 at 0.98×0.98×2 mm stored as int16, PET 200×200×~330 at 4 mm), written as .mha first.

    .venv/bin/python bench/bench_roi_sampling.py [--repeats 3] [--keep DIR]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hnseg_infer.geometry.grid import Grid, sample  # noqa: E402
from hnseg_infer.io.images import FILL_VALUE, load_case  # noqa: E402
from hnseg_infer.roi.locate import locate_roi  # noqa: E402
from hnseg_infer.tools.phantom import make_phantom  # noqa: E402

MODEL_SPACING_XYZ_MM = (1.0, 1.0, 1.0)
ROI = ("pet_threshold_head_neck_box", {})


def write_case(folder: Path) -> tuple[Path, Path]:
    phantom = make_phantom(seed=7, fov="whole-body", ct_spacing_xyz_mm=(0.98, 0.98, 2.0), ct_size_xy=512,
                           pet_spacing_xyz_mm=(4.0, 4.0, 4.0), pet_size_xyz=(200, 200, 330))
    ct_path, pet_path = folder / "ct.mha", folder / "pet.mha"
    sitk.WriteImage(sitk.Cast(phantom.ct, sitk.sitkInt16), str(ct_path), useCompression=False)
    sitk.WriteImage(phantom.pet, str(pet_path), useCompression=False)
    return ct_path, pet_path


def locate(ct, pet, suv_per_stored_value):
    return locate_roi(ROI[0], ct=ct, pet=pet, suv_per_stored_value=suv_per_stored_value, params=ROI[1]).box


def route_hnseg(ct_path: Path, pet_path: Path) -> np.ndarray:
    case = load_case(ct_path, pet_path)
    box = locate(case.ct, case.pet, case.pet_unit.suv_per_stored_value)
    grid = Grid.covering(box, MODEL_SPACING_XYZ_MM)
    return np.stack([sample(case.ct, grid, interpolation="linear", fill_value=FILL_VALUE["ct"]),
                     sample(case.pet, grid, interpolation="linear", fill_value=FILL_VALUE["pet"])])


def route_naive(ct_path: Path, pet_path: Path) -> np.ndarray:
    case = load_case(ct_path, pet_path)
    box = locate(case.ct, case.pet, case.pet_unit.suv_per_stored_value)
    pet_on_ct = sitk.Resample(case.pet, case.ct, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    sub, slices_zyx = Grid.of(case.ct).crop_to(box)
    crops = []
    for image in (sitk.Cast(case.ct, sitk.sitkFloat32), pet_on_ct):
        crop = sub.image_from_array(sitk.GetArrayFromImage(image)[slices_zyx])
        crops.append(crop)
    grid = Grid.covering(box, MODEL_SPACING_XYZ_MM)
    return np.stack([sample(crops[0], grid, interpolation="linear", fill_value=FILL_VALUE["ct"]),
                     sample(crops[1], grid, interpolation="linear", fill_value=FILL_VALUE["pet"])])


def peak_rss_mib() -> float:
    """This process's own peak resident memory (VmHWM; ru_maxrss would include the parent's from before exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def _child(route_name, ct_path, pet_path, queue):
    start = time.perf_counter()
    out = ROUTES[route_name](ct_path, pet_path)
    elapsed = time.perf_counter() - start
    queue.put((elapsed, peak_rss_mib(), out.shape,
               float(out[1].sum()), out))


ROUTES = {"hnseg": route_hnseg, "naive": route_naive}


def measure(route_name, ct_path, pet_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(route_name, ct_path, pet_path, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="write the case here instead of a temp folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        ct_path, pet_path = write_case(folder)
        ct, pet = sitk.ReadImage(str(ct_path)), sitk.ReadImage(str(pet_path))
        print(f"case: CT {ct.GetSize()} @ {np.round(ct.GetSpacing(), 2).tolist()} mm {ct.GetPixelIDTypeAsString()}, "
              f"PET {pet.GetSize()} @ {np.round(pet.GetSpacing(), 2).tolist()} mm "
              f"(generated in {time.perf_counter() - start:.1f} s)")
        del ct, pet
        results = {name: [] for name in ROUTES}
        outputs = {}
        for _ in range(args.repeats):
            for name in ROUTES:  # interleaved, so drift in machine load hits both routes alike
                elapsed, rss, shape, pet_sum, out = measure(name, ct_path, pet_path)
                results[name].append((elapsed, rss))
                outputs[name] = out
        model_grid_shape = outputs["hnseg"].shape
        pet_diff = np.abs(outputs["hnseg"][1] - outputs["naive"][1])
        print(f"model grid (C, z, y, x): {model_grid_shape}; PET channel |hnseg - naive|: mean "
              f"{pet_diff.mean():.4f} SUV, max {pet_diff.max():.3f} SUV (the naive route interpolates twice)")
        print(f"{'route':8} {'wall s (median)':>16} {'peak RSS MiB (max)':>19}")
        summary = {}
        for name, runs in results.items():
            wall = statistics.median(r[0] for r in runs)
            rss = max(r[1] for r in runs)
            summary[name] = (wall, rss)
            print(f"{name:8} {wall:16.2f} {rss:19.0f}")
        speed = summary["naive"][0] / summary["hnseg"][0]
        memory = summary["hnseg"][1] / summary["naive"][1]
        print(f"hnseg is {speed:.1f}x faster than naive (goal >= 5x) and uses {memory:.2f}x its peak memory "
              f"(goal <= 0.5x); {args.repeats} repeats each, 2 cores")


if __name__ == "__main__":
    main()
