"""How closely two runs of a model agree: the measure every export proof and engine build applies (torch-free, so
that export/to_tensorrt.py can use it inside the inference image)."""

from __future__ import annotations

import numpy as np

# A proof passes when the largest logit difference is within tolerance × max(1, largest |logit|) and the predicted
# class (argmax, or each region's sign) agrees on at least min_agreement of the voxels.
TOLERANCE_FP32, MIN_AGREEMENT_FP32 = 1e-3, 0.999  # an export against PyTorch
TOLERANCE_FP16, MIN_AGREEMENT_FP16 = 5e-2, 0.99  # fp16 weights, or a TensorRT fp16 engine, against fp32


def compare_logits(reference: np.ndarray, candidate: np.ndarray, *, head: str, tolerance: float,
                   min_agreement: float) -> dict:
    """Max |Δlogit| and class agreement of two [N, K, z, y, x] logit arrays; `passed` applies the thresholds."""
    diff = float(np.abs(reference - candidate).max())
    scale = float(np.abs(reference).max())
    if head == "softmax":
        agreement = float((reference.argmax(1) == candidate.argmax(1)).mean())
    else:
        agreement = float(((reference > 0) == (candidate > 0)).mean())
    allowed = tolerance * max(1.0, scale)
    return {"max_abs_logit_diff": diff, "max_abs_logit": scale, "agreement": agreement, "tolerance": allowed,
            "min_agreement": min_agreement, "passed": bool(diff <= allowed and agreement >= min_agreement)}
