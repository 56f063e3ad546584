"""`hnseg cohort` on a local Ray with 2 actors (cli/cohort.py): failure isolation, resume, a worker killed mid-case,
references scored as `hnseg evaluate` does, an interrupted run, and Ray kept off `hnseg batch` and process.py.

One Ray session is shared by the module's tests (its start-up is most of their time). The tests on Ray are `slow`
(tens of seconds on the shared 2-core machine, Ray's start-up mostly): `make test` runs them, `make test-fast`
keeps the ones without Ray."""

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from builders import image_from_function, oblique_direction, write_weights
from conftest import REPO, ct_values, small_case, write_gc_input

from hnseg_infer.cli.main import main
from hnseg_infer.tools import metrics

ray = pytest.importorskip("ray")
from hnseg_infer.cli.cohort import local_ray_options  # noqa: E402

SESSION_MARK = f"HNSEG_TEST_SESSION={uuid.uuid4().hex}"  # in the environment of this session's workers only


@pytest.fixture(scope="module")
def ray_session():
    options = local_ray_options(2)
    name, value = SESSION_MARK.split("=")
    options["runtime_env"]["env_vars"][name] = value
    ray.init(**options)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_weights(tmp_path_factory.mktemp("cohort") / "weights")


def write_cases(root: Path, names, *, bad=()) -> dict:
    """Grand-challenge case folders with an oblique CT grid; the cases in `bad` get a CT that is not an image."""
    ct, pet = small_case(ct_direction=oblique_direction())
    for name in names:
        write_gc_input(root / name / "input", ct, pet)
        if name in bad:
            (root / name / "input" / "images" / "ct" / "ct.mha").write_bytes(b"not an image")
    return {"ct": ct}


def cohort(source, out, weights, *extra) -> int:
    return main(["cohort", str(source), "--out", str(out), "--weights", str(weights), "--workers", "2",
                 "--threads-per-worker", "1", "--device", "cpu", *map(str, extra)])


def manifest_rows(out: Path) -> dict:
    with open(out / "manifest.csv", newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def assert_on_ct_grid(mask_path: Path, ct: sitk.Image):
    mask = sitk.ReadImage(str(mask_path))
    assert mask.GetSize() == ct.GetSize() and mask.GetPixelID() == sitk.sitkUInt8
    assert np.allclose(mask.GetSpacing(), ct.GetSpacing()) and np.allclose(mask.GetOrigin(), ct.GetOrigin())
    assert np.allclose(mask.GetDirection(), ct.GetDirection())
    labels = sitk.GetArrayFromImage(mask)
    assert set(np.unique(labels)) <= {0, 1, 2} and (labels == 1).sum() > 0  # the lesion is found


@pytest.mark.slow
def test_a_bad_case_fails_alone_and_a_rerun_skips_the_rest(tmp_path, ray_session, weights, capsys):
    names = [f"case{i}" for i in range(6)]
    images = write_cases(tmp_path / "cases", names, bad=("case3",))
    out = tmp_path / "out"
    assert cohort(tmp_path / "cases", out, weights) == 3
    rows = manifest_rows(out)
    assert sorted(rows) == names
    good = [n for n in names if n != "case3"]
    for name in good:
        assert rows[name]["status"] == "ok" and rows[name]["error"] == ""
        assert_on_ct_grid(out / "masks" / f"{name}.mha", images["ct"])
        assert json.loads((out / "reports" / f"{name}.json").read_text())["status"] == "ok"
        assert len(rows[name]["ct_sha256"]) == 64 and float(rows[name]["gtvp_ml"]) > 0
    assert len({rows[n]["worker"] for n in good}) == 2  # both actors took cases
    failed = rows["case3"]
    assert failed["status"] == "failed" and "cannot be read as a medical image" in failed["error"]
    assert str(tmp_path / "cases" / "case3" / "input" / "images" / "ct" / "ct.mha") in failed["error"]
    assert not (out / "masks" / "case3.mha").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (5, 1, 0)
    assert list(summary["failed_cases"]) == ["case3"]
    assert "5 ok, 0 skipped, 1 failed of 6 cases" in capsys.readouterr().out

    written = {n: (out / "masks" / f"{n}.mha").stat().st_mtime_ns for n in good}
    assert cohort(tmp_path / "cases", out, weights) == 3
    rows = manifest_rows(out)
    assert {n: rows[n]["status"] for n in names} == {**{n: "skipped" for n in good}, "case3": "failed"}
    assert {n: (out / "masks" / f"{n}.mha").stat().st_mtime_ns for n in good} == written  # not written again
    assert "0 ok, 5 skipped, 1 failed of 6 cases" in capsys.readouterr().out


def running_case_workers() -> list[int]:
    """Pids of this session's actors busy in CaseWorker.run (Ray names the process by the method it runs)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes()
            if title.startswith(b"ray::CaseWorker.run") and SESSION_MARK.encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


@pytest.mark.slow
def test_a_worker_killed_mid_case_is_replaced_and_its_case_retried(tmp_path, ray_session, weights):
    write_cases(tmp_path / "cases", ["b", "c", "d"])
    big_ct = image_from_function(ct_values, size_xyz=(120, 110, 60), spacing_xyz_mm=(0.8, 0.8, 1.0),
                                 origin_xyz_mm=(-48.0, -44.0, -20.0), direction=oblique_direction())
    _, pet = small_case()
    write_gc_input(tmp_path / "cases" / "a" / "input", big_ct, pet)  # the slow case: time to kill its worker
    killed = []

    def kill_first_busy_worker():
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for pid in running_case_workers():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.005)

    killer = threading.Thread(target=kill_first_busy_worker, daemon=True)
    killer.start()
    out = tmp_path / "out"
    assert cohort(tmp_path / "cases", out, weights) == 0
    killer.join()
    assert len(killed) == 1
    rows = manifest_rows(out)
    assert {r["status"] for r in rows.values()} == {"ok"}
    retried = [r for r in rows.values() if r["attempts"] == "2"]
    assert retried and all(not r["worker"].endswith(f":{killed[0]}") for r in retried)
    assert all(r["attempts"] == "1" for r in rows.values() if r not in retried)
    assert sitk.ReadImage(str(out / "masks" / "a.mha")).GetSize() == big_ct.GetSize()


def reference_on(ct: sitk.Image) -> sitk.Image:
    """GTVp: a 6 mm ball inside the lesion (so the PET-threshold prediction overlaps it partly); GTVn: nothing."""
    from conftest import LESION_CENTER_XYZ_MM

    ball = image_from_function(lambda p: (np.linalg.norm(p - LESION_CENTER_XYZ_MM, axis=1) < 6.0).astype(float),
                               size_xyz=ct.GetSize(), spacing_xyz_mm=ct.GetSpacing(), origin_xyz_mm=ct.GetOrigin(),
                               direction=ct.GetDirection())
    return sitk.Cast(ball, sitk.sitkUInt8)


def assert_same_figures(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] is None if value is None else got[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.slow
def test_hecktor_layout_references_scored_as_hnseg_evaluate_does(tmp_path, ray_session, weights, capsys):
    source = tmp_path / "hecktor"
    (source / "imagesTr").mkdir(parents=True)
    (source / "labelsTr").mkdir()
    for i, direction in enumerate([(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), oblique_direction()]):
        ct, pet = small_case(ct_direction=direction)
        sitk.WriteImage(ct, str(source / "imagesTr" / f"CHUM-00{i}__CT.nii.gz"))
        sitk.WriteImage(pet, str(source / "imagesTr" / f"CHUM-00{i}__PT.nii.gz"))
        sitk.WriteImage(reference_on(ct), str(source / "labelsTr" / f"CHUM-00{i}.nii.gz"))
    out = tmp_path / "out"
    assert cohort(source, out, weights) == 0
    expected = metrics.aggregate([metrics.evaluate_files(out / "masks" / f"{c}.mha", source / "labelsTr" /
                                                         f"{c}.nii.gz", case=c) for c in ("CHUM-000", "CHUM-001")])
    assert 0 < expected["gtvp_dice_mean"] < 1
    assert_same_figures(json.loads((out / "summary.json").read_text())["hecktor"], expected)
    assert "HECKTOR figures: 2 cases" in capsys.readouterr().out
    rows = manifest_rows(out)
    assert float(rows["CHUM-000"]["gtvp_dice"]) == pytest.approx(
        metrics.evaluate_files(out / "masks" / "CHUM-000.mha", source / "labelsTr" / "CHUM-000.nii.gz",
                               case="CHUM-000").gtvp.dice, abs=1e-6)
    # the resumed run's figures come back from the manifest's columns
    assert cohort(source, out, weights) == 0
    assert_same_figures(json.loads((out / "summary.json").read_text())["hecktor"], expected)
    # other references (--references): the skipped cases are scored again against them, without running
    (tmp_path / "empty").mkdir()
    for case in ("CHUM-000", "CHUM-001"):
        empty = sitk.ReadImage(str(source / "labelsTr" / f"{case}.nii.gz")) * 0
        sitk.WriteImage(empty, str(tmp_path / "empty" / f"{case}.nii.gz"))
    assert cohort(source, out, weights, "--references", tmp_path / "empty") == 0
    rows = manifest_rows(out)
    assert {r["status"] for r in rows.values()} == {"skipped"}
    assert rows["CHUM-000"]["reference"] == str(tmp_path / "empty" / "CHUM-000.nii.gz")
    assert json.loads((out / "summary.json").read_text())["hecktor"]["gtvp_dice_mean"] == 0.0  # nothing to find


def test_errors_before_any_case_exit_2_and_write_nothing(tmp_path, weights, capsys):
    write_cases(tmp_path / "cases", ["a"])
    (tmp_path / "cases" / "imagesTr").mkdir()
    (tmp_path / "cases" / "imagesTr" / "X__CT.nii.gz").write_bytes(b"x")
    assert cohort(tmp_path / "cases", tmp_path / "out", weights) == 2
    assert "is ambiguous" in capsys.readouterr().err and not (tmp_path / "out").exists()
    broken = write_weights(tmp_path / "broken")
    (broken / "recipe.json").write_text("{")
    assert cohort(tmp_path / "cases" / "a", tmp_path / "out", broken) == 2
    assert not (tmp_path / "out").exists()


def test_workers_the_cluster_cannot_place_are_not_asked_for(tmp_path, ray_session, weights, capsys):
    """An actor Ray cannot place waits for ever: no GPU for --gpus-per-worker is an error before any case, and more
    workers than the CPUs hold are cut to those that fit."""
    from hnseg_infer.cli.cohort import CohortOptions, _placeable

    write_cases(tmp_path / "cases", ["a"])
    assert cohort(tmp_path / "cases", tmp_path / "out", weights, "--gpus-per-worker", "1") == 2
    err = capsys.readouterr().err
    assert "cannot place one worker of 1 CPU(s) and 1 GPU(s)" in err and "0 GPU" in err
    assert not (tmp_path / "out" / "masks").exists()
    options = CohortOptions(weights=weights, out=tmp_path, workers=4, threads_per_worker=2, gpus_per_worker=0.5)
    assert _placeable(options, {"CPU": 16.0, "GPU": 1.0}).workers == 2  # 2 GPUs' halves
    assert _placeable(options, {"CPU": 6.0, "GPU": 8.0}).workers == 3  # 6 CPUs / 2
    assert "places 3 of the 4 workers" in capsys.readouterr().err


@pytest.mark.slow
def test_an_interrupted_run_leaves_a_consistent_manifest_and_resumes(tmp_path, weights):
    """SIGTERM to a real `hnseg cohort` process (its own local Ray) once a few cases are done: exit 130, every
    manifest row's mask in place, and the next run does only the rest."""
    names = [f"c{i:02d}" for i in range(24)]
    write_cases(tmp_path / "cases", names)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hnseg_infer.cli.main", "cohort", str(tmp_path / "cases"), "--out", str(out),
           "--weights", str(weights), "--workers", "1", "--threads-per-worker", "1", "--device", "cpu"]
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "manifest.csv").exists() and len(manifest_rows(out)) >= 3:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    rows = manifest_rows(out)
    assert 3 <= len(rows) < len(names) and {r["status"] for r in rows.values()} == {"ok"}
    for name in rows:
        assert sitk.ReadImage(str(out / "masks" / f"{name}.mha")).GetPixelID() == sitk.sitkUInt8
    assert "interrupted" in stderr and json.loads((out / "summary.json").read_text())["interrupted"] is True
    done = set(rows)
    assert subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=300, check=False).returncode == 0
    rows = manifest_rows(out)
    assert {n for n, r in rows.items() if r["status"] == "skipped"} == done
    assert {n for n, r in rows.items() if r["status"] == "ok"} == set(names) - done


def test_batch_shares_the_sources_and_manifest_and_neither_batch_nor_process_imports_ray(tmp_path, weights):
    ct, pet = small_case()
    for name in ("A", "B"):
        sitk.WriteImage(ct, str(tmp_path / f"{name}_ct.mha"))
        sitk.WriteImage(pet, str(tmp_path / f"{name}_pet.mha"))
    (tmp_path / "cohort.csv").write_text("case,ct,pet\nA,A_ct.mha,A_pet.mha\nB,B_ct.mha,B_pet.mha\n")
    write_gc_input(tmp_path / "gc" / "input", ct, pet)
    script = (f"import sys; from hnseg_infer.cli.main import main, container_main; "
              f"a = main(['batch', '--input', {str(tmp_path / 'cohort.csv')!r}, '--out', {str(tmp_path / 'masks')!r},"
              f" '--weights', {str(weights)!r}, '--device', 'cpu']); "
              f"b = container_main(['--input', {str(tmp_path / 'gc' / 'input')!r}, '--output', "
              f"{str(tmp_path / 'gc-out')!r}, '--weights', {str(weights)!r}, '--device', 'cpu', '--report', "
              f"{str(tmp_path / 'r.json')!r}]); print(a, b, 'ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.stdout.strip().splitlines()[-1] == "0 0 False", result.stderr
    rows = manifest_rows(tmp_path / "masks")
    assert {n: r["status"] for n, r in rows.items()} == {"A": "ok", "B": "ok"}
    assert rows["A"]["ct"] == str(tmp_path / "A_ct.mha") and (tmp_path / "masks" / "B.mha").is_file()


def test_batch_runs_an_nnunet_raw_source_in_its_channel_order(tmp_path, weights):
    """PET as channel 0 and CT as channel 1 (dataset.json): the masks are on the CT's grid and find the lesion."""
    ct, pet = small_case(ct_direction=oblique_direction())
    source = tmp_path / "Dataset900_HN"
    (source / "imagesTs").mkdir(parents=True)
    (source / "dataset.json").write_text(json.dumps({"channel_names": {"0": "PET", "1": "CT"},
                                                     "labels": {"background": 0, "GTVp": 1, "GTVn": 2},
                                                     "file_ending": ".nii.gz"}))
    for case in ("HN_001", "HN_002"):
        sitk.WriteImage(pet, str(source / "imagesTs" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(ct, str(source / "imagesTs" / f"{case}_0001.nii.gz"))
    assert main(["batch", "--input", str(source), "--out", str(tmp_path / "masks"), "--weights", str(weights),
                 "--device", "cpu"]) == 0
    for case in ("HN_001", "HN_002"):
        assert_on_ct_grid(tmp_path / "masks" / f"{case}.mha", sitk.ReadImage(str(source / "imagesTs" /
                                                                               f"{case}_0001.nii.gz")))
    assert set(manifest_rows(tmp_path / "masks")) == {"HN_001", "HN_002"}
