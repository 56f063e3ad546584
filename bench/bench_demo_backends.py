"""Benchmark: the demo case (`make demo`'s phantom, `hnseg phantom --seed 1 --fov whole-body`) through process.py
with the demo cascade on each CPU backend, per stage, interleaved (onnxruntime, then OpenVINO, each repeat).

Each run is a fresh `process.py --device cpu --backend B` process, as `make demo` runs it; its report gives the
seconds per stage, the total and the peak resident memory. Printed: the median of each over the repeats, the ratio
OpenVINO / onnxruntime, and the voxels where the two masks differ (over the voxels either labels).

    .venv/bin/python bench/bench_demo_backends.py [--repeats 1] [--weights weights/demo]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import machine  # noqa: E402  (bench/)

from hnseg_infer.tools.phantom import hecktor_acquisition, make_phantom, write_case  # noqa: E402

BACKENDS = ("onnxruntime", "openvino")
MASK = "images/tumor-lymph-node-segmentation/output.mha"


def run(case: Path, out: Path, weights: Path, backend: str) -> dict:
    report = out.with_suffix(".json")
    subprocess.run([sys.executable, str(ROOT / "process.py"), "--input", str(case), "--output", str(out),
                    "--weights", str(weights), "--device", "cpu", "--backend", backend, "--report", str(report)],
                   check=True, cwd=ROOT, capture_output=True)
    return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "demo")
    args = parser.parse_args()
    print(machine.describe())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # exactly make demo's case (`hnseg phantom --seed 1 --fov whole-body`: the acquisition drawn from the seed too)
        case = write_case(make_phantom(seed=1, fov="whole-body", **hecktor_acquisition(1)), tmp / "case") / "input"
        reports = {b: [] for b in BACKENDS}
        for repeat in range(args.repeats):
            for backend in BACKENDS:  # interleaved: drift in the machine's load hits both alike
                reports[backend].append(run(case, tmp / f"{backend}-{repeat}", args.weights, backend))
        stages = list(reports["onnxruntime"][0]["stages_s"])
        print(f"{'stage':58} {'onnxruntime s':>13} {'openvino s':>10} {'ratio':>6}")
        for stage in stages + ["total_s", "peak_memory_mib"]:
            values = {}
            for backend in BACKENDS:
                picked = [r[stage] if stage in ("total_s", "peak_memory_mib") else r["stages_s"].get(stage, 0.0)
                          for r in reports[backend]]
                values[backend] = statistics.median(picked)
            ratio = values["openvino"] / values["onnxruntime"] if values["onnxruntime"] else float("nan")
            print(f"{stage:58} {values['onnxruntime']:13.2f} {values['openvino']:10.2f} {ratio:6.2f}")
        masks = {b: sitk.GetArrayFromImage(sitk.ReadImage(str(tmp / f"{b}-0" / MASK))) for b in BACKENDS}
        differ = int(np.count_nonzero(masks["openvino"] != masks["onnxruntime"]))
        labelled = int(np.count_nonzero((masks["openvino"] > 0) | (masks["onnxruntime"] > 0)))
        print(f"masks: {differ} of {labelled} labelled voxels differ; volumes (mL) "
              + "; ".join(f"{b} GTVp {reports[b][0]['labels']['GTVp']['volume_ml']}, "
                          f"GTVn {reports[b][0]['labels']['GTVn']['volume_ml']}" for b in BACKENDS)
              + f"; {args.repeats} repeat(s), 2 cores")


if __name__ == "__main__":
    main()
