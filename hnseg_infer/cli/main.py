"""Command line: `hnseg predict`, `refine`, `batch`, `evaluate`, `qc`, `phantom`, `pack-model`, `check-output`, and
the grand-challenge entry (process.py).

Errors the user can fix (HnsegError) print one line on stderr and exit 2; unexpected ones exit 1. Either way
nothing is left under the output path, and the run report (status "error") still goes to --report.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from hnseg_infer.cli.check_output import GC_OUTPUT_RELATIVE, check_output
from hnseg_infer.cli.console import quiet_libraries, say
from hnseg_infer.clock import Deadline, process_start_s
from hnseg_infer.errors import HnsegError, InputError, MissingPetError, OutputError, Terminated
from hnseg_infer.inference.backend import BACKENDS, PRECISIONS
from hnseg_infer.io.atomic import check_writable_folder, clear_previous
from hnseg_infer.io.images import discover_inputs, find_single_image, is_dicom_folder, write_image_atomic
from hnseg_infer.recipe.load import RECIPE_FILE
from hnseg_infer.report import RunReport
from hnseg_infer.segmenter import Prediction, Segmenter
from hnseg_infer.uncertainty.passes import UncertaintyOptions, write_maps

GC_MODEL_DIR = Path("/opt/ml/model")
BACKEND_HELP = ("the CPU engine: auto (OpenVINO where installed and the model compiles in f32, else onnxruntime), "
                "onnxruntime or openvino; CUDA always runs on onnxruntime")
PRECISION_HELP = ("f32 (default) or bf16: OpenVINO in bf16 where this CPU has it and each model's first tile batch "
                  "agrees with f32, else f32 with a line in the report")
BUNDLED_WEIGHTS = Path(__file__).resolve().parents[2] / "weights"  # beside hnseg_infer/: /opt/app/weights
EXIT_USER_ERROR, EXIT_INTERNAL_ERROR = 2, 1
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as a shell reports a process ended by SIGTERM
CONTAINER_TIME_BUDGET_S = 540.0  # a minute of margin under grand-challenge's 10 minutes per case


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: the clean-up must not be interrupted
    raise Terminated("terminated by SIGTERM (the platform's time limit?)")


def install_sigterm() -> None:
    """SIGTERM raises Terminated in the main thread: the run stops, leaves nothing under the output folder, writes
    its report with status "terminated" and exits 143. (Python runs signal handlers in the main thread only.)"""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def exits_143_on_sigterm(command):
    """A command whose SIGTERM outside a case (while parsing, finding the inputs) still exits 143."""
    @functools.wraps(command)
    def wrapped(argv: list[str] | None = None, **options) -> int:
        install_sigterm()
        try:
            return command(argv, **options)
        except Terminated as exc:
            print(f"hnseg: {exc}: nothing written", file=sys.stderr)
            return EXIT_TERMINATED
    return wrapped


def time_budget_arg(value: str) -> float:
    """--time-budget / HNSEG_TIME_BUDGET: seconds >= 0 (0: none)."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"time budget {value!r} is not a number of seconds >= 0: give e.g. 540, or "
                                         f"0 for none")
    return seconds


def _deadline(budget_s: float | None, *, start_s: float | None = None, label: str = "case start") -> Deadline | None:
    """The case's deadline: from the process start (imports and model loading count) unless `start_s` is given."""
    if start_s is None:
        return Deadline.from_budget(budget_s, start_s=process_start_s(), label="process start")
    return Deadline.from_budget(budget_s, start_s=start_s, label=label)


def default_weights() -> Path:
    """Grand-challenge model tarball at /opt/ml/model when it holds a recipe, else the image's weights/ folder."""
    if GC_MODEL_DIR.is_dir() and list(GC_MODEL_DIR.glob(f"**/{RECIPE_FILE}")):
        return GC_MODEL_DIR
    return BUNDLED_WEIGHTS


@dataclass(frozen=True)
class CaseOutputs:
    """Where one case's files go: the mask, and when asked for the report, QC picture, crop sidecar and maps."""

    mask: Path
    report: Path | None = None
    qc_png: Path | None = None
    sidecar: Path | None = None
    uncertainty_dir: Path | None = None
    dicom_seg: Path | None = None  # DICOM-SEG / RTSTRUCT of the mask (io/dicom_out.py): need a DICOM CT series
    rtstruct: Path | None = None


def run_one(*, ct: Path, pet: Path | None, out: Path, weights: Path, report_path: Path | None, device: str,
            backend: str = "auto", precision: str = "f32",
            ct_only: bool = False, pet_missing: MissingPetError | None = None,
            debug: bool, qc_png: Path | None = None, sidecar: Path | None = None, clicks: Path | None = None,
            uncertainty_dir: Path | None = None, uncertainty_seed: int | None = None,
            ct_series: str | None = None, pet_series: str | None = None, dicom_seg: Path | None = None,
            rtstruct: Path | None = None, report: RunReport | None = None, time_budget_s: float | None = None,
            allow_trt_build: bool = False, start_s: float | None = None) -> int:
    """Load the weights, predict one case and write its files (see `run_case`), within `time_budget_s` from the
    process start (or from `start_s`, on time.monotonic()) when given. Returns the exit code."""
    report = report if report is not None else RunReport()
    outputs = CaseOutputs(out, report_path, qc_png, sidecar, uncertainty_dir, dicom_seg, rtstruct)
    deadline = _deadline(time_budget_s, start_s=start_s, label="call start")
    # start-up: interpreter and imports until here; the recipe and sessions are stages_s["load_models"]
    report.add_stage_time("process_start_to_run", time.monotonic() - (process_start_s() if start_s is None
                                                                       else start_s))
    try:
        segmenter = Segmenter.from_weights(weights, device=device, backend=backend, precision=precision,
                                           allow_trt_build=allow_trt_build)
    except Terminated as exc:
        return _finish(report, outputs.report, exc, debug=debug)
    except Exception as exc:  # noqa: BLE001 - reported as any case error is
        return _finish(report, outputs.report, exc, debug=debug)
    return run_case(segmenter, ct=ct, pet=pet, outputs=outputs, report=report, ct_only=ct_only,
                    pet_missing=pet_missing, clicks=clicks, uncertainty_seed=uncertainty_seed, debug=debug,
                    ct_series=ct_series, pet_series=pet_series, deadline=deadline)


def run_case(segmenter: Segmenter, *, ct: Path, pet: Path | None, outputs: CaseOutputs, report: RunReport | None = None,
             ct_only: bool = False, pet_missing: MissingPetError | None = None, clicks: Path | None = None,
             uncertainty_seed: int | None = None, debug: bool = False, ct_series: str | None = None,
             pet_series: str | None = None, deadline: Deadline | None = None) -> int:
    """Predict one case with loaded models and write its mask (and, when asked, its QC picture, crop sidecar and
    uncertainty maps first); with `clicks` (a clicks JSON file) the prediction is refined by them; within
    `deadline` when given. The report is written whatever happens; on SIGTERM (Terminated) the mask is removed
    if it was already written. Returns the exit code."""
    report = report if report is not None else RunReport()
    written = False
    try:
        uncertainty = UncertaintyOptions(seed=uncertainty_seed) if outputs.uncertainty_dir else None
        _check_dicom_outputs(ct, outputs)
        prediction = segmenter.predict(ct, pet, ct_only=ct_only, pet_missing=pet_missing, clicks=clicks,
                                       uncertainty=uncertainty, report=report, ct_series=ct_series,
                                       pet_series=pet_series, deadline=deadline)
        if outputs.qc_png is not None:
            _draw_qc(prediction, outputs.qc_png, case_name=Path(ct).name)
        if outputs.sidecar is not None:
            _write_sidecar(prediction, outputs.sidecar, mask_path=outputs.mask)
        if outputs.uncertainty_dir is not None and prediction.uncertainty is not None:  # None: out of time
            with report.stage("write_uncertainty"):
                report.update("uncertainty", files=write_maps(prediction.uncertainty, prediction.case.ct_grid,
                                                              outputs.uncertainty_dir))
        _write_dicom_outputs(prediction, outputs)
        with report.stage("write"):
            write_image_atomic(prediction.mask, outputs.mask)
            written = True
        report.set("output", str(outputs.mask))
        if deadline is not None:
            report.data["budget"]["actual_s"] = round(deadline.elapsed_s(), 3)  # the write included
        report.finish("ok")
    except Terminated as exc:
        if written:
            outputs.mask.unlink(missing_ok=True)
        return _finish(report, outputs.report, exc, debug=debug)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: report, never leave a partial output
        return _finish(report, outputs.report, exc, debug=debug)
    return _finish(report, outputs.report, None, debug=debug)


def _finish(report: RunReport, report_path: Path | None, exc: BaseException | None, *, debug: bool) -> int:
    """Write the report, report the error (one line on stderr), print the summary line; the exit code.
    A report that cannot be written is a warning (on the error's line after an error): it never turns a run, or
    its mask, into a failure. SIGTERM (Terminated): status terminated, exit 143."""
    if isinstance(exc, Terminated):
        report.finish("terminated", str(exc))
    elif isinstance(exc, HnsegError):
        report.finish("error", str(exc))
    elif exc is not None:
        report.finish("internal error", f"{type(exc).__name__}: {exc}")
    not_written = ""
    if report_path is not None:
        try:
            report.write(report_path)
        except OutputError as error:
            not_written = f"run report not written: {error}"
    if isinstance(exc, Terminated):
        say(f"hnseg: {exc}: nothing written" + (f" ({not_written})" if not_written else ""), sys.stderr)
    elif isinstance(exc, HnsegError):
        say(f"hnseg: error: {exc}" + (f" ({not_written})" if not_written else ""), sys.stderr)
    elif exc is not None:
        say(f"hnseg: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)"
            + (f" ({not_written})" if not_written else ""), sys.stderr)
        if debug:
            traceback.print_exception(exc)
    elif not_written:
        say(f"hnseg: warning: {not_written}", sys.stderr)
    say(report.summary_line())
    if exc is None:
        return 0
    if isinstance(exc, Terminated):
        return EXIT_TERMINATED
    return EXIT_USER_ERROR if isinstance(exc, HnsegError) else EXIT_INTERNAL_ERROR


def _draw_qc(prediction: Prediction, qc_png: Path, *, case_name: str) -> None:
    from hnseg_infer.tools.qc import boxes_of, draw_qc

    report, case = prediction.report, prediction.case
    with report.stage("qc_picture"):
        pet = case.pet if not case.ct_only else _blank_like(case.ct)  # CT-only: an empty PET row and MIP
        draw_qc(ct=case.ct, pet=pet, mask=prediction.mask, boxes=boxes_of(prediction.rois), out_png=qc_png,
                case=case_name, suv_per_stored_value=case.suv_per_stored_value,
                title="CT-only mode: no PET" if case.ct_only else "")
    report.set("qc_picture", str(qc_png))


def _write_sidecar(prediction: Prediction, sidecar: Path, *, mask_path: Path) -> None:
    from hnseg_infer.io.sidecar import write_sidecar

    with prediction.report.stage("sidecar"):
        write_sidecar(sidecar, prediction.crop, prediction.model_labels, mask_path=mask_path)
    prediction.report.set("sidecar", str(sidecar))


def _check_dicom_outputs(ct, outputs: CaseOutputs) -> None:
    """DICOM-SEG and RTSTRUCT reference the CT's slices: refused before the run when the CT is not a series."""
    for option, path in (("--out-dicom-seg", outputs.dicom_seg), ("--out-rtstruct", outputs.rtstruct)):
        if path is not None and not (isinstance(ct, (str, Path)) and Path(ct).is_dir()):
            raise InputError(f"{option} {path} needs the CT as a DICOM series folder to reference, but the CT is "
                             f"{ct}: give --ct DIR (a folder of CT slices), or leave out {option}")


def _write_dicom_outputs(prediction: Prediction, outputs: CaseOutputs) -> None:
    if outputs.dicom_seg is None and outputs.rtstruct is None:
        return
    from hnseg_infer.io import dicom_out

    ct_dicom, report = prediction.case.ct_dicom, prediction.report
    if outputs.dicom_seg is not None:
        with report.stage("write_dicom_seg"):
            dicom_out.write_dicom_seg(prediction.mask, dicom_out.require_dicom_ct(ct_dicom, "--out-dicom-seg"),
                                      outputs.dicom_seg)
        report.set("dicom_seg", str(outputs.dicom_seg))
    if outputs.rtstruct is not None:
        with report.stage("write_rtstruct"):
            dicom_out.write_rtstruct(prediction.mask, dicom_out.require_dicom_ct(ct_dicom, "--out-rtstruct"),
                                     outputs.rtstruct)
        report.set("rtstruct", str(outputs.rtstruct))


def _blank_like(image):
    import SimpleITK as sitk

    blank = sitk.Image(image.GetSize(), sitk.sitkFloat32)
    blank.CopyInformation(image)  # a new zero image on the CT's grid, not a geometry fix
    return blank


def _discover(input_dir: Path) -> tuple[Path, Path | None, MissingPetError | None]:
    """CT and PET of a grand-challenge input folder (images/ct and images/pet each hold one image file, or one
    DICOM series). A missing PET is handed on (with where it was looked for): the recipe decides whether the case
    runs CT-only or the missing PET is the error."""
    images = Path(input_dir) / "images"
    if is_dicom_folder(images / "ct") or is_dicom_folder(images / "pet"):
        def find(role):
            folder = images / role
            return folder if is_dicom_folder(folder) else find_single_image(folder, role)

        ct = find("ct")
        try:
            return ct, find("pet"), None
        except MissingPetError as missing:
            return ct, None, missing
    try:
        ct, pet = discover_inputs(input_dir)
    except MissingPetError as missing:  # raised after the CT was found
        return find_single_image(Path(input_dir) / "images" / "ct", "ct"), None, missing
    return ct, pet, None


def _env_path(name: str, default) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else (Path(default) if default is not None else None)


@exits_143_on_sigterm
def container_main(argv: list[str] | None = None, *, from_process_start: bool = False) -> int:
    """process.py: /input → /output/images/tumor-lymph-node-segmentation/output.mha, as on grand-challenge."""
    # The budget counts from the process's start where this is the process's job (process.py says so, as the
    # platform counts), else from this call: a notebook's or test's process may have started long before.
    start_s = None if from_process_start else time.monotonic()
    parser = argparse.ArgumentParser(prog="process.py", description=container_main.__doc__)
    parser.add_argument("--input", type=Path, default=_env_path("HNSEG_INPUT", "/input"))
    parser.add_argument("--output", type=Path, default=_env_path("HNSEG_OUTPUT", "/output"))
    parser.add_argument("--weights", type=Path, default=_env_path("HNSEG_WEIGHTS", None))
    parser.add_argument("--report", type=Path, default=_env_path("HNSEG_REPORT", "/tmp/hnseg/report.json"))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=os.environ.get("HNSEG_DEVICE", "auto"))
    parser.add_argument("--backend", choices=BACKENDS, default=os.environ.get("HNSEG_BACKEND", "auto"),
                        help=BACKEND_HELP)
    parser.add_argument("--precision", choices=PRECISIONS, default=os.environ.get("HNSEG_PRECISION", "f32"),
                        help=PRECISION_HELP)
    parser.add_argument("--qc", type=Path, default=_env_path("HNSEG_QC", None),
                        help="also draw the QC picture (PNG) here; keep it outside --output on grand-challenge")
    parser.add_argument("--sidecar", type=Path, default=_env_path("HNSEG_SIDECAR", None),
                        help="also write the crop provenance (JSON; model-grid labels beside it with restore "
                             "paste_nearest) here; keep it outside --output on grand-challenge")
    parser.add_argument("--ct-only", action="store_true", default=os.environ.get("HNSEG_CT_ONLY") == "1",
                        help="ignore the PET (zero-filled PET channels); only for recipes with \"pet_optional\": true")
    parser.add_argument("--uncertainty", type=Path, default=_env_path("HNSEG_UNCERTAINTY", None), metavar="DIR",
                        help="also write probabilities_gtvp/gtvn.mha and entropy.mha (float32, CT grid) to DIR, from "
                             "the recipe's uncertainty passes; keep DIR outside --output on grand-challenge")
    parser.add_argument("--uncertainty-seed", type=int, default=None, help="instead of the recipe's seed")
    parser.add_argument("--time-budget", type=time_budget_arg, metavar="SECONDS",
                        default=os.environ.get("HNSEG_TIME_BUDGET", str(CONTAINER_TIME_BUDGET_S)),
                        help="finish within this many seconds of the process start, dropping refinements that would "
                             f"not fit (default {CONTAINER_TIME_BUDGET_S:g}; 0: none)")
    parser.add_argument("--allow-trt-build", action="store_true",
                        default=os.environ.get("HNSEG_ALLOW_TRT_BUILD") == "1",
                        help="let onnxruntime build TensorRT engines inside the case where none is prebuilt (minutes)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of internal errors")
    args = parser.parse_args(argv)
    weights = args.weights or default_weights()
    mask = args.output / GC_OUTPUT_RELATIVE
    report = RunReport()
    try:
        _check_container_paths(args, mask, report)
        ct, pet, pet_missing = _discover(args.input)
    except HnsegError as exc:
        say(f"hnseg: error: {exc}", sys.stderr)
        return EXIT_USER_ERROR
    with quiet_libraries(report.warn):
        return run_one(ct=ct, pet=pet, ct_only=args.ct_only, pet_missing=pet_missing, out=mask, weights=weights,
                       report_path=args.report, device=args.device, backend=args.backend,
                       precision=args.precision, debug=args.debug, qc_png=args.qc,
                       sidecar=args.sidecar, uncertainty_dir=args.uncertainty,
                       uncertainty_seed=args.uncertainty_seed, report=report, time_budget_s=args.time_budget,
                       allow_trt_build=args.allow_trt_build, start_s=start_s)


def _check_container_paths(args, mask: Path, report: RunReport) -> None:
    """Before anything is read: the output folder can take the mask, the report is not an extra file under it,
    and what an earlier run left in the socket folder (its mask, a killed run's .partial-* file) is gone."""
    output = args.output
    if output.exists() and not output.is_dir():
        raise OutputError(f"output {output} is a file, not a folder: pass --output DIR (a folder)")
    check_writable_folder(mask, "the mask")
    if args.report is not None and _inside(args.report, output):
        raise OutputError(f"--report {args.report} is inside the output folder {output}, where grand-challenge "
                          f"takes only the mask: pass a report path outside it (default /tmp/hnseg/report.json)")
    removed = clear_previous(mask)
    if removed:
        report.warn(f"removed {', '.join(removed)} left in {mask.parent} by an earlier run")


def _inside(path: Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())  # symbolic links followed


def _batch(args) -> int:
    """Every case of --input (a cohort source: grand-challenge case folders, HECKTOR 2025, nnU-Net raw or a CSV;
    io/sources.py) → --out/CASE.mha, with the models loaded once for the batch, serially and without Ray; per case
    CASE.report.json and, when asked, CASE.qc.png, CASE.sidecar.json and CASE.uncertainty/; --out/manifest.csv
    as `hnseg cohort` writes it (every case runs again: batch does not resume)."""
    from tqdm import tqdm

    from hnseg_infer.cli.cases import run_source_case
    from hnseg_infer.cli.manifest import MANIFEST_FILE, Manifest, recipe_sha256
    from hnseg_infer.io.sources import find_cases

    try:
        cases = find_cases(args.input).cases
        segmenter = Segmenter.from_weights(args.weights, device=args.device, backend=args.backend,
                                           precision=args.precision, allow_trt_build=args.allow_trt_build)
    except HnsegError as exc:
        print(f"hnseg: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    out = Path(args.out)
    manifest, recipe_sha = Manifest(out / MANIFEST_FILE), recipe_sha256(segmenter.recipe)
    failed = []
    for number, case in enumerate(tqdm(cases, desc="hnseg batch", unit="case", file=sys.stderr)):
        name = case.case
        outputs = CaseOutputs(out / f"{name}.mha", out / f"{name}.report.json",
                              out / f"{name}.qc.png" if args.qc else None,
                              out / f"{name}.sidecar.json" if args.sidecar else None,
                              out / f"{name}.uncertainty" if args.uncertainty else None,
                              out / f"{name}.seg.dcm" if args.dicom_seg else None,
                              out / f"{name}.rtstruct.dcm" if args.rtstruct else None)
        # each case gets the budget; the first one's counts from the process start (loading is its cost)
        deadline = _deadline(args.time_budget, start_s=None if number == 0 else time.monotonic())
        try:
            row = run_source_case(segmenter, case, outputs, recipe_sha=recipe_sha, ct_only=args.ct_only,
                                  uncertainty_seed=args.uncertainty_seed, debug=args.debug, deadline=deadline)
        except Terminated:  # the case's report says so; the manifest keeps the cases done
            return EXIT_TERMINATED
        manifest.record(row)
        if row["status"] == "failed":
            failed.append(name)
    print(f"hnseg batch: {len(cases) - len(failed)} of {len(cases)} cases ok"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return EXIT_USER_ERROR if failed else 0


def _evaluate(args) -> int:
    """HECKTOR metrics of --pred masks against --gt masks, paired by file name; --csv/--json get the details."""
    from tqdm import tqdm

    from hnseg_infer.tools import metrics

    try:
        if metrics.is_rtstruct_reference(args.gt):  # DICOM references, rasterised on each mask's grid
            pairs = metrics.pair_rtstructs(args.pred, args.gt)
            score = partial(metrics.evaluate_rtstruct, roi_mapping=args.gt_roi or metrics.DEFAULT_GT_ROI)
        elif args.gt_roi:
            raise InputError(f"--gt-roi {args.gt_roi!r} applies to RTSTRUCT references, but --gt {args.gt} holds "
                             f"masks: leave out --gt-roi, or give RTSTRUCT files (.dcm)")
        else:
            pairs, score = metrics.pair_masks(args.pred, args.gt), metrics.evaluate_files
        cases = [score(pred, ref, case=case)
                 for case, pred, ref in tqdm(pairs, desc="hnseg evaluate", unit="case", file=sys.stderr,
                                                leave=False, disable=None)]
        summary = metrics.aggregate(cases)
        if args.csv:
            metrics.write_csv(cases, args.csv)
        if args.json:
            metrics.write_json(cases, summary, args.json)
    except HnsegError as exc:
        print(f"hnseg: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(metrics.summary_text(summary))
    return 0


def add_cohort_parser(sub, common) -> None:
    c = sub.add_parser("cohort", parents=[common], help="a cohort on Ray workers, with resume and the HECKTOR "
                       "figures (pip install 'hnseg[cohort]'; docs/cohort.md)")
    c.add_argument("source", type=Path, metavar="SOURCE", help="a folder of cases (grand-challenge, HECKTOR 2025 or "
                   "nnU-Net raw layout) or a CSV case,ct,pet[,reference]")
    c.add_argument("--out", type=Path, required=True, help="DIR: masks/, reports/, qc/, manifest.csv, summary.json")
    c.add_argument("--workers", type=int, default=1, help="Ray actors, each with the models loaded once")
    c.add_argument("--threads-per-worker", type=int, default=None, help="CPUs per worker (default: the CPUs / workers)")
    c.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (fractions share a GPU)")
    c.add_argument("--address", default=None, help="join a Ray cluster (auto, or ray://HOST:PORT) instead of "
                   "starting a local one")
    c.add_argument("--references", type=Path, default=None, metavar="REFS", help="a folder of reference masks "
                   "REFS/CASE.nii.gz|.mha for every case (instead of the source's own): scored as hnseg evaluate does")
    c.add_argument("--qc", action="store_true", help="also draw DIR/qc/CASE.png")
    c.add_argument("--force", action="store_true", help="rerun every case, even those the manifest says are done")


def _cohort(args) -> int:
    """`hnseg cohort` (cli/cohort.py); Ray is imported only here."""
    try:
        from hnseg_infer.cli import cohort
    except ModuleNotFoundError as exc:
        if exc.name != "ray":
            raise
        print(f"hnseg: error: hnseg cohort needs Ray ({exc}): pip install 'hnseg[cohort]'", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.workers < 1 or (args.threads_per_worker is not None and args.threads_per_worker < 1) \
            or args.gpus_per_worker < 0:
        print(f"hnseg: error: --workers {args.workers}, --threads-per-worker {args.threads_per_worker} and "
              f"--gpus-per-worker {args.gpus_per_worker} must be positive (GPUs: 0 or more)", file=sys.stderr)
        return EXIT_USER_ERROR
    options = cohort.CohortOptions(
        weights=args.weights, out=args.out, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        threads_per_worker=args.threads_per_worker or cohort.default_threads(args.workers), device=args.device,
        address=args.address, qc=args.qc, force=args.force, ct_only=args.ct_only, references=args.references)
    return cohort.run_cohort(args.source, options)


def _pack_model(args) -> int:
    """The grand-challenge model tarball of a weights folder (tools/pack.py)."""
    from hnseg_infer.tools.pack import pack_model

    try:
        packed = pack_model(args.weights_dir, args.out)
    except HnsegError as exc:
        print(f"hnseg: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    mib = 1024 ** 2
    print(f"hnseg pack-model: wrote {packed.out}: {len(packed.members)} files, {packed.packed_bytes / mib:.1f} MiB "
          f"({packed.unpacked_bytes / mib:.1f} MiB unpacked), hashes as the recipe was loaded")
    return 0


def _plan(args) -> int:
    """`hnseg plan` (tools/plan.py): the cost of the recipe on this case, and its physical limit on a T4."""
    import json

    from hnseg_infer.io.atomic import write_bytes_atomic
    from hnseg_infer.tools.plan import plan_text, plan_weights

    try:
        plans = plan_weights(args.weights or default_weights(), ct=args.ct, pet=args.pet, measure=not args.no_measure)
        if args.json:
            write_bytes_atomic(args.json, json.dumps([p.to_dict() for p in plans], indent=1).encode())
    except HnsegError as exc:
        print(f"hnseg: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(plan_text(plans))
    return 0


def _calibrate(args) -> int:
    """`hnseg calibrate`: each model's seconds per tile here, into calibration.json beside the weights (the budget
    planner's costs before a model's first pass; inference/calibration.py)."""
    from hnseg_infer.inference.calibration import CALIBRATION_FILE, write_calibration

    try:
        segmenter = Segmenter.from_weights(args.weights or default_weights(), device=args.device,
                                           backend=args.backend)
        segmenter.seconds_per_tile.clear()  # measured here, not seeded from an older file
        for _ in range(args.repeats):  # an unbounded budget runs every member the anytime way, each cost measured
            with quiet_libraries(lambda line: None):
                segmenter.predict(args.ct, args.pet, time_budget_s=1e9)
        out = args.out or segmenter.recipe.path.parent / CALIBRATION_FILE
        write_calibration(out, segmenter.models, segmenter.seconds_per_tile)
    except HnsegError as exc:
        print(f"hnseg: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    for name, seconds in segmenter.seconds_per_tile.items():
        print(f"{name}: {seconds:.4f} s per tile")
    print(f"calibration written to {out} (the last of {args.repeats} run(s) of the case)")
    return 0


def _check_output(args) -> int:
    try:
        print(check_output(args.input, args.output))
    except HnsegError as exc:
        print(f"hnseg: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def _add_dicom_options(parser_: argparse.ArgumentParser) -> None:
    """--ct/--pet may be DICOM series folders (docs/dicom.md); these select a series and ask for DICOM outputs."""
    parser_.add_argument("--ct-series", default=None, metavar="UID",
                         help="the CT's SeriesInstanceUID when the --ct folder holds several series")
    parser_.add_argument("--pet-series", default=None, metavar="UID",
                         help="the PET's SeriesInstanceUID when the --pet folder holds several series")
    parser_.add_argument("--out-dicom-seg", type=Path, default=None, metavar="FILE",
                         help="also write the mask as a DICOM-SEG referencing the CT series (needs --ct DIR)")
    parser_.add_argument("--out-rtstruct", type=Path, default=None, metavar="FILE",
                         help="also write the mask as an RTSTRUCT (ROIs GTVp, GTVn) on the CT series (needs --ct DIR)")


@exits_143_on_sigterm
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hnseg", description="Head-and-neck GTVp/GTVn segmentation in PET/CT")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--weights", type=Path, default=None, help="folder with recipe.json (default: bundled)")
    common.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    common.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    common.add_argument("--precision", choices=PRECISIONS, default="f32", help=PRECISION_HELP)
    common.add_argument("--debug", action="store_true")
    common.add_argument("--ct-only", action="store_true",
                        help="ignore the PET (zero-filled PET channels); only for recipes with \"pet_optional\": true")
    common.add_argument("--time-budget", type=time_budget_arg, default=0.0, metavar="SECONDS",
                        help="finish each case within this many seconds (the first from the process start), dropping "
                             "refinements that would not fit (default 0: none)")
    common.add_argument("--allow-trt-build", action="store_true",
                        help="let onnxruntime build TensorRT engines where none is prebuilt (minutes)")

    p = sub.add_parser("predict", parents=[common], help="one case: --ct CT --pet PET --out MASK")
    p.add_argument("--ct", type=Path, required=True)
    p.add_argument("--pet", type=Path, default=None, help="required unless the recipe allows CT-only input")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--report", type=Path, default=None)
    p.add_argument("--qc", type=Path, default=None, help="also draw the QC picture (PNG) here")
    p.add_argument("--sidecar", type=Path, default=None,
                   help="also write the crop provenance (JSON: crop indices, grids, ROI record) here")
    _add_dicom_options(p)

    for parser_ in (p, r := sub.add_parser("refine", parents=[common], help="one case refined by clicks: --ct CT "
                                           "--pet PET --clicks clicks.json --out MASK (a model with prompt channels)")):
        parser_.add_argument("--uncertainty", type=Path, default=None, metavar="DIR",
                             help="also write probabilities_gtvp/gtvn.mha and entropy.mha (float32, CT grid) to DIR")
        parser_.add_argument("--uncertainty-seed", type=int, default=None, help="instead of the recipe's seed")
    r.add_argument("--ct", type=Path, required=True)
    r.add_argument("--pet", type=Path, default=None, help="required unless the recipe allows CT-only input")
    r.add_argument("--clicks", type=Path, required=True,
                   help='JSON: {"clicks": [{"point_mm": [x, y, z], "label": "GTVp"|"GTVn", "type": '
                        '"positive"|"negative"}]}, points in mm (LPS, as ITK)')
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--report", type=Path, default=None)
    r.add_argument("--qc", type=Path, default=None, help="also draw the QC picture (PNG) here")
    _add_dicom_options(r)

    b = sub.add_parser("batch", parents=[common], help="every case folder under --input")
    b.add_argument("--input", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--qc", action="store_true", help="also draw OUT/CASE.qc.png")
    b.add_argument("--sidecar", action="store_true", help="also write the crop provenance OUT/CASE.sidecar.json")
    b.add_argument("--uncertainty", action="store_true",
                   help="also write the recipe's uncertainty maps to OUT/CASE.uncertainty/")
    b.add_argument("--uncertainty-seed", type=int, default=None, help="instead of the recipe's seed")
    b.add_argument("--dicom-seg", action="store_true",
                   help="also write OUT/CASE.seg.dcm (DICOM-SEG; the case's images/ct must be a DICOM series)")
    b.add_argument("--rtstruct", action="store_true",
                   help="also write OUT/CASE.rtstruct.dcm (RTSTRUCT; the case's images/ct must be a DICOM series)")

    e = sub.add_parser("evaluate", help="HECKTOR metrics of predicted masks against references (paired by file name)")
    e.add_argument("--pred", type=Path, required=True, help="folder of predicted masks (.mha/.nii.gz), or one mask")
    e.add_argument("--gt", type=Path, required=True,
                   help="folder of reference masks with the same file names, or one mask (then --pred is one too)")
    e.add_argument("--gt-roi", default=None, metavar="MAPPING",
                   help="with RTSTRUCT references (--gt FILE.dcm or a folder of CASE.dcm): which ROIs are GTVp and "
                        "GTVn, shell patterns, e.g. 'GTVp=GTV_P,GTVn=GTV_N*' (default 'GTVp=GTVp,GTVn=GTVn')")
    e.add_argument("--csv", type=Path, default=None, help="one row per case")
    e.add_argument("--json", type=Path, default=None, help='{"cases": [...], "aggregate": {...}}')

    ph = sub.add_parser("phantom", help="write a synthetic PET/CT case in the grand-challenge layout")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--fov", choices=("head-only", "head-neck", "whole-body", "no-head"), default="head-neck")
    ph.add_argument("--pet-unit", choices=("suv", "bqml"), default="suv")
    ph.add_argument("--out", type=Path, required=True)

    q = sub.add_parser("qc", help="QC picture (PNG) of a mask over its CT/PET, with ROI boxes from a run report")
    q.add_argument("--ct", type=Path, required=True)
    q.add_argument("--pet", type=Path, required=True)
    q.add_argument("--mask", type=Path, required=True, help="label map on the CT grid (1 GTVp, 2 GTVn)")
    q.add_argument("--reference", type=Path, default=None, help="reference label map on the CT grid (dashed)")
    q.add_argument("--report", type=Path, default=None, help="run report JSON of the prediction (ROI boxes)")
    q.add_argument("--title", default="", help="extra text for the title line")
    q.add_argument("--out", type=Path, required=True, help="the PNG to write")

    pm = sub.add_parser("pack-model", help="the grand-challenge model tarball (extracted to /opt/ml/model): "
                        "recipe.json and every file it names")
    pm.add_argument("weights_dir", type=Path, metavar="WEIGHTS_DIR", help="folder with recipe.json")
    pm.add_argument("--out", type=Path, required=True, help="the tarball to write, e.g. model.tar.gz")

    add_cohort_parser(sub, common)

    co = sub.add_parser("check-output", help="check a container run's output folder against the contract")
    co.add_argument("--input", type=Path, required=True, help="the run's input folder (images/ct/*)")
    co.add_argument("--output", type=Path, required=True, help="the run's output folder")

    pl = sub.add_parser("plan", help="per model: grid, tiles, passes, FLOPs from the ONNX graph, the T4 lower "
                        "bound and the time predicted here from a measured forward pass")
    pl.add_argument("--weights", type=Path, default=None, help="folder with recipe.json (default: bundled)")
    pl.add_argument("--ct", type=Path, required=True)
    pl.add_argument("--pet", type=Path, default=None)
    pl.add_argument("--no-measure", action="store_true", help="skip the measured forward pass (large networks)")
    pl.add_argument("--json", type=Path, default=None, help="also write the plan as JSON here")

    ca = sub.add_parser("calibrate", help="measure each model's seconds per tile on this machine and write them "
                        "to calibration.json beside the weights, for the time budget's planner")
    ca.add_argument("--weights", type=Path, default=None, help="folder with recipe.json (default: bundled)")
    ca.add_argument("--ct", type=Path, required=True)
    ca.add_argument("--pet", type=Path, default=None)
    ca.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ca.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    ca.add_argument("--repeats", type=int, default=2, help="runs of the case; the last one's costs are kept")
    ca.add_argument("--out", type=Path, default=None, help="instead of WEIGHTS/calibration.json")

    args = parser.parse_args(argv)
    if args.command == "plan":
        return _plan(args)
    if args.command == "calibrate":
        return _calibrate(args)
    if args.command == "pack-model":
        return _pack_model(args)
    if args.command == "check-output":
        return _check_output(args)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "phantom":
        from hnseg_infer.tools.phantom import hecktor_acquisition, make_phantom, write_case

        write_case(make_phantom(seed=args.seed, fov=args.fov, pet_unit=args.pet_unit,
                                **hecktor_acquisition(args.seed)), args.out)
        print(f"hnseg phantom: wrote {args.out}/input/images/{{ct,pet}} and {args.out}/reference")
        return 0
    if args.command == "qc":
        from hnseg_infer.tools.qc import draw_qc_files

        try:
            centre, seconds = draw_qc_files(ct=args.ct, pet=args.pet, mask=args.mask, reference=args.reference,
                                            report=args.report, out_png=args.out, title=args.title)
        except HnsegError as exc:
            print(f"hnseg: error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        print(f"hnseg qc: wrote {args.out} in {seconds:.1f} s ({centre.describe()})")
        return 0
    args.weights = args.weights or default_weights()
    if args.command == "cohort":
        return _cohort(args)
    if args.command in ("predict", "refine"):
        return run_one(ct=args.ct, pet=args.pet, ct_only=args.ct_only, out=args.out, weights=args.weights,
                       report_path=args.report,
                       device=args.device, backend=args.backend, precision=args.precision, debug=args.debug,
                       qc_png=args.qc,
                       sidecar=getattr(args, "sidecar", None),
                       clicks=getattr(args, "clicks", None), uncertainty_dir=args.uncertainty,
                       uncertainty_seed=args.uncertainty_seed, ct_series=getattr(args, "ct_series", None),
                       pet_series=getattr(args, "pet_series", None), dicom_seg=getattr(args, "out_dicom_seg", None),
                       rtstruct=getattr(args, "out_rtstruct", None), time_budget_s=args.time_budget,
                       allow_trt_build=args.allow_trt_build)
    return _batch(args)


if __name__ == "__main__":
    sys.exit(main())
