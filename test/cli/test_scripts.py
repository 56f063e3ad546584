"""do_build.sh, do_test_run.sh and do_save.sh against a stand-in `docker` on PATH (Docker does not run here): what
each passes to docker and in which order, which mounts are read-only, and do_test_run.sh's check of the output
(hnseg check-output) passing and failing on masks the stand-in writes into the mounted /output."""

import fnmatch
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import GC_OUTPUT, REPO, small_case, write_gc_input

from hnseg_infer.cli.check_output import check_output
from hnseg_infer.errors import OutputError

# Records each call as a JSON line; `run` writes a mask as FAKE_RUN says into the host folder mounted at /output,
# on the grid of the CT in the folder mounted at /input; `save` writes a few bytes.
FAKE_DOCKER = f"""#!{sys.executable}
import json, os, sys
from pathlib import Path
import numpy as np, SimpleITK as sitk
args = sys.argv[1:]
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[0] == "save":
    sys.stdout.buffer.write(b"image layers" * 100)
if args[0] == "run" and "--entrypoint" not in args:  # not the permission clean-up
    mounts = dict(reversed(args[i + 1].split(":", 1)) for i, a in enumerate(args) if a == "--volume")
    host = {{target.split(":")[0]: source for target, source in mounts.items()}}
    mode = os.environ.get("FAKE_RUN", "good")
    ct = sitk.ReadImage(str(next((Path(host["/input"]) / "images" / "ct").iterdir())))
    labels = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8)
    labels[2:4, 5:9, 5:9] = 3 if mode == "label-3" else 1
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(ct)
    if mode == "shifted":
        mask.SetOrigin([o + 0.5 for o in ct.GetOrigin()])
    out = Path(host["/output"]) / "{GC_OUTPUT}"
    out.parent.mkdir(parents=True)
    sitk.WriteImage(mask, str(out))
    if mode == "extra":
        (Path(host["/output"]) / "report.json").write_text("{{}}")
    print("hnseg: ok in 1.0 s on FakeExecutionProvider: GTVp 0.1 mL in 1 component(s)")
"""


@pytest.fixture
def fake_bin(tmp_path):
    """PATH with the stand-in docker, and an nvidia-smi that succeeds only when FAKE_GPU=1."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "docker").write_text(FAKE_DOCKER)
    (folder / "nvidia-smi").write_text('#!/bin/sh\n[ "$FAKE_GPU" = 1 ]\n')
    for tool in folder.iterdir():
        tool.chmod(0o755)
    return folder


def script(name, *args, fake_bin, tmp_path, **env):
    environment = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "FAKE_DOCKER_LOG": str(tmp_path / "log"),
                   "PYTHON": sys.executable, "WORK": str(tmp_path / "work"), **env}
    result = subprocess.run(["bash", str(REPO / name), *map(str, args)], capture_output=True, text=True,
                            env=environment, timeout=120)
    calls = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()] if (
        tmp_path / "log").exists() else []
    return result, calls


def volumes(run_args) -> dict:
    """--volume SOURCE:TARGET[:ro] as {TARGET: (SOURCE, read_only)}."""
    out = {}
    for i, arg in enumerate(run_args):
        if arg == "--volume":
            source, target, *options = run_args[i + 1].split(":")
            out[target] = (source, options == ["ro"])
    return out


def option(run_args, name):
    return run_args[run_args.index(name) + 1]


@pytest.fixture
def case(tmp_path):
    return write_gc_input(tmp_path / "case", *small_case())


def test_build_passes_the_tag_and_the_repository(fake_bin, tmp_path):
    result, calls = script("do_build.sh", fake_bin=fake_bin, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    result, more = script("do_build.sh", "hnseg:v2", fake_bin=fake_bin, tmp_path=tmp_path)
    assert calls == [["build", "--platform=linux/amd64", "--tag", "hnseg", str(REPO)]]
    assert more[-1] == ["build", "--platform=linux/amd64", "--tag", "hnseg:v2", str(REPO)]


def test_test_run_mounts_and_limits_as_the_platform_and_checks_the_output(fake_bin, tmp_path, case):
    result, calls = script("do_test_run.sh", case, fake_bin=fake_bin, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [c[:2] for c in calls] == [["volume", "create"], ["run", "--rm"], ["run", "--rm"], ["volume", "rm"]]
    tmp_volume, run, cleanup, removed = calls[0][2], calls[1], calls[2], calls[3][2]
    assert removed == tmp_volume and run[-1] == "hnseg"  # the image last: nothing after it reaches process.py
    # after the run, the image's user opens what it wrote to the host user (the templates' clean-up)
    assert cleanup[-4:] == ["/bin/sh", "hnseg", "-c", "chmod -R -f o+rwX /output/* || true"]
    assert volumes(cleanup) == {"/output": (str(tmp_path / "work" / "output"), False)}
    mounts = volumes(run)
    assert mounts == {"/input": (str(case), True), "/output": (str(tmp_path / "work" / "output"), False),
                      "/tmp": (tmp_volume, False)}
    assert option(run, "--network") == "none" and option(run, "--memory") == "16g"
    assert option(run, "--memory-swap") == "16g" and option(run, "--shm-size") == "128m"
    assert option(run, "--user") == "user" and option(run, "--cap-drop") == "ALL"
    assert "--gpus" not in run  # nvidia-smi fails here
    out = result.stdout
    assert "=+= summary: hnseg: ok in 1.0 s on FakeExecutionProvider" in out
    assert re.search(r"docker run exited 0 after \d+\.\d{3} s \(wall", out)
    assert f"hnseg check-output: ok: {tmp_path / 'work' / 'output' / GC_OUTPUT} is uint8 on the CT grid (48×40×20)" in out
    assert "GTVp 32 voxels, GTVn 0 voxels" in out


def test_test_run_asks_for_the_gpus_when_nvidia_smi_works_and_mounts_a_model(fake_bin, tmp_path, case):
    model = tmp_path / "model"
    model.mkdir()
    result, calls = script("do_test_run.sh", case, fake_bin=fake_bin, tmp_path=tmp_path, FAKE_GPU="1",
                           MODEL_DIR=str(model), TAG="mine:1")
    assert result.returncode == 0, result.stderr
    run = calls[1]
    assert option(run, "--gpus") == "all" and run[-1] == "mine:1"
    assert volumes(run)["/opt/ml/model"] == (str(model), True)


@pytest.mark.parametrize("mode, message", [
    ("shifted", "is not on the grid of the CT"),
    ("label-3", "holds the values [0, 3]"),
    ("extra", "holds more than images/tumor-lymph-node-segmentation/output.mha: report.json"),
])
def test_test_run_fails_when_the_output_breaks_the_contract(fake_bin, tmp_path, case, mode, message):
    result, calls = script("do_test_run.sh", case, fake_bin=fake_bin, tmp_path=tmp_path, FAKE_RUN=mode)
    assert result.returncode == 2 and "check-output: ok" not in result.stdout
    (line,) = result.stderr.splitlines()
    assert line.startswith("hnseg: error: ") and message in line
    assert calls[-1][:2] == ["volume", "rm"]  # the throwaway /tmp is removed whatever happened


def test_test_run_writes_the_demo_case_when_none_is_given(fake_bin, tmp_path):
    result, calls = script("do_test_run.sh", fake_bin=fake_bin, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    demo = tmp_path / "work" / "demo-case"
    assert volumes(calls[1])["/input"] == (str(demo / "input"), True)
    assert len(list((demo / "reference").iterdir())) == 1  # hnseg phantom's layout
    assert "hnseg check-output: ok" in result.stdout


def test_save_gzips_the_image_with_a_time_stamp_and_warns_above_the_limit(fake_bin, tmp_path):
    saved = tmp_path / "saved"
    saved.mkdir()
    result, calls = script("do_save.sh", "hnseg:v2", fake_bin=fake_bin, tmp_path=tmp_path, OUT_DIR=str(saved))
    assert result.returncode == 0, result.stderr
    assert calls == [["save", "hnseg:v2"]]
    (tarball,) = saved.iterdir()
    assert re.fullmatch(r"hnseg_v2_\d{8}-\d{6}\.tar\.gz", tarball.name)
    assert subprocess.run(["gzip", "-dc", str(tarball)], capture_output=True).stdout == b"image layers" * 100
    assert f"=+= wrote {tarball}: {tarball.stat().st_size} bytes" in result.stdout and not result.stderr
    result, _ = script("do_save.sh", fake_bin=fake_bin, tmp_path=tmp_path, OUT_DIR=str(saved), GC_MAX_IMAGE_BYTES="10")
    assert result.returncode == 0 and "above grand-challenge's limit of 10 bytes" in result.stderr


def write_mask(path, labels_zyx, like):
    mask = sitk.GetImageFromArray(labels_zyx)
    mask.CopyInformation(like)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(mask, str(path))


def test_check_output_refuses_a_mask_that_is_not_uint8_or_missing(tmp_path, case):
    ct = sitk.ReadImage(str(next((case / "images" / "ct").iterdir())))
    output = tmp_path / "output"
    with pytest.raises(OutputError, match="no mask at .*output.mha: the run wrote nothing"):
        check_output(case, output)
    write_mask(output / GC_OUTPUT, np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.int16), ct)
    with pytest.raises(OutputError, match="output.mha is 16-bit signed integer: the contract is uint8"):
        check_output(case, output)
    write_mask(output / GC_OUTPUT, np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8), ct)
    assert check_output(case, output).endswith("GTVp 0 voxels, GTVn 0 voxels")


def excluded_from_build_context(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parent folders decides; `!`
    re-includes; a leading `**/` matches at any depth."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]  # "a", "a/b", "a/b/c"
    excluded = False
    for pattern in patterns:
        negated, glob = pattern.startswith("!"), pattern.lstrip("!")
        if glob.startswith("**/"):
            names, glob = parts, glob[3:]  # any folder or file name along the path
        else:
            names = prefixes
        if any(fnmatch.fnmatchcase(name, glob) for name in names):
            excluded = not negated
    return excluded


def test_every_file_the_dockerfile_copies_is_in_the_build_context():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copies = [line.split()[1:] for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("COPY")]
    sources = [arg for args in copies for arg in args[:-1] if not arg.startswith("--")]
    assert "export/to_tensorrt.py" in sources and "weights" in sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert not excluded_from_build_context(source, patterns), f"{source} is left out by .dockerignore"
    # the rule itself: what .dockerignore is there to leave out stays out
    assert all(excluded_from_build_context(p, patterns) for p in
               (".venv", "test/cli/test_scripts.py", "export/to_onnx.py", "hnseg_infer/__pycache__/x.pyc"))
