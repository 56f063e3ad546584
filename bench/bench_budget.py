"""The time budget on the demo cascade: 6 unseen phantoms, each run unconstrained and then with budgets of 100 %,
50 % and 30 % of its own unconstrained time measured in the same run, just before (paired, interleaved per case).

Per budget: actual/budget (the predict call and the mask's write, from the start of the call: the models are
loaded once before, as `hnseg batch` does), the refinements left out, and GTVp Dice, GTVn DSCagg and F1agg against
the reference and against the unconstrained masks.

    .venv/bin/python bench/bench_budget.py [--weights weights/demo] [--first-seed 300] [--out budget.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hnseg_infer.clock import Deadline  # noqa: E402
from hnseg_infer.io.images import write_image_atomic  # noqa: E402
from hnseg_infer.segmenter import Segmenter  # noqa: E402
from hnseg_infer.tools.metrics import aggregate, evaluate_arrays  # noqa: E402
from hnseg_infer.tools.phantom import hecktor_acquisition, make_phantom  # noqa: E402

FOVS = ("head-neck", "whole-body", "head-only")
FRACTIONS = (1.0, 0.5, 0.3)


def timed_run(segmenter: Segmenter, phantom, budget_s: float | None, out: Path) -> tuple[sitk.Image, dict, float]:
    """(mask, report, seconds from the call's start to the mask written)."""
    start = time.monotonic()
    deadline = Deadline.from_budget(budget_s, start_s=start)
    prediction = segmenter.predict(phantom.ct, phantom.pet, deadline=deadline)
    write_image_atomic(prediction.mask, out)
    return prediction.mask, prediction.report.data, time.monotonic() - start


def scores(pairs) -> dict:
    cases = [evaluate_arrays(sitk.GetArrayFromImage(pred), sitk.GetArrayFromImage(ref),
                             spacing_zyx_mm=ref.GetSpacing()[::-1], case=str(i)) for i, (pred, ref) in enumerate(pairs)]
    summary = aggregate(cases)
    return {k: round(summary[k], 4) for k in ("gtvp_dice_mean", "gtvn_dscagg", "gtvn_f1agg")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "demo")
    parser.add_argument("--first-seed", type=int, default=300)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    segmenter = Segmenter.from_weights(args.weights, device="cpu")
    rows, masks = [], {f: [] for f in (None, *FRACTIONS)}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.cases):
            seed, fov = args.first_seed + i, FOVS[i % len(FOVS)]
            phantom = make_phantom(seed=seed, fov=fov, pet_unit=("suv", "bqml")[i % 2], **hecktor_acquisition(seed))
            reference = phantom.label
            mask, _, unconstrained_s = timed_run(segmenter, phantom, None, Path(tmp) / f"{i}.mha")
            masks[None].append((mask, reference))
            row = {"case": f"seed{seed}_{fov}", "unconstrained_s": round(unconstrained_s, 2), "budgets": []}
            for fraction in FRACTIONS:
                budget_s = fraction * unconstrained_s
                budgeted, report, actual_s = timed_run(segmenter, phantom, budget_s, Path(tmp) / f"{i}_{fraction}.mha")
                masks[fraction].append((budgeted, reference, mask))
                record = report["budget"]
                row["budgets"].append({"fraction": fraction, "budget_s": round(budget_s, 2),
                                       "actual_s": round(actual_s, 2), "ratio": round(actual_s / budget_s, 3),
                                       "inference_end_s": record["inference_end_s"],
                                       "left_out": [f"{s['model']} {s['kind']} ({s['decision']})"
                                                    for s in record["steps"]]})
                print(f"{row['case']}: {fraction:.0%} budget {budget_s:.1f} s, actual {actual_s:.1f} s "
                      f"(ratio {actual_s / budget_s:.2f}); left out: {row['budgets'][-1]['left_out']}", flush=True)
            rows.append(row)
            if args.out:  # after every case, so that a run cut short still leaves its cases
                args.out.write_text(json.dumps({"cases": rows, "summary": summarise(rows, masks)}, indent=1))
    result = {"cases": rows, "summary": summarise(rows, masks)}
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


def summarise(rows: list[dict], masks: dict) -> dict:
    summary = {"cases": len(rows), "unconstrained": {"vs_reference": scores(masks[None])}}
    for fraction in FRACTIONS:
        ratios = [b["ratio"] for r in rows for b in r["budgets"] if b["fraction"] == fraction]
        summary[f"{fraction:.0%}"] = {
            "ratio_max": max(ratios), "ratio_median": sorted(ratios)[len(ratios) // 2],
            "within_budget": f"{sum(r <= 1.0 for r in ratios)} of {len(ratios)}",
            "vs_reference": scores([(m, ref) for m, ref, _ in masks[fraction]]),
            "vs_unconstrained": scores([(m, full) for m, _, full in masks[fraction]])}
    return summary


if __name__ == "__main__":
    main()
