import json

import pytest
from builders import model_entry, write_weights

from hnseg_infer.errors import RecipeError
from hnseg_infer.recipe.load import load_recipe


def edit(folder, fn):
    recipe = json.loads((folder / "recipe.json").read_text())
    fn(recipe)
    (folder / "recipe.json").write_text(json.dumps(recipe))
    return folder


def monai_tiling(model: dict, **overlap) -> None:
    model.pop("step_fraction")
    model.update(tiling="monai", **overlap)


def test_valid_recipe_loads_with_defaults_filled(tmp_path):
    recipe = load_recipe(write_weights(tmp_path))
    (model,) = recipe.models
    assert model.grid.orientation == "lps" and model.fold_average == "probabilities" and model.tiling.gaussian is True
    assert model.tiling.mirror_axes_zyx == () and model.tiling.patch_size_zyx == (16, 16, 16)
    assert [op.to_json() for op in model.channels[1].ops] == [{"op": "suv"}] and model.head.n_outputs == 3
    assert len(model.sha256[0]) == 64 and len(recipe.sha256) == 64


def test_monai_tiling_and_ras_orientation_load(tmp_path):
    folder = edit(write_weights(tmp_path), lambda r: (monai_tiling(r["models"][0], overlap=0.625),
                                                      r["models"][0].update(orientation="ras")))
    (model,) = load_recipe(folder).models
    assert (model.tiling.kind, model.tiling.overlap, model.grid.orientation) == ("monai", 0.625, "ras")
    (default,) = load_recipe(write_weights(tmp_path / "default")).models
    assert (default.tiling.kind, default.tiling.step_fraction) == ("nnunet", 0.5)
    assert not hasattr(default.tiling, "overlap")  # nnU-Net tiling has no MONAI overlap to set


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r.update(extra_key=1), "unknown key(s) ['extra_key']"),
    (lambda r: r.update(schema_version=7), "schema_version 7 is not supported"),
    (lambda r: r["models"][0].update(fold_average="median"), "fold_average must be one of"),
    (lambda r: r["models"][0].update(step_fraction=0), "step_fraction must be in (0, 1]"),
    (lambda r: r["models"][0].update(mirror_axes_zyx=[0, 3]), "mirror_axes_zyx"),
    (lambda r: r["models"][0].update(spacing_xyz_mm=[1, 1]), "'spacing_xyz_mm' must be a list of 3 numbers"),
    (lambda r: r["models"][0].update(orientation="xyz"), "orientation must be one of"),
    (lambda r: r["models"][0]["channels"][0].update(source="mri"), "source must be one of"),
    (lambda r: r["models"][0]["channels"][0].update(interp="linear"), "unknown key(s) ['interp']"),
    (lambda r: r["models"][0].update(head={"type": "softmax", "labels": [1, 2]}), "including 0"),
    (lambda r: r["models"][0].update(head={"type": "sigmoid", "regions": [[1, 2]], "region_labels": [1, 2]}),
     "equal length"),
    (lambda r: r["models"][0].update(files=["nope.onnx"]), "nope.onnx does not exist"),
    (lambda r: r.update(models=[]), "'models' is empty"),
    (lambda r: r["roi"].update(size=3), "unknown key(s) ['size']"),
    (lambda r: r["roi"].update(method="atlas"), "unknown ROI method 'atlas'"),
    (lambda r: r["roi"].update(method="ct_top", params={"size": [1, 2, 3]}), "unknown key(s) ['size']"),
    (lambda r: r["roi"].update(method="labels_bbox"), "reads the labels of a previous stage"),
    (lambda r: r["roi"].update(method="labels_centroid_cube", params={"fallback": "labels_bbox"}), "must be one of"),
    (lambda r: r.update(postprocess={"min_volume": 3}), "min_volume"),
    (lambda r: r["models"][0].update(tiling="torchio"), "tiling must be one of"),
    (lambda r: r["models"][0].update(tiling="monai", overlap=0.5), "'step_fraction' is nnU-Net tiling's"),
    (lambda r: monai_tiling(r["models"][0]), "missing required key 'overlap'"),
    (lambda r: monai_tiling(r["models"][0], overlap=1.0), "overlap must be in [0, 1)"),
    (lambda r: r["models"][0].update(overlap=0.5), "'overlap' is MONAI tiling's"),
    (lambda r: r["models"][0].update(grid_spacing="nnunet"), "grid_spacing must be one of"),
    (lambda r: r["models"][0]["channels"][0].update(ops_before_sampling="yes"), "'ops_before_sampling' must be bool"),
    (lambda r: r["models"][0].update(resampling="scipy"), "resampling must be one of"),
    (lambda r: r["models"][0].update(resampling="nnunet", orientation="ras"), "it needs orientation \"ct\""),
    (lambda r: r["models"][0].update(pet_to_ct="bspline"), "pet_to_ct is read only with resampling \"nnunet\""),
    (lambda r: r["models"][0].update(resampling="nnunet", orientation="ct", pet_to_ct="cubic"),
     "pet_to_ct must be one of"),
])
def test_invalid_recipes_name_the_key(tmp_path, mutate, message):
    folder = edit(write_weights(tmp_path), mutate)
    with pytest.raises(RecipeError) as info:
        load_recipe(folder)
    assert message in str(info.value)
    assert "recipe.json" in str(info.value) or "postprocess" in str(info.value) or "min_volume" in str(info.value)


def test_sigmoid_models_with_different_regions_cannot_be_ensembled(tmp_path):
    a = model_entry(name="a", files=["a.onnx"], head={"type": "sigmoid", "regions": [[1, 2], [2]], "region_labels": [1, 2]})
    b = model_entry(name="b", files=["b.onnx"], head={"type": "sigmoid", "regions": [[1], [2]], "region_labels": [1, 2]})
    with pytest.raises(RecipeError, match="different regions"):
        load_recipe(write_weights(tmp_path, models=[a, b]))


def test_not_json_and_missing_recipe(tmp_path):
    folder = write_weights(tmp_path / "w")
    (folder / "recipe.json").write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_recipe(folder)
    (folder / "recipe.json").unlink()
    with pytest.raises(RecipeError, match="no recipe.json"):
        load_recipe(folder)
