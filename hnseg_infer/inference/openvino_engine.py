"""The OpenVINO backend: one ONNX model as the callable `float32[N, C, z, y, x] -> float32[N, K, z, y, x]` on the
CPU, read from the same .onnx file as onnxruntime (no conversion step, nothing written).

Why it exists: on the 2-core development CPU it ran the demo's models in 0.4–0.8× onnxruntime's time per tile
(docs/benchmarks.md). Two things are not left to OpenVINO's defaults:

- **Precision.** On a CPU with bf16 instructions OpenVINO computes in bf16 by default, which moves logits by up to
  0.2. hnseg sets `INFERENCE_PRECISION_HINT` to f32 and reads it back from the compiled model; any other precision
  is refused (`BackendRefused`). bf16 runs only when asked for, and only after its first tile batch agrees with
  f32 on this machine by the fp16 rule (inference/agreement.py); else, or where the CPU compiles f32 anyway, the
  model runs in f32 with a fallback line.
- **Shapes and parallelism.** Each tile batch shape is compiled static (once, then cached). Small tiles (at most
  64³ voxels) in batches of two or more run one tile per infer request, `THROUGHPUT_REQUESTS` requests at once under
  the THROUGHPUT hint; anything else runs the whole tile batch as one request under the LATENCY hint.

`OpenVinoModel` exposes what `OnnxModel` does (`path`, `provider`, `fallbacks`, `fixed_batch`, `n_input_channels`,
`n_outputs`, `patch_zyx`, `engine`, `max_batch`), plus `backend`, `backend_version`, `precision` and the chosen
`performance_hint`. Deep-supervision extra outputs are ignored (the first output is the logits); fp16 ONNX files
take a float16 input when they declare one. The stochastic twins stay on onnxruntime: OpenVINO's CPU plugin
computes int64 in int32, which breaks their integer-hash dropout (inference/stochastic.py; tested).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import openvino as ov
from openvino.frontend import FrontEndManager, GeneralFailure, OpConversionFailure, OpValidationFailure

from hnseg_infer.errors import ModelError
from hnseg_infer.inference.agreement import MIN_AGREEMENT_FP16, TOLERANCE_FP16, compare_logits
from hnseg_infer.inference.backend import PRECISIONS, BackendRefused
from hnseg_infer.inference.batch import check_batch

PROVIDER = "OpenVINO CPU"
SMALL_TILE_VOXELS = 64**3  # at most this many voxels per tile: THROUGHPUT with one tile per request
THROUGHPUT_REQUESTS = 2
_INPUT_DTYPES = {"f32": np.float32, "f16": np.float16}
_FRONTEND_ERRORS = (GeneralFailure, OpConversionFailure, OpValidationFailure)


@lru_cache(maxsize=1)
def core() -> ov.Core:
    """One OpenVINO runtime per process (it holds the plugins)."""
    return ov.Core()


def version() -> str:
    return ov.get_version().split("-")[0]


def plan_hint(patch_zyx, tile_batch: int) -> tuple[str, int]:
    """(performance hint, infer requests) for tiles of `patch_zyx` sent `tile_batch` at a time (docs/benchmarks.md):
    two single-tile requests in parallel on small tiles, one request per tile batch otherwise."""
    if tile_batch >= THROUGHPUT_REQUESTS and int(np.prod(patch_zyx)) <= SMALL_TILE_VOXELS:
        return "THROUGHPUT", THROUGHPUT_REQUESTS
    return "LATENCY", 1


class OpenVinoModel:
    """An ONNX file compiled by OpenVINO for the CPU, callable on [N, C, z, y, x] batches.

    `patch_zyx` and `tile_batch` (the recipe's tiling) choose the performance hint and, when given, compile the
    first shape at once, so a model that does not compile is known at load time. `precision` "f32" (default) or
    "bf16" (on request, proven on the first batch; `head` is the recipe's, for that proof). `performance_hint`
    "LATENCY" or "THROUGHPUT" overrides the plan (benchmarks)."""

    backend = "openvino"
    engine = None  # no TensorRT engine on this backend
    max_batch = None

    def __init__(self, path: Path, *, patch_zyx=None, tile_batch: int = 1, precision: str = "f32",
                 head: str = "softmax", threads: int | None = None, sha256: str | None = None,
                 performance_hint: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: model file not found: check the recipe's 'files' and the weights folder")
        if precision not in PRECISIONS:
            raise ModelError(f"unknown OpenVINO precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        self.provider, self.backend_version, self.precision = PROVIDER, version(), precision
        self.fallbacks: list[str] = []
        self.head, self.bf16_proof = head, None  # bf16_proof: the first batch's comparison with f32
        self.threads = threads or os.cpu_count() or 1
        self._model = _read_onnx(self.path)
        self._read_signature()
        self.performance_hint, self.infer_requests = plan_hint(patch_zyx or self.patch_zyx or (1, 1, 1), tile_batch)
        if performance_hint is not None:  # the benchmark's override
            self.performance_hint = performance_hint
            self.infer_requests = THROUGHPUT_REQUESTS if performance_hint == "THROUGHPUT" else 1
        self._compiled: dict[tuple[int, ...], tuple[ov.CompiledModel, ov.AsyncInferQueue]] = {}
        if patch_zyx is not None and self.n_input_channels is not None and self.patch_zyx in (None, tuple(patch_zyx)):
            self._queue(self._request_batch(tile_batch), tuple(patch_zyx))  # compile now: fail at load, not later

    def __call__(self, batch_nczyx: np.ndarray) -> np.ndarray:
        """float32 logits [N, K, z, y, x] for a [N, C, z, y, x] batch."""
        batch = np.asarray(batch_nczyx)
        self._check_batch(batch.shape)
        batch = np.ascontiguousarray(batch, dtype=self._input_dtype)
        if self.precision == "bf16" and self.bf16_proof is None:
            return self._prove_bf16(batch)
        return self._run(batch, self.precision)

    def __repr__(self) -> str:
        return f"OpenVinoModel({self.path.name!r} on {PROVIDER} {self.backend_version}, {self.precision})"

    def _read_signature(self) -> None:
        """Input/output names, dtype and the static dimensions, checked to be one 5-D input and a 5-D output."""
        inputs, outputs = self._model.inputs, self._model.outputs
        if len(inputs) != 1:
            raise ModelError(f"{self.path}: the model has {len(inputs)} inputs ({[_name(i) for i in inputs]}); hnseg "
                             f"feeds one [N, C, z, y, x] tensor: re-export with a single input")
        static = _static_dims(inputs[0])
        if len(static) != 5 or outputs[0].get_partial_shape().rank.is_static and len(_static_dims(outputs[0])) != 5:
            raise ModelError(f"{self.path}: input shape {inputs[0].get_partial_shape()} and output shape "
                             f"{outputs[0].get_partial_shape()} must both be 5-D [N, C, z, y, x]: export the 3-D "
                             f"network with a batch and a channel axis")
        element = inputs[0].get_element_type().get_type_name()
        if element not in _INPUT_DTYPES:
            raise ModelError(f"{self.path}: input type {element} is not float32 or float16: re-export it")
        self._input_name, self._input_dtype = _name(inputs[0]), _INPUT_DTYPES[element]
        self.fixed_batch, self.n_input_channels = static[0], static[1]
        self.patch_zyx = tuple(static[2:]) if None not in static[2:] else None
        out = _static_dims(outputs[0]) if outputs[0].get_partial_shape().rank.is_static else []
        self.n_outputs = out[1] if len(out) == 5 else None

    def _check_batch(self, shape: tuple[int, ...]) -> None:
        check_batch(self.path, shape, n_input_channels=self.n_input_channels, patch_zyx=self.patch_zyx)

    # ------------------------------------------------------------------------------------------ compile and run

    def _request_batch(self, n: int) -> int:
        """Items per infer request: the model's fixed batch, one tile under THROUGHPUT, else the whole batch."""
        return self.fixed_batch or (1 if self.performance_hint == "THROUGHPUT" else n)

    def _queue(self, batch: int, patch_zyx: tuple[int, ...], channels: int | None = None, precision: str = ""):
        """The compiled model and its infer requests for one static shape and precision, compiled on first use."""
        channels, precision = channels or self.n_input_channels, precision or self.precision
        key = (precision, batch, channels, *patch_zyx)
        if key not in self._compiled:
            compiled = self._compile([batch, channels, *patch_zyx], precision)
            obtained = compiled_precision(compiled)
            if obtained == "f32" and precision == "bf16":  # a CPU without bf16 instructions
                self._drop_bf16("OpenVINO compiled it in f32 on this CPU")
                return self._queue(batch, patch_zyx, channels)
            if obtained != precision:
                raise BackendRefused(f"{self.path}: OpenVINO compiled it in {obtained} where {precision} was asked "
                                     f"for")
            self._compiled[key] = compiled, ov.AsyncInferQueue(compiled, self.infer_requests)
        return self._compiled[key]

    def _prove_bf16(self, batch_nczyx: np.ndarray) -> np.ndarray:
        """The first batch in bf16 and in f32: bf16 is kept if the two agree by the fp16 rule; the f32 logits are
        returned either way."""
        fast = self._run(batch_nczyx, "bf16")
        if self.precision != "bf16":  # refused while compiling
            return self._run(batch_nczyx, "f32")
        exact = self._run(batch_nczyx, "f32")
        self.bf16_proof = compare_logits(exact, fast, head=self.head, tolerance=TOLERANCE_FP16,
                                         min_agreement=MIN_AGREEMENT_FP16)
        if not self.bf16_proof["passed"]:
            proof = self.bf16_proof
            self._drop_bf16(f"its first tile batch in bf16 disagrees with f32 (max |Δlogit| "
                            f"{proof['max_abs_logit_diff']:.3g}, agreement {proof['agreement']:.5f})")
        return exact

    def _drop_bf16(self, why: str) -> None:
        self.precision = "f32"
        self.fallbacks.append(f"bf16 asked for {self.path.name} but {why}: running f32")

    def _compile(self, shape_nczyx: list[int], precision: str) -> ov.CompiledModel:
        model = self._model.clone()
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": self.performance_hint,
                  "INFERENCE_NUM_THREADS": self.threads}
        if self.performance_hint == "THROUGHPUT":
            config["NUM_STREAMS"] = self.infer_requests
        try:
            model.reshape({self._input_name: ov.PartialShape(shape_nczyx)})
            return core().compile_model(model, "CPU", config)
        except RuntimeError as error:
            raise BackendRefused(f"{self.path}: OpenVINO cannot compile it for shape {shape_nczyx} "
                                 f"({_first_line(error)})") from error

    def _run(self, batch_nczyx: np.ndarray, precision: str) -> np.ndarray:
        """Run the batch in chunks of the request batch over the infer requests, the last chunk of a fixed-batch
        model zero-filled (its extra items dropped)."""
        n = len(batch_nczyx)
        batch = self._request_batch(n)
        _, queue = self._queue(batch, batch_nczyx.shape[2:], batch_nczyx.shape[1], precision)
        results: list = [None] * -(-n // batch)

        def keep(request, index):
            results[index] = request.get_output_tensor(0).data.copy()  # the request's buffer is reused

        queue.set_callback(keep)
        try:
            for index, first in enumerate(range(0, n, batch)):
                queue.start_async({self._input_name: _padded(batch_nczyx[first:first + batch], batch)}, index)
            queue.wait_all()
        except RuntimeError as error:
            raise ModelError(f"{self.path}: OpenVINO failed on a batch of shape {batch_nczyx.shape} "
                             f"({_first_line(error)}): if it ran out of memory lower the recipe's tile_batch, or run "
                             f"with --backend onnxruntime") from error
        logits = results[0] if len(results) == 1 else np.concatenate(results)
        return logits[:n].astype(np.float32, copy=False)


def _read_onnx(path: Path) -> ov.Model:
    """The file through OpenVINO's ONNX frontend alone (read_model would try every frontend, and the TensorFlow one
    writes to stderr on a file it cannot parse)."""
    frontend = onnx_frontend()
    if not frontend.supported(str(path)):
        raise BackendRefused(f"{path}: OpenVINO cannot read it as ONNX")
    try:
        return frontend.convert(frontend.load(str(path)))
    except (RuntimeError, *_FRONTEND_ERRORS) as error:
        raise BackendRefused(f"{path}: OpenVINO cannot read it ({_first_line(error)})") from error


@lru_cache(maxsize=1)
def onnx_frontend():
    return FrontEndManager().load_by_framework("onnx")


def compiled_precision(compiled: ov.CompiledModel) -> str:
    """The precision the compiled model computes in, as OpenVINO reports it ("f32", "bf16", "f16")."""
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def _name(port) -> str:
    return port.get_any_name()


def _static_dims(port) -> list[int | None]:
    return [d.get_length() if d.is_static else None for d in port.get_partial_shape()]


def _padded(chunk: np.ndarray, size: int) -> np.ndarray:
    if len(chunk) == size:
        return chunk
    return np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)])


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
