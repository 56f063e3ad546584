"""The recipe's `uncertainty` block (HN-UISeg): how many stochastic passes, the dropout rate, the test-time
augmentations each pass may draw, the seed and an optional time budget. Validated strictly on load (unknown keys,
bad values: RecipeError naming the key). Kept free of the other recipe types so that recipe/load.py can import it.

    "uncertainty": {"passes": 8, "dropout_rate": 0.05, "seed": 0,
                    "augmentations": {"noise": {"std": 0.05}, "flip": {"axes_zyx": [0, 1, 2]},
                                      "rotation": {"max_degrees": 5}},
                    "time_budget_s": 480}

- `passes`: N stochastic passes (each runs every fold of every model of the last stage once).
- `dropout_rate`: p of the dropout made active in each fold's stochastic twin (`stochastic_files` of each model,
  written by export/to_onnx.py torch --uncertainty); 0 gives augmentation-only uncertainty and needs no twin.
- `augmentations`: the kinds a pass draws one of, uniformly, with their parameters: `noise` (Gaussian noise of
  `std` × each image channel's standard deviation on the model grid), `flip` (one axis drawn from `axes_zyx` of the
  model grid), `rotation` (about one model-grid axis, by an angle drawn uniformly from ±`max_degrees`, at most 5).
  `{}`: every pass runs on the plain input (dropout alone).
- `seed`: the run is a pure function of it (the command line may override it).
- `time_budget_s` (optional): seconds from the start of the case after which no further pass starts; the passes
  run are then a prefix of the full run, named in the report's fallbacks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hnseg_infer.errors import RecipeError

AUGMENTATION_PARAMS = {"noise": ("std",), "flip": ("axes_zyx",), "rotation": ("max_degrees",)}
MAX_ROTATION_DEGREES = 5.0
MAX_PASSES = 1000
KEYS = ("passes", "dropout_rate", "seed", "augmentations", "time_budget_s")


@dataclass(frozen=True)
class Augmentations:
    noise_std: float | None = None  # None: the kind is not drawn
    flip_axes_zyx: tuple[int, ...] | None = None
    rotation_max_degrees: float | None = None

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds a pass may draw, in a fixed order (the draw indexes into it)."""
        return tuple(kind for kind, value in (("noise", self.noise_std), ("flip", self.flip_axes_zyx),
                                              ("rotation", self.rotation_max_degrees)) if value is not None)

    def to_dict(self) -> dict:
        out = {}
        if self.noise_std is not None:
            out["noise"] = {"std": self.noise_std}
        if self.flip_axes_zyx is not None:
            out["flip"] = {"axes_zyx": list(self.flip_axes_zyx)}
        if self.rotation_max_degrees is not None:
            out["rotation"] = {"max_degrees": self.rotation_max_degrees}
        return out


@dataclass(frozen=True)
class UncertaintyConfig:
    passes: int
    dropout_rate: float
    seed: int
    augmentations: Augmentations
    time_budget_s: float | None = None

    def to_dict(self) -> dict:
        return {"passes": self.passes, "dropout_rate": self.dropout_rate, "seed": self.seed,
                "augmentations": self.augmentations.to_dict(), "time_budget_s": self.time_budget_s}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_uncertainty(obj, where: str) -> UncertaintyConfig:
    """The block, validated; `where` names it in messages (e.g. 'recipe.json uncertainty')."""
    if not isinstance(obj, dict):
        raise RecipeError(f"{where} must be a JSON object with keys {list(KEYS)}, got {type(obj).__name__}")
    if unknown := sorted(set(obj) - set(KEYS)):
        raise RecipeError(f"{where}: unknown key(s) {unknown}; allowed keys: {sorted(KEYS)}")
    if missing := [key for key in ("passes", "dropout_rate", "seed", "augmentations") if key not in obj]:
        raise RecipeError(f"{where}: missing required key(s) {missing}")
    passes = obj["passes"]
    if not (_is_int(passes) and 1 <= passes <= MAX_PASSES):
        raise RecipeError(f"{where}: 'passes' must be an integer in [1, {MAX_PASSES}], got {passes!r}")
    rate = obj["dropout_rate"]
    if not (_is_number(rate) and 0 <= rate < 1):
        raise RecipeError(f"{where}: 'dropout_rate' must be a number in [0, 1), got {rate!r}")
    seed = obj["seed"]
    if not (_is_int(seed) and 0 <= seed < 2**63):
        raise RecipeError(f"{where}: 'seed' must be a non-negative integer, got {seed!r}")
    budget = obj.get("time_budget_s")
    if budget is not None and not (_is_number(budget) and budget > 0):
        raise RecipeError(f"{where}: 'time_budget_s' must be a positive number of seconds or null, got {budget!r}")
    augmentations = parse_augmentations(obj["augmentations"], f"{where} augmentations")
    if rate == 0 and not augmentations.kinds:
        raise RecipeError(f"{where}: with dropout_rate 0 and no augmentations every pass is the same prediction: "
                          f"set a dropout_rate > 0 or list augmentations")
    return UncertaintyConfig(passes, float(rate), seed, augmentations, None if budget is None else float(budget))


def parse_augmentations(obj, where: str) -> Augmentations:
    if not isinstance(obj, dict):
        raise RecipeError(f"{where} must be a JSON object mapping kinds ({', '.join(AUGMENTATION_PARAMS)}) to their "
                          f"parameters, got {obj!r}")
    if unknown := sorted(set(obj) - set(AUGMENTATION_PARAMS)):
        raise RecipeError(f"{where}: unknown augmentation(s) {unknown}; known: {sorted(AUGMENTATION_PARAMS)}")
    values = {}
    for kind, params in obj.items():
        allowed = AUGMENTATION_PARAMS[kind]
        if not isinstance(params, dict) or set(params) != set(allowed):
            raise RecipeError(f"{where}: {kind!r} takes exactly {{{', '.join(repr(k) for k in allowed)}}}, got "
                              f"{params!r}")
        value = params[allowed[0]]
        if kind == "noise" and not (_is_number(value) and 0 < value <= 1):
            raise RecipeError(f"{where}: noise 'std' (a fraction of each channel's standard deviation) must be in "
                              f"(0, 1], got {value!r}")
        if kind == "flip" and not (isinstance(value, list) and value and len(set(map(repr, value))) == len(value)
                                   and all(_is_int(a) and 0 <= a <= 2 for a in value)):
            raise RecipeError(f"{where}: flip 'axes_zyx' must be a non-empty list of distinct axes among 0 (z), "
                              f"1 (y), 2 (x), got {value!r}")
        if kind == "rotation" and not (_is_number(value) and 0 < value <= MAX_ROTATION_DEGREES):
            raise RecipeError(f"{where}: rotation 'max_degrees' must be in (0, {MAX_ROTATION_DEGREES:g}], got "
                              f"{value!r}")
        values[kind] = tuple(value) if kind == "flip" else float(value)
    return Augmentations(values.get("noise"), values.get("flip"), values.get("rotation"))


def parse_stochastic_files(value, *, n_files: int, where: str) -> tuple[str, ...]:
    """A model's `stochastic_files`: one stochastic twin per entry of `files`, in the same order (their presence is
    checked when the recipe's files are loaded)."""
    if not (isinstance(value, list) and all(isinstance(f, str) and f for f in value)):
        raise RecipeError(f"{where}: 'stochastic_files' must be a list of file names, got {value!r}")
    if value and len(value) != n_files:
        raise RecipeError(f"{where}: 'stochastic_files' lists {len(value)} file(s) for {n_files} fold file(s): one "
                          f"stochastic twin per fold, in the order of 'files' (re-export with --uncertainty)")
    return tuple(value)


def check_stage(config: UncertaintyConfig, stage, where: str) -> None:
    """The passes run the last stage's models: softmax heads (the entropy is over labels), and with a dropout rate
    a stochastic twin for every fold."""
    for i, model in enumerate(stage.models):
        if model.head.type != "softmax":
            raise RecipeError(f"{where}: uncertainty maps need softmax heads (the entropy is over background, GTVp "
                              f"and GTVn); model {model.name!r} of stage {stage.name!r} has a {model.head.type} head")
        if config.dropout_rate > 0 and not model.stochastic_files:
            raise RecipeError(f"{where}: dropout_rate {config.dropout_rate} needs a stochastic twin of each fold, "
                              f"but model {model.name!r} of stage {stage.name!r} has no 'stochastic_files': "
                              f"re-export it with export/to_onnx.py torch --uncertainty, or set dropout_rate 0 "
                              f"(augmentation-only uncertainty)")
