"""Recipe.to_json is parse_recipe's inverse: parse_recipe(r.to_json(), r.path) == r for every kind of recipe the
project ships or builds without torch (a one-stage recipe, the demo cascade with nnU-Net resampling, MONAI tiling and
fit_roi grids, the SUV baseline, a sigmoid-region head, an uncertainty block), the JSON is plain JSON, and a recipe
is hashable (frozen all the way down)."""

import json
import subprocess
import sys

import pytest
from builders import model_entry, write_weights
from conftest import REPO

from hnseg_infer.recipe.load import load_recipe
from hnseg_infer.recipe.parse import parse_recipe
from hnseg_infer.recipe.spec import MonaiTiling, NnunetTiling


def _round_trip(recipe):
    text = json.dumps(recipe.to_json())  # plain JSON: enums as strings, no paths
    again = parse_recipe(json.loads(text), recipe.path)
    assert again == recipe
    assert hash(again) == hash(recipe)  # frozen all the way down: ops, ROI parameters, provenance
    return again


def test_the_demo_cascade_round_trips():
    recipe = load_recipe(REPO / "weights" / "demo")
    _round_trip(recipe)
    tilings = {type(m.tiling) for m in recipe.models}
    assert tilings == {NnunetTiling, MonaiTiling}  # both tilings and nnU-Net resampling are covered


def test_one_stage_and_sigmoid_and_uncertainty_recipes_round_trip(tmp_path):
    sigmoid = {"type": "sigmoid", "regions": [[1, 2], [2]], "region_labels": [1, 2]}
    weights = write_weights(tmp_path / "a", models=[model_entry(head=sigmoid, mirror_axes_zyx=[0, 2])],
                            postprocess={"min_volume_mm3": {"GTVn": 30.0}, "gtvn_max_distance_to_gtvp_mm": 50})
    recipe = load_recipe(weights)
    assert "stages" not in recipe.to_json()  # written back in the flat form it came in
    _round_trip(recipe)
    block = {"passes": 4, "dropout_rate": 0.0, "seed": 3, "augmentations": {"flip": {"axes_zyx": [2]}}}
    _round_trip(load_recipe(write_weights(tmp_path / "b", extra={"uncertainty": block})))


def test_the_suv_baseline_round_trips(tmp_path):
    subprocess.run([sys.executable, str(REPO / "export" / "make_suv_baseline.py"), "--out", str(tmp_path / "suv")],
                   check=True, capture_output=True)
    _round_trip(load_recipe(tmp_path / "suv"))


def test_a_changed_value_makes_a_different_recipe(tmp_path):
    recipe = load_recipe(write_weights(tmp_path / "w"))
    raw = recipe.to_json()
    raw["models"][0]["step_fraction"] = 0.25
    assert parse_recipe(raw, recipe.path) != recipe
    box = {"method": "pet_threshold_head_neck_box", "params": {"size_mm": [20.0, 24.0, 31.0]}}
    recipe = load_recipe(write_weights(tmp_path / "box", roi=box))
    edits = (lambda raw: raw["models"][0]["channels"][0].update(ops=[{"op": "clip", "min": -1000, "max": 999}]),
             lambda raw: raw["roi"]["params"].update(size_mm=[21.0, 24.0, 31.0]))
    for edit in edits:
        raw = recipe.to_json()
        edit(raw)
        changed = parse_recipe(raw, recipe.path)
        assert changed != recipe and len({recipe, changed}) == 2


def test_recipe_parts_cannot_be_changed_in_place(tmp_path):
    box = {"method": "pet_threshold_head_neck_box", "params": {"size_mm": [20.0, 24.0, 31.0]}}
    recipe = load_recipe(write_weights(tmp_path / "w", roi=box))
    with pytest.raises(TypeError):
        recipe.stages[0].roi.params["size_mm"] = (1.0, 1.0, 1.0)  # a FrozenMap
    with pytest.raises(AttributeError):
        recipe.models[0].channels[0].ops[0].min = 0.0  # a frozen dataclass


def test_nnunet_tiling_cannot_take_a_monai_overlap(tmp_path):
    recipe = load_recipe(write_weights(tmp_path / "w"))
    raw = recipe.to_json()
    raw["models"][0]["overlap"] = 0.5
    with pytest.raises(Exception, match="'overlap' is MONAI tiling's"):
        parse_recipe(raw, recipe.path)


def test_vocabularies_are_enums_and_the_spec_is_frozen(tmp_path):
    import dataclasses

    from hnseg_infer.recipe.vocabulary import ChannelSource, FoldAverage, HeadType, Orientation, Restore, Tiling

    recipe = load_recipe(write_weights(tmp_path / "w"))
    (model,) = recipe.models
    assert isinstance(model.grid.orientation, Orientation) and isinstance(model.tiling.kind, Tiling)
    assert isinstance(model.head.type, HeadType) and isinstance(model.fold_average, FoldAverage)
    assert isinstance(model.channels[0].source, ChannelSource) and isinstance(recipe.stages[0].restore, Restore)
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.tiling.tile_batch = 4


def test_parsing_reads_no_file_and_loading_checks_them(tmp_path):
    from hnseg_infer.errors import RecipeError
    from hnseg_infer.recipe.load import load_files

    recipe = load_recipe(write_weights(tmp_path / "w"))
    elsewhere = tmp_path / "empty" / "recipe.json"  # a folder holding none of the files the recipe names
    parsed = parse_recipe(recipe.to_json(), elsewhere)
    (model,) = parsed.models
    assert model.files == tuple(elsewhere.parent / f.name for f in recipe.models[0].files)
    assert model.sha256 == recipe.models[0].sha256  # as declared, not computed
    with pytest.raises(RecipeError, match=r"model file .*empty.* does not exist"):
        load_files(parsed)
    raw = recipe.to_json()
    raw["models"][0]["sha256"] = ["abc"]
    with pytest.raises(RecipeError, match="64 hex digits"):
        parse_recipe(raw, recipe.path)
    raw["models"][0].update(sha256=recipe.models[0].sha256, files=[3])
    with pytest.raises(RecipeError, match="must list file names"):
        parse_recipe(raw, recipe.path)
