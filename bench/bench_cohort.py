"""`hnseg cohort` against the serial routes, on the same phantoms in one run: cases per minute and peak memory.

Routes, each a fresh process on the same cases:
  reload  the per-case reload `hnseg batch` did before the Segmenter: a Segmenter made for every case (recipe
          loaded, model files hashed, sessions created), all the CPUs for onnxruntime;
  serial  `hnseg batch` now: one Segmenter for the batch, all the CPUs;
  cohort  `hnseg cohort --workers W --threads-per-worker T` (embedded local Ray; its start-up is in the time).
Cases per minute are over each route's whole wall time (process start, loading, Ray start included). Peak memory:
the process's peak RSS (os.wait4) for the serial routes; for the cohort each worker's own peak (the manifest's
peak_memory_mib) and the driver's. The masks of the three routes are compared voxel for voxel.

    .venv/bin/python bench/bench_cohort.py [--weights weights/demo] [--fast] [--suv-baseline] [--cases 12]
        [--workers 2] [--threads-per-worker 1] [--small] [--work /tmp/hnseg-bench-cohort]

--fast: the demo recipe with mirroring off and tiles without overlap (test/test_same_masks.py's);
--suv-baseline: export/make_suv_baseline.py's one-operator recipe instead of the demo (a short run);
--small: phantoms with a 3 mm CT (the models' grids are in mm, so they do the same work; reading is cheaper).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "test"))
from hnseg_infer.tools.phantom import hecktor_acquisition, make_phantom, write_case  # noqa: E402

RELOAD_SCRIPT = """
import sys
from pathlib import Path
from hnseg_infer.cli.cases import run_source_case
from hnseg_infer.cli.main import CaseOutputs
from hnseg_infer.cli.manifest import recipe_sha256
from hnseg_infer.io.sources import find_cases
from hnseg_infer.segmenter import Segmenter
cases, weights, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
for case in find_cases(cases).cases:
    segmenter = Segmenter.from_weights(weights, device="cpu")  # the per-case reload
    row = run_source_case(segmenter, case, CaseOutputs(out / f"{case.case}.mha"),
                          recipe_sha=recipe_sha256(segmenter.recipe))
    assert row["status"] == "ok", row
"""

RAY_START_SCRIPT = """
import sys
import ray
from hnseg_infer.cli.cohort import local_ray_options
ray.init(**local_ray_options(int(sys.argv[1])))
ray.get(ray.remote(num_cpus=1)(lambda: 0).remote())  # one worker process up
ray.shutdown()
"""


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a child process."""
    start = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stderr = process.stderr.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} … exited {process.returncode}: {stderr[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def write_cases(folder: Path, n: int, *, small: bool) -> None:
    fovs = ("head-neck", "head-only", "whole-body")
    for i in range(n):
        seed = 500 + i
        acquisition = hecktor_acquisition(seed)
        if small:
            acquisition.update(ct_size_xy=170, ct_spacing_xyz_mm=(3.0, 3.0, 3.0), pet_spacing_xyz_mm=(5.0, 5.0, 5.0))
        write_case(make_phantom(seed=seed, fov=fovs[i % 3], pet_unit=("suv", "bqml")[i % 2], **acquisition),
                   folder / f"case{i:02d}")


def weights_for(args) -> Path:
    if args.suv_baseline:
        out = args.work / "suv-baseline"
        subprocess.run([sys.executable, str(ROOT / "export" / "make_suv_baseline.py"), "--out", str(out)], check=True,
                       capture_output=True)
        return out
    if args.fast:
        from test_same_masks import fast_demo_weights

        return fast_demo_weights(args.work / "demo-fast")
    return args.weights


def differing_voxels(a_dir: Path, b_dir: Path, names: list[str]) -> int:
    return sum(int(np.count_nonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(a_dir / f"{n}.mha")))
                                    != sitk.GetArrayFromImage(sitk.ReadImage(str(b_dir / f"{n}.mha")))))
               for n in names)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "demo")
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--suv-baseline", action="store_true")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hnseg-bench-cohort"))
    args = parser.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    weights = weights_for(args)
    cases = args.work / "cases"
    write_cases(cases, args.cases, small=args.small)
    names = sorted(p.name for p in cases.iterdir())
    python, n = sys.executable, args.cases

    reload_s, reload_mib = run_measured([python, "-c", RELOAD_SCRIPT, str(cases), str(weights),
                                         str(args.work / "reload")])
    serial_s, serial_mib = run_measured([python, "-m", "hnseg_infer.cli.main", "batch", "--input", str(cases),
                                         "--out", str(args.work / "serial"), "--weights", str(weights),
                                         "--device", "cpu"])
    cohort_s, driver_mib = run_measured([python, "-m", "hnseg_infer.cli.main", "cohort", str(cases), "--out",
                                         str(args.work / "cohort"), "--weights", str(weights), "--device", "cpu",
                                         "--workers", str(args.workers), "--threads-per-worker",
                                         str(args.threads_per_worker)])
    ray_start_s, _ = run_measured([python, "-c", RAY_START_SCRIPT, str(args.workers * args.threads_per_worker)])
    with open(args.work / "cohort" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n and {r["status"] for r in rows} == {"ok"}
    per_worker: dict[str, float] = {}
    for r in rows:
        per_worker[r["worker"]] = max(per_worker.get(r["worker"], 0.0), float(r["peak_memory_mib"]))
    case_s = [float(r["seconds"]) for r in rows]
    with open(args.work / "serial" / "manifest.csv", newline="") as f:
        serial_case_s = [float(r["seconds"]) for r in csv.DictReader(f)]

    label = "SUV baseline" if args.suv_baseline else f"{weights.name}{' (fast variant)' if args.fast else ''}"
    print(f"{n} phantoms{' (3 mm CT)' if args.small else ''}, weights {label}, {os.cpu_count()} CPUs; "
          f"routes run one after another in fresh processes")
    for name, seconds, mib in (("reload (per-case Segmenter)", reload_s, reload_mib),
                               ("serial (hnseg batch)", serial_s, serial_mib)):
        print(f"  {name:<34} {seconds:7.1f} s  {n / seconds * 60:6.2f} cases/min  peak {mib:7.0f} MiB "
              f" ×{reload_s / seconds:.2f} vs reload")
    workers = f"cohort ({args.workers} × {args.threads_per_worker} thread)"
    print(f"  {workers:<34} {cohort_s:7.1f} s  {n / cohort_s * 60:6.2f} cases/min  peak per worker "
          f"{', '.join(f'{v:.0f}' for v in sorted(per_worker.values()))} MiB, driver {driver_mib:.0f} MiB "
          f" ×{reload_s / cohort_s:.2f} vs reload, ×{serial_s / cohort_s:.2f} vs serial")
    print(f"  cohort per-case seconds in the workers: median {np.median(case_s):.1f} "
          f"(range {min(case_s):.1f}-{max(case_s):.1f}), serial's {np.median(serial_case_s):.1f}; "
          f"{len(per_worker)} workers took cases")
    print(f"  Ray alone (start a local Ray, run one no-op task, shut down; a fresh process): {ray_start_s:.1f} s")
    print(f"  voxels differing from reload: serial {differing_voxels(args.work / 'reload', args.work / 'serial', names)}"
          f", cohort {differing_voxels(args.work / 'reload', args.work / 'cohort' / 'masks', names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
