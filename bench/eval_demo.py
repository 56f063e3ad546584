"""Accuracy of a weights folder (default: the demo cascade) on phantoms it never saw in training — every field of
view, both PET units — and its per-stage timings, from the run reports.

Each case is written in the grand-challenge layout by `hnseg phantom`'s generator (HECKTOR-like geometry drawn from
the seed), predicted by the same `run_one` that process.py calls, and scored by `hnseg evaluate`. Training uses seeds
1000-1999 (export/train_demo.py); evaluation seeds start at --first-seed (default 100).

    .venv/bin/python bench/eval_demo.py [--weights weights/demo] [--cases-per-fov 6] [--work /tmp/hnseg-eval]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hnseg_infer.cli.main import main as hnseg_main  # noqa: E402
from hnseg_infer.cli.main import run_one  # noqa: E402
from hnseg_infer.io.images import discover_inputs  # noqa: E402
from hnseg_infer.tools.phantom import hecktor_acquisition, make_phantom, write_case  # noqa: E402

FOVS = ("head-only", "head-neck", "whole-body")


def cases(first_seed: int, per_fov: int) -> list[tuple[str, int, str, str]]:
    """(name, seed, fov, PET unit): consecutive seeds, the PET unit alternating within each field of view."""
    out, seed = [], first_seed
    for fov in FOVS:
        for i in range(per_fov):
            unit = ("suv", "bqml")[i % 2]
            out.append((f"seed{seed:04d}_{fov}_{unit}", seed, fov, unit))
            seed += 1
    return out


def predict(work: Path, weights: Path, name: str, seed: int, fov: str, unit: str) -> dict:
    case = work / "cases" / name
    if case.exists():
        shutil.rmtree(case)
    write_case(make_phantom(seed=seed, fov=fov, pet_unit=unit, **hecktor_acquisition(seed)), case)
    (reference,) = (case / "reference").glob("*.mha")
    shutil.copy(reference, work / "reference" / f"{name}.mha")
    ct, pet = discover_inputs(case / "input")
    report_path = work / "pred" / f"{name}.report.json"
    code = run_one(ct=ct, pet=pet, out=work / "pred" / f"{name}.mha", weights=weights, report_path=report_path,
                   device="cpu", debug=True)
    if code:
        raise SystemExit(f"{name}: hnseg failed with exit {code}; see {report_path}")
    return json.loads(report_path.read_text())


def timing_table(reports: list[dict]) -> str:
    """Median seconds per stage over the cases, in the order the stages ran, then total and peak memory."""
    names = list(reports[0]["stages_s"])
    rows = [f"| {name} | {statistics.median(r['stages_s'].get(name, 0.0) for r in reports):.2f} |" for name in names]
    rows.append(f"| **total (process)** | {statistics.median(r['total_s'] for r in reports):.2f} |")
    rows.append(f"| peak memory (MiB) | {statistics.median(r['peak_memory_mib'] for r in reports):.0f} |")
    return "| stage | median s |\n|---|---|\n" + "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "demo")
    parser.add_argument("--cases-per-fov", type=int, default=6)
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hnseg-eval"))
    args = parser.parse_args(argv)
    for sub in ("pred", "reference"):
        shutil.rmtree(args.work / sub, ignore_errors=True)
        (args.work / sub).mkdir(parents=True)
    reports = []
    for name, seed, fov, unit in cases(args.first_seed, args.cases_per_fov):
        report = predict(args.work, args.weights, name, seed, fov, unit)
        fell_back = [s["name"] for s in report.get("stages", []) if s["roi"]["fell_back"]]
        print(f"{name}: {report['total_s']:.1f} s, detected PET unit {report['inputs']['pet_unit']['unit']}"
              + (f", ROI fell back in {fell_back}" if fell_back else ""), flush=True)
        reports.append(report)
    code = hnseg_main(["evaluate", "--pred", str(args.work / "pred"), "--gt", str(args.work / "reference"),
                       "--json", str(args.work / "metrics.json"), "--csv", str(args.work / "metrics.csv")])
    print(f"\nper-case metrics: {args.work / 'metrics.csv'}; aggregate: {args.work / 'metrics.json'}\n")
    print(timing_table(reports))
    return code


if __name__ == "__main__":
    sys.exit(main())
