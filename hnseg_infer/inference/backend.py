"""Which engine runs a model file: onnxruntime (every device; the GPU path) or OpenVINO (CPU only, faster there).

`backend` "auto" (default) takes OpenVINO on the CPU, meaning `device` "cpu", or "auto" without onnxruntime's CUDA,
when the `openvino` package is installed and the model compiles there in f32; otherwise onnxruntime, with a
fallback line saying why. "onnxruntime" or "openvino" forces one ("openvino" is an error where it cannot run).
The GPU path (device "cuda", or "auto" with CUDA) is onnxruntime's, unchanged. The stochastic twins always run on
onnxruntime: OpenVINO's CPU plugin computes int64 in int32, which breaks their integer-hash dropout (a line says so).
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from hnseg_infer.errors import ModelError
from hnseg_infer.inference.onnx_engine import CUDA, DEVICES, TENSORRT, OnnxModel
from hnseg_infer.inference.stochastic import StochasticModel

BACKENDS = ("auto", "onnxruntime", "openvino")
PRECISIONS = ("f32", "bf16")  # what the CPU computes in: bf16 only on request, on OpenVINO


class BackendRefused(ModelError):
    """A backend cannot run this model as asked (it does not compile, or compiles in another precision): under
    "auto" onnxruntime runs it instead, saying why."""


def runs_on_cpu(device: str) -> bool:
    if device not in DEVICES:
        raise ModelError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    return device == "cpu" or (device == "auto" and CUDA not in ort.get_available_providers())


def open_model(path: Path, *, device: str, backend: str = "auto", sha256: str | None = None, patch_zyx=None,
               tile_batch: int = 1, stochastic: bool = False, threads: int | None = None, precision: str = "f32",
               head: str = "softmax", allow_trt_build: bool = False):
    """The engine for one model file (a stochastic twin with `stochastic`), chosen as the module says; `patch_zyx`
    and `tile_batch` (the recipe's tiling) let OpenVINO compile at load and choose its performance hint.
    `precision` "bf16" asks OpenVINO for bf16, proven against f32 on the first batch (`head`: the recipe's).
    `allow_trt_build`: onnxruntime may build a TensorRT engine inside the case (inference/tensorrt.py)."""
    if backend not in BACKENDS:
        raise ModelError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    cpu = runs_on_cpu(device)
    if backend == "openvino" and device == "cuda":
        raise ModelError("backend 'openvino' runs on the CPU only: use --device cpu (or auto), or --backend "
                         "onnxruntime for CUDA")
    fallback = None
    if stochastic and backend != "onnxruntime" and cpu:
        fallback = (f"stochastic twin {Path(path).name} runs on onnxruntime's CPU provider, not OpenVINO: OpenVINO "
                    f"computes int64 in int32, which would change its dropout masks")
    elif backend == "openvino" or (backend == "auto" and cpu):
        try:
            return _openvino(path, patch_zyx=patch_zyx, tile_batch=tile_batch, threads=threads,
                             precision=precision, head=head)
        except (ImportError, ModelError) as error:
            if backend == "openvino" or not isinstance(error, (ImportError, BackendRefused)):
                raise _forced(error, path) if isinstance(error, ImportError) else error
            fallback = f"OpenVINO not used for {Path(path).name} ({error}); running on onnxruntime's CPU provider"
    engine = StochasticModel if stochastic else OnnxModel
    model = engine(path, device=device, sha256=sha256, threads=threads, allow_trt_build=allow_trt_build)
    if fallback:
        model.fallbacks.insert(0, fallback)
    if precision != "f32":
        model.fallbacks.append(f"{precision} asked for {Path(path).name} but onnxruntime runs it in the model "
                               f"file's precision")
    return model


def describe(model) -> dict:
    """The report's record of one engine: backend, its version, the precision it computes in (onnxruntime: the
    model file's own, or TensorRT's fp16), and OpenVINO's performance hint."""
    if getattr(model, "backend", "onnxruntime") == "openvino":
        record = {"backend": "openvino", "version": model.backend_version, "precision": model.precision,
                  "performance_hint": model.performance_hint, "infer_requests": model.infer_requests}
        return record | ({"bf16_proof": model.bf16_proof} if model.bf16_proof else {})
    return {"backend": "onnxruntime", "version": ort.__version__, "provider": model.provider,
            "precision": "f16 (TensorRT)" if model.provider == TENSORRT else "the model file's"}


def _openvino(path, **options):
    from hnseg_infer.inference.openvino_engine import OpenVinoModel  # lazy: the package is optional

    return OpenVinoModel(path, **options)


def _forced(error: ImportError, path) -> ModelError:
    return ModelError(f"backend 'openvino' asked for {Path(path).name} but the openvino package is not installed "
                      f"({error}): pip install openvino, or use --backend onnxruntime")
