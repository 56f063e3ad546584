"""Benchmark: OpenVINO vs onnxruntime (CPU) per tile batch on each model of a weights folder, paired and interleaved.

For every model of the recipe: one tile batch of the recipe's patch and tile_batch (random normal input, seed 0) is
run `--repeats` times by each engine in turn (onnxruntime as hnseg runs it: ORT_ENABLE_ALL, arena off, all cores;
OpenVINO f32 with the planned hint, and with each hint forced). Printed per engine: the median time, its ratio to
onnxruntime's measured in the same loop, the load (read + compile) time, and the agreement of the logits with
onnxruntime's (max |Δlogit|, argmax agreement: inference/agreement.py's rule at the fp32 tolerance). First, the
import time of each package (a fresh interpreter's, less an empty one's).

    .venv/bin/python bench/bench_openvino.py [--weights weights/demo] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import machine  # noqa: E402  (bench/)

from hnseg_infer.inference.agreement import MIN_AGREEMENT_FP32, TOLERANCE_FP32, compare_logits  # noqa: E402
from hnseg_infer.inference.onnx_engine import OnnxModel  # noqa: E402
from hnseg_infer.inference.openvino_engine import OpenVinoModel  # noqa: E402
from hnseg_infer.recipe.load import load_recipe, resolve_weights  # noqa: E402


# onnxruntime's intra-op threads spin for a while after a run and take the cores from whatever is timed next: without
# this pause the engine timed right after onnxruntime ran 1.3-1.7x slower than the same configuration timed later
SETTLE_S = 0.3


def timed(make):
    start = time.perf_counter()
    value = make()
    return value, time.perf_counter() - start


def bench_model(spec, repeats: int) -> None:
    patch, tile_batch = spec.tiling.patch_size_zyx, spec.tiling.tile_batch
    x = np.random.default_rng(0).standard_normal((tile_batch, len(spec.channels), *patch)).astype(np.float32)
    path = spec.files[0]
    engines = {"onnxruntime": timed(lambda: OnnxModel(path, device="cpu"))}
    engines["openvino (plan)"] = timed(lambda: OpenVinoModel(path, patch_zyx=patch, tile_batch=tile_batch))
    for hint in ("LATENCY", "THROUGHPUT"):
        engines[f"openvino {hint}"] = timed(lambda hint=hint: OpenVinoModel(
            path, patch_zyx=patch, tile_batch=tile_batch, performance_hint=hint))
    times = {name: [] for name in engines}
    outputs = {name: engine(x) for name, (engine, _) in engines.items()}  # warm-up, and the logits compared
    for _ in range(repeats):
        for name, (engine, _) in engines.items():  # interleaved: each repeat runs every engine once
            time.sleep(SETTLE_S)
            times[name].append(timed(lambda engine=engine: engine(x))[1])
    reference = statistics.median(times["onnxruntime"])
    plan = engines["openvino (plan)"][0]
    print(f"\n{spec.name}: tiles {tile_batch}×{list(patch)}, {len(spec.channels)} channels; plan "
          f"{plan.performance_hint} with {plan.infer_requests} request(s)")
    for name, (engine, load_s) in engines.items():
        agree = compare_logits(outputs["onnxruntime"], outputs[name], head=spec.head.type, tolerance=TOLERANCE_FP32,
                               min_agreement=MIN_AGREEMENT_FP32)
        median = statistics.median(times[name])
        print(f"  {name:20s} {median:7.3f} s  ratio {median / reference:5.2f}  load {load_s:5.2f} s  "
              f"max|Δ| {agree['max_abs_logit_diff']:.1e}  agreement {agree['agreement']:.5f}"
              f"{'' if agree['passed'] else '  FAILS the fp32 rule'}")


def import_seconds(module: str, repeats: int = 3) -> float:
    """Median wall time of a fresh interpreter importing `module`, less that of one importing nothing."""
    def once(code):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - start
    return statistics.median(once(f"import {module}") - once("pass") for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "demo")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    recipe = load_recipe(resolve_weights(args.weights))
    print(machine.describe())
    print("import: " + ", ".join(f"{m} {import_seconds(m):.2f} s" for m in ("onnxruntime", "openvino")))
    for spec in recipe.models:
        bench_model(spec, args.repeats)


if __name__ == "__main__":
    main()
