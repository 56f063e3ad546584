"""The recipe's `budget` block (recipe/budget.py): strict like the rest of the recipe, its defaults, and the
round trip through Recipe.to_json."""

import json

import pytest
from builders import model_entry, write_weights

from hnseg_infer.errors import RecipeError
from hnseg_infer.recipe.budget import DEFAULT_RESERVE_S, REFINEMENTS, BudgetConfig, Floor
from hnseg_infer.recipe.load import load_recipe
from hnseg_infer.recipe.parse import parse_recipe


def _weights(tmp_path, block, n_folds=3):
    files = [f"f{i}.onnx" for i in range(n_folds)]
    models = [model_entry(name="fine", files=files, mirror_axes_zyx=[0, 2]), model_entry(name="extra")]
    extra = None if block is None else {"budget": block}
    return write_weights(tmp_path / "w", models=models, extra=extra)


def test_no_block_means_the_documented_defaults(tmp_path):
    recipe = load_recipe(_weights(tmp_path, None))
    assert recipe.budget == BudgetConfig() and not recipe.budget.declared
    assert recipe.budget.refinements == REFINEMENTS == ("members", "folds", "mirror_axes")
    assert "budget" not in recipe.to_json()
    # the reserve: 10 s, or a tenth of the budget when that is less
    assert recipe.budget.reserve_s is None
    assert recipe.budget.reserve_for(540.0) == DEFAULT_RESERVE_S == 10.0 and recipe.budget.reserve_for(20.0) == 2.0


def test_a_block_without_a_reserve_keeps_the_default_one(tmp_path):
    recipe = load_recipe(_weights(tmp_path, {"first_pass_tiles": "covering"}))
    assert recipe.budget.reserve_s is None and "reserve_s" not in recipe.to_json()["budget"]
    assert parse_recipe(json.loads(json.dumps(recipe.to_json())), recipe.path) == recipe


def test_a_block_is_read_and_round_trips(tmp_path):
    block = {"refinements": ["folds", "mirror_axes", "members"], "floors": {"fine": {"folds": 2, "mirror_axes": 1}},
             "reserve_s": 25, "earlier_stages_until": 0.4, "first_pass_tiles": "covering"}
    recipe = load_recipe(_weights(tmp_path, block))
    assert recipe.budget.first_pass_tiles == "covering"
    assert recipe.budget.floor("fine", first=True) == Floor(2, 1)
    assert recipe.budget.floor("extra", first=False) == Floor(0, 0)
    assert recipe.budget.reserve_s == 25.0 and recipe.budget.earlier_stages_until == 0.4
    again = parse_recipe(json.loads(json.dumps(recipe.to_json())), recipe.path)
    assert again == recipe and again.to_json()["budget"] == recipe.to_json()["budget"]


@pytest.mark.parametrize("block, message", [
    ({"reserve": 5}, r"budget: unknown key\(s\) \['reserve'\]; allowed keys"),
    ({"refinements": ["folds", "members"]}, r"'refinements' must list each of \['members', 'folds', 'mirror_axes'\]"),
    ({"refinements": ["folds", "folds", "members"]}, "must list each of"),
    ({"refinements": ["folds", "tta", "members"]}, "must list each of"),
    ({"reserve_s": -1}, r"'reserve_s' must be a number of seconds >= 0, got -1"),
    ({"reserve_s": True}, "'reserve_s' must be a number"),
    ({"earlier_stages_until": 0}, r"'earlier_stages_until' must be a fraction of the budget in \(0, 1\]"),
    ({"floors": {"coarse": {"folds": 1}}}, r"floors 'coarse': no model of that name in the recipe; its models are "
                                           r"\['extra', 'fine'\]"),
    ({"floors": {"fine": {"folds": 4}}}, r"floors 'fine': 'folds' must be an integer in \[0, 3\] \(the model has 3\)"),
    ({"floors": {"fine": {"mirror_axes": 3}}}, r"'mirror_axes' must be an integer in \[0, 2\]"),
    ({"floors": {"fine": {"tta": 1}}}, r"must be an object with keys among \['folds', 'mirror_axes'\]"),
    ([], "budget must be a JSON object"),
    ({"first_pass_tiles": "some"}, r"'first_pass_tiles' must be one of \['all', 'covering'\], got 'some'"),
])
def test_bad_blocks_are_refused_naming_the_key(tmp_path, block, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_weights(tmp_path, block))
