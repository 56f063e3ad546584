"""Build TensorRT engines for a weights folder on the GPU at hand, stamped so that the runtime uses them only there.

    python export/to_tensorrt.py WEIGHTS_DIR [--overwrite]

For every model file of WEIGHTS_DIR/recipe.json (fold_0.onnx, ...) this writes fold_0.trt/ beside it: an
onnxruntime EP-context model, the fp16 TensorRT engine it names (one optimisation profile, batch 1 up to the recipe's
tile_batch) and stamp.json (GPU, compute capability, TensorRT and onnxruntime versions, source sha256, profile,
proof). Each engine is proven against the plain ONNX on CUDA before anything is written. Build where the container
will run: for grand-challenge a T4 (sm_75), inside the hnseg image (onnxruntime-gpu 1.22, TensorRT 10.9). The
runtime refuses an engine built for another GPU or TensorRT version and runs the plain ONNX on CUDA instead.

Exit 0 when every engine was built and proven; on any error exit 2 with one line naming the cause, and nothing
written. Needs onnxruntime-gpu, TensorRT's libraries and numpy/scipy only (no torch), so it runs in the inference
image (weights in ./w):
    docker run --gpus all --user $(id -u):$(id -g) --entrypoint python -v $PWD/w:/w IMAGE export/to_tensorrt.py /w
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import EPFail, Fail, InvalidArgument, InvalidGraph, RuntimeException
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented
from scipy.ndimage import zoom

from hnseg_infer.errors import ExportError, HnsegError
from hnseg_infer.inference.agreement import MIN_AGREEMENT_FP16, TOLERANCE_FP16, compare_logits
from hnseg_infer.inference.tensorrt import (
    CONTEXT_MODEL,
    STAMP_FILE,
    TENSORRT,
    EngineStamp,
    Platform,
    engine_dir,
    probe_platform,
)
from hnseg_infer.io.atomic import file_sha256
from hnseg_infer.recipe.load import load_recipe
from hnseg_infer.recipe.spec import ModelSpec

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
# The fp16 bar of the exports (hnseg_infer.inference.agreement): an fp16 engine against the fp32 ONNX on CUDA.
TOLERANCE, MIN_AGREEMENT = TOLERANCE_FP16, MIN_AGREEMENT_FP16
_ORT_ERRORS = (Fail, EPFail, InvalidArgument, InvalidGraph, RuntimeException, OrtNotImplemented)
_INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def check_platform(available: list[str], here: Platform) -> None:
    """ExportError unless this machine can build engines: onnxruntime's TensorRT EP, a GPU and TensorRT."""
    problems = [] if TENSORRT in available else [f"this onnxruntime ({ort.__version__}, providers: "
                                                 f"{', '.join(available)}) has no {TENSORRT}"]
    problems += list(here.problems)
    if problems:
        raise ExportError(f"cannot build TensorRT engines here: {'; '.join(problems)}. Run export/to_tensorrt.py "
                          f"on the GPU the container will run on (a T4 for grand-challenge), inside the hnseg image "
                          f"(onnxruntime-gpu with TensorRT libraries); nothing was written")


def build_weights(weights_dir: Path, *, overwrite: bool = False, probe=probe_platform) -> list[EngineStamp]:
    """Build, prove and stamp an engine for every model file of the recipe; all are installed, or none."""
    recipe = load_recipe(weights_dir)
    here = probe()
    check_platform(ort.get_available_providers(), here)
    jobs = [(spec, path, sha) for spec in recipe.models for path, sha in zip(spec.files, spec.sha256)]
    existing = [engine_dir(path) for _, path, _ in jobs if engine_dir(path).exists()]
    if existing and not overwrite:
        raise ExportError(f"engine folder(s) {', '.join(str(e) for e in existing)} exist: pass --overwrite to "
                          f"rebuild them")
    staging = Path(tempfile.mkdtemp(prefix=".tensorrt-", dir=recipe.path.parent))
    try:
        stamps = [build_engine(path, staging / engine_dir(path).name, spec=spec, source_sha256=sha, here=here)
                  for spec, path, sha in jobs]
        _install([(staging / engine_dir(path).name, engine_dir(path)) for _, path, _ in jobs])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return stamps


def _install(moves: list[tuple[Path, Path]]) -> None:
    for built, target in moves:
        if target.exists():
            shutil.rmtree(target)
        built.rename(target)


def profile_shapes(session: ort.InferenceSession, spec: ModelSpec, path: Path) -> dict[str, list[int]]:
    """min/opt/max [N, C, *patch] of the model's input: batch 1 … tile_batch (a fixed batch stays fixed)."""
    declared = list(session.get_inputs()[0].shape)
    wanted = [None, len(spec.channels), *spec.tiling.patch_size_zyx]
    for axis, (have, want) in enumerate(zip(declared[1:], wanted[1:]), start=1):
        if isinstance(have, int) and have > 0 and have != want:
            raise ExportError(f"{path}: input axis {axis} is fixed to {have} but the recipe's model {spec.name!r} "
                              f"gives {want} (channels, patch_size_zyx): fix the recipe or re-export the model")
    fixed_batch = declared[0] if isinstance(declared[0], int) and declared[0] > 0 else None
    low, high = (fixed_batch, fixed_batch) if fixed_batch else (1, spec.tiling.tile_batch)
    return {"min": [low, *wanted[1:]], "opt": [high, *wanted[1:]], "max": [high, *wanted[1:]]}


def build_engine(path: Path, out_dir: Path, *, spec: ModelSpec, source_sha256: str, here: Platform) -> EngineStamp:
    """Engine + context model + stamp for one ONNX file in `out_dir`, proven against CUDA on the plain ONNX."""
    out_dir.mkdir(parents=True)
    reference = _session(path, [CUDA, CPU], {}, whole=False)
    input_name = reference.get_inputs()[0].name
    shapes = profile_shapes(reference, spec, path)
    batch = proof_input(shapes["max"], dtype=_INPUT_DTYPES.get(reference.get_inputs()[0].type, np.float32))
    expected = reference.run(None, {input_name: batch})[0]
    start = time.perf_counter()
    _build(path, out_dir / CONTEXT_MODEL, input_name, shapes, batch)
    build_s = time.perf_counter() - start
    proof = prove(out_dir / CONTEXT_MODEL, reference, batch, expected, head=spec.head.type, path=path)
    files = {f.name: file_sha256(f) for f in sorted(out_dir.iterdir()) if f.name != STAMP_FILE}
    stamp = EngineStamp(source_file=path.name, source_sha256=source_sha256, gpu_name=here.gpu_name,
                        compute_capability=here.compute_capability, tensorrt_version=here.tensorrt_version,
                        onnxruntime_version=ort.__version__, fp16=True, input_name=input_name,
                        profile_min=tuple(shapes["min"]), profile_opt=tuple(shapes["opt"]),
                        profile_max=tuple(shapes["max"]), files_sha256=files, proof=proof, build_s=round(build_s, 1))
    stamp.write(out_dir)
    return stamp


def _build(path: Path, context_path: Path, input_name: str, shapes: dict, batch: np.ndarray) -> None:
    """onnxruntime's TensorRT EP builds the engine and dumps the EP-context model that names it (engine file in
    the same folder, named relative to it, as onnxruntime requires when loading)."""
    dims = {k: f"{input_name}:{'x'.join(map(str, v))}" for k, v in shapes.items()}
    options = {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_dump_ep_context_model": True,
               "trt_ep_context_file_path": str(context_path), "trt_ep_context_embed_mode": 0,
               "trt_profile_min_shapes": dims["min"], "trt_profile_opt_shapes": dims["opt"],
               "trt_profile_max_shapes": dims["max"]}
    session = _session(path, [TENSORRT], options)
    _run(session, batch, path)  # the dump may wait for the first run when the engine is built lazily
    del session
    if not context_path.is_file():
        raise ExportError(f"{path}: onnxruntime {ort.__version__} built no EP-context model at {context_path}: "
                          f"this onnxruntime's TensorRT EP does not dump context models; use onnxruntime-gpu 1.22")


def prove(context_path: Path, reference: ort.InferenceSession, batch: np.ndarray, expected: np.ndarray, *,
          head: str, path: Path) -> dict:
    """The engine, loaded as the runtime loads it, against the plain ONNX on CUDA: the full tile batch and a
    single tile (both ends of the profile), and the time per batch of each."""
    engine = _session(context_path, [TENSORRT], {})
    got = _run(engine, batch, path)
    single = _run(engine, batch[:1], path)
    result = compare(expected, got, head=head)
    result["single_tile"] = compare(expected[:1], single, head=head)
    result["passed"] = result["passed"] and result["single_tile"]["passed"]
    if not result["passed"]:
        raise ExportError(f"{path}: the TensorRT engine disagrees with the ONNX model on CUDA (max |Δlogit| "
                          f"{result['max_abs_logit_diff']:.3g}, allowed {result['tolerance']:.3g}; agreement "
                          f"{result['agreement']:.4f}, needed {MIN_AGREEMENT}): fp16 overflows in this network; "
                          f"run it without engines (the CUDA EP in fp32); nothing was written")
    result["ms_per_batch"] = {"tensorrt": _time_ms(engine, batch, path), "cuda": _time_ms(reference, batch, path)}
    result.update(reference=f"onnxruntime {ort.__version__} {reference.get_providers()[0]} on the plain ONNX",
                  input_shape=list(batch.shape))
    return result


def compare(reference: np.ndarray, candidate: np.ndarray, *, head: str) -> dict:
    return compare_logits(reference, candidate, head=head, tolerance=TOLERANCE, min_agreement=MIN_AGREEMENT)


def proof_input(shape_nczyx, *, dtype=np.float32, seed: int = 0) -> np.ndarray:
    """Smooth random tiles (noise at 1/8 of the patch, upsampled, plus a little fine noise), image-like in scale."""
    rng = np.random.default_rng(seed)
    n, c, *patch = shape_nczyx
    coarse = rng.normal(size=(n, c, *[max(2, p // 8) for p in patch]))
    smooth = zoom(coarse, [1, 1, *[p / q for p, q in zip(patch, coarse.shape[2:])]], order=1)
    return (smooth + 0.1 * rng.normal(size=smooth.shape)).astype(dtype)


def _session(path: Path, providers: list[str], trt_options: dict, *, whole: bool = True) -> ort.InferenceSession:
    """A session on `providers`; `whole`: onnxruntime may not hand any node to the CPU, so that an engine always
    holds the whole network (a partial engine would leave the rest to the CPU at run time)."""
    options = ort.SessionOptions()
    if whole:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    chain = [(p, trt_options) if p == TENSORRT else p for p in providers]
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=chain)
    except _ORT_ERRORS as error:
        alone = " alone" if whole else ""
        raise ExportError(f"{path}: onnxruntime cannot run this model on {providers[0]}{alone} ({error}): a model "
                          f"TensorRT cannot take whole runs on CUDA without an engine; nothing was written") from error


def _run(session: ort.InferenceSession, batch: np.ndarray, path: Path) -> np.ndarray:
    try:
        return session.run(None, {session.get_inputs()[0].name: batch})[0].astype(np.float32)
    except _ORT_ERRORS as error:
        raise ExportError(f"{path}: running a batch of shape {batch.shape} on {session.get_providers()[0]} failed "
                          f"({error}); nothing was written") from error


def _time_ms(session: ort.InferenceSession, batch: np.ndarray, path: Path, repeats: int = 5) -> float:
    _run(session, batch, path)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _run(session, batch, path)
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path, help="the weights folder (recipe.json and its ONNX files)")
    parser.add_argument("--overwrite", action="store_true", help="replace engine folders built before")
    args = parser.parse_args(argv)
    try:
        stamps = build_weights(args.weights, overwrite=args.overwrite)
    except HnsegError as error:
        print(f"to_tensorrt: error: {error}", file=sys.stderr)
        return 2
    for stamp in stamps:
        proof = stamp.proof
        print(f"{stamp.source_file}: engine for {stamp.platform.describe()} built in {stamp.build_s} s; batch "
              f"{stamp.profile_max[0]}: TensorRT {proof['ms_per_batch']['tensorrt']} ms, CUDA "
              f"{proof['ms_per_batch']['cuda']} ms; max |Δlogit| {proof['max_abs_logit_diff']:.3g}, agreement "
              f"{proof['agreement']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
