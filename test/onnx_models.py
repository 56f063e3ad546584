"""Small ONNX models for tests (opset 17), each saved to a path, with a numpy reference where one is useful.

- `save_voxelwise_model`: logits are a fixed non-linear voxel-wise function of the channels (`voxelwise_reference`),
  so any correct stitching, padding or mirroring reproduces the whole-volume result exactly.
- `save_conv_model`: a random-weight Conv3×3×3 → Relu → Conv1×1×1 net, so tiles see context and borders matter.
- `save_rank_model`: an element-wise model whose input has a chosen rank (for rank errors).

Batch and spatial dimensions are dynamic ('N', 'z', 'y', 'x') unless a fixed `batch` / `patch_zyx` is given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
VOXELWISE_A, VOXELWISE_B = 0.5, 2.0


def voxelwise_reference(image_czyx: np.ndarray, *, n_out: int = 3) -> np.ndarray:
    """float32 [n_out, z, y, x], with c0 = channel 0 and c1 = channel 1 (channel 0 again for one channel):
    [a·c0 + b·c1, sin(c0)·c1, c0² − c1], then the same three plus 1, plus 2, ... for more outputs."""
    image = np.asarray(image_czyx, np.float32)
    c0, c1 = image[0], image[1 % len(image)]
    base = [VOXELWISE_A * c0 + VOXELWISE_B * c1, np.sin(c0) * c1, c0 * c0 - c1]
    return np.stack([base[k % 3] + np.float32(k // 3) if k >= 3 else base[k] for k in range(n_out)])


def save_voxelwise_model(path: Path, *, n_in: int = 2, n_out: int = 3, batch: int | None = None,
                         patch_zyx=None) -> Path:
    """The ONNX twin of `voxelwise_reference` (Slice/Mul/Add/Sin/Sub/Concat)."""
    inits = [_const("starts0", [0]), _const("ends0", [1]), _const("starts1", [1 % n_in]),
             _const("ends1", [1 % n_in + 1]), _const("axis1", [1]),
             _const("a", VOXELWISE_A, np.float32), _const("b", VOXELWISE_B, np.float32)]
    nodes = [helper.make_node("Slice", ["input", "starts0", "ends0", "axis1"], ["c0"]),
             helper.make_node("Slice", ["input", "starts1", "ends1", "axis1"], ["c1"]),
             helper.make_node("Mul", ["c0", "a"], ["ac0"]), helper.make_node("Mul", ["c1", "b"], ["bc1"]),
             helper.make_node("Add", ["ac0", "bc1"], ["f0"]),
             helper.make_node("Sin", ["c0"], ["sin_c0"]), helper.make_node("Mul", ["sin_c0", "c1"], ["f1"]),
             helper.make_node("Mul", ["c0", "c0"], ["c0sq"]), helper.make_node("Sub", ["c0sq", "c1"], ["f2"])]
    outputs = []
    for k in range(n_out):
        if k < 3:
            outputs.append(f"f{k}")
            continue
        inits.append(_const(f"offset{k}", float(k // 3), np.float32))
        nodes.append(helper.make_node("Add", [f"f{k % 3}", f"offset{k}"], [f"f{k}"]))
        outputs.append(f"f{k}")
    nodes.append(helper.make_node("Concat", outputs, ["logits"], axis=1))
    return _save(path, nodes, inits, n_in=n_in, n_out=n_out, batch=batch, patch_zyx=patch_zyx, name="voxelwise")


def save_conv_model(path: Path, *, n_in: int = 2, n_out: int = 3, seed: int = 0, hidden: int = 4,
                    batch: int | None = None, patch_zyx=None, static_channels: bool = True) -> Path:
    """Conv 3×3×3 (pad 1) → Relu → Conv 1×1×1 with random weights; `static_channels=False` declares the channel
    axis dynamic, so a wrong channel count fails inside onnxruntime rather than at our own check."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((hidden, n_in, 3, 3, 3)) * 0.3).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32) * 0.1, "B1"),
             numpy_helper.from_array(rng.standard_normal((n_out, hidden, 1, 1, 1)).astype(np.float32), "W2"),
             numpy_helper.from_array(rng.standard_normal(n_out).astype(np.float32) * 0.1, "B2")]
    nodes = [helper.make_node("Conv", ["input", "W1", "B1"], ["h"], pads=[1] * 6),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "W2", "B2"], ["logits"])]
    return _save(path, nodes, inits, n_in=n_in if static_channels else "C", n_out=n_out, batch=batch,
                 patch_zyx=patch_zyx, name="conv")


def save_rank_model(path: Path, *, rank: int) -> Path:
    """Sin over a float input of `rank` dynamic dimensions (a 2-D or 4-D model where hnseg wants 5-D)."""
    dims = [f"d{i}" for i in range(rank)]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, dims)
    graph = helper.make_graph([helper.make_node("Sin", ["input"], ["logits"])], f"rank{rank}", [x], [y])
    return _write(path, graph)


def _save(path, nodes, inits, *, n_in, n_out, batch, patch_zyx, name) -> Path:
    spatial = list(patch_zyx) if patch_zyx is not None else ["z", "y", "x"]
    batch_dim = batch if batch is not None else "N"
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch_dim, n_in, *spatial])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch_dim, n_out, *spatial])
    return _write(path, helper.make_graph(nodes, name, [x], [y], inits))


def _write(path, graph) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = min(model.ir_version, 8)  # readable by onnxruntime >= 1.17 (the pinned minimum)
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _const(name: str, value, dtype=np.int64):
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)
