"""Prebuilt TensorRT engines: where they live, the stamp saying what they were built for, the facts of the GPU at
hand, and the decision to use an engine or to refuse it.

An engine is valid only for the GPU model, compute capability and TensorRT version it was built with, and for the
exact ONNX file it was built from. onnxruntime's TensorRT EP only logs a warning when an engine's compute capability
differs from the GPU's (then fails or runs slowly), so hnseg compares the stamp itself and, on any difference, runs
the plain ONNX on the CUDA EP with a report line saying why. Engines are built by export/to_tensorrt.py.

Layout, beside `fold_0.onnx`:
    fold_0.trt/context.onnx   onnxruntime EP-context model: one EPContext node naming the engine file beside it
    fold_0.trt/<engine file>  the serialised TensorRT engine (fp16, one optimisation profile over the tile batch)
    fold_0.trt/stamp.json     EngineStamp: GPU, compute capability, TensorRT and onnxruntime versions, source sha256,
                              profile shapes, sha256 of every file in the folder, the proof against the plain ONNX
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

from hnseg_infer.errors import ModelError
from hnseg_infer.io.atomic import file_sha256

TENSORRT = "TensorrtExecutionProvider"
STAMP_SCHEMA = 1
CONTEXT_MODEL, STAMP_FILE = "context.onnx", "stamp.json"
REBUILD = "rebuild the engines on this GPU with: python export/to_tensorrt.py WEIGHTS_DIR --overwrite"
# onnxruntime-gpu 1.22's TensorRT EP links libnvinfer.so.10; the unversioned name is a development install's.
NVINFER_NAMES = ("libnvinfer.so.10", "libnvinfer.so")
_CU_ATTRIBUTE_CC_MAJOR, _CU_ATTRIBUTE_CC_MINOR = 75, 76  # CUdevice_attribute values in cuda.h


def engine_dir(model_path: Path) -> Path:
    """The folder holding a model's engine: `fold_0.onnx` → `fold_0.trt`, `fold_0.fp16.onnx` → `fold_0.fp16.trt`."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.trt")


@dataclass(frozen=True)
class Platform:
    """What an engine must match: the GPU (device 0, as onnxruntime uses it) and the TensorRT library loaded.
    A fact that could not be read is None, with the reason in `problems`."""

    gpu_name: str | None
    compute_capability: str | None  # "7.5"
    tensorrt_version: str | None  # "10.9.0"
    problems: tuple[str, ...] = ()

    @property
    def ready(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        gpu = f"{self.gpu_name} (sm_{self.compute_capability.replace('.', '')})" if self.gpu_name else "no GPU"
        return f"{gpu} with TensorRT {self.tensorrt_version or 'absent'}"


@dataclass(frozen=True)
class EngineStamp:
    """stamp.json: what one engine folder was built from, for and with, and how it compared with the plain ONNX."""

    source_file: str
    source_sha256: str
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    onnxruntime_version: str
    fp16: bool
    input_name: str
    profile_min: tuple[int, ...]  # [N, C, z, y, x] in the network's axis order
    profile_opt: tuple[int, ...]
    profile_max: tuple[int, ...]
    files_sha256: dict  # every file of the engine folder but the stamp, context.onnx included
    proof: dict = field(default_factory=dict)
    build_s: float = 0.0
    schema: int = STAMP_SCHEMA

    @property
    def platform(self) -> Platform:
        return Platform(self.gpu_name, self.compute_capability, self.tensorrt_version)

    def write(self, folder: Path) -> Path:
        path = Path(folder) / STAMP_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path


def read_stamp(path: Path) -> EngineStamp:
    """The stamp at `path`; ModelError naming the file and the fault when it is not one this version wrote."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{path}: not a readable engine stamp ({error})") from error
    if not isinstance(data, dict) or data.get("schema") != STAMP_SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ModelError(f"{path}: engine stamp schema {found!r}, this hnseg reads schema {STAMP_SCHEMA}")
    try:
        stamp = EngineStamp(**data)
    except TypeError as error:  # missing or unknown keys
        raise ModelError(f"{path}: engine stamp keys do not match schema {STAMP_SCHEMA} ({error})") from error
    _check_stamp_types(stamp, path)
    profiles = {k: tuple(data[k]) for k in ("profile_min", "profile_opt", "profile_max")}  # JSON gives lists
    return EngineStamp(**{**data, **profiles})


def _check_stamp_types(stamp: EngineStamp, path: Path) -> None:
    texts = ("source_file", "source_sha256", "gpu_name", "compute_capability", "tensorrt_version", "input_name")
    bad = [k for k in texts if not isinstance(getattr(stamp, k), str) or not getattr(stamp, k)]
    bad += [k for k in ("profile_min", "profile_opt", "profile_max")
            if not (isinstance(getattr(stamp, k), (list, tuple)) and len(getattr(stamp, k)) == 5
                    and all(isinstance(d, int) and d > 0 for d in getattr(stamp, k)))]
    if not (isinstance(stamp.files_sha256, dict) and CONTEXT_MODEL in stamp.files_sha256):
        bad.append("files_sha256")
    if bad:
        raise ModelError(f"{path}: engine stamp has invalid {', '.join(bad)}")


def platform_mismatch(stamp: EngineStamp, here: Platform) -> str | None:
    """Why an engine built for `stamp` cannot run here, or None. The GPU model counts, not only its compute
    capability: TensorRT engines are tuned to one GPU model and NVIDIA does not support moving them to another."""
    if not here.ready:
        return f"it cannot be checked on this machine ({'; '.join(here.problems)})"
    if stamp.platform == here:
        return None
    return f"built for {stamp.platform.describe()}, this is {here.describe()}"


def files_mismatch(stamp: EngineStamp, folder: Path, source: Path, source_sha256: str) -> str | None:
    """Why the engine folder does not hold what its stamp promises for this ONNX file, or None."""
    if stamp.source_file != source.name or stamp.source_sha256 != source_sha256:
        return (f"built from {stamp.source_file} with sha256 {stamp.source_sha256[:12]}…, but {source.name} has "
                f"sha256 {source_sha256[:12]}… (the model was re-exported after the engine was built)")
    for name, sha in stamp.files_sha256.items():
        path = folder / name
        if not path.is_file():
            return f"{name} listed in {STAMP_FILE} is missing"
        if file_sha256(path) != sha:
            return f"{name} differs from the file the stamp describes (truncated or replaced)"
    return None


@dataclass(frozen=True)
class EnginePlan:
    """What OnnxModel opens: the engine's context model on TensorRT alone, or the plain ONNX on `providers`."""

    engine: Path | None  # the context model, or None: run the plain ONNX
    stamp: EngineStamp | None
    providers: list[str]  # for the plain ONNX (also the fallback if the engine fails to load)
    fallbacks: list[str]


def plan_engine(model_path: Path, providers: list[str], *, source_sha256: str | None = None,
                probe: Callable[[], Platform] | None = None, allow_build: bool = False) -> EnginePlan:
    """Use the stamped engine beside `model_path` when its stamp matches this GPU, TensorRT and ONNX file.

    A CPU-only chain: `providers` unchanged. No engine folder: without TensorRT (an engine built inside a case can
    take minutes of its budget), with a fallback line, unless `allow_build` (--allow-trt-build) lets onnxruntime
    build and cache one. An engine that does not match: the plain ONNX without TensorRT and a fallback line saying
    exactly why.
    """
    folder = engine_dir(model_path)
    without_trt = [p for p in providers if p != TENSORRT]
    if providers == ["CPUExecutionProvider"] or (not folder.is_dir() and (allow_build or TENSORRT not in providers)):
        return EnginePlan(None, None, providers, [])
    if not folder.is_dir():
        line = (f"no prebuilt TensorRT engine for {Path(model_path).name}: running it on {without_trt[0]}, since "
                f"building one inside a case can take minutes (build it beforehand with export/to_tensorrt.py, or "
                f"pass --allow-trt-build)")
        return EnginePlan(None, None, without_trt, [line])
    stamp, reason = _check_engine(Path(model_path), folder, providers, source_sha256, probe or probe_platform)
    if reason is not None:
        line = (f"TensorRT engine {folder.name} refused for {Path(model_path).name}: {reason}; running "
                f"{Path(model_path).name} on {without_trt[0]} instead; {REBUILD}")
        return EnginePlan(None, None, without_trt, [line])
    return EnginePlan(folder / CONTEXT_MODEL, stamp, without_trt, [])


def _check_engine(model_path: Path, folder: Path, providers: list[str], source_sha256: str | None,
                  probe: Callable[[], Platform]) -> tuple[EngineStamp | None, str | None]:
    """The engine's stamp and the reason to refuse it (None when it may be used)."""
    if TENSORRT not in providers:
        return None, f"this onnxruntime build cannot run it ({TENSORRT} is not available)"
    try:
        stamp = read_stamp(folder / STAMP_FILE)
    except ModelError as error:
        return None, str(error)
    reason = platform_mismatch(stamp, probe())
    if reason is None:
        reason = files_mismatch(stamp, folder, model_path, source_sha256 or file_sha256(model_path))
    return stamp, reason


@lru_cache(maxsize=1)
def probe_platform() -> Platform:
    """GPU 0's name and compute capability (CUDA driver API) and the TensorRT version of the libnvinfer that
    onnxruntime's TensorRT EP loads. Read once per process; never raises."""
    (gpu_name, capability), gpu_problem = _probe_gpu()
    trt_version, trt_problem = _probe_tensorrt()
    problems = tuple(p for p in (gpu_problem, trt_problem) if p)
    return Platform(gpu_name, capability, trt_version, problems)


def _probe_gpu() -> tuple[tuple[str | None, str | None], str | None]:
    """Through libcuda, which sees the same device 0 as onnxruntime (CUDA_VISIBLE_DEVICES applied)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        return (None, None), f"no NVIDIA driver ({error})"
    device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    calls = (("cuInit", lambda: cuda.cuInit(0)), ("cuDeviceGet", lambda: cuda.cuDeviceGet(ctypes.byref(device), 0)),
             ("cuDeviceGetAttribute", lambda: cuda.cuDeviceGetAttribute(ctypes.byref(major), _CU_ATTRIBUTE_CC_MAJOR,
                                                                         device)),
             ("cuDeviceGetAttribute", lambda: cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CU_ATTRIBUTE_CC_MINOR,
                                                                         device)),
             ("cuDeviceGetName", lambda: cuda.cuDeviceGetName(name, len(name), device)))
    for what, call in calls:
        status = call()
        if status != 0:
            return (None, None), f"no usable GPU ({what} returned CUDA error {status})"
    return (name.value.decode(errors="replace"), f"{major.value}.{minor.value}"), None


def _probe_tensorrt() -> tuple[str | None, str | None]:
    errors = []
    for soname in NVINFER_NAMES:
        try:
            library = ctypes.CDLL(soname)
        except OSError as error:
            errors.append(str(error))
            continue
        return decode_trt_version(int(library.getInferLibVersion())), None
    return None, f"no TensorRT library ({'; '.join(errors)})"


def decode_trt_version(number: int) -> str:
    """getInferLibVersion(): major·10000 + minor·100 + patch since TensorRT 10, major·1000 + … before."""
    if number >= 100000:
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"
