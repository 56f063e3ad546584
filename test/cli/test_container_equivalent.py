"""process.py as the image runs it, without Docker: a clean virtualenv from the image's CPU runtime pins alone
(requirements-cpu.txt), the files the Dockerfile copies (hnseg_infer, process.py, weights/) in an app folder, run as
a non-root user (nobody) with no network (a new network namespace), a fresh /tmp (tmpfs), HOME unwritable, the input
read-only and only the output folder writable. Then the wheel: built from the project, installed alone into another
clean virtualenv, and `hnseg predict` run from it the same way. Both must write a valid mask on the CT grid, the same.
Needs root (for the namespaces and to drop to nobody) and PyPI (as `make test` does); skipped otherwise, saying why."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from builders import write_weights
from conftest import GC_OUTPUT, REPO, files_under, small_case, write_gc_input

from hnseg_infer.cli.check_output import check_output

pytestmark = pytest.mark.slow
NOBODY = 65534
# The image's Python is the distribution's (/usr/bin/python3); a Python under /root (pyenv) is not even executable
# by a non-root user, so the clean virtualenvs are made from the system's.
SYSTEM_PYTHON = Path("/usr/bin/python3")
IMAGE_PYTHON = "3.10"  # the Dockerfile's base image is Ubuntu 22.04, whose python3 is 3.10


def image_python() -> Path | None:
    """A Python of the image's version (3.10, the oldest the package supports), if this machine has one."""
    candidates = [*sorted(Path.home().glob(f".pyenv/versions/{IMAGE_PYTHON}.*/bin/python{IMAGE_PYTHON}")),
                  Path(f"/usr/bin/python{IMAGE_PYTHON}")]  # pyenv's shims are not interpreters
    return next((path for path in candidates if path.is_file() and os.access(path, os.X_OK)), None)


def _can_isolate() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make the namespaces and to run as nobody"
    if not SYSTEM_PYTHON.is_file() or subprocess.run([str(SYSTEM_PYTHON), "-c", "import venv, ensurepip"],
                                                     capture_output=True).returncode:
        return f"needs a system Python with venv and ensurepip at {SYSTEM_PYTHON} (Debian: python3-venv)"
    for tool in ("unshare", "setpriv"):
        if shutil.which(tool) is None:
            return f"needs {tool} (util-linux)"
    probe = subprocess.run(["unshare", "-n", "-m", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare -n -m is not allowed here: {probe.stderr.strip()}"


def run_isolated(argv: list[str], *, cwd: Path, as_nobody: bool = True) -> subprocess.CompletedProcess:
    """`argv` as nobody (or root), in new network and mount namespaces, with a fresh tmpfs /tmp and no writable
    HOME."""
    user = f"setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups " if as_nobody else ""
    inner = (f"mount -t tmpfs -o mode=1777 tmpfs /tmp && exec {user}"
             "env -i HOME=/nonexistent PATH=/usr/bin:/bin LANG=C.UTF-8 \"$@\"")
    return subprocess.run(["unshare", "-n", "-m", "--propagation", "private", "sh", "-c", inner, "sh", *argv],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def venv(folder: Path, *pip_args: str, python: Path = SYSTEM_PYTHON) -> Path:
    subprocess.run([str(python), "-m", "venv", str(folder)], check=True)
    subprocess.run([str(folder / "bin" / "pip"), "install", "--quiet", *pip_args], check=True, capture_output=True,
                   timeout=900)
    return folder / "bin"


@pytest.fixture(scope="module")
def sandbox():
    if reason := _can_isolate():
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="hnseg-container-", dir="/var/tmp"))  # not under /tmp: that is replaced
    try:
        root.chmod(0o755)
        app = root / "app"  # as the Dockerfile lays out /opt/app
        shutil.copytree(REPO / "hnseg_infer", app / "hnseg_infer", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "process.py", app / "process.py")
        write_weights(app / "weights" / "test")  # the image's bundled weights: process.py finds them itself
        ct, pet = small_case()
        case = write_gc_input(root / "input", ct, pet)
        for path in [case, *case.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)  # read-only, as /input is mounted
        yield {"root": root, "app": app, "input": case, "ct": ct}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def writable_output(folder: Path) -> Path:
    folder.mkdir()
    os.chown(folder, NOBODY, NOBODY)
    return folder


def test_process_py_in_a_clean_runtime_venv_as_nobody_without_network(sandbox):
    bin_ = venv(sandbox["root"] / "runtime", "-r", str(REPO / "requirements-cpu.txt"))
    assert not list((sandbox["root"] / "runtime").glob("lib/python*/site-packages/torch"))  # the runtime set only
    output = writable_output(sandbox["root"] / "output")
    result = run_isolated([str(bin_ / "python"), "process.py", "--input", str(sandbox["input"]), "--output",
                           str(output), "--device", "cpu"], cwd=sandbox["app"])
    assert result.returncode == 0, result.stderr
    assert "hnseg: ok" in result.stdout
    check_output(sandbox["input"], output)  # uint8, labels in {0,1,2}, the CT's exact grid, nothing else
    assert files_under(output) == ["images", "images/tumor-lymph-node-segmentation", str(GC_OUTPUT)]
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(output / GC_OUTPUT)))
    assert mask.max() == 1  # the hot lesion is found
    sandbox["mask"] = mask


def test_hnseg_predict_from_the_wheel_alone(sandbox):
    """On the image's Python (3.10) where this machine has one: what runs there must not need a newer one (enum's
    StrEnum is 3.11's). That Python lives under /root (pyenv), so this run is root's, still without network."""
    python = image_python()
    wheels = sandbox["root"] / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", str(REPO), "-w", str(wheels)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("hnseg-*.whl")
    bin_ = venv(sandbox["root"] / "wheel-only", str(wheel), python=python or SYSTEM_PYTHON)
    output = writable_output(sandbox["root"] / "predicted")
    ct, pet = (next((sandbox["input"] / "images" / role).iterdir()) for role in ("ct", "pet"))
    result = run_isolated([str(bin_ / "hnseg"), "predict", "--ct", str(ct), "--pet", str(pet), "--out",
                           str(output / "mask.mha"), "--weights", str(sandbox["app"] / "weights" / "test"),
                           "--device", "cpu"], cwd=sandbox["root"],  # not the repo: the wheel's code runs
                          as_nobody=python is None)
    assert result.returncode == 0, result.stderr
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "mask.mha")))
    assert mask.max() == 1
    if "mask" in sandbox:
        assert np.array_equal(mask, sandbox["mask"])


LINUX_WHEELS = ("manylinux_2_28_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64")


def test_the_image_pins_have_wheels_for_the_image_python(tmp_path):
    """What the Dockerfile installs (requirements-cpu.txt less onnxruntime, plus onnxruntime-gpu) resolves to wheels
    for the image's Python: a pin made on a newer Python (matplotlib 3.11 needs 3.11) fails `docker build` only.
    tensorrt-cu12-libs is left out: on PyPI it is a source stub that fetches NVIDIA's wheel at build time."""
    shared = [line for line in (REPO / "requirements-cpu.txt").read_text().splitlines()
              if line.strip() and not line.startswith(("#", "onnxruntime=="))]
    gpu = [line for line in (REPO / "requirements-gpu.txt").read_text().splitlines()
           if line.strip() and not line.startswith(("#", "tensorrt-"))]
    (tmp_path / "req.txt").write_text("\n".join(shared + gpu) + "\n")
    platforms = [arg for tag in LINUX_WHEELS for arg in ("--platform", tag)]
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                             "--target", str(tmp_path / "site"), "--python-version", IMAGE_PYTHON, *platforms,
                             "--only-binary=:all:", "-r", str(tmp_path / "req.txt")],
                            capture_output=True, text=True, timeout=300)
    if result.returncode and "Network is unreachable" in result.stderr + result.stdout:
        pytest.skip("needs PyPI (as `make test` does)")
    assert result.returncode == 0, result.stderr[-2000:]
