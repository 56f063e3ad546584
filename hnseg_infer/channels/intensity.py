"""The channel catalogue: how each model input channel is made from the sampled CT or PET.

A channel is a source ("ct", "pet" or "zero") and a list of operations applied in order, each a small dict
declared in the recipe. Statistics (z-score, min-max) are taken over the model's input grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from hnseg_infer.channels.harmonise import DEFAULT_RADIUS, harmonise, load_reference
from hnseg_infer.errors import RecipeError
from hnseg_infer.recipe.vocabulary import ChannelSource, values

SOURCES = values(ChannelSource)


def _window(x, *, min, max, to):  # noqa: A002 - recipe key names
    lo, hi = to
    return (np.clip(x, min, max) - min) / (max - min) * (hi - lo) + lo


def _clip(x, *, min, max):  # noqa: A002
    return np.clip(x, min, max)


def _minmax(x, *, to):
    lo, hi = to
    x_min, x_max = float(x.min()), float(x.max())
    if x_max == x_min:
        return np.full_like(x, lo)
    return (x - x_min) / (x_max - x_min) * (hi - lo) + lo


def _zscore(x, *, over):
    if over == "nonzero":
        mask = x != 0
        if not mask.any():
            return np.zeros_like(x)
        values = x[mask]
        return np.where(mask, (x - values.mean()) / max(float(values.std()), 1e-8), 0).astype(np.float32)
    return (x - x.mean()) / max(float(x.std()), 1e-8)


def _nnunet_ct(x, *, percentile_00_5, percentile_99_5, mean, std):
    """nnU-Net v2 CTNormalization: clip to the dataset's foreground percentiles, then dataset mean/std."""
    return (np.clip(x, percentile_00_5, percentile_99_5) - mean) / max(std, 1e-8)


def _min_over_std(x):
    """(x − min) / std, the sample std (N − 1) as torch's x.std(): Auto3DSeg segresnet's "pet" normalize_mode
    before its sigmoid (Project-MONAI/research-contributions auto3dseg/algorithm_templates/segresnet)."""
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return (x - x.min()) / max(std, 1e-8)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _power(x, *, exponent):
    return np.power(x, exponent)


def _cbrt(x):
    return np.cbrt(x)


def _scale(x, *, factor, offset=0.0):
    return x * factor + offset


# op name → (function, required parameter names, optional parameter names)
OPS: dict[str, tuple[Callable, set[str], set[str]]] = {
    "window": (_window, {"min", "max", "to"}, set()),
    "clip": (_clip, {"min", "max"}, set()),
    "minmax": (_minmax, {"to"}, set()),
    "zscore": (_zscore, {"over"}, set()),
    "nnunet_ct": (_nnunet_ct, {"percentile_00_5", "percentile_99_5", "mean", "std"}, set()),
    "min_over_std": (_min_over_std, set(), set()),
    "sigmoid": (_sigmoid, set(), set()),
    "power": (_power, {"exponent"}, set()),
    "cbrt": (_cbrt, set(), set()),
    "scale": (_scale, {"factor"}, {"offset"}),
    # PET stored values → SUV (× the factor found by unit detection); bound at run time.
    "suv": (None, set(), set()),
    # CT harmonisation (harmonise.py): each axial slice's low-frequency DCT block replaced by the reference's.
    # "reference" names a file in the recipe's folder, loaded (and hashed) when the recipe is.
    "spectrum_swap": (harmonise, {"reference"}, {"radius"}),
}


def validate_ops(ops: list, *, source: str, where: str, folder: Path | None = None) -> tuple[dict, ...]:
    """Check a channel's op list once, at recipe load; RecipeError naming the op and key at fault. `folder` (the
    recipe's) holds the files ops name; a `spectrum_swap` op comes back with its reference loaded."""
    checked = []
    for i, op in enumerate(ops):
        if not isinstance(op, dict) or "op" not in op:
            raise RecipeError(f"{where}: ops[{i}] must be an object with an 'op' key, got {op!r}")
        name = op["op"]
        if name not in OPS:
            raise RecipeError(f"{where}: unknown op {name!r} in ops[{i}]; known ops: {', '.join(sorted(OPS))}")
        _, required, optional = OPS[name]
        params = set(op) - {"op"}
        if missing := required - params:
            raise RecipeError(f"{where}: op {name!r} misses {sorted(missing)}")
        if unknown := params - required - optional:
            raise RecipeError(f"{where}: op {name!r} has unknown key(s) {sorted(unknown)}; allowed: "
                              f"{sorted(required | optional)}")
        if name == "suv" and source != "pet":
            raise RecipeError(f"{where}: op 'suv' applies only to a 'pet' source, not {source!r}")
        if name == "zscore" and op["over"] not in ("all", "nonzero"):
            raise RecipeError(f"{where}: zscore 'over' must be 'all' or 'nonzero', got {op['over']!r}")
        if name in ("window", "clip") and not op["max"] > op["min"]:
            raise RecipeError(f"{where}: op {name!r} needs max > min, got min={op['min']} max={op['max']}")
        if name == "spectrum_swap":
            op = _spectrum_swap_op(op, source=source, where=where, folder=folder)
        checked.append(dict(op))
    return tuple(checked)


def _spectrum_swap_op(op: dict, *, source: str, where: str, folder: Path | None) -> dict:
    """The op with its reference file resolved in the recipe's folder and loaded."""
    radius = op.get("radius", DEFAULT_RADIUS)
    if source != "ct":
        raise RecipeError(f"{where}: op 'spectrum_swap' harmonises CT and applies only to a 'ct' source, not "
                          f"{source!r}")
    if not isinstance(radius, int) or isinstance(radius, bool) or radius < 1:
        raise RecipeError(f"{where}: op 'spectrum_swap' radius must be an integer >= 1, got {radius!r}")
    reference = op["reference"]
    if not isinstance(reference, str) or not reference or Path(reference).is_absolute() or ".." in Path(
            reference).parts:
        raise RecipeError(f"{where}: op 'spectrum_swap' reference must be a file name in the recipe's folder, got "
                          f"{reference!r}")
    if folder is None:
        raise RecipeError(f"{where}: op 'spectrum_swap' names a file ({reference}) but these ops belong to no "
                          f"weights folder; add it to an exported recipe with export/make_harmonisation_reference.py")
    loaded = load_reference(Path(folder) / reference, radius=radius, where=f"{where}: op 'spectrum_swap'")
    return {"op": "spectrum_swap", "reference": loaded, "radius": radius}


def apply_ops(x: np.ndarray, ops: tuple[dict, ...], *, suv_per_stored_value: float) -> np.ndarray:
    """Apply validated ops in order to a float32 array; returns float32."""
    for op in ops:
        params = {k: v for k, v in op.items() if k != "op"}
        if op["op"] == "suv":
            x = x * np.float32(suv_per_stored_value)
        else:
            x = OPS[op["op"]][0](x, **params)
    return np.asarray(x, dtype=np.float32)
