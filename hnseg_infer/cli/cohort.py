"""`hnseg cohort SOURCE --out DIR`: a cohort on Ray actors, each holding one Segmenter, with resume, failure
isolation and the HECKTOR figures at the end (docs/cohort.md).

The driver finds the cases (io/sources.py), loads the recipe (to refuse a bad one before any case and to hash it),
skips the cases the manifest says are done, and hands the rest to the actors as paths: at most IN_FLIGHT_PER_WORKER
cases queued per actor, so memory stays flat however large the cohort. Each worker writes its case's files itself
(the mask atomically) and returns the manifest row; the driver rewrites DIR/manifest.csv after every case. A case
whose actor dies is retried once on a fresh actor. Ray is imported here only: `hnseg batch` and process.py never
import this module.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import ray
import SimpleITK as sitk
from tqdm import tqdm

import hnseg_infer
from hnseg_infer.cli.cases import CohortLayout, hecktor_figures, run_source_case, score
from hnseg_infer.cli.manifest import COLUMNS, MANIFEST_FILE, Manifest, failed_row, recipe_sha256
from hnseg_infer.errors import HnsegError, InputError
from hnseg_infer.io.atomic import write_bytes_atomic
from hnseg_infer.io.sources import CaseSource, Source, find_cases, with_references
from hnseg_infer.recipe.load import load_recipe, resolve_weights
from hnseg_infer.segmenter import Segmenter

EXIT_OK, EXIT_USER_ERROR, EXIT_CASES_FAILED, EXIT_INTERRUPTED = 0, 2, 3, 130
IN_FLIGHT_PER_WORKER = 2  # one running, one waiting: the actor never idles between cases
MAX_ATTEMPTS = 2  # a case whose worker dies is retried once on a fresh actor
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class CohortOptions:
    weights: Path
    out: Path
    workers: int = 1
    threads_per_worker: int = 1
    gpus_per_worker: float = 0.0
    device: str = "auto"
    address: str | None = None
    qc: bool = False
    force: bool = False
    ct_only: bool = False
    references: Path | None = None


class CaseWorker:
    """A Ray actor: one Segmenter, loaded once, then case after case (paths in, manifest row out)."""

    def __init__(self, weights: str, device: str, threads: int, out: str, qc: bool, recipe_sha: str, ct_only: bool):
        os.environ["HNSEG_THREADS"] = str(threads)  # onnxruntime's intra-op threads: this actor's CPUs
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)  # and ITK's resampling threads
        self.segmenter = Segmenter.from_weights(weights, device=device)
        self.layout, self.qc, self.recipe_sha, self.ct_only = CohortLayout(Path(out)), qc, recipe_sha, ct_only

    def run(self, case: CaseSource, attempt: int) -> dict:
        return run_source_case(self.segmenter, case, self.layout.outputs(case.case, qc=self.qc),
                               recipe_sha=self.recipe_sha, attempt=attempt, ct_only=self.ct_only)


def local_ray_options(num_cpus: int) -> dict:
    """ray.init's arguments for an embedded local Ray: no dashboard, worker logs kept off the terminal, and this
    copy of hnseg_infer importable by the workers."""
    package_root = str(Path(hnseg_infer.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    return {"num_cpus": num_cpus, "include_dashboard": False, "log_to_driver": False,
            "runtime_env": {"env_vars": {"PYTHONPATH": path}}}


def run_cohort(source_path: Path, options: CohortOptions) -> int:
    """The whole command: find, plan, run, summarise. The exit code (0, 2, 3, or 130 when interrupted)."""
    started = time.perf_counter()
    try:
        source = find_cases(source_path)
        if options.references is not None:
            source = with_references(source, options.references)
        recipe = load_recipe(resolve_weights(Path(options.weights)))
        manifest = Manifest.open(Path(options.out) / MANIFEST_FILE)
    except HnsegError as exc:
        print(f"hnseg: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    recipe_sha = recipe_sha256(recipe)
    print(f"hnseg cohort: {source.describe()}; recipe {recipe.name!r} ({recipe_sha[:12]})", file=sys.stderr)
    todo = plan(source, manifest, recipe_sha=recipe_sha, layout=CohortLayout(Path(options.out)), force=options.force)
    interrupted = False
    if todo:
        try:
            interrupted = not _run_on_ray(todo, manifest, options, recipe_sha)
        except InputError as exc:  # the cluster cannot be joined or cannot place a worker: nothing ran
            print(f"hnseg: error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
    return summarise(source, manifest, Path(options.out), seconds=time.perf_counter() - started,
                     interrupted=interrupted)


def plan(source: Source, manifest: Manifest, *, recipe_sha: str, layout: CohortLayout, force: bool) -> list:
    """The cases to run; the others (finished with this recipe and these inputs, mask present) become `skipped`,
    scored again here when their reference is not the one they were scored against."""
    todo = []
    for case in source.cases:
        mask = layout.outputs(case.case, qc=False).mask
        previous = None if force else manifest.reusable(case, recipe_sha=recipe_sha, mask=mask)
        if previous is None:
            todo.append(case)
            continue
        row = {**previous, "status": "skipped"}
        if row.get("reference", "") != str(case.reference or ""):
            row = {k: v for k, v in row.items() if k in COLUMNS}  # the old reference's metrics go
            row.update(reference=str(case.reference or ""), error="",
                       **(score(mask, case) if case.reference else {}))
        manifest.put(row)
    _remove_partial_files(layout.out)
    manifest.write()
    return todo


def _remove_partial_files(out: Path) -> None:
    """The temporary files of a worker killed while writing (io/atomic.py's names): never anyone's output."""
    for folder in ("masks", "reports", "qc"):
        for partial in (out / folder).glob(".partial-*") if (out / folder).is_dir() else ():
            partial.unlink(missing_ok=True)


def _run_on_ray(todo: list[CaseSource], manifest: Manifest, options: CohortOptions, recipe_sha: str) -> bool:
    """Run the cases on the actors; False when interrupted (Ctrl-C, SIGTERM). The manifest is rewritten after
    every case, so it is consistent whenever the run stops."""
    started_ray = _start_ray(options)
    try:
        options = _placeable(options, ray.cluster_resources())
    except InputError:
        if started_ray:
            ray.shutdown()
        raise
    previous_sigterm = _raise_on_sigterm()
    scheduler = Scheduler(todo, manifest, options, recipe_sha)
    try:
        scheduler.run()
        return True
    except KeyboardInterrupt:
        print(f"\nhnseg cohort: interrupted; {scheduler.done} of {len(todo)} cases finished and in the manifest, "
              f"the rest run on the next start", file=sys.stderr)
        return False
    finally:
        scheduler.stop()
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if started_ray:
            ray.shutdown()


def _start_ray(options: CohortOptions) -> bool:
    """Join the cluster at --address, or start a local Ray sized for the workers; False when Ray was already
    running in this process (a test's session, a notebook's)."""
    if ray.is_initialized():
        return False
    if options.address:
        _check_reachable(options.address)
        try:
            ray.init(address=options.address, log_to_driver=False)
        except ConnectionError as exc:
            raise InputError(
                f"cannot join the Ray cluster at --address {options.address}: {exc}. Check the address with "
                f"`ray status --address {options.address}`; a cluster started with token authentication (the "
                f"default of `ray start` since Ray 2.59) needs RAY_AUTH_MODE=token here too, and its token in "
                f"RAY_AUTH_TOKEN or ~/.ray/auth_token") from exc
    else:
        ray.init(**local_ray_options(options.workers * options.threads_per_worker))
    return True


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """An InputError when nothing answers at a HOST:PORT or ray://HOST:PORT address (ray.init would wait there
    for ever); `auto` is left to Ray, which fails at once when no cluster runs here."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise InputError(f"cannot join the Ray cluster at --address {address}: nothing answers there ({exc}). "
                         f"Start its head with `ray start --head --port {port}`, or check the address with "
                         f"`ray status --address {address}`") from exc


def _placeable(options: CohortOptions, cluster: dict) -> CohortOptions:
    """The options with no more workers than the cluster can place at once (its CPUs per --threads-per-worker, its
    GPUs per --gpus-per-worker): an actor Ray cannot place waits for ever, and so would its cases."""
    fits = {"CPU": int(cluster.get("CPU", 0) // options.threads_per_worker)}
    if options.gpus_per_worker:
        fits["GPU"] = int(cluster.get("GPU", 0) // options.gpus_per_worker)
    fit = min(fits.values())
    have = ", ".join(f"{cluster.get(k, 0):g} {k}" for k in fits)
    if fit < 1:
        raise InputError(f"the Ray cluster ({have}) cannot place one worker of {options.threads_per_worker} CPU(s)"
                         + (f" and {options.gpus_per_worker:g} GPU(s)" if options.gpus_per_worker else "")
                         + ": lower --threads-per-worker or --gpus-per-worker, or add nodes with those resources")
    if fit < options.workers:
        print(f"hnseg cohort: the Ray cluster ({have}) places {fit} of the {options.workers} workers asked for; "
              f"running {fit}", file=sys.stderr)
        return replace(options, workers=fit)
    return options


def _raise_on_sigterm():
    """SIGTERM stops the run as Ctrl-C does (only the main thread may set handlers)."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


class Scheduler:
    """Bounded dispatch of cases to actors, with the retry of a case whose actor died."""

    def __init__(self, todo: list[CaseSource], manifest: Manifest, options: CohortOptions, recipe_sha: str):
        self.queue = deque((case, 1) for case in todo)
        self.manifest, self.options, self.recipe_sha = manifest, options, recipe_sha
        resources = {"num_cpus": options.threads_per_worker}
        if options.gpus_per_worker:
            resources["num_gpus"] = options.gpus_per_worker
        self.remote = ray.remote(**resources)(CaseWorker)
        self.actors = [self._new_actor() for _ in range(min(options.workers, len(todo)))]
        self.pending: dict = {}  # ObjectRef -> (actor slot, actor, case, attempt)
        self.done = self.failed = 0
        self.bar = tqdm(total=len(todo), desc="hnseg cohort", unit="case", file=sys.stderr, dynamic_ncols=True)

    def _new_actor(self):
        o = self.options
        device = "cuda" if o.gpus_per_worker and o.device == "auto" else o.device
        return self.remote.remote(str(Path(o.weights).resolve()), device, o.threads_per_worker,
                                  str(Path(o.out).resolve()), o.qc, self.recipe_sha, o.ct_only)

    def _fill(self) -> None:
        for slot, actor in enumerate(self.actors):
            while self.queue and sum(p[0] == slot for p in self.pending.values()) < IN_FLIGHT_PER_WORKER:
                case, attempt = self.queue.popleft()
                self.pending[actor.run.remote(case, attempt)] = (slot, actor, case, attempt)

    def run(self) -> None:
        self._fill()
        while self.pending:
            [ref], _ = ray.wait(list(self.pending), num_returns=1)
            slot, actor, case, attempt = self.pending.pop(ref)
            try:
                row = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # the actor's process died (killed, out of memory)
                row = self._worker_died(slot, actor, case, attempt, exc)
            except ray.exceptions.RayError as exc:  # the task itself broke outside run_source_case's guard
                row = failed_row(case, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}",
                                 recipe_sha=self.recipe_sha, attempts=attempt)
            if row is not None:
                self._record(row)
            self._fill()

    def _worker_died(self, slot: int, actor, case: CaseSource, attempt: int, exc: Exception) -> dict | None:
        """Replace the dead actor (once, whichever of its cases reports first) and retry the case, or give up."""
        if self.actors[slot] is actor:
            self.actors[slot] = self._new_actor()
        if attempt < MAX_ATTEMPTS:
            self.queue.appendleft((case, attempt + 1))
            return None
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return failed_row(case, f"its worker died on each of {attempt} attempts ({reason}): check the worker's "
                                f"memory (a case too large for it?)", recipe_sha=self.recipe_sha, attempts=attempt)

    def _record(self, row: dict) -> None:
        self.manifest.record(row)
        self.done += 1
        self.failed += row["status"] == "failed"
        elapsed_min = self.bar.format_dict["elapsed"] / 60
        self.bar.set_postfix(failed=self.failed, per_min=f"{self.done / elapsed_min:.1f}" if elapsed_min else "-",
                             refresh=False)
        self.bar.update(1)

    def stop(self) -> None:
        self.bar.close()
        for actor in self.actors:
            ray.kill(actor)


def summarise(source: Source, manifest: Manifest, out: Path, *, seconds: float, interrupted: bool = False) -> int:
    """DIR/summary.json and the printed summary over this source's cases; the exit code."""
    rows = [manifest.rows[c.case] for c in source.cases if c.case in manifest.rows]
    counts = {status: sum(r["status"] == status for r in rows) for status in ("ok", "skipped", "failed")}
    failed = [r for r in rows if r["status"] == "failed"]
    figures = hecktor_figures(rows)
    ran = counts["ok"] + counts["failed"]
    summary = {"source": str(source.root), "layout": source.layout, "n_cases": len(source.cases), **counts,
               "not_run": len(source.cases) - len(rows), "interrupted": interrupted, "seconds": round(seconds, 1),
               "cases_per_minute": round(ran / seconds * 60, 2) if ran and seconds else None,
               "failed_cases": {r["case"]: r["error"] for r in failed}, "hecktor": figures}
    write_bytes_atomic(out / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode(),
                       hint="pass an --out folder you can write")
    print(f"hnseg cohort: {counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed"
          + (f", {summary['not_run']} not run (interrupted)" if interrupted else "")
          + f" of {len(source.cases)} cases in {seconds:.1f} s; manifest {manifest.path}")
    for r in failed[:20]:
        print(f"  failed: {r['case']}: {r['error']}")
    if len(failed) > 20:
        print(f"  … and {len(failed) - 20} more failed cases (see the manifest)")
    if figures is not None:
        from hnseg_infer.tools.metrics import summary_text

        print(summary_text(figures).replace("hnseg evaluate:", "HECKTOR figures:", 1))
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_CASES_FAILED if failed else EXIT_OK


def default_threads(workers: int) -> int:
    return max(1, math.floor((os.cpu_count() or 1) / max(1, workers)))
