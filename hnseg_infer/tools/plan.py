"""`hnseg plan`: what a recipe costs on one case, and the physical limit it is measured against.

Per model: its grid in the stage's ROI, tiles per pass, passes (folds × mirror flips), the forward pass's FLOPs
counted from the ONNX graph (Conv, ConvTranspose, MatMul, Gemm: 2 per multiply-add; the rest is memory-bound and
left out), the total per case, the lower bound on an NVIDIA T4 (65 TFLOPS fp16 tensor cores, 8.1 TFLOPS fp32:
FLOPs / peak, never reached in practice) and, unless --no-measure, the time predicted on this machine from one
measured forward pass of one tile (onnxruntime, fold 0).

The graph is read with the `onnx` package (its shape inference gives every node's output shape at the model's patch
size, which onnxruntime does not expose); onnx is not in the container's runtime, so `plan` is a tool, off the
inference path, and says how to install it when it is missing.

Grids: the first stage's ROI is located on the case (the ROI methods are cheap). A later stage's ROI comes from the
previous stage's labels, which `plan` does not compute: a fixed-size method's box is used as is (its position
does not change the grid's size), and a variable-size one is bounded by the previous stage's box (said so).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hnseg_infer.channels.build import model_grid
from hnseg_infer.errors import HnsegError, ModelError
from hnseg_infer.geometry.grid import Box
from hnseg_infer.inference.anytime import n_tiles
from hnseg_infer.io.images import load_case
from hnseg_infer.recipe.load import load_recipe, resolve_weights
from hnseg_infer.recipe.spec import ModelSpec, Recipe
from hnseg_infer.roi.locate import box_size_mm, locate_roi

T4_FP16_FLOPS = 65e12  # tensor cores
T4_FP32_FLOPS = 8.1e12


@dataclass(frozen=True)
class ModelPlan:
    stage: str
    model: str
    grid_size_zyx: tuple[int, int, int]
    spacing_xyz_mm: tuple[float, float, float]
    roi_note: str
    tiles: int
    folds: int
    flips: int
    flops_per_tile: float
    seconds_per_tile: float | None

    @property
    def passes(self) -> int:
        return self.folds * self.flips

    @property
    def flops(self) -> float:
        return self.flops_per_tile * self.tiles * self.passes

    @property
    def predicted_s(self) -> float | None:
        return None if self.seconds_per_tile is None else self.seconds_per_tile * self.tiles * self.passes

    def to_dict(self) -> dict:
        return {"stage": self.stage, "model": self.model, "grid_size_zyx": list(self.grid_size_zyx),
                "spacing_xyz_mm": list(self.spacing_xyz_mm), "roi": self.roi_note, "tiles": self.tiles,
                "folds": self.folds, "flips": self.flips, "passes": self.passes,
                "gflops_per_tile": round(self.flops_per_tile / 1e9, 3), "tflops_per_case": round(self.flops / 1e12, 4),
                "t4_fp16_lower_bound_s": round(self.flops / T4_FP16_FLOPS, 3),
                "t4_fp32_lower_bound_s": round(self.flops / T4_FP32_FLOPS, 3),
                "seconds_per_tile_here": None if self.seconds_per_tile is None else round(self.seconds_per_tile, 4),
                "predicted_s_here": None if self.predicted_s is None else round(self.predicted_s, 2)}


def count_flops(path: Path, input_shape_nczyx: tuple[int, ...]) -> float:
    """FLOPs of one forward pass at this input shape: 2 × the multiply-adds of every Conv, ConvTranspose, MatMul
    and Gemm, from onnx's shape inference with the input's dimensions fixed."""
    try:
        import onnx
        from onnx import shape_inference
    except ImportError as exc:
        raise HnsegError("hnseg plan reads the ONNX graph with the onnx package, which the container's runtime does "
                         "not include: pip install onnx") from exc
    model = onnx.load(str(path))
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    (first,) = [i for i in graph.input if i.name not in initializers]
    for dim, value in zip(first.type.tensor_type.shape.dim, input_shape_nczyx):
        dim.ClearField("dim_param")
        dim.dim_value = int(value)
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises its own assortment
        raise ModelError(f"{path}: onnx shape inference failed at input {list(input_shape_nczyx)} ({exc})") from exc
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    shapes.update({i.name: list(i.dims) for i in graph.initializer})
    total = 0.0
    for node in inferred.graph.node:
        total += _node_flops(node, shapes, path)
    return total


def _node_flops(node, shapes: dict, path: Path) -> float:
    def shape(name):
        dims = shapes.get(name)
        if not dims or not all(d > 0 for d in dims):
            raise ModelError(f"{path}: no static shape for {name!r} (input of {node.op_type} {node.name!r}) after "
                             f"shape inference: hnseg plan cannot count it")
        return dims

    if node.op_type == "Conv":  # weight [C_out, C_in/groups, *k]: each output element costs C_in/groups·k MACs
        weight = shape(node.input[1])
        return 2.0 * np.prod(shape(node.output[0]), dtype=float) * np.prod(weight[1:], dtype=float)
    if node.op_type == "ConvTranspose":  # weight [C_in, C_out/groups, *k]: each input element feeds C_out/g·k
        weight = shape(node.input[1])
        return 2.0 * np.prod(shape(node.input[0]), dtype=float) * np.prod(weight[1:], dtype=float)
    if node.op_type == "MatMul":  # [..., M, K] @ [..., K, N]
        a, b = shape(node.input[0]), shape(node.input[1])
        return 2.0 * np.prod(a, dtype=float) * b[-1]
    if node.op_type == "Gemm":  # A' [M, K] @ B' [K, N]
        a, b = shape(node.input[0]), shape(node.input[1])
        trans_b = next((x.i for x in node.attribute if x.name == "transB"), 0)
        return 2.0 * a[0] * a[1] * (b[0] if trans_b else b[1])
    return 0.0


def measure_seconds_per_tile(spec: ModelSpec, *, repeats: int = 2) -> float:
    """One tile through fold 0 on onnxruntime's CPU provider (after a warm-up run): the fastest of `repeats`."""
    from hnseg_infer.inference.onnx_engine import OnnxModel

    model = OnnxModel(spec.files[0], device="cpu", sha256=spec.sha256[0])
    tile = np.random.default_rng(0).standard_normal((1, len(spec.channels), *spec.tiling.patch_size_zyx))
    tile = tile.astype(np.float32)
    model(tile)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(tile)
        best = min(best, time.perf_counter() - start)
    return best


def plan_recipe(recipe: Recipe, *, ct: Path, pet: Path | None, measure: bool = True) -> list[ModelPlan]:
    case = load_case(ct, pet)
    plans, previous = [], None
    for index, stage in enumerate(recipe.stages):
        size = box_size_mm(stage.roi.method, stage.roi.params)
        if index == 0:
            box = locate_roi(stage.roi.method, ct=case.ct, pet=case.pet, previous=None,
                             suv_per_stored_value=case.suv_per_stored_value, params=stage.roi.params).box
            note = f"located by {stage.roi.method!r} on this case"
        elif size is not None:
            box = Box.around(previous.center_xyz_mm, size)
            note = f"the fixed {list(size)} mm box of {stage.roi.method!r}"
        else:
            box, note = previous, f"bounded by the previous stage's box ({stage.roi.method!r} depends on its labels)"
        for spec in stage.models:
            grid = model_grid(spec, box, case.ct_grid)
            flops = count_flops(spec.files[0], (1, len(spec.channels), *spec.tiling.patch_size_zyx))
            plans.append(ModelPlan(stage.name, spec.name, grid.size_zyx, grid.spacing_xyz_mm, note,
                                   n_tiles(spec, grid.size_zyx), len(spec.files),
                                   2 ** len(spec.tiling.mirror_axes_zyx), flops,
                                   measure_seconds_per_tile(spec) if measure else None))
        previous = box
    return plans


def plan_text(plans: list[ModelPlan]) -> str:
    lines = ["| stage | model | grid zyx | tiles | folds × flips | GFLOPs/tile | TFLOPs/case | T4 fp16 / fp32 bound s "
             "| s/tile here | predicted s here |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in plans:
        d = p.to_dict()
        here = "—" if p.seconds_per_tile is None else f"{d['seconds_per_tile_here']} | {d['predicted_s_here']}"
        lines.append(f"| {p.stage} | {p.model} | {'×'.join(map(str, p.grid_size_zyx))} | {p.tiles} | "
                     f"{p.folds} × {p.flips} | {d['gflops_per_tile']} | {d['tflops_per_case']} | "
                     f"{d['t4_fp16_lower_bound_s']} / {d['t4_fp32_lower_bound_s']} | "
                     + (here if p.seconds_per_tile is not None else "— | —") + " |")
    flops = sum(p.flops for p in plans)
    predicted = [p.predicted_s for p in plans]
    lines.append(f"\ntotal per case: {flops / 1e12:.3f} TFLOPs; T4 lower bound {flops / T4_FP16_FLOPS:.2f} s fp16, "
                 f"{flops / T4_FP32_FLOPS:.2f} s fp32"
                 + (f"; predicted here {sum(predicted):.1f} s (model passes only)" if None not in predicted else ""))
    notes = sorted({f"{p.stage}: ROI {p.roi_note}" for p in plans})
    return "\n".join(lines + notes)


def plan_weights(weights: Path, *, ct: Path, pet: Path | None, measure: bool = True) -> list[ModelPlan]:
    return plan_recipe(load_recipe(resolve_weights(Path(weights))), ct=ct, pet=pet, measure=measure)
