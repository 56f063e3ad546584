"""Anytime execution under a time budget (inference/anytime.py): with an injected clock and deliberately slow
models (each tile batch advances the clock by a fixed cost, so nothing sleeps), the budget is respected,
refinements are dropped in the declared order, any stopping point gives the mean the recipe with the same folds and
mirror axes gives, the report's steps are right, and the floors always run."""

from dataclasses import replace

import numpy as np
import pytest
from builders import model_entry, write_weights

from hnseg_infer.clock import Deadline
from hnseg_infer.geometry.grid import Grid
from hnseg_infer.inference.anytime import ModelPasses, Planner, n_tiles, network_order, run_stage
from hnseg_infer.inference.runner import LoadedModel
from hnseg_infer.inference.sliding_window import tile_starts_zyx
from hnseg_infer.recipe.budget import BudgetConfig, Floor
from hnseg_infer.recipe.load import load_recipe

SHAPE_ZYX = (20, 24, 28)
PATCH = [10, 12, 16]


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class SlowFold:
    """A fold whose logits depend on the position inside the tile (so flips matter) and on its seed (so folds
    differ); every tile it runs advances `clock` by `tile_s`."""

    def __init__(self, seed: int, clock: FakeClock, tile_s: float, n_out: int = 3):
        rng = np.random.default_rng(seed)
        self.weights = rng.standard_normal((n_out, 2)).astype(np.float32)
        self.clock, self.tile_s, self.calls = clock, tile_s, 0

    def __call__(self, batch):
        self.clock.now += self.tile_s * len(batch)
        self.calls += len(batch)
        ramp = np.cumsum(batch[:, 0], axis=-1) / batch.shape[-1] + np.cumsum(batch[:, 1], axis=-3) * 0.1
        return np.stack([w[0] * ramp + w[1] * batch[:, 1] for w in self.weights], axis=1).astype(np.float32)


def _spec(tmp_path, name="m", n_folds=3, mirror=(0, 1, 2), **overrides):
    files = [f"{name}_{f}.onnx" for f in range(n_folds)]
    weights = write_weights(tmp_path / name, models=[model_entry(name=name, files=files, patch_size_zyx=PATCH,
                                                                 mirror_axes_zyx=list(mirror), **overrides)])
    return load_recipe(weights).models[0]


def _loaded(spec, clock, tile_s=1.0, seed=0):
    return LoadedModel(spec, "cpu", tuple(SlowFold(seed + f, clock, tile_s) for f in range(len(spec.files))))


def _image():
    rng = np.random.default_rng(7)
    return rng.standard_normal((2, *SHAPE_ZYX)).astype(np.float32)


def _tiles():
    return int(np.prod([len(s) for s in tile_starts_zyx(SHAPE_ZYX, PATCH, 0.5)]))


@pytest.mark.parametrize("fold_average", ["logits", "probabilities"])
@pytest.mark.parametrize("n_folds, n_axes", [(1, 0), (2, 1), (3, 3), (1, 2)])
def test_any_stopping_point_is_the_recipe_with_those_folds_and_axes(tmp_path, fold_average, n_folds, n_axes):
    spec = _spec(tmp_path, fold_average=fold_average, transpose_forward=[2, 0, 1])
    loaded = _loaded(spec, FakeClock())
    image = _image()
    run = ModelPasses(loaded, None, network_order(spec, image))
    run.add_fold()
    for _ in range(n_axes):
        run.add_axis()
    for _ in range(n_folds - 1):
        run.add_fold()
    subset_spec = replace(spec, files=spec.files[:n_folds],
                          tiling=replace(spec.tiling, mirror_axes_zyx=spec.tiling.mirror_axes_zyx[:n_axes]))
    reference = LoadedModel(subset_spec, "cpu", loaded.folds[:n_folds]).probabilities(image)
    assert run.n_passes == n_folds * 2 ** n_axes
    np.testing.assert_allclose(run.probabilities(), reference, rtol=1e-5, atol=1e-6)
    if (n_folds, n_axes) != (3, 3):  # a subset, not the whole model: a different result
        full = loaded.probabilities(image)
        assert np.abs(run.probabilities() - full).max() > 1e-4


def _stage(tmp_path, names=("a", "b"), n_folds=3, mirror=(2, 1), budget=None):
    files = {n: [f"{n}_{f}.onnx" for f in range(n_folds)] for n in names}
    models = [model_entry(name=n, files=files[n], patch_size_zyx=PATCH, mirror_axes_zyx=list(mirror)) for n in names]
    weights = write_weights(tmp_path / "w", models=models, extra={"budget": budget} if budget else None)
    return load_recipe(weights)


def _run(recipe, clock, budget_s, *, tile_s=1.0, costs=None):
    stage = recipe.stages[0]
    models = {spec.name: _loaded(spec, clock, tile_s, seed=10 * i) for i, spec in enumerate(stage.models)}
    deadline = Deadline(budget_s, clock(), clock)
    planner = Planner(deadline, recipe.budget, {} if costs is None else costs)
    grid = Grid(size_xyz=SHAPE_ZYX[::-1], spacing_xyz_mm=(1.0, 1.0, 1.0), origin_xyz_mm=(0.0, 0.0, 0.0),
                direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    runs = run_stage(stage, models, planner, last_stage=True, grid_of=lambda spec: grid,
                     input_of=lambda spec, g: _image())
    return runs, planner, models


def test_no_pressure_runs_everything_and_leaves_nothing_out(tmp_path):
    recipe = _stage(tmp_path)
    clock = FakeClock()
    runs, planner, models = _run(recipe, clock, budget_s=1e6)
    assert [r.spec.name for r in runs] == ["a", "b"]
    assert all(r.n_passes == 3 * 4 for r in runs) and planner.steps == [] and planner.warning() is None
    # the same work as the recipe unconstrained: every fold saw every tile under each of the 4 flips
    assert all(fold.calls == 4 * _tiles() for m in models.values() for fold in m.folds)
    image = _image()
    for run in runs:
        np.testing.assert_allclose(run.probabilities(), models[run.spec.name].probabilities(image), rtol=1e-5,
                                   atol=1e-6)


def test_the_budget_is_respected_and_refinements_drop_in_the_default_order(tmp_path):
    recipe = _stage(tmp_path, budget={"reserve_s": 10})  # the default order: members, folds, mirror_axes
    clock = FakeClock()
    pass_s = float(_tiles())  # 1 s per tile
    budget = 10 + 4.5 * pass_s  # the floor (1 pass), member b (1 pass), a's 2 folds (2): 4 passes fit, not a 5th
    start = clock()
    runs, planner, _ = _run(recipe, clock, budget)
    assert clock() - start <= budget - planner.reserve_s == budget - 10
    records = {r.spec.name: r.record() for r in runs}
    assert records["a"]["folds_run"] == 3 and records["a"]["mirror_axes_zyx_run"] == []
    assert records["b"]["folds_run"] == 1  # b's folds come after a's in the same kind: a took the time
    steps = [(s["model"], s["kind"], s["dropped"], s["decision"]) for s in planner.steps]
    assert steps == [("b", "folds", {"folds": [1, 2]}, "skipped"),
                     ("a", "mirror_axes", {"mirror_axes_zyx": [2, 1]}, "skipped"),
                     ("b", "mirror_axes", {"mirror_axes_zyx": [2, 1]}, "skipped")]
    first = planner.steps[0]
    assert first["predicted_s"] == pytest.approx(pass_s) and first["left_s"] == pytest.approx(budget - 4 * pass_s)
    assert "3 refinement(s) left out" in planner.warning()


def test_the_declared_order_decides_what_runs(tmp_path):
    budget_block = {"refinements": ["mirror_axes", "folds", "members"], "reserve_s": 0}
    recipe = _stage(tmp_path, budget=budget_block)
    clock = FakeClock()
    pass_s = float(_tiles())
    runs, planner, _ = _run(recipe, clock, 4.5 * pass_s)  # floor + mirror axis 2 (1 pass) + axis 1 (2 passes)
    assert [r.spec.name for r in runs] == ["a"]
    assert runs[0].record()["mirror_axes_zyx_run"] == [2, 1] and runs[0].record()["folds_run"] == 1
    kinds = [(s["model"], s["kind"], s["decision"]) for s in planner.steps]
    assert kinds == [("a", "folds", "skipped"), ("b", "members", "cut")]  # b's cost unknown: cut in its pass


def test_floors_always_run_even_past_the_budget(tmp_path):
    block = {"floors": {"a": {"folds": 2, "mirror_axes": 1}, "b": {"folds": 1}}, "reserve_s": 0}
    recipe = _stage(tmp_path, budget=block)
    clock = FakeClock()
    runs, planner, _ = _run(recipe, clock, budget_s=1.0)  # far less than one pass
    records = {r.spec.name: r.record() for r in runs}
    assert records["a"]["folds_run"] == 2 and records["a"]["mirror_axes_zyx_run"] == [2]
    assert records["b"]["folds_run"] == 1
    assert {(s["model"], s["kind"]) for s in planner.steps} == {("a", "folds"), ("a", "mirror_axes"),
                                                               ("b", "folds"), ("b", "mirror_axes")}
    assert "the floors alone ran until" in planner.warning()  # a budget the floors cannot keep is said so


def test_an_unknown_member_is_cut_inside_its_pass_and_a_known_one_skipped_before(tmp_path):
    recipe = _stage(tmp_path, budget={"reserve_s": 0})
    pass_s = float(_tiles())
    clock = FakeClock()
    runs, planner, models = _run(recipe, clock, 1.5 * pass_s)
    assert [r.spec.name for r in runs] == ["a"]
    cut = planner.steps[0]
    assert (cut["model"], cut["kind"], cut["decision"], cut["predicted_s"]) == ("b", "members", "cut", None)
    calls = models["b"].folds[0].calls
    assert 0 < calls < _tiles()  # it stopped inside its pass, not after it
    assert clock() - 100.0 <= 1.5 * pass_s + 2  # at most one tile batch (2 tiles) past the limit
    assert planner.costs["b"] == pytest.approx(1.0)  # the rate measured until the cut is kept: the next case skips it
    # a later case knows b's cost per tile: skipped before it starts, nothing wasted
    costs = {"b": 1.0}
    clock = FakeClock()
    runs, planner, models = _run(recipe, clock, 1.5 * pass_s, costs=costs)
    assert planner.steps[0]["decision"] == "skipped" and planner.steps[0]["predicted_s"] == pytest.approx(pass_s)
    assert models["b"].folds[0].calls == 0


def test_costs_per_tile_are_measured_on_the_first_pass(tmp_path):
    recipe = _stage(tmp_path, names=("a",))
    costs = {}
    _run(recipe, FakeClock(), 1e6, tile_s=0.25, costs=costs)
    assert costs == {"a": pytest.approx(0.25)}
    assert n_tiles(recipe.models[0], SHAPE_ZYX) == _tiles()


def test_earlier_stages_stop_refining_at_their_share(tmp_path):
    recipe = _stage(tmp_path, names=("a",), budget={"reserve_s": 0, "earlier_stages_until": 0.5})
    clock = FakeClock()
    stage = recipe.stages[0]
    models = {"a": _loaded(stage.models[0], clock)}
    pass_s = float(_tiles())
    planner = Planner(Deadline(4 * pass_s, clock(), clock), recipe.budget, {})
    grid = Grid(size_xyz=SHAPE_ZYX[::-1], spacing_xyz_mm=(1.0, 1.0, 1.0), origin_xyz_mm=(0.0, 0.0, 0.0),
                direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    runs = run_stage(stage, models, planner, last_stage=False, grid_of=lambda spec: grid,
                     input_of=lambda spec, g: _image())
    assert runs[0].n_passes == 2  # 2 of the 4 passes' worth of budget: half of it, for an earlier stage


def test_budget_config_floor_defaults():
    config = BudgetConfig()
    assert config.floor("x", first=True) == Floor(1, 0) and config.floor("x", first=False) == Floor(0, 0)


def test_a_covering_subset_of_tiles_is_a_complete_weighted_mean_and_the_rest_completes_it():
    from hnseg_infer.inference.sliding_window import WindowSums, predict_sliding_window

    image, fold = _image(), SlowFold(0, FakeClock(), 0.0)
    options = {"patch_zyx": PATCH, "n_outputs": 3, "tile_batch": 2}
    window = WindowSums(image, **options)
    cover = window.covering()
    assert (len(cover), window.n_tiles) == (8, _tiles())  # 2 of 3 starts per axis
    window.add(fold, cover, flips_zyx=[()])
    assert (window.weights > 0).all()  # every voxel covered
    # here the covering tiles are those of a tiling without overlap: the same weighted mean
    np.testing.assert_allclose(window.logits(), predict_sliding_window(fold, image, step_fraction=1.0, **options),
                               rtol=1e-6, atol=1e-6)
    window.add(fold, [i for i in range(window.n_tiles) if i not in window.added], flips_zyx=[()])
    np.testing.assert_allclose(window.logits(), predict_sliding_window(fold, image, **options), rtol=1e-5, atol=1e-6)
    every = WindowSums(image, **options)
    every.add(fold, range(every.n_tiles))
    assert np.array_equal(every.logits(), predict_sliding_window(fold, image, **options))  # the same floats


def test_covering_first_passes_keep_a_budget_below_one_pass_and_complete_without_pressure(tmp_path):
    from hnseg_infer.inference.runner import activate
    from hnseg_infer.inference.sliding_window import predict_sliding_window

    recipe = _stage(tmp_path, names=("a",), budget={"first_pass_tiles": "covering", "reserve_s": 0})
    runs, planner, models = _run(recipe, FakeClock(), 1e6)
    assert planner.steps == [] and runs[0].first is None and runs[0].n_passes == 3 * 4
    assert models["a"].folds[0].calls == 4 * _tiles()  # every tile once per flip: nothing run twice
    np.testing.assert_allclose(runs[0].probabilities(), models["a"].probabilities(_image()), rtol=1e-5, atol=1e-6)
    clock = FakeClock()
    (run,), planner, models = _run(recipe, clock, 10.0)  # 1 s per tile: one whole pass (27 s) does not fit
    assert models["a"].folds[0].calls == 8 and clock() - 100.0 <= 10.0
    assert [(s["kind"], s["dropped"], s["decision"]) for s in planner.steps] == [
        ("tiles", {"tiles": _tiles() - 8}, "skipped"), ("folds", {"folds": [1, 2]}, "skipped"),
        ("mirror_axes", {"mirror_axes_zyx": [2, 1]}, "skipped")]
    assert planner.models[0]["first_pass_tiles_run"] == 8
    logits = predict_sliding_window(models["a"].folds[0], _image(), patch_zyx=PATCH, n_outputs=3, step_fraction=1.0)
    np.testing.assert_allclose(run.probabilities(), activate(logits, run.spec.head), rtol=1e-5, atol=1e-6)
