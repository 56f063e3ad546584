"""The image's pinned runtime: requirements-cpu.txt (installs anywhere) and requirements-gpu.txt on top of it, each
shared pin written once, both within pyproject.toml's ranges, and the Dockerfile installing them without putting
onnxruntime and onnxruntime-gpu side by side."""

import re
import subprocess

import tomllib
from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CPU = {"numpy", "scipy", "simpleitk", "onnxruntime", "openvino", "connected-components-3d", "tqdm", "matplotlib"}
GPU = {"onnxruntime-gpu", "tensorrt-cu12-libs"}


def pins(name) -> dict[str, Requirement]:
    lines = [line.strip() for line in (REPO / name).read_text().splitlines()]
    requirements = [Requirement(line) for line in lines if line and not line.startswith("#")]
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in requirements), name
    return {canonicalize_name(r.name): r for r in requirements}


def version(requirement: Requirement) -> str:
    return next(iter(requirement.specifier)).version


def test_the_cpu_set_and_the_gpu_libraries_each_pin_once():
    cpu, gpu = pins("requirements-cpu.txt"), pins("requirements-gpu.txt")
    assert set(cpu) == CPU and set(gpu) == GPU  # Requirement() also refuses a `-r` line: the GPU file stands alone
    assert version(gpu["onnxruntime-gpu"]) == version(cpu["onnxruntime"])  # the tests run the image's onnxruntime
    assert not (REPO / "requirements.txt").exists()


def test_the_pins_are_within_pyprojects_ranges():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ranges = {canonicalize_name(r.name): r.specifier for r in map(Requirement, project["dependencies"])}
    ranges.update({canonicalize_name(r.name): r.specifier
                   for r in map(Requirement, project["optional-dependencies"]["gpu"])})
    for name, requirement in {**pins("requirements-cpu.txt"), **pins("requirements-gpu.txt")}.items():
        if name in ranges:
            assert version(requirement) in ranges[name], f"{name} {version(requirement)} not in {ranges[name]}"
    assert CPU | {"onnxruntime-gpu"} <= set(ranges)  # every pin but the TensorRT libraries was checked


def test_the_dockerfile_installs_the_cpu_set_without_onnxruntime_and_the_gpu_file(tmp_path):
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "pip uninstall" not in dockerfile and "requirements.txt" not in dockerfile
    (run,) = re.findall(r"RUN (grep .*?requirements-cpu\.txt.*?)\n(?!\s*&&)", dockerfile, flags=re.S)
    # run its filter here: what pip is given is the CPU set less onnxruntime, then the GPU file
    filter_command = run.split("&&")[0].replace("\\", "").replace("/tmp/", f"{tmp_path}/")
    subprocess.run(filter_command, shell=True, check=True, cwd=REPO)
    shared = pins(next(tmp_path.iterdir()))
    assert set(shared) == CPU - {"onnxruntime"}
    assert "-r requirements-gpu.txt" in run
