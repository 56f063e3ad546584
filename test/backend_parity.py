"""The two CPU backends on the same tiles: OpenVINO (f32) against onnxruntime, by the rule of inference/agreement.py
(max |Δlogit| ≤ tolerance × max(1, |logit|) and argmax or region-sign agreement)."""

from __future__ import annotations

import numpy as np

from hnseg_infer.inference.agreement import MIN_AGREEMENT_FP32, TOLERANCE_FP32, compare_logits
from hnseg_infer.inference.onnx_engine import OnnxModel
from hnseg_infer.inference.openvino_engine import OpenVinoModel


def assert_backends_agree(path, tiles_nczyx: np.ndarray, *, head: str = "softmax", tile_batch: int | None = None,
                          tolerance: float = TOLERANCE_FP32, min_agreement: float = MIN_AGREEMENT_FP32) -> dict:
    """Run `tiles_nczyx` through both backends (OpenVINO compiled for the tiles' patch, `tile_batch` of them per
    call, default all) and assert that they agree; returns the comparison."""
    tiles = np.asarray(tiles_nczyx, np.float32)
    reference = OnnxModel(path, device="cpu")(tiles)
    model = OpenVinoModel(path, patch_zyx=tiles.shape[2:], tile_batch=tile_batch or len(tiles))
    assert model.precision == "f32"
    candidate = model(tiles)
    assert candidate.shape == reference.shape and candidate.dtype == np.float32
    result = compare_logits(reference, candidate, head=head, tolerance=tolerance, min_agreement=min_agreement)
    assert result["passed"], f"{path}: OpenVINO and onnxruntime disagree: {result}"
    return result
