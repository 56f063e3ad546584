"""One case of a cohort (`hnseg cohort`'s workers and `hnseg batch`): run it with loaded models, write its files,
score it against its reference, and give its manifest row. The HECKTOR figures over the rows."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from hnseg_infer.cli.main import EXIT_TERMINATED, CaseOutputs, run_case
from hnseg_infer.cli.manifest import DONE, input_sha256
from hnseg_infer.errors import HnsegError, MissingPetError, Terminated
from hnseg_infer.io.sources import CaseSource
from hnseg_infer.report import RunReport
from hnseg_infer.segmenter import Segmenter


@dataclass(frozen=True)
class CohortLayout:
    """Where `hnseg cohort` writes a case's files under DIR."""

    out: Path

    def outputs(self, case: str, *, qc: bool) -> CaseOutputs:
        return CaseOutputs(mask=self.out / "masks" / f"{case}.mha", report=self.out / "reports" / f"{case}.json",
                           qc_png=self.out / "qc" / f"{case}.png" if qc else None)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_source_case(segmenter: Segmenter, case: CaseSource, outputs: CaseOutputs, *, recipe_sha: str,
                    attempt: int = 1, ct_only: bool = False, uncertainty_seed: int | None = None,
                    debug: bool = False, deadline=None) -> dict:
    """Predict one case and write its files (run_case: the mask atomically, the report whatever happens), within
    `deadline` (clock.Deadline) when given; the manifest row. A failure is a `failed` row with the one-line message,
    never an exception; SIGTERM (Terminated) is raised again once the case's report is written."""
    start = time.perf_counter()
    row = {"case": case.case, "ct": str(case.ct), "pet": str(case.pet or ""), "reference": str(case.reference or ""),
           "recipe_sha256": recipe_sha, "worker": worker_name(), "attempts": attempt}
    report = RunReport()
    try:
        row.update(input_sha256(case))
    except OSError as exc:
        return {**row, "status": "failed", "error": f"cannot read the inputs of case {case.case}: {exc}",
                "seconds": round(time.perf_counter() - start, 3)}
    pet_missing = None if case.pet else MissingPetError(f"no PET image for case {case.case} (CT {case.ct})",
                                                        folder=case.ct.parent)
    code = run_case(segmenter, ct=case.ct, pet=case.pet, outputs=outputs, report=report, ct_only=ct_only,
                    pet_missing=pet_missing, uncertainty_seed=uncertainty_seed, debug=debug, deadline=deadline)
    if code == EXIT_TERMINATED:
        raise Terminated(report.data.get("error", "terminated"))
    data = report.data
    row.update(status="ok" if data["status"] == "ok" else "failed", error=data.get("error", ""),
               peak_memory_mib=data.get("peak_memory_mib"))
    for name, volume in data.get("labels", {}).items():
        row.update({f"{name.lower()}_ml": volume["volume_ml"], f"{name.lower()}_components": volume["components"]})
    if row["status"] == "ok" and case.reference is not None:
        row.update(score(outputs.mask, case))
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def score(mask: Path, case: CaseSource) -> dict:
    """The case's metric columns (tools/metrics.py's, plus the voxel volume the aggregate needs); a reference that
    cannot be scored is noted in the error column, the mask stays ok."""
    from hnseg_infer.tools import metrics

    try:
        scored = metrics.evaluate_files(mask, case.reference, case=case.case)
    except HnsegError as exc:
        return {"error": f"reference not scored: {exc}"}
    return {**{k: v for k, v in scored.to_dict().items() if k != "case"}, "voxel_volume_ml": scored.voxel_volume_ml}


def case_metrics(row: dict):
    """A manifest row's metrics as tools.metrics.CaseMetrics (None when the case was not scored); rows read back
    from the CSV hold strings."""
    from hnseg_infer.tools.metrics import LABELS, CaseMetrics, LabelMetrics, LesionCounts

    if not str(row.get("gtvp_dice", "")):
        return None

    def number(key, kind=float):
        value = row.get(key)
        return None if value in (None, "") else kind(float(value))

    labels = {name: LabelMetrics(number(f"{name}_intersection_voxels", int), number(f"{name}_pred_voxels", int),
                                 number(f"{name}_ref_voxels", int), number(f"{name}_dice"),
                                 number(f"{name}_hd95_mm"), number(f"{name}_nsd_2mm")) for name in LABELS}
    lesions = LesionCounts(*(number(f"gtvn_{k}", int) for k in ("tp", "fp", "fn")))
    return CaseMetrics(row["case"], number("voxel_volume_ml"), labels["gtvp"], labels["gtvn"], lesions)


def hecktor_figures(rows: list[dict]) -> dict | None:
    """`hnseg evaluate`'s aggregate over the scored ok/skipped rows; None when no case has a reference."""
    from hnseg_infer.tools.metrics import aggregate

    scored = [m for row in rows if row["status"] in DONE and (m := case_metrics(row)) is not None]
    return aggregate(scored) if scored else None
