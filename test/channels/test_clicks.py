"""Click refinement: the clicks file, spheres in the prompt channels, and a model whose GTVn logit rises with its
GTVn prompt: a click in a lesion the model misses changes the mask there and nowhere far from it, at the same
physical place whatever the CT's axes."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import SimpleITK as sitk
from builders import image_from_function, model_entry, signed_permutations, write_weights
from conftest import write_gc_input
from onnx import TensorProto, helper, numpy_helper

from hnseg_infer.channels.clicks import RADIUS_VOXELS, Click, Clicks, encode, load_clicks
from hnseg_infer.cli.main import main
from hnseg_infer.errors import InputError, RecipeError
from hnseg_infer.geometry.grid import Grid
from hnseg_infer.io.images import Case, detect_pet_unit
from hnseg_infer.recipe.load import load_recipe
from hnseg_infer.segmenter import Segmenter

TUMOUR_XYZ_MM, TUMOUR_RADIUS_MM, TUMOUR_SUV = np.array([8.0, -4.0, 14.0]), 7.0, 10.0
NODE_XYZ_MM, NODE_RADIUS_MM, NODE_SUV = np.array([-13.0, 9.0, 6.0]), 5.0, 4.0  # below the model's threshold
IDENTITY = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)


def _values(points, tumour, node, background):
    r_t = np.linalg.norm(points - TUMOUR_XYZ_MM, axis=1)
    r_n = np.linalg.norm(points - NODE_XYZ_MM, axis=1)
    body = np.linalg.norm(points[:, :2] / [40.0, 30.0], axis=1) < 1
    return np.where(r_t < TUMOUR_RADIUS_MM, tumour, np.where(r_n < NODE_RADIUS_MM, node,
                                                             np.where(body, background, 0.0)))


def two_lesion_case(direction=IDENTITY) -> Case:
    """A GTVp the model finds (SUV 10) and a GTVn node it misses (SUV 4); the CT's axes may be any."""
    size, spacing = (48, 40, 22), (1.1, 1.3, 2.5)
    origin = np.array([0.0, 0.0, 10.0]) - np.asarray(direction).reshape(3, 3) @ (
        np.asarray(spacing) * (np.asarray(size) - 1) / 2)
    ct = image_from_function(lambda p: _values(p, 60.0, 45.0, 40.0) - 1040.0 * (_values(p, 1, 1, 1) == 0),
                             size_xyz=size, spacing_xyz_mm=spacing, origin_xyz_mm=tuple(origin), direction=direction)
    pet = image_from_function(lambda p: _values(p, TUMOUR_SUV, NODE_SUV, 1.0), size_xyz=(24, 22, 16),
                              spacing_xyz_mm=(4.0, 4.0, 3.5), origin_xyz_mm=(-46.0, -42.0, -16.0), direction=IDENTITY)
    return Case(ct, pet, ct_path=Path("ct.mha"), pet_path=Path("pet.mha"), pet_unit=detect_pet_unit(pet))


def save_prompt_model(path: Path) -> Path:
    """Channels [CT, SUV, GTVp prompt, GTVn prompt] → logits [background, GTVp, GTVn], voxel-wise:
    h = ReLU([SUV + 10·pn − 12.5, SUV + 10·pp − 12.5, SUV, −pp, −pn]);
    background 0; GTVp 2·SUV − 10 + 10·h1 − 100·h3; GTVn 10·h0 − 1 − 100·h4.
    Without prompts: GTVp where SUV > 5, never GTVn (below SUV 12.5). A positive GTVn click marks GTVn where
    SUV > 2.5 inside its sphere; a negative click vetoes its label inside its sphere."""
    w1 = np.array([[0, 1, 0, 10], [0, 1, 10, 0], [0, 1, 0, 0], [0, 0, -1, 0], [0, 0, 0, -1]], np.float32)
    b1 = np.array([-12.5, -12.5, 0, 0, 0], np.float32)
    w2 = np.array([[0, 0, 0, 0, 0], [0, 10, 2, -100, 0], [10, 0, 0, 0, -100]], np.float32)
    b2 = np.array([0, -10, -1], np.float32)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, "z", "y", "x"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, "z", "y", "x"])
    inits = [numpy_helper.from_array(w1.reshape(5, 4, 1, 1, 1), "W1"), numpy_helper.from_array(b1, "B1"),
             numpy_helper.from_array(w2.reshape(3, 5, 1, 1, 1), "W2"), numpy_helper.from_array(b2, "B2")]
    nodes = [helper.make_node("Conv", ["input", "W1", "B1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "W2", "B2"], ["logits"])]
    model = helper.make_model(helper.make_graph(nodes, "prompt", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


PROMPT_CHANNELS = [{"source": "ct", "ops": [{"op": "clip", "min": -1024, "max": 3071}]},
                   {"source": "pet", "ops": [{"op": "suv"}, {"op": "clip", "min": 0, "max": 50}]},
                   {"source": "clicks_gtvp"}, {"source": "clicks_gtvn"}]


def prompt_weights(folder: Path, **overrides) -> Path:
    save_prompt_model(folder / "prompt.onnx")
    return write_weights(folder, models=[model_entry(name="prompt", files=["prompt.onnx"], channels=PROMPT_CHANNELS,
                                                     **overrides)])


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return load_recipe(prompt_weights(tmp_path_factory.mktemp("prompt") / "w"))


def clicks_file(path: Path, clicks, **extra) -> Path:
    path.write_text(json.dumps({"clicks": clicks, **extra}))
    return path


def click(point, label="GTVn", kind="positive") -> dict:
    return {"point_mm": [float(v) for v in point], "label": label, "type": kind}


def physical_points(mask: sitk.Image, where: np.ndarray) -> np.ndarray:
    return Grid.of(mask).index_to_physical(np.argwhere(where)[:, ::-1])


def labels(prediction) -> np.ndarray:
    return sitk.GetArrayFromImage(prediction.mask)


# ------------------------------------------------------------------------------------------------- the clicks file

def test_clicks_file_is_read_in_lps_or_ras(tmp_path):
    clicks = load_clicks(clicks_file(tmp_path / "c.json", [click([1, 2, 3]), click([4, 5, 6], "GTVp", "negative")]))
    assert [(c.point_xyz_mm, c.label, c.value, c.index) for c in clicks.clicks] == [
        ((1.0, 2.0, 3.0), "GTVn", 1.0, 0), ((4.0, 5.0, 6.0), "GTVp", -1.0, 1)]
    ras = load_clicks(clicks_file(tmp_path / "r.json", [click([1, 2, 3])], coordinate_system="RAS"))
    assert ras.clicks[0].point_xyz_mm == (-1.0, -2.0, 3.0)


@pytest.mark.parametrize("content, words", [
    ("not json", "is not valid JSON"),
    ("[]", "must hold a JSON object with a 'clicks' list"),
    ({"clicks": []}, "'clicks' must be a non-empty list"),
    ({"clicks": [click([0, 0, 0])], "units": "mm"}, "unknown key(s) ['units']"),
    ({"clicks": [click([0, 0, 0])], "coordinate_system": "IJK"}, "coordinate_system must be one of"),
    ({"clicks": [click([0, 0, 0]), [1, 2, 3]]}, "click 1 must be an object"),
    ({"clicks": [click([0, 0, 0]), {"point_mm": [0, 0, 0], "label": "GTVn"}]}, "click 1 misses ['type']"),
    ({"clicks": [click([0, 0, 0]), {**click([0, 0, 0]), "radius": 3}]}, "click 1 has unknown key(s) ['radius']"),
    ({"clicks": [click([0, 0, 0]), {**click([0, 0, 0]), "point_mm": [0, 0]}]}, "click 1: 'point_mm' must be 3"),
    ({"clicks": [click([0, 0, 0]), {**click([0, 0, 0]), "point_mm": [0, 0, "1"]}]}, "click 1: 'point_mm'"),
    ({"clicks": [click([0, 0, 0]), {**click([0, 0, 0]), "label": "tumour"}]}, "click 1: 'label' must be 'GTVp' or"),
    ({"clicks": [click([0, 0, 0]), {**click([0, 0, 0]), "type": "add"}]}, "click 1: 'type' must be 'positive' or"),
])
def test_bad_clicks_files_name_the_file_the_click_and_the_fix(tmp_path, content, words):
    path = tmp_path / "clicks.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(InputError) as error:
        load_clicks(path)
    assert words in str(error.value) and str(path) in str(error.value)


def test_missing_clicks_file(tmp_path):
    with pytest.raises(InputError, match="does not exist: pass --clicks"):
        load_clicks(tmp_path / "none.json")


def test_a_click_is_a_sphere_of_radius_3_voxels_on_the_model_grid():
    grid = Grid((20, 18, 16), (1.0, 2.0, 3.0), (0.0, 0.0, 0.0), (0.0, 1.0, 0, -1.0, 0, 0, 0, 0, 1.0))
    at = grid.index_to_physical([[10, 9, 8]])[0]
    clicks = Clicks(Path("c.json"), (Click(tuple(at), "GTVn", 1.0, 0), Click(tuple(at + [0, 0, 300]), "GTVn", -1.0, 1),
                                     Click(tuple(at), "GTVp", -1.0, 2)))
    gtvn = encode(clicks, "clicks_gtvn", grid)
    n_inside = sum(1 for i in range(-3, 4) for j in range(-3, 4) for k in range(-3, 4) if i * i + j * j + k * k <= 9)
    assert (gtvn == 1).sum() == n_inside == 123 and (gtvn == -1).sum() == 0 and gtvn[8, 9, 10] == 1
    assert clicks.landed == {0}  # click 1 lies 300 mm away: outside this grid
    assert (encode(clicks, "clicks_gtvp", grid) == -1).sum() == 123
    assert not encode(None, "clicks_gtvp", grid).any()
    # later clicks win where spheres overlap
    both = Clicks(Path("c.json"), (Click(tuple(at), "GTVn", 1.0, 0), Click(tuple(at), "GTVn", -1.0, 1)))
    assert (encode(both, "clicks_gtvn", grid) == -1).sum() == 123
    assert RADIUS_VOXELS == 3


# ---------------------------------------------------------------------------------------------------- refinement

def test_a_click_in_a_missed_node_adds_it_and_changes_nothing_far_from_it(recipe, tmp_path):
    case = two_lesion_case()
    plain = labels(Segmenter(recipe, device="cpu").predict_case(case))
    assert (plain == 1).any() and not (plain == 2).any()  # the tumour is found, the node missed
    clicks = load_clicks(clicks_file(tmp_path / "c.json", [click(NODE_XYZ_MM)]))
    refined_prediction = Segmenter(recipe, device="cpu").predict_case(case, clicks=clicks)
    refined = labels(refined_prediction)
    changed = refined != plain
    assert (refined == 2).sum() > 0 and changed.any()
    distances = np.linalg.norm(physical_points(refined_prediction.mask, changed) - NODE_XYZ_MM, axis=1)
    assert distances.max() <= 10.0, distances.max()
    node_voxels = np.linalg.norm(physical_points(refined_prediction.mask, refined == 2) - NODE_XYZ_MM, axis=1)
    assert node_voxels.max() <= NODE_RADIUS_MM + 1.5  # GTVn inside the node only (not the sphere's background)
    assert refined_prediction.report.data["clicks"]["clicks"][0]["label"] == "GTVn"


def test_a_negative_click_removes_a_false_gtvp_near_it_only(recipe, tmp_path):
    case = two_lesion_case()
    plain = labels(Segmenter(recipe, device="cpu").predict_case(case))
    edge = TUMOUR_XYZ_MM + [5.0, 0, 0]
    clicks = load_clicks(clicks_file(tmp_path / "c.json", [click(edge, "GTVp", "negative")]))
    refined_prediction = Segmenter(recipe, device="cpu").predict_case(case, clicks=clicks)
    removed = (plain == 1) & (labels(refined_prediction) != 1)
    assert removed.any() and (labels(refined_prediction) == 1).any()
    assert np.linalg.norm(physical_points(refined_prediction.mask, removed) - edge, axis=1).max() <= 10.0


@pytest.mark.parametrize("direction", [signed_permutations()[i] for i in (7, 13, 42)])
def test_a_click_lands_at_the_same_physical_place_whatever_the_ct_axes(recipe, tmp_path, direction):
    clicks = load_clicks(clicks_file(tmp_path / "c.json", [click(NODE_XYZ_MM)]))
    reference = Segmenter(recipe, device="cpu").predict_case(two_lesion_case(), clicks=clicks)
    turned = Segmenter(recipe, device="cpu").predict_case(two_lesion_case(direction), clicks=load_clicks(tmp_path / "c.json"))
    centre = physical_points(reference.mask, labels(reference) == 2).mean(axis=0)
    centre_turned = physical_points(turned.mask, labels(turned) == 2).mean(axis=0)
    assert np.linalg.norm(centre - centre_turned) < 1.5, (centre, centre_turned)
    assert np.linalg.norm(centre - NODE_XYZ_MM) < 1.5
    volume = (labels(reference) == 2).sum() * np.prod(reference.mask.GetSpacing())
    assert abs((labels(turned) == 2).sum() * np.prod(turned.mask.GetSpacing()) - volume) < 0.2 * volume


def test_refining_without_prompt_channels_is_a_recipe_error(tmp_path):
    case = two_lesion_case()
    clicks = load_clicks(clicks_file(tmp_path / "c.json", [click(NODE_XYZ_MM)]))
    with pytest.raises(RecipeError, match="has no model with a click-prompt channel"):
        Segmenter(load_recipe(write_weights(tmp_path / "plain")), device="cpu").predict_case(case, clicks=clicks)
    save_prompt_model(tmp_path / "p" / "prompt.onnx")
    only_gtvp = write_weights(tmp_path / "p", models=[model_entry(
        files=["prompt.onnx"], channels=PROMPT_CHANNELS[:3] + [{"source": "zero"}])])
    with pytest.raises(RecipeError, match="click 0 is a GTVn click.*prompt channels for \\['GTVp'\\] only"):
        Segmenter(load_recipe(only_gtvp), device="cpu").predict_case(case, clicks=clicks)


def test_clicks_outside_the_ct_or_the_roi_are_input_errors(recipe, tmp_path):
    case = two_lesion_case()
    far = load_clicks(clicks_file(tmp_path / "far.json", [click(NODE_XYZ_MM), click([0, 0, 500])]))
    with pytest.raises(InputError, match="click 1 at .* lies outside CT"):
        Segmenter(recipe, device="cpu").predict_case(case, clicks=far)
    save_prompt_model(tmp_path / "box" / "prompt.onnx")
    boxed = load_recipe(write_weights(tmp_path / "box", roi={"method": "ct_top", "params": {"size_mm": [40, 40, 20]}},
                                      models=[model_entry(files=["prompt.onnx"], channels=PROMPT_CHANNELS)]))
    low = load_clicks(clicks_file(tmp_path / "low.json", [click([0, 0, -12])]))  # 20 mm box at the CT's top
    with pytest.raises(InputError, match="click 0 at .* outside the region the models see"):
        Segmenter(boxed, device="cpu").predict_case(case, clicks=low)


def test_predict_runs_a_prompt_model_with_empty_prompts(recipe):
    prediction = Segmenter(recipe, device="cpu").predict_case(two_lesion_case())
    assert "clicks" not in prediction.report.data and (labels(prediction) == 1).any()


# -------------------------------------------------------------------------------------------- the refine command

def test_hnseg_refine_command(tmp_path, recipe):
    case = two_lesion_case()
    root = write_gc_input(tmp_path / "in", case.ct, case.pet)
    ct, pet = root / "images/ct/ct.mha", root / "images/pet/pet.mha"
    good = clicks_file(tmp_path / "c.json", [click(NODE_XYZ_MM)])
    out, report = tmp_path / "out" / "mask.mha", tmp_path / "report.json"
    code = main(["refine", "--ct", str(ct), "--pet", str(pet), "--clicks", str(good), "--out", str(out),
                 "--weights", str(recipe.path.parent), "--report", str(report), "--device", "cpu"])
    assert code == 0 and (sitk.GetArrayFromImage(sitk.ReadImage(str(out))) == 2).any()
    assert json.loads(report.read_text())["clicks"]["file"] == str(good)
    bad = clicks_file(tmp_path / "bad.json", [click(NODE_XYZ_MM), {**click(NODE_XYZ_MM), "label": "node"}])
    out2 = tmp_path / "out2" / "mask.mha"
    code = main(["refine", "--ct", str(ct), "--pet", str(pet), "--clicks", str(bad), "--out", str(out2),
                 "--weights", str(recipe.path.parent), "--device", "cpu"])
    assert code == 2 and not out2.exists()
    plain = write_weights(tmp_path / "plain")
    code = main(["refine", "--ct", str(ct), "--pet", str(pet), "--clicks", str(good), "--out", str(out2),
                 "--weights", str(plain), "--device", "cpu"])
    assert code == 2 and not out2.exists()
