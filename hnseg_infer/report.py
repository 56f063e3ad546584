"""The JSON run report: what ran, on what, how long, with what warnings and fallbacks, and what came out."""

from __future__ import annotations

import json
import platform
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import cc3d
import numpy as np
import onnxruntime
import SimpleITK as sitk

from hnseg_infer._version import __version__
from hnseg_infer.io.atomic import write_bytes_atomic
from hnseg_infer.labels import LABEL_NAMES


def versions() -> dict:
    return {"hnseg": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__, "SimpleITK": sitk.Version_VersionString()}


def peak_memory_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def label_volumes(labels_zyx: np.ndarray, *, spacing_xyz_mm) -> dict:
    voxel_mm3 = float(np.prod(spacing_xyz_mm))
    out = {}
    for label, name in LABEL_NAMES.items():
        mask = labels_zyx == label
        n_components = int(cc3d.connected_components(mask, connectivity=26, return_N=True)[1]) if mask.any() else 0
        count = int(mask.sum())
        out[name] = {"voxels": count, "volume_ml": round(count * voxel_mm3 / 1000, 3), "components": n_components}
    return out


class RunReport:
    """Collects the facts of one run; `to_dict` gives the JSON document."""

    def __init__(self):
        self.started = time.time()
        self.data: dict = {"status": "running", "versions": versions(), "stages_s": {}, "warnings": [],
                           "fallbacks": []}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add_stage_time(name, time.perf_counter() - start)

    def add_stage_time(self, name: str, seconds: float) -> None:
        """A stage timed elsewhere (the models, loaded once before the cases that use them)."""
        self.data["stages_s"][name] = round(self.data["stages_s"].get(name, 0.0) + seconds, 3)

    def stage_record(self, name: str) -> dict:
        """The report's entry for one recipe stage (ROI, models, labels), made on first use, in stage order."""
        stages = self.data.setdefault("stages", [])
        for record in stages:
            if record["name"] == name:
                return record
        stages.append({"name": name})
        return stages[-1]

    def warn(self, message: str) -> None:
        self.data["warnings"].append(message)

    def fallback(self, message: str) -> None:
        self.data["fallbacks"].append(message)

    def set(self, key: str, value) -> None:
        self.data[key] = value

    def finish(self, status: str, error: str | None = None) -> dict:
        self.data["status"] = status
        if error:
            self.data["error"] = error
        self.data["total_s"] = round(time.time() - self.started, 3)
        self.data["peak_memory_mib"] = peak_memory_mib()
        return self.data

    def update(self, key: str, **fields) -> None:
        """More fields for an entry already set (e.g. the files an adapter wrote for it)."""
        self.data[key].update(fields)

    def write(self, path: Path) -> None:
        write_bytes_atomic(path, json.dumps(self.data, indent=2, default=str).encode(),
                           hint="pass a --report path in a writable folder")

    def summary_line(self) -> str:
        d = self.data
        if d["status"] != "ok":
            return f"hnseg: {d['status']}: {d.get('error', '')}"
        vols = d.get("labels", {})
        parts = [f"{name} {v['volume_ml']} mL in {v['components']} component(s)" for name, v in vols.items()]
        return (f"hnseg: ok in {d['total_s']:.1f} s on {d.get('provider', '?')}: {'; '.join(parts)}; "
                f"{len(d['warnings'])} warning(s), {len(d['fallbacks'])} fallback(s)")

