"""`hnseg cohort --address`: joining a Ray cluster started apart (`ray start --head`), as on a cluster's head node.

Its own module: the cluster is a second Ray beside test_cohort.py's embedded one, so it runs after that one has
stopped. The cluster runs in its own process group, killed at the end (`ray stop` would stop every Ray here)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from builders import write_weights
from test_cohort import assert_on_ct_grid, manifest_rows, write_cases

pytest.importorskip("ray")
BIN = Path(sys.executable).parent
# Ray >= 2.59 authenticates by token; the head and every driver must agree (docs/cohort.md)
TOKEN_ENV = {**os.environ, "RAY_AUTH_MODE": "token"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_cpu_cluster():
    """A head node of 1 CPU; its address. Its temp folder is short: Ray's socket paths must fit 107 bytes."""
    port, temp = free_port(), Path(f"/tmp/hnseg-ray-{uuid.uuid4().hex[:8]}")
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=TOKEN_ENV)
    try:
        out, _ = head.communicate(timeout=180)
        assert head.returncode == 0, out.decode()[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # gcs_server and raylet ignore SIGTERM
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(2)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_cohort_joins_a_cluster_at_its_address_and_resumes_there(tmp_path, one_cpu_cluster):
    names = ["case0", "case1", "case2"]
    images = write_cases(tmp_path / "cases", names)
    weights = write_weights(tmp_path / "weights")
    out = tmp_path / "out"
    command = [str(BIN / "hnseg"), "cohort", str(tmp_path / "cases"), "--out", str(out), "--weights", str(weights),
               "--address", one_cpu_cluster, "--workers", "2", "--threads-per-worker", "1", "--device", "cpu"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, env=TOKEN_ENV)
    assert first.returncode == 0, first.stderr[-3000:]
    # the cluster's 1 CPU, not an embedded Ray sized for the 2 workers asked for, placed the work
    assert "the Ray cluster (1 CPU) places 1 of the 2 workers asked for; running 1" in first.stderr
    rows = manifest_rows(out)
    assert {n: rows[n]["status"] for n in names} == dict.fromkeys(names, "ok")
    assert len({rows[n]["worker"] for n in names}) == 1
    for name in names:
        assert_on_ct_grid(out / "masks" / f"{name}.mha", images["ct"])

    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=TOKEN_ENV)  # the cluster stays up
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 ok, 3 skipped, 0 failed of 3 cases" in again.stdout


@pytest.mark.slow
def test_an_address_nobody_answers_is_an_error_before_any_case(tmp_path):
    write_cases(tmp_path / "cases", ["case0"])
    address, out = f"127.0.0.1:{free_port()}", tmp_path / "out"
    result = subprocess.run([str(BIN / "hnseg"), "cohort", str(tmp_path / "cases"), "--out", str(out),
                             "--weights", str(write_weights(tmp_path / "weights")), "--address", address,
                             "--device", "cpu"], capture_output=True, text=True, timeout=600, env=TOKEN_ENV)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"cannot join the Ray cluster at --address {address}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "masks").exists() or not any((out / "masks").iterdir())
