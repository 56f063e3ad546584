"""Anytime execution of a stage under a time budget (recipe/budget.py, clock.py).

A pass is one fold over every tile with one mirror flip (or none). Each model of a stage first runs its floor (at
least, for the stage's first model, one fold unmirrored: the cheapest complete prediction), timed; then the
refinements run in the order the recipe's `budget` block declares: further members, further folds, further mirror
axes. Before each, the planner predicts its cost from the model's measured pass time and skips it when it would
end later than the budget less the reserve for restore and writing (for an earlier stage of a cascade: later than
`earlier_stages_until` of the budget). A refinement whose cost is not known yet (a member not run before in this
process), or that runs slower than predicted, is cut inside its pass once its measured rate says it would end too
late. Each model keeps, per fold, the running sum of its logits over the flips run, so any stopping point gives the
mean that the recipe with those folds and mirror axes would give (the same arithmetic up to float rounding):
mirror flips averaged as logits, then the folds as the recipe's `fold_average` says.

With the budget block's `first_pass_tiles: "covering"`, each model's first pass runs only a subset of its tiles
that covers the grid (the Gaussian-weighted mean of those tiles is already a complete prediction), and its other
tiles are the first refinement, added into the same weighted sums (sliding_window.WindowSums); a model's mirror
axes wait for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from hnseg_infer.clock import Deadline
from hnseg_infer.geometry.grid import Grid
from hnseg_infer.inference.runner import LoadedModel, activate
from hnseg_infer.inference.sliding_window import (
    WindowSums,
    mirror_combinations,
    monai_tile_starts_zyx,
    predict_sliding_window,
    tile_starts_zyx,
)
from hnseg_infer.recipe.budget import BudgetConfig
from hnseg_infer.recipe.spec import ModelSpec, StageSpec


class StepCut(Exception):
    """A refinement stopped inside its passes: at its measured rate it would have ended too late."""


def network_order(spec: ModelSpec, array_czyx: np.ndarray) -> np.ndarray:
    return array_czyx.transpose((0, *(a + 1 for a in spec.grid.transpose_forward)))


def n_tiles(spec: ModelSpec, grid_size_zyx) -> int:
    """Tiles per pass of the model over a grid of this size (in the network's axis order, padded to the patch)."""
    size = [grid_size_zyx[a] for a in spec.grid.transpose_forward]
    tiling = spec.tiling
    if tiling.kind == "monai":
        starts = monai_tile_starts_zyx(size, tiling.patch_size_zyx, tiling.overlap)
    else:
        starts = tile_starts_zyx(size, tiling.patch_size_zyx, tiling.step_fraction)
    return int(np.prod([len(s) for s in starts]))


@dataclass
class ModelPasses:
    """One model's passes so far: per fold run, the sum of its logits over the flips run (network axis order)."""

    loaded: LoadedModel
    grid: Grid
    image: np.ndarray  # [C, ...] in the network's axis order
    sums: list[np.ndarray] = field(default_factory=list)
    n_axes: int = 0  # the mirror axes run: the first n_axes of the recipe's mirror_axes_zyx
    pass_s: float | None = None  # one pass over all tiles, measured on the first
    first: WindowSums | None = None  # fold 0's unflipped pass while it holds only some of its tiles

    @property
    def spec(self) -> ModelSpec:
        return self.loaded.spec

    @property
    def axes(self) -> tuple[int, ...]:
        return tuple(self.spec.tiling.mirror_axes_zyx[:self.n_axes])

    @property
    def n_passes(self) -> int:
        return len(self.sums) * 2 ** self.n_axes

    def fold_cost_s(self) -> float:
        return self.pass_s * 2 ** self.n_axes

    def axis_cost_s(self) -> float:
        return self.pass_s * 2 ** self.n_axes * len(self.sums)

    def _passes(self, fold, flips, guard) -> np.ndarray:
        """The sum of the logits of `fold` over `flips`, one pass each."""
        total = None
        for flip in flips:
            logits = predict_sliding_window(fold, self.image, n_outputs=self.spec.head.n_outputs, flips_zyx=[flip],
                                            on_batch=guard, **self.spec.tiling.window())
            total = logits if total is None else np.add(total, logits, out=total)
        return total

    def add_fold(self, guard=None, clock=None, *, covering: bool = False) -> None:
        """The next fold over the flips run so far (kept only once all its passes ran). `covering`: the first
        fold's pass over a covering subset of its tiles only (the others: add_tiles)."""
        start = clock() if clock else None
        fold = self.loaded.folds[len(self.sums)]
        share = 1.0  # of a whole pass's tiles run
        if covering and not self.sums:
            window = WindowSums(self.image, n_outputs=self.spec.head.n_outputs, **self.spec.tiling.window())
            tiles = window.covering()
            window.add(fold, tiles, flips_zyx=[()], on_batch=guard)
            self.sums.append(window.logits())
            self.first, share = (window if len(tiles) < window.n_tiles else None), len(tiles) / window.n_tiles
        else:
            self.sums.append(self._passes(fold, mirror_combinations(self.axes), guard))
        if self.pass_s is None and clock is not None:
            self.pass_s = (clock() - start) / share

    def tiles_left(self) -> int:
        return 0 if self.first is None else self.first.n_tiles - len(self.first.added)

    def add_tiles(self, guard=None) -> None:
        """The first pass's other tiles, into its weighted sums; those added before a cut stay added."""
        window = self.first
        try:
            window.add(self.loaded.folds[0], [i for i in range(window.n_tiles) if i not in window.added],
                       flips_zyx=[()], on_batch=guard)
        finally:
            self.sums[0] = window.logits()  # no mirror axis runs before its tiles: sums[0] is this pass alone
            if not self.tiles_left():
                self.first = None

    def add_axis(self, guard=None) -> None:
        """The next mirror axis over the folds run so far: the flips that include it (kept once all ran)."""
        axes = tuple(self.spec.tiling.mirror_axes_zyx[:self.n_axes + 1])
        new = [flip for flip in mirror_combinations(axes) if axes[-1] in flip]
        parts = [self._passes(fold, new, guard) for fold in self.loaded.folds[:len(self.sums)]]
        for total, part in zip(self.sums, parts):
            total += part
        self.n_axes += 1

    def probabilities(self) -> np.ndarray:
        """float32 [K, z, y, x] on the model grid: as LoadedModel.probabilities with the folds and axes run."""
        spec = self.spec
        forward = (0, *(a + 1 for a in spec.grid.transpose_forward))
        backward = tuple(int(a) for a in np.argsort(forward))
        n_flips = np.float32(2 ** self.n_axes)
        total = None
        for fold_sum in self.sums:
            logits = (fold_sum / n_flips).transpose(backward)
            term = logits if spec.fold_average == "logits" else activate(logits, spec.head)
            total = term if total is None else np.add(total, term, out=total)
        mean = total / len(self.sums)
        result = activate(mean, spec.head) if spec.fold_average == "logits" else mean
        return result.astype(np.float32, copy=False)

    def record(self) -> dict:
        tiling = self.spec.tiling
        return {"model": self.spec.name, "folds_run": len(self.sums), "folds": len(self.loaded.folds),
                "mirror_axes_zyx_run": list(self.axes), "mirror_axes_zyx": list(tiling.mirror_axes_zyx),
                "passes": self.n_passes, "pass_s": None if self.pass_s is None else round(self.pass_s, 3),
                **({"first_pass_tiles_run": len(self.first.added), "tiles": self.first.n_tiles} if self.first else {})}


@dataclass
class Planner:
    """Decides, before each refinement, whether it fits; records what ran and every refinement skipped or cut.
    `costs`: seconds per tile of each model measured in this process (a member's cost before it runs)."""

    deadline: Deadline
    config: BudgetConfig
    costs: dict[str, float] = field(default_factory=dict)
    models: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    inference_end_s: float | None = None

    @property
    def reserve_s(self) -> float:
        return self.config.reserve_for(self.deadline.budget_s)

    def limit_s(self, *, last_stage: bool) -> float:
        """Seconds from the clock's start by which a refinement must end."""
        end = self.deadline.budget_s - self.reserve_s
        return end if last_stage else min(end, self.config.earlier_stages_until * self.deadline.budget_s)

    def fits(self, predicted_s: float | None, *, last_stage: bool) -> bool:
        if predicted_s is None:  # unknown: the guard decides inside the first pass
            return self.deadline.elapsed_s() < self.limit_s(last_stage=last_stage)
        return self.deadline.elapsed_s() + predicted_s <= self.limit_s(last_stage=last_stage)

    def guard(self, n_passes: int, *, last_stage: bool, cost_of: str | None = None) -> Callable[[int, int], None]:
        """on_batch for a refinement of `n_passes` passes: StepCut once the rate so far says it ends too late. With
        `cost_of` (a member's first pass, its cost unknown), the rate measured until the cut becomes that model's
        cost per tile, so that the next case skips it before it starts."""
        clock, start, finished = self.deadline.clock, self.deadline.clock(), [0, 0]  # passes, tiles of this one
        limit = self.limit_s(last_stage=last_stage)

        def on_batch(tiles_done: int, n_tiles: int) -> None:
            if finished[1] == n_tiles:  # the previous pass had ended: this batch began the next
                finished[0] += 1
            finished[1] = tiles_done
            done = finished[0] * n_tiles + tiles_done
            per_tile_s = (clock() - start) / done
            left_s = per_tile_s * (n_passes * n_tiles - done)
            if self.deadline.elapsed_s() + left_s > limit:
                if cost_of is not None:
                    self.costs[cost_of] = per_tile_s
                raise StepCut(f"~{left_s:.1f} s more")
        return on_batch

    def left_out(self, stage: str, model: str, kind: str, dropped: dict, predicted_s: float | None,
                 decision: str, note: str | None = None) -> None:
        self.steps.append({"stage": stage, "model": model, "kind": kind, "dropped": dropped,
                           "predicted_s": None if predicted_s is None else round(predicted_s, 3),
                           "left_s": round(self.deadline.left_s(), 3), "decision": decision,
                           **({"note": note} if note else {})})

    def record(self, *, clock_start: str) -> dict:
        config = self.config
        return {"time_budget_s": self.deadline.budget_s, "clock_start": clock_start, **config.to_dict(),
                "reserve_s": self.reserve_s, "recipe_block": config.declared, "models": self.models,
                "steps": self.steps,
                "inference_end_s": None if self.inference_end_s is None else round(self.inference_end_s, 3),
                "predicted_s": None if self.inference_end_s is None else
                round(self.inference_end_s + self.reserve_s, 3), "actual_s": None}

    def warning(self) -> str | None:
        over = self.inference_end_s is not None and self.inference_end_s > self.limit_s(last_stage=True)
        if not self.steps and not over:
            return None
        parts = [f"{s['model']} {s['kind']} {_dropped_text(s['dropped'])} ({s['decision']})" for s in self.steps]
        floors = (f"; the floors alone ran until {self.inference_end_s:.1f} s, past the budget less its reserve "
                  f"({self.limit_s(last_stage=True):g} s): lower the recipe's budget floors or give more time"
                  if over else "")
        return (f"time budget {self.deadline.budget_s:g} s: {len(self.steps)} refinement(s) left out: "
                f"{'; '.join(parts)}{floors}; the mask is the weighted mean of what ran (report: budget.steps)")


def _dropped_text(dropped: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in dropped.items())


def run_stage(stage: StageSpec, models: dict[str, LoadedModel], planner: Planner, *, last_stage: bool,
              grid_of: Callable[[ModelSpec], Grid], input_of: Callable[[ModelSpec, Grid], np.ndarray]
              ) -> list[ModelPasses]:
    """The stage's models run pass by pass (module docstring): the runs of the models that ran, in recipe order.
    `grid_of(spec)`: the model's grid in the ROI; `input_of(spec, grid)`: its input channels [C, z, y, x]."""
    runs: dict[str, ModelPasses] = {}
    clock = planner.deadline.clock

    covering = planner.config.first_pass_tiles == "covering"

    def start(spec: ModelSpec, guard=None) -> ModelPasses:
        grid = grid_of(spec)
        run = ModelPasses(models[spec.name], grid, network_order(spec, input_of(spec, grid)))
        run.add_fold(guard, clock, covering=covering)
        planner.costs[spec.name] = run.pass_s / n_tiles(spec, grid.size_zyx)
        return run

    for index, spec in enumerate(stage.models):  # the floors: always run
        floor = planner.config.floor(spec.name, first=index == 0)
        if floor.folds:
            run = runs[spec.name] = start(spec)
            if run.first is not None and (floor.mirror_axes or floor.folds > 1):
                run.add_tiles()  # a floor beyond one pass is whole passes
            while run.n_axes < floor.mirror_axes:
                run.add_axis()
            while len(run.sums) < floor.folds:
                run.add_fold()
    for spec in stage.models:  # the first refinement: the rest of each first pass's tiles
        if spec.name in runs and runs[spec.name].first is not None:
            _add_tiles_if_fits(runs[spec.name], stage, planner, last_stage=last_stage)
    for kind in planner.config.refinements:
        for spec in stage.models:
            if kind == "members" and spec.name not in runs:
                member = _try_member(spec, stage, planner, start, grid_of, last_stage=last_stage)
                if member is not None:
                    runs[spec.name] = member
            elif kind == "folds" and spec.name in runs:
                _add_while_fits(runs[spec.name], stage, planner, "folds", last_stage=last_stage)
            elif kind == "mirror_axes" and spec.name in runs:
                _add_while_fits(runs[spec.name], stage, planner, "mirror_axes", last_stage=last_stage)
    ordered = [runs[spec.name] for spec in stage.models if spec.name in runs]
    planner.models += [{"stage": stage.name, **run.record()} for run in ordered]
    planner.models += [{"stage": stage.name, "model": spec.name, "folds_run": 0, "folds": len(spec.files),
                        "passes": 0} for spec in stage.models if spec.name not in runs]
    planner.inference_end_s = planner.deadline.elapsed_s()
    return ordered


def _try_member(spec: ModelSpec, stage: StageSpec, planner: Planner, start, grid_of, *,
                last_stage: bool) -> ModelPasses | None:
    """A further member's first pass, when it fits (its cost from an earlier case, else unknown: guarded)."""
    per_tile = planner.costs.get(spec.name)
    predicted = None if per_tile is None else per_tile * n_tiles(spec, grid_of(spec).size_zyx)
    dropped = {"member": spec.name}
    if not planner.fits(predicted, last_stage=last_stage):
        planner.left_out(stage.name, spec.name, "members", dropped, predicted, "skipped")
        return None
    try:
        run = start(spec, planner.guard(1, last_stage=last_stage, cost_of=spec.name))
    except StepCut as cut:
        planner.left_out(stage.name, spec.name, "members", dropped, predicted, "cut", f"stopped in its pass: {cut}")
        return None
    if run.first is not None:
        _add_tiles_if_fits(run, stage, planner, last_stage=last_stage)
    return run


def _add_tiles_if_fits(run: ModelPasses, stage: StageSpec, planner: Planner, *, last_stage: bool) -> None:
    """The rest of the model's first pass's tiles when they fit; cut inside, the tiles added so far count."""
    left = run.tiles_left()
    predicted, dropped = run.pass_s * left / run.first.n_tiles, {"tiles": left}
    if not planner.fits(predicted, last_stage=last_stage):
        planner.left_out(stage.name, run.spec.name, "tiles", dropped, predicted, "skipped")
        return
    try:
        run.add_tiles(planner.guard(1, last_stage=last_stage))
    except StepCut as cut:
        planner.left_out(stage.name, run.spec.name, "tiles", {"tiles": run.tiles_left()}, predicted, "cut",
                         f"stopped after {left - run.tiles_left()} of them: {cut}")


def _add_while_fits(run: ModelPasses, stage: StageSpec, planner: Planner, kind: str, *, last_stage: bool) -> None:
    """The model's next folds (or mirror axes) while each fits; the first that does not ends the kind."""
    spec = run.spec
    while True:
        if kind == "folds":
            left = list(range(len(run.sums), len(run.loaded.folds)))
            if not left:
                return
            predicted, n_passes, dropped = run.fold_cost_s(), 2 ** run.n_axes, {"folds": left}
        else:
            left = list(spec.tiling.mirror_axes_zyx[run.n_axes:])
            if not left:
                return
            if run.first is not None:  # a mirror pass over every tile would outweigh the first pass's subset
                planner.left_out(stage.name, spec.name, kind, {"mirror_axes_zyx": left}, None, "skipped",
                                 "its first pass's tiles were not all run")
                return
            predicted, n_passes, dropped = run.axis_cost_s(), 2 ** run.n_axes * len(run.sums), {"mirror_axes_zyx": left}
        if not planner.fits(predicted, last_stage=last_stage):
            planner.left_out(stage.name, spec.name, kind, dropped, predicted, "skipped")
            return
        guard = planner.guard(n_passes, last_stage=last_stage)
        try:
            run.add_fold(guard) if kind == "folds" else run.add_axis(guard)
        except StepCut as cut:
            planner.left_out(stage.name, spec.name, kind, dropped, predicted, "cut", f"stopped in its passes: {cut}")
            return
