"""The recipe's `budget` block: how a case spends a time budget (inference/anytime.py). Optional; its defaults
apply whenever a budget is set. Validated strictly (unknown keys, bad values, unknown models: RecipeError).

    "budget": {"refinements": ["members", "folds", "mirror_axes"],
               "floors": {"fine_nnunet": {"folds": 2, "mirror_axes": 0}},
               "reserve_s": 10, "earlier_stages_until": 0.5, "first_pass_tiles": "all"}

- `refinements`: the order in which a stage adds work after its floors, each kind tried for every model of the
  stage in recipe order: `members` (a further model of the stage: its first fold, unmirrored), `folds` (a
  model's next fold, over the mirror axes it runs so far), `mirror_axes` (a model's next mirror axis, over the
  folds it runs so far). Every kind must be listed once.
- `floors`: per model, what always runs, budget or not: `folds` (≥ 1 makes a further member mandatory; the first
  model of each stage always runs at least 1) and `mirror_axes` (the first N of its mirror_axes_zyx).
- `reserve_s`: seconds kept for the restore onto the CT, post-processing and writing: no refinement starts that
  would end later than the budget less this. Default: 10 s, or a tenth of the budget when that is less (the
  demo's restore and write take ~0.3 s; a fixed 10 s would be half of a 20 s budget).
- `earlier_stages_until`: a fraction of the budget; a cascade's earlier stages (which only place the next ROI)
  add no refinement that would end later than this fraction of the budget.
- `first_pass_tiles`: "all" (default) or "covering": each model's first pass runs only a subset of its tiles that
  covers its grid (e.g. 27 of 125), a complete prediction at a fraction of the cost; the other tiles are then the
  first refinement (before the kinds above), added into the same weighted mean. With no budget pressure every
  tile runs and the result is the recipe's up to float rounding (the tiles are summed in another order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hnseg_infer.errors import RecipeError

REFINEMENTS = ("members", "folds", "mirror_axes")
KEYS = ("refinements", "floors", "reserve_s", "earlier_stages_until", "first_pass_tiles")
FIRST_PASS_TILES = ("all", "covering")
FLOOR_KEYS = ("folds", "mirror_axes")
DEFAULT_RESERVE_S = 10.0  # at most; the default is also at most DEFAULT_RESERVE_FRACTION of the budget
DEFAULT_RESERVE_FRACTION = 0.1
DEFAULT_EARLIER_STAGES_UNTIL = 0.5


@dataclass(frozen=True)
class Floor:
    folds: int = 0
    mirror_axes: int = 0

    def to_dict(self) -> dict:
        return {"folds": self.folds, "mirror_axes": self.mirror_axes}


@dataclass(frozen=True)
class BudgetConfig:
    refinements: tuple[str, ...] = REFINEMENTS
    floors: tuple[tuple[str, Floor], ...] = ()  # (model name, floor), in the recipe's order
    reserve_s: float | None = None  # None: the default (reserve_for)
    earlier_stages_until: float = DEFAULT_EARLIER_STAGES_UNTIL
    declared: bool = field(default=False, compare=False)  # False: no block in the recipe (the defaults)
    first_pass_tiles: str = "all"

    def floor(self, model: str, *, first: bool) -> Floor:
        """The model's floor: the recipe's, with at least one fold for the first model of a stage."""
        floor = dict(self.floors).get(model, Floor())
        return Floor(max(floor.folds, 1), floor.mirror_axes) if first else floor

    def reserve_for(self, budget_s: float) -> float:
        """The seconds kept for restore and writing under a budget of `budget_s`."""
        if self.reserve_s is not None:
            return self.reserve_s
        return min(DEFAULT_RESERVE_S, DEFAULT_RESERVE_FRACTION * budget_s)

    def to_dict(self) -> dict:
        return {"refinements": list(self.refinements), "floors": {m: f.to_dict() for m, f in self.floors},
                **({} if self.reserve_s is None else {"reserve_s": self.reserve_s}),
                "earlier_stages_until": self.earlier_stages_until, "first_pass_tiles": self.first_pass_tiles}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_budget(obj, where: str, stages) -> BudgetConfig:
    """The block, validated against the recipe's `stages` (floors name their models and fit their folds/axes)."""
    if not isinstance(obj, dict):
        raise RecipeError(f"{where} must be a JSON object with keys {list(KEYS)}, got {type(obj).__name__}")
    if unknown := sorted(set(obj) - set(KEYS)):
        raise RecipeError(f"{where}: unknown key(s) {unknown}; allowed keys: {sorted(KEYS)}")
    order = obj.get("refinements", list(REFINEMENTS))
    if not (isinstance(order, list) and sorted(map(str, order)) == sorted(REFINEMENTS) and len(order) == 3):
        raise RecipeError(f"{where}: 'refinements' must list each of {list(REFINEMENTS)} once, in the order to add "
                          f"them, got {order!r}")
    reserve = obj.get("reserve_s")
    if reserve is not None and not (_is_number(reserve) and reserve >= 0):
        raise RecipeError(f"{where}: 'reserve_s' must be a number of seconds >= 0, got {reserve!r}")
    until = obj.get("earlier_stages_until", DEFAULT_EARLIER_STAGES_UNTIL)
    if not (_is_number(until) and 0 < until <= 1):
        raise RecipeError(f"{where}: 'earlier_stages_until' must be a fraction of the budget in (0, 1], got "
                          f"{until!r}")
    tiles = obj.get("first_pass_tiles", "all")
    if tiles not in FIRST_PASS_TILES:
        raise RecipeError(f"{where}: 'first_pass_tiles' must be one of {list(FIRST_PASS_TILES)}, got {tiles!r}")
    floors = obj.get("floors", {})
    if not isinstance(floors, dict):
        raise RecipeError(f"{where}: 'floors' must map model names to {{\"folds\": N, \"mirror_axes\": N}}, got "
                          f"{floors!r}")
    models = {m.name: m for stage in stages for m in stage.models}
    parsed = tuple((name, _floor(value, f"{where} floors {name!r}", models.get(name), sorted(models)))
                   for name, value in floors.items())
    return BudgetConfig(tuple(order), parsed, None if reserve is None else float(reserve), float(until),
                        declared=True, first_pass_tiles=tiles)


def _floor(obj, where: str, model, names: list[str]) -> Floor:
    if model is None:
        raise RecipeError(f"{where}: no model of that name in the recipe; its models are {names}")
    if not isinstance(obj, dict) or not set(obj) <= set(FLOOR_KEYS):
        raise RecipeError(f"{where} must be an object with keys among {list(FLOOR_KEYS)}, got {obj!r}")
    limits = {"folds": len(model.files), "mirror_axes": len(model.tiling.mirror_axes_zyx)}
    values = {}
    for key in FLOOR_KEYS:
        value = obj.get(key, 0)
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limits[key]):
            raise RecipeError(f"{where}: {key!r} must be an integer in [0, {limits[key]}] (the model has "
                              f"{limits[key]}), got {value!r}")
        values[key] = value
    return Floor(**values)
