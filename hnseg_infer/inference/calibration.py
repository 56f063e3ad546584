"""The cost calibration stored beside the weights (`calibration.json`): each model's seconds per tile, measured by
`hnseg calibrate` on one machine, seeds the budget planner (inference/anytime.py) before the model's first pass in
a run, so that a further ensemble member's cost is known on the first case too.

A calibration is used only where it was measured: the same model files (sha256), the same engine record (backend,
version, provider, precision: inference/backend.describe), the same tile batch, the same CPU (model name, CPUs
visible, HNSEG_THREADS) and GPU. Anything else is ignored, with the reason in the report. A cost measured in the
run replaces the seeded one from its first pass on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hnseg_infer.errors import RecipeError
from hnseg_infer.inference.backend import describe
from hnseg_infer.inference.runner import LoadedModel
from hnseg_infer.io.atomic import write_bytes_atomic

CALIBRATION_FILE = "calibration.json"
SCHEMA = 1


def machine() -> dict:
    """What a cost depends on besides the model and its engine: the CPU, the CPUs visible, the threads, the GPUs."""
    return {"cpu": _cpu_model(), "cpus": len(os.sched_getaffinity(0)), "threads": os.environ.get("HNSEG_THREADS", ""),
            "gpus": _gpu_models()}


def model_key(model: LoadedModel) -> dict:
    """As JSON gives it back: what the model's cost depends on."""
    return json.loads(json.dumps({"sha256": list(model.spec.sha256), "engine": describe(model.folds[0]),
                                  "tile_batch": model.spec.tiling.tile_batch}))


def write_calibration(path: Path, models: dict[str, LoadedModel], seconds_per_tile: dict[str, float]) -> Path:
    """calibration.json (atomically) for the models whose cost was measured."""
    entries = {name: {**model_key(models[name]), "seconds_per_tile": round(seconds, 6)}
               for name, seconds in seconds_per_tile.items()}
    body = {"schema": SCHEMA, "machine": machine(), "models": entries}
    write_bytes_atomic(Path(path), (json.dumps(body, indent=1) + "\n").encode())
    return Path(path)


def read_calibration(folder: Path, models: dict[str, LoadedModel]) -> tuple[dict[str, float], dict | None]:
    """(seconds per tile by model name, the report's record) from `folder`/calibration.json; ({}, None) when there
    is none. A file that cannot be read as a calibration is a RecipeError (it ships with the weights)."""
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return {}, None
    try:
        body = json.loads(path.read_text())
        here, entries = body["machine"], body["models"]
        if body.get("schema") != SCHEMA or not isinstance(entries, dict):
            raise ValueError(f"schema {body.get('schema')!r}, expected {SCHEMA}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RecipeError(f"{path} is not an hnseg calibration ({type(error).__name__}: {error}): rewrite it with "
                          f"`hnseg calibrate` or remove it") from error
    if here != machine():
        return {}, {"file": str(path), "used": [], "ignored": f"measured on {here}, this machine is {machine()}"}
    costs, ignored = {}, {}
    for name, model in models.items():
        entry = entries.get(name)
        if not isinstance(entry, dict):
            ignored[name] = "not calibrated"
        elif {k: entry.get(k) for k in ("sha256", "engine", "tile_batch")} != model_key(model):
            ignored[name] = "measured with other model files, engine or tile batch"
        elif not (isinstance(entry.get("seconds_per_tile"), (int, float)) and entry["seconds_per_tile"] > 0):
            ignored[name] = f"seconds_per_tile {entry.get('seconds_per_tile')!r} is not a positive number"
        else:
            costs[name] = float(entry["seconds_per_tile"])
    return costs, {"file": str(path), "used": sorted(costs), **({"ignored": ignored} if ignored else {})}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            return next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), "")
    except OSError:
        return ""


def _gpu_models() -> list[str]:
    """The NVIDIA driver's model names (no subprocess, no CUDA library needed); [] without one."""
    names = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            names += [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                      if line.startswith("Model:")]
        except OSError:
            continue
    return names
