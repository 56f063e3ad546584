"""`hnseg batch` with the models loaded once, against the per-case reload it replaced, on the same cases in one run.

"per-case reload": each case runs as `process.py` did before the Segmenter (run_one: recipe loaded, every model file
hashed and its session created, then the case). "load once": `hnseg batch`, one Segmenter for the whole batch.
Both write the same masks (checked). onnxruntime sessions are counted by wrapping InferenceSession.

    .venv/bin/python bench/bench_batch.py [--weights weights/demo] [--cases 6] [--fast] [--work /tmp/hnseg-bench-batch]

--fast: the demo recipe with mirroring off and tiles without overlap (test/test_same_masks.py's), so that loading
is a larger share of each case.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "test"))
import hnseg_infer.inference.onnx_engine as onnx_engine  # noqa: E402
from hnseg_infer.cli.main import main as hnseg_main  # noqa: E402
from hnseg_infer.cli.main import run_one  # noqa: E402
from hnseg_infer.io.images import discover_inputs  # noqa: E402
from hnseg_infer.tools.phantom import hecktor_acquisition, make_phantom, write_case  # noqa: E402

SESSIONS: list[str] = []


def count_sessions() -> None:
    real = onnx_engine.ort.InferenceSession

    def counting(*args, **kwargs):
        SESSIONS.append(str(args[0]))
        return real(*args, **kwargs)

    onnx_engine.ort.InferenceSession = counting


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "demo")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hnseg-bench-batch"))
    args = parser.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    weights = args.weights
    if args.fast:
        from test_same_masks import fast_demo_weights

        weights = fast_demo_weights(args.work / "weights")
    fovs = ("head-only", "head-neck", "whole-body")
    for i in range(args.cases):
        seed = 300 + i
        write_case(make_phantom(seed=seed, fov=fovs[i % 3], pet_unit=("suv", "bqml")[i % 2],
                                **hecktor_acquisition(seed)), args.work / "cases" / f"case{i}")
    count_sessions()

    start = time.perf_counter()
    for case in sorted((args.work / "cases").iterdir()):
        ct, pet = discover_inputs(case / "input")
        assert run_one(ct=ct, pet=pet, out=args.work / "reload" / f"{case.name}.mha", weights=weights,
                       report_path=None, device="cpu", debug=True) == 0
    reload_s, reload_sessions = time.perf_counter() - start, len(SESSIONS)

    SESSIONS.clear()
    start = time.perf_counter()
    assert hnseg_main(["batch", "--input", str(args.work / "cases"), "--out", str(args.work / "once"),
                       "--weights", str(weights), "--device", "cpu"]) == 0
    once_s, once_sessions = time.perf_counter() - start, len(SESSIONS)

    differing = sum(int(np.count_nonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(args.work / "reload" / m.name)))
                                         != sitk.GetArrayFromImage(sitk.ReadImage(str(m)))))
                    for m in sorted((args.work / "once").glob("*.mha")))
    n = args.cases
    print(f"{n} cases, weights {args.weights.name}{' (fast variant)' if args.fast else ''}")
    print(f"per-case reload: {reload_s / n:.2f} s per case, {reload_sessions} sessions")
    print(f"load once:       {once_s / n:.2f} s per case, {once_sessions} sessions")
    print(f"ratio (load once / reload): {once_s / reload_s:.3f}; saved {(reload_s - once_s) / n:.2f} s per case; "
          f"voxels that differ between the two routes' masks: {differing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
