"""The onnxruntime backend: one ONNX model as the callable `float32[N, C, z, y, x] -> float32[N, K, z, y, x]`.

Provider choice is explicit and recorded: "cuda" asks for TensorRT (fp16, engine cache), then CUDA, then CPU, and
every provider asked for but not obtained becomes a human-readable line in `fallbacks` for the run report.
onnxruntime's own silent fallback is turned off so that nothing changes without a line saying so.

With "cuda", a prebuilt engine beside the model (export/to_tensorrt.py; see tensorrt.py) is used when its stamp
matches this GPU, TensorRT version and ONNX file; otherwise the plain ONNX runs on CUDA, with a line saying why.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import (
    EPFail,
    Fail,
    InvalidArgument,
    InvalidGraph,
    InvalidProtobuf,
    NoSuchFile,
    RuntimeException,
)
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

from hnseg_infer.errors import ModelError
from hnseg_infer.inference.batch import check_batch
from hnseg_infer.inference.tensorrt import TENSORRT, plan_engine

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")
TRT_CACHE = Path("/tmp/hnseg/trt-cache")  # /tmp is writable on grand-challenge; engines survive between models

# Errors that say the file itself is bad: no other provider would load it either.
_MODEL_FILE_ERRORS = (InvalidProtobuf, InvalidGraph, InvalidArgument, NoSuchFile)
# Errors a provider may raise when it cannot start (missing CUDA/TensorRT libraries, unsupported GPU, ...).
_PROVIDER_ERRORS = (Fail, EPFail, RuntimeException, OrtNotImplemented, RuntimeError, ValueError)
_RUN_ERRORS = (Fail, EPFail, InvalidArgument, RuntimeException, OrtNotImplemented)
_INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# How onnxruntime's providers word an allocation failure (BFC arena, CUDA, cuDNN/cuBLAS, TensorRT, the CPU).
_OUT_OF_MEMORY = ("failed to allocate", "out of memory", "bad_alloc", "alloc_failed", "cudaerrormemoryallocation")


class _OutOfMemory(Exception):
    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def is_out_of_memory(error: Exception) -> bool:
    return any(marker in str(error).lower() for marker in _OUT_OF_MEMORY)


def plan_providers(device: str, available: list[str]) -> tuple[list[str], list[str]]:
    """The providers to ask for, best first, and a fallback line for each one wanted but not in this build."""
    if device not in DEVICES:
        raise ModelError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if CUDA in available else "cpu"
    if device == "cpu":
        return [CPU], []
    wanted = [TENSORRT, CUDA, CPU]
    missing = [p for p in wanted if p not in available]
    fallbacks = [f"{p} requested (device 'cuda') but not in this onnxruntime build (available: "
                 f"{', '.join(available)}); install onnxruntime-gpu with matching CUDA/TensorRT to use it"
                 for p in missing]
    return [p for p in wanted if p in available], fallbacks


class OnnxModel:
    """An onnxruntime session over one .onnx file, callable on [N, C, z, y, x] batches.

    Static input/output dimensions are exposed (None where dynamic) so that callers can check them against the
    recipe: `n_input_channels`, `n_outputs`, `fixed_batch`, `patch_zyx`. A model exported with a fixed batch size
    is run in chunks of that size whatever batch it is given; a prebuilt engine (`engine`) in chunks of at most its
    profile's batch (`max_batch`). `sha256`: the model file's, when the caller has it (the recipe does).
    """

    def __init__(self, path: Path, *, device: str = "auto", threads: int | None = None,
                 sha256: str | None = None, allow_trt_build: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: model file not found: check the recipe's 'files' and the weights folder")
        if threads is not None and not (isinstance(threads, int) and threads > 0):
            raise ModelError(f"threads must be a positive integer or None, got {threads!r}")
        providers, self.fallbacks = plan_providers(device, ort.get_available_providers())
        plan = plan_engine(self.path, providers, source_sha256=sha256,  # sha256: the recipe's, saves a re-read
                           allow_build=allow_trt_build)
        self.fallbacks += plan.fallbacks
        self.engine: Path | None = plan.engine  # the TensorRT engine's context model, when one is in use
        self.max_batch: int | None = plan.stamp.profile_max[0] if plan.stamp else None  # the engine's profile
        self._session = self._open_engine(threads) if self.engine else None
        if self._session is None:
            self.max_batch = None
            self._session = self._open_session(self.path, plan.providers,
                                               _session_options(threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL))
        self.provider: str = self._session.get_providers()[0]
        self._read_signature()
        self._threads = threads
        self.batch_limit: int | None = None  # lowered after running out of memory, kept for later batches
        self.run_fallbacks: list[str] = []  # out-of-memory steps since the caller last took them

    def __call__(self, batch_nczyx: np.ndarray) -> np.ndarray:
        """float32 logits [N, K, z, y, x] for a [N, C, z, y, x] batch. Out of memory, the batch is split in halves
        and retried, down to 1 tile, then the model moves to the CPU provider: each step a line in run_fallbacks."""
        batch = np.asarray(batch_nczyx)
        self._check_batch(batch.shape)
        batch = np.ascontiguousarray(batch, dtype=self._input_dtype)
        while True:
            chunk = min(self.fixed_batch or self.max_batch or len(batch), self.batch_limit or len(batch))
            try:
                parts = [self._run_padded(batch[i:i + chunk], self.fixed_batch or 0)
                         for i in range(0, len(batch), chunk)]
                return parts[0] if len(parts) == 1 else np.concatenate(parts)
            except _OutOfMemory as oom:
                self._after_out_of_memory(chunk, oom.error)

    def _after_out_of_memory(self, chunk: int, error: Exception) -> None:
        """Halve the tile batch; at 1 tile (or a fixed-batch model) move to the CPU; on the CPU, give up."""
        if chunk > 1 and not self.fixed_batch:
            self.batch_limit = chunk // 2
            self.run_fallbacks.append(f"{self.path.name}: out of memory on {self.provider} with a tile batch of "
                                      f"{chunk}; retrying with {chunk // 2}")
            return
        if self.provider == CPU:
            raise ModelError(f"{self.path}: onnxruntime ran out of memory on {CPU} with a batch of {chunk} ({error}): "
                             f"lower the recipe's tile_batch or patch_size_zyx, or give the machine more memory")
        self.run_fallbacks.append(f"{self.path.name}: out of memory on {self.provider} with a tile batch of {chunk}; "
                                  f"running it on {CPU} from here")
        options = _session_options(self._threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        self._session = self._open_session(self.path, [CPU], options)
        self.provider, self.engine, self.max_batch, self.batch_limit = CPU, None, None, None
        self._read_signature()

    def __repr__(self) -> str:
        engine = f" with engine {self.engine.parent.name}" if self.engine else ""
        return f"OnnxModel({self.path.name!r} on {self.provider}{engine})"

    def _open_engine(self, threads: int | None) -> ort.InferenceSession | None:
        """The engine's context model on TensorRT alone (no other provider can run its EPContext node); None, and
        a fallback line, when it does not load, so that the plain ONNX runs instead."""
        # One EPContext node: graph optimisation has nothing to do (onnxruntime advises it off for fast loading).
        options = _session_options(threads, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        try:
            return self._open_session(self.engine, [TENSORRT], options, engine=True)
        except ModelError as error:
            self.fallbacks.append(f"TensorRT engine {self.engine.parent.name} for {self.path.name} failed to load "
                                  f"({error}); running the plain ONNX instead")
            self.engine = None
            return None

    def _open_session(self, path: Path, providers: list[str], options: ort.SessionOptions, *,
                      engine: bool = False) -> ort.InferenceSession:
        """A session on the first provider chain that starts; each provider dropped on the way is a fallback line."""
        while True:
            try:
                session = ort.InferenceSession(str(path), sess_options=options, enable_fallback=0,
                                               providers=[_with_options(p, engine=engine) for p in providers])
            except _MODEL_FILE_ERRORS as error:
                raise ModelError(f"{path}: not a loadable ONNX model ({error}): re-export it or replace the "
                                 f"file (a truncated copy or a Git LFS pointer looks like this)") from error
            except _PROVIDER_ERRORS as error:
                if len(providers) == 1:
                    raise ModelError(f"{path}: onnxruntime cannot create a session on {providers[0]} ({error}): "
                                     f"check the model's opset and operators, or re-export it") from error
                self.fallbacks.append(f"{providers[0]} failed to start for {path.name} ({error}); "
                                      f"falling back to {providers[1]}")
                providers = providers[1:]
                continue
            # A provider that cannot register (e.g. missing libcudnn) may be dropped with only a log line.
            obtained = session.get_providers()
            self.fallbacks += [f"{p} could not be registered for {self.path.name}; running on {obtained[0]}"
                               for p in providers if p not in obtained]
            return session

    def _read_signature(self) -> None:
        """Input/output names, dtype and the static dimensions, checked to be one 5-D input and a 5-D output."""
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1:
            raise ModelError(f"{self.path}: the model has {len(inputs)} inputs ({[i.name for i in inputs]}); hnseg "
                             f"feeds one [N, C, z, y, x] tensor: re-export with a single input")
        shape_in, shape_out = list(inputs[0].shape), list(outputs[0].shape)
        if len(shape_in) != 5 or len(shape_out) not in (0, 5):  # 0: the graph leaves the output rank unknown
            raise ModelError(f"{self.path}: input shape {shape_in} and output shape {shape_out} must both be 5-D "
                             f"[N, C, z, y, x]: export the 3-D network with a batch and a channel axis")
        if inputs[0].type not in _INPUT_DTYPES:
            raise ModelError(f"{self.path}: input type {inputs[0].type} is not float32 or float16: re-export it")
        static = [d if isinstance(d, int) and d > 0 else None for d in shape_in]
        self._input_name, self._output_name = inputs[0].name, outputs[0].name  # extra outputs: deep supervision
        self._input_dtype = _INPUT_DTYPES[inputs[0].type]
        self.fixed_batch: int | None = static[0]
        self.n_input_channels: int | None = static[1]
        self.patch_zyx: tuple[int, int, int] | None = tuple(static[2:]) if None not in static[2:] else None
        k = shape_out[1] if shape_out else None
        self.n_outputs: int | None = k if isinstance(k, int) and k > 0 else None

    def _check_batch(self, shape: tuple[int, ...]) -> None:
        check_batch(self.path, shape, n_input_channels=self.n_input_channels, patch_zyx=self.patch_zyx)

    def _run_padded(self, chunk: np.ndarray, pad_to: int) -> np.ndarray:
        """Run one chunk, zero-filled up to `pad_to` items (a fixed-batch model's last chunk), extra items dropped."""
        n = len(chunk)
        if n < pad_to:
            chunk = np.concatenate([chunk, np.zeros((pad_to - n, *chunk.shape[1:]), chunk.dtype)])
        return self._session_run({self._input_name: chunk}, chunk.shape, out_of_memory=_OutOfMemory)[:n]

    def _session_run(self, feed: dict, shape: tuple[int, ...], *, out_of_memory=None) -> np.ndarray:
        """The session's output for `feed` as float32; its failure a ModelError naming the model, or, out of
        memory, `out_of_memory(error)` when given (the tile batch halving of __call__)."""
        try:
            (logits,) = self._session.run([self._output_name], feed)
        except _RUN_ERRORS as error:
            if out_of_memory is not None and is_out_of_memory(error):
                raise out_of_memory(error) from error
            raise ModelError(f"{self.path}: onnxruntime failed on a batch of shape {shape} with {self.provider} "
                             f"({error}): if it ran out of memory lower the recipe's tile_batch or run with "
                             f"--device cpu") from error
        return logits.astype(np.float32, copy=False)


def _session_options(threads: int | None, level: ort.GraphOptimizationLevel) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    # HNSEG_THREADS: a process's share of the CPUs when several run side by side (hnseg cohort's workers)
    options.intra_op_num_threads = threads or int(os.environ.get("HNSEG_THREADS") or 0) or os.cpu_count() or 1
    # The CPU arena keeps each session's peak activations (~1 GB per fold for a 5-stage U-Net on a 48×128×128
    # tile pair) for the life of the session; without it they are freed after each run, at ~10 % of the speed on this CPU.
    options.enable_cpu_mem_arena = False
    return options


def _with_options(provider: str, *, engine: bool = False) -> str | tuple[str, dict]:
    """TensorRT in fp16 (the T4 has fp16 tensor cores) with engines cached, so later runs skip the build; a
    prebuilt engine's context model needs no option (its precision and profile are in the engine)."""
    if provider != TENSORRT or engine:
        return provider
    TRT_CACHE.mkdir(parents=True, exist_ok=True)
    return (TENSORRT, {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                       "trt_engine_cache_path": str(TRT_CACHE)})
