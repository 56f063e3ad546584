"""The time budget end to end: Segmenter.predict(time_budget_s=, deadline=), report["budget"], process.py's
--time-budget / HNSEG_TIME_BUDGET (default 540 s from the process start), and SIGTERM (status terminated, nothing
under the output folder, exit 143)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
from builders import model_entry, write_weights
from conftest import GC_OUTPUT, REPO, files_under, small_case, write_gc_input

from hnseg_infer.cli.main import EXIT_TERMINATED, CaseOutputs, install_sigterm, run_case
from hnseg_infer.clock import Deadline
from hnseg_infer.inference.runner import LoadedModel
from hnseg_infer.segmenter import Segmenter


def _weights(tmp_path, n_folds=3, mirror=(2, 1), budget=None):
    files = [f"fold_{f}.onnx" for f in range(n_folds)]
    models = [model_entry(files=files, mirror_axes_zyx=list(mirror), patch_size_zyx=[8, 8, 8])]
    return write_weights(tmp_path / "weights", models=models, extra={"budget": budget} if budget else None)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Slow:
    """A real fold that also advances the fake clock by `tile_s` per tile."""

    def __init__(self, fold, clock, tile_s):
        self.fold, self.clock, self.tile_s = fold, clock, tile_s

    def __call__(self, batch):
        self.clock.now += self.tile_s * len(batch)
        return self.fold(batch)

    def __getattr__(self, name):  # provider, fallbacks: the real fold's
        return getattr(self.fold, name)


class Terminating(Slow):
    """A real fold during whose first batch the platform's SIGTERM arrives."""

    def __call__(self, batch):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # the handler runs at the next bytecode
        return self.fold(batch)


def _slowed(segmenter, clock, tile_s=0.01):
    for name, model in segmenter.models.items():
        segmenter.models[name] = LoadedModel(model.spec, model.device,
                                             tuple(Slow(f, clock, tile_s) for f in model.folds))


def test_without_a_budget_the_report_says_null_and_a_loose_budget_gives_the_same_mask(tmp_path):
    ct, pet = small_case()
    segmenter = Segmenter.from_weights(_weights(tmp_path), device="cpu")
    plain = segmenter.predict(ct, pet)
    assert plain.report.data["budget"] is None
    loose = segmenter.predict(ct, pet, time_budget_s=3600)
    budget = loose.report.data["budget"]
    assert budget["steps"] == [] and budget["clock_start"] == "predict call"
    assert budget["models"][0]["passes"] == 3 * 4  # every fold under every flip
    a, b = sitk.GetArrayFromImage(plain.mask), sitk.GetArrayFromImage(loose.mask)
    assert (a > 0).sum() > 50 and np.array_equal(a, b)  # a lesion is found, and the same voxels
    assert not any("time budget" in w for w in loose.report.data["warnings"])


def test_a_tight_budget_drops_refinements_reports_them_and_is_respected(tmp_path):
    ct, pet = small_case()
    segmenter = Segmenter.from_weights(_weights(tmp_path, budget={"reserve_s": 1.0}), device="cpu")
    clock = FakeClock()
    _slowed(segmenter, clock)
    full = segmenter.predict(ct, pet, deadline=Deadline(1e6, 0.0, clock))
    pass_s = full.report.data["budget"]["models"][0]["pass_s"]
    clock.now = 0.0
    budget_s = 1.0 + 2.5 * pass_s  # the floor and one further fold fit, not a third pass
    tight = segmenter.predict(ct, pet, deadline=Deadline(budget_s, 0.0, clock))
    record = tight.report.data["budget"]
    assert record["models"][0]["folds_run"] == 2 and record["models"][0]["mirror_axes_zyx_run"] == []
    assert [(s["kind"], s["dropped"], s["decision"]) for s in record["steps"]] == [
        ("folds", {"folds": [2]}, "skipped"), ("mirror_axes", {"mirror_axes_zyx": [2, 1]}, "skipped")]
    assert record["actual_s"] <= budget_s and record["time_budget_s"] == budget_s
    assert any(w.startswith(f"time budget {budget_s:g} s: 2 refinement(s) left out") for w in
               tight.report.data["warnings"])
    assert tight.report.data["stages"][0]["models"][0]["folds"] == 2
    assert sitk.GetArrayFromImage(tight.mask).any()


def test_process_py_budget_from_the_process_start_and_its_bad_values(tmp_path):
    ct, pet = small_case()
    case = write_gc_input(tmp_path / "input", ct, pet)
    weights = _weights(tmp_path)
    cmd = [sys.executable, str(REPO / "process.py"), "--input", str(case), "--weights", str(weights),
           "--device", "cpu"]
    default = {k: v for k, v in os.environ.items() if k != "HNSEG_TIME_BUDGET"}  # conftest sets it to 0
    done = subprocess.run(cmd + ["--output", str(tmp_path / "out"), "--report", str(tmp_path / "r.json")],
                          capture_output=True, text=True, cwd=REPO, timeout=300, env=default)
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    budget = data["budget"]
    assert budget["time_budget_s"] == 540 and budget["clock_start"] == "process start"
    startup = [data["stages_s"][k] for k in ("process_start_to_run", "load_recipe", "load_models")]
    assert all(s > 0 for s in startup) and sum(startup) < budget["actual_s"]  # start-up counts, and is measured
    assert 0 < budget["actual_s"] < 540 and budget["steps"] == []
    env = {**os.environ, "HNSEG_TIME_BUDGET": "0"}
    done = subprocess.run(cmd + ["--output", str(tmp_path / "out0"), "--report", str(tmp_path / "r0.json")],
                          capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert done.returncode == 0 and json.loads((tmp_path / "r0.json").read_text())["budget"] is None
    env["HNSEG_TIME_BUDGET"] = "ten minutes"
    done = subprocess.run(cmd + ["--output", str(tmp_path / "bad")], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env=env)
    assert done.returncode == 2 and "time budget 'ten minutes' is not a number of seconds" in done.stderr
    assert files_under(tmp_path / "bad") == []


def test_sigterm_in_a_case_writes_nothing_and_reports_terminated(tmp_path):
    ct, pet = small_case()
    segmenter = Segmenter.from_weights(_weights(tmp_path), device="cpu")
    model = next(iter(segmenter.models.values()))
    segmenter.models[model.spec.name] = LoadedModel(model.spec, "cpu",
                                                    tuple(Terminating(f, None, 0) for f in model.folds))
    previous = signal.getsignal(signal.SIGTERM)
    install_sigterm()
    try:
        outputs = CaseOutputs(tmp_path / "out" / "mask.mha", tmp_path / "report.json")
        code = run_case(segmenter, ct=write_gc_input(tmp_path / "in", ct, pet) / "images/ct/ct.mha",
                        pet=tmp_path / "in/images/pet/pet.mha", outputs=outputs)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == EXIT_TERMINATED == 143
    assert files_under(tmp_path / "out") == []
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "terminated" and "SIGTERM" in report["error"]


def _catches_sigterm(pid: int) -> bool:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def test_sigterm_to_process_py_exits_143_with_nothing_under_output(tmp_path):
    ct, pet = small_case()
    case = write_gc_input(tmp_path / "input", ct, pet)
    # a deliberately long case: a 0.3 mm grid, small overlapping tiles, three mirror axes (minutes on this CPU)
    models = [model_entry(spacing_xyz_mm=[0.3, 0.3, 0.3], patch_size_zyx=[16, 16, 16], step_fraction=0.25,
                          mirror_axes_zyx=[0, 1, 2], tile_batch=1)]
    weights = write_weights(tmp_path / "weights", models=models)
    out, report = tmp_path / "out", tmp_path / "report.json"
    process = subprocess.Popen([sys.executable, str(REPO / "process.py"), "--input", str(case), "--output", str(out),
                                "--weights", str(weights), "--report", str(report), "--device", "cpu"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not _catches_sigterm(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # into loading or inference
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert files_under(out) == [] and GC_OUTPUT.name not in stdout
    data = json.loads(report.read_text())
    assert data["status"] == "terminated" and "nothing written" in stderr


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_time_budget_values_refused(value):
    from hnseg_infer.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--ct", "a", "--pet", "b", "--out", "c", "--time-budget", value])
    assert exit_.value.code == 2


def test_batch_gives_each_case_the_budget_the_first_from_the_process_start(tmp_path):
    from hnseg_infer.cli.main import main

    ct, pet = small_case()
    for name in ("a", "b"):
        write_gc_input(tmp_path / "cases" / name, ct, pet)
    code = main(["batch", "--input", str(tmp_path / "cases"), "--out", str(tmp_path / "out"), "--weights",
                 str(_weights(tmp_path)), "--device", "cpu", "--time-budget", "1e6"])
    assert code == 0
    starts = [json.loads((tmp_path / "out" / f"{n}.report.json").read_text())["budget"]["clock_start"]
              for n in ("a", "b")]
    assert starts == ["process start", "case start"]


def test_container_main_in_a_long_lived_process_counts_from_its_call(tmp_path, monkeypatch):
    """A notebook's or test's process started long ago: its budget counts from the container_main call."""
    import hnseg_infer.cli.main as cli

    ct, pet = small_case()
    case = write_gc_input(tmp_path / "input", ct, pet)
    monkeypatch.setattr(cli, "process_start_s", lambda: time.monotonic() - 10_000.0)  # "started" ~3 h ago
    code = cli.container_main(["--input", str(case), "--output", str(tmp_path / "out"), "--weights",
                               str(_weights(tmp_path)), "--device", "cpu", "--report", str(tmp_path / "r.json"),
                               "--time-budget", "540"])
    assert code == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["budget"]["clock_start"] == "call start" and data["budget"]["steps"] == []
    assert 0 < data["budget"]["actual_s"] < 540 and data["stages_s"]["process_start_to_run"] < 60


def test_uncertainty_passes_stop_at_the_case_budget():
    from hnseg_infer.inference.anytime import Planner
    from hnseg_infer.recipe.budget import BudgetConfig
    from hnseg_infer.report import RunReport
    from hnseg_infer.uncertainty.config import UncertaintyConfig
    from hnseg_infer.uncertainty.passes import _no_time_for

    clock = FakeClock()
    config = BudgetConfig()
    planner = Planner(Deadline(100.0, 0.0, clock), config)
    uncertainty = UncertaintyConfig(passes=5, dropout_rate=0.0, seed=0, augmentations=None)
    report = RunReport()
    clock.now = 100.0 - planner.reserve_s - 25.0  # 25 s left before the reserve (10 s of a 100 s budget)
    assert _no_time_for(1, [20.0], uncertainty, report, planner, first_pass_s=None) is None
    why = _no_time_for(1, [30.0], uncertainty, report, planner, first_pass_s=None)
    assert why.startswith("another pass (~30.0 s) would end past the time budget of 100 s")
    assert _no_time_for(0, [], uncertainty, report, planner, first_pass_s=20.0) is None
    assert _no_time_for(0, [], uncertainty, report, planner, first_pass_s=30.0).startswith("a pass (~30.0 s)")
    assert _no_time_for(1, [30.0], uncertainty, report, None, first_pass_s=None) is None  # no budget: all run
