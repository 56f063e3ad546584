"""The channel catalogue: how each model input channel is made from the sampled CT or PET.

A channel is a source ("ct", "pet" or "zero") and a list of operations applied in order. Each operation is a small
frozen dataclass, one per op name in `OPS`; the recipe writes it as an object `{"op": NAME, PARAM: VALUE, ...}`
whose keys are the dataclass's fields (a field with a default is optional). Statistics (z-score, min-max) are taken
over the model's input grid.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from hnseg_infer.channels.harmonise import DEFAULT_RADIUS, SpectrumReference, harmonise, load_reference
from hnseg_infer.errors import RecipeError
from hnseg_infer.recipe.vocabulary import ChannelSource, values

SOURCES = values(ChannelSource)


@dataclass(frozen=True)
class Op:
    """One intensity operation: float32 array in, array out. `sources`: the channel sources it applies to."""

    name: ClassVar[str]
    sources: ClassVar[tuple[str, ...]] = SOURCES

    def apply(self, x: np.ndarray, suv_per_stored_value: float) -> np.ndarray:
        raise NotImplementedError

    def check(self, where: str) -> None:
        """RecipeError for a value out of range (types are checked by `parse_op`)."""

    def to_json(self) -> dict:
        return {"op": self.name, **{f.name: _json_value(getattr(self, f.name)) for f in fields(self)}}


def _json_value(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Window(Op):
    name: ClassVar[str] = "window"
    min: float  # noqa: A003 - the recipe's key names
    max: float  # noqa: A003
    to: tuple[float, float]

    def apply(self, x, suv_per_stored_value):
        lo, hi = self.to
        return (np.clip(x, self.min, self.max) - self.min) / (self.max - self.min) * (hi - lo) + lo

    def check(self, where):
        _check_range(self, where)


@dataclass(frozen=True)
class Clip(Op):
    name: ClassVar[str] = "clip"
    min: float  # noqa: A003
    max: float  # noqa: A003

    def apply(self, x, suv_per_stored_value):
        return np.clip(x, self.min, self.max)

    def check(self, where):
        _check_range(self, where)


def _check_range(op: Window | Clip, where: str) -> None:
    if not op.max > op.min:
        raise RecipeError(f"{where}: op {op.name!r} needs max > min, got min={op.min} max={op.max}")


@dataclass(frozen=True)
class MinMax(Op):
    name: ClassVar[str] = "minmax"
    to: tuple[float, float]

    def apply(self, x, suv_per_stored_value):
        lo, hi = self.to
        x_min, x_max = float(x.min()), float(x.max())
        if x_max == x_min:
            return np.full_like(x, lo)
        return (x - x_min) / (x_max - x_min) * (hi - lo) + lo


@dataclass(frozen=True)
class ZScore(Op):
    name: ClassVar[str] = "zscore"
    over: str  # "all" voxels, or the "nonzero" ones (zeros stay zero)

    def apply(self, x, suv_per_stored_value):
        if self.over == "nonzero":
            mask = x != 0
            if not mask.any():
                return np.zeros_like(x)
            inside = x[mask]
            return np.where(mask, (x - inside.mean()) / max(float(inside.std()), 1e-8), 0).astype(np.float32)
        return (x - x.mean()) / max(float(x.std()), 1e-8)

    def check(self, where):
        if self.over not in ("all", "nonzero"):
            raise RecipeError(f"{where}: zscore 'over' must be 'all' or 'nonzero', got {self.over!r}")


@dataclass(frozen=True)
class NnunetCt(Op):
    """nnU-Net v2 CTNormalization: clip to the dataset's foreground percentiles, then dataset mean/std."""

    name: ClassVar[str] = "nnunet_ct"
    percentile_00_5: float
    percentile_99_5: float
    mean: float
    std: float

    def apply(self, x, suv_per_stored_value):
        return (np.clip(x, self.percentile_00_5, self.percentile_99_5) - self.mean) / max(self.std, 1e-8)


@dataclass(frozen=True)
class MinOverStd(Op):
    """(x − min) / std, the sample std (N − 1) as torch's x.std(): Auto3DSeg segresnet's "pet" normalize_mode
    before its sigmoid (Project-MONAI/research-contributions auto3dseg/algorithm_templates/segresnet)."""

    name: ClassVar[str] = "min_over_std"

    def apply(self, x, suv_per_stored_value):
        std = float(x.std(ddof=1)) if x.size > 1 else 0.0
        return (x - x.min()) / max(std, 1e-8)


@dataclass(frozen=True)
class Sigmoid(Op):
    name: ClassVar[str] = "sigmoid"

    def apply(self, x, suv_per_stored_value):
        return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class Power(Op):
    name: ClassVar[str] = "power"
    exponent: float

    def apply(self, x, suv_per_stored_value):
        return np.power(x, self.exponent)


@dataclass(frozen=True)
class Cbrt(Op):
    name: ClassVar[str] = "cbrt"

    def apply(self, x, suv_per_stored_value):
        return np.cbrt(x)


@dataclass(frozen=True)
class Scale(Op):
    name: ClassVar[str] = "scale"
    factor: float
    offset: float = 0.0

    def apply(self, x, suv_per_stored_value):
        return x * self.factor + self.offset


@dataclass(frozen=True)
class Suv(Op):
    """PET stored values → SUV: × the factor the case's unit detection found (io/images.py)."""

    name: ClassVar[str] = "suv"
    sources: ClassVar[tuple[str, ...]] = ("pet",)

    def apply(self, x, suv_per_stored_value):
        return x * np.float32(suv_per_stored_value)


@dataclass(frozen=True)
class SpectrumSwap(Op):
    """CT harmonisation (harmonise.py): each axial slice's low-frequency DCT block replaced by the reference's. The
    recipe names the reference file in its folder (`reference`); parsing keeps the name, and loading the recipe's
    files (recipe/load.py) reads it into `spectrum`."""

    name: ClassVar[str] = "spectrum_swap"
    sources: ClassVar[tuple[str, ...]] = ("ct",)
    reference: str  # the file's name in the recipe's folder
    radius: int = DEFAULT_RADIUS
    # Not a recipe key: the loaded file. Two ops naming the same file compare equal; its sha256 is reported.
    spectrum: SpectrumReference | None = field(default=None, compare=False, metadata={"loaded": True})

    def apply(self, x, suv_per_stored_value):
        if self.spectrum is None:
            raise RecipeError(f"op 'spectrum_swap': its reference {self.reference} was parsed but not loaded: load the "
                              f"recipe with load_recipe (or the ops with load_spectra)")
        return harmonise(x, reference=self.spectrum, radius=self.radius)

    def to_json(self) -> dict:
        return {"op": self.name, "reference": self.reference, "radius": self.radius}


OPS: dict[str, type[Op]] = {op.name: op for op in (Window, Clip, MinMax, ZScore, NnunetCt, MinOverStd, Sigmoid, Power,
                                                    Cbrt, Scale, Suv, SpectrumSwap)}


def validate_ops(ops: list, *, source: str, where: str) -> tuple[Op, ...]:
    """A channel's op list, parsed once at recipe load (no file read: see load_spectra); RecipeError naming the op
    and key at fault."""
    return tuple(parse_op(op, i, source=source, where=where) for i, op in enumerate(ops))


def parse_op(raw, index: int, *, source: str, where: str) -> Op:
    if not isinstance(raw, dict) or "op" not in raw:
        raise RecipeError(f"{where}: ops[{index}] must be an object with an 'op' key, got {raw!r}")
    name = raw["op"]
    if name not in OPS:
        raise RecipeError(f"{where}: unknown op {name!r} in ops[{index}]; known ops: {', '.join(sorted(OPS))}")
    kind = OPS[name]
    keys = [f for f in fields(kind) if not f.metadata.get("loaded")]
    required = {f.name for f in keys if f.default is MISSING}
    allowed = {f.name for f in keys}
    params = {key: value for key, value in raw.items() if key != "op"}
    if missing := required - set(params):
        raise RecipeError(f"{where}: op {name!r} misses {sorted(missing)}")
    if unknown := set(params) - allowed:
        raise RecipeError(f"{where}: op {name!r} has unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    if source not in kind.sources:
        raise RecipeError(f"{where}: op {name!r} applies only to a {' or '.join(map(repr, kind.sources))} source, "
                          f"not {source!r}")
    if kind is SpectrumSwap:
        _check_spectrum_swap(params, where=where)
    else:
        params = {key: _typed(value, name, key, where) for key, value in params.items()}
    op = kind(**params)
    op.check(where)
    return op


def _typed(value, name: str, key: str, where: str):
    """A parameter value as the op holds it: a finite number, a pair of them (`to`), or a string (`over`)."""
    if key == "over":
        return value
    if key == "to":
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)):
            raise RecipeError(f"{where}: op {name!r} 'to' must be 2 numbers [low, high], got {value!r}")
        return tuple(value)
    if not _is_number(value):
        raise RecipeError(f"{where}: op {name!r} {key!r} must be a finite number, got {value!r}")
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_spectrum_swap(params: dict, *, where: str) -> None:
    radius = params.get("radius", DEFAULT_RADIUS)
    if not isinstance(radius, int) or isinstance(radius, bool) or radius < 1:
        raise RecipeError(f"{where}: op 'spectrum_swap' radius must be an integer >= 1, got {radius!r}")
    reference = params["reference"]
    if not isinstance(reference, str) or not reference or Path(reference).is_absolute() or ".." in Path(
            reference).parts:
        raise RecipeError(f"{where}: op 'spectrum_swap' reference must be a file name in the recipe's folder, got "
                          f"{reference!r}")


def load_spectra(ops: tuple[Op, ...], *, folder: Path, where: str) -> tuple[Op, ...]:
    """The ops with each `spectrum_swap` reference read from `folder` (the recipe's) and checked."""
    return tuple(replace(op, spectrum=load_reference(Path(folder) / op.reference, radius=op.radius,
                                                     where=f"{where}: op 'spectrum_swap'"))
                 if isinstance(op, SpectrumSwap) else op for op in ops)


def apply_ops(x: np.ndarray, ops: tuple[Op, ...], *, suv_per_stored_value: float) -> np.ndarray:
    """Apply parsed ops in order to a float32 array; returns float32."""
    for op in ops:
        x = op.apply(x, suv_per_stored_value)
    return np.asarray(x, dtype=np.float32)
