"""`hnseg batch` with the models loaded once, against the per-case reload it replaced, on the same cases in one run.

"per-case reload": each case runs as `hnseg batch` did before the Segmenter (run_one: recipe loaded, every model
file hashed and its session created, then the case). "load once": what `hnseg batch` does now, one Segmenter for
the batch and run_case per case. The two routes alternate case by case (paired, interleaved). Both must write the
same masks (checked). onnxruntime sessions are counted by wrapping InferenceSession.

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
from hnseg_infer.cli.main import CaseOutputs, run_case, run_one  # noqa: E402
from hnseg_infer.io.images import discover_inputs  # noqa: E402
from hnseg_infer.segmenter import Segmenter  # noqa: E402
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
    segmenter = Segmenter.from_weights(weights, device="cpu")  # what `hnseg batch` does once for the batch
    load_s, load_sessions = time.perf_counter() - start, len(SESSIONS)
    reload_s, once_s, reload_sessions = [], [], 0
    for i, case in enumerate(sorted((args.work / "cases").iterdir())):
        ct, pet = discover_inputs(case / "input")
        routes = [("reload", lambda: run_one(ct=ct, pet=pet, out=args.work / "reload" / f"{case.name}.mha",
                                             weights=weights, report_path=None, device="cpu", debug=True)),
                  ("once", lambda: run_case(segmenter, ct=ct, pet=pet,
                                            outputs=CaseOutputs(args.work / "once" / f"{case.name}.mha"), debug=True))]
        for name, route in routes if i % 2 == 0 else routes[::-1]:  # alternate the order: paired, interleaved
            before, start = len(SESSIONS), time.perf_counter()
            assert route() == 0
            (reload_s if name == "reload" else once_s).append(time.perf_counter() - start)
            if name == "reload":
                reload_sessions += len(SESSIONS) - before
    differing = sum(int(np.count_nonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(args.work / "reload" / m.name)))
                                         != sitk.GetArrayFromImage(sitk.ReadImage(str(m)))))
                    for m in sorted((args.work / "once").glob("*.mha")))
    n, once_sessions = args.cases, len(SESSIONS) - reload_sessions
    ratios = [o / r for o, r in zip(once_s, reload_s)]
    print(f"{n} cases, weights {args.weights.name}{' (fast variant)' if args.fast else ''}, paired and interleaved")
    print(f"per-case reload: {np.mean(reload_s):.2f} s per case (median {np.median(reload_s):.2f}), "
          f"{reload_sessions} sessions ({reload_sessions / n:.0f} per case)")
    print(f"load once:       {np.mean(once_s):.2f} s per case (median {np.median(once_s):.2f}) + {load_s:.2f} s "
          f"loading once, {once_sessions} sessions (= {load_sessions} at load, 0 per case)")
    print(f"time ratio load once / reload per case: median {np.median(ratios):.3f} (range {min(ratios):.3f}-"
          f"{max(ratios):.3f}); saved {np.mean(reload_s) - np.mean(once_s):.2f} s per case")
    print(f"voxels that differ between the two routes' masks: {differing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
