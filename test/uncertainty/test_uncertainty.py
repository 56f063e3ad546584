"""Uncertainty (HN-UISeg): the recipe block, hash dropout in the stochastic twins, the test-time augmentations and
their inverses, and the maps: deterministic for a seed, entropy in [0, log 3], a time budget that runs a prefix."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from builders import image_from_function, model_entry, oblique_direction, write_weights
from conftest import small_case

from hnseg_export.onnx_export import export_onnx
from hnseg_export.stochastic import StochasticNetwork, export_stochastic
from hnseg_infer.errors import ExportError, RecipeError
from hnseg_infer.geometry.grid import Grid, sample
from hnseg_infer.inference.stochastic import StochasticModel, keep_mask_reference
from hnseg_infer.io.images import Case, detect_pet_unit
from hnseg_infer.recipe.load import load_recipe
from hnseg_infer.segmenter import Segmenter
from hnseg_infer.uncertainty import tta
from hnseg_infer.uncertainty.config import Augmentations, parse_uncertainty
from hnseg_infer.uncertainty.passes import FILES, UncertaintyOptions, predictive_entropy, write_maps

pytestmark = pytest.mark.torch

ALL_AUGMENTATIONS = {"noise": {"std": 0.05}, "flip": {"axes_zyx": [0, 1, 2]}, "rotation": {"max_degrees": 5}}
BLOCK = {"passes": 3, "dropout_rate": 0.2, "seed": 7, "augmentations": ALL_AUGMENTATIONS}


class TinyNet(torch.nn.Module):
    """Conv 3³ → ReLU → Dropout → Conv 1³: a network with one dropout site on the path to the logits."""

    def __init__(self, n_in=2, n_out=3, hidden=6, p=0.2):
        super().__init__()
        self.conv1 = torch.nn.Conv3d(n_in, hidden, 3, padding=1)
        self.drop = torch.nn.Dropout(p)
        self.conv2 = torch.nn.Conv3d(hidden, n_out, 1)

    def forward(self, x):
        return self.conv2(self.drop(torch.relu(self.conv1(x))))


def make_case(ct, pet) -> Case:
    return Case(ct, pet, ct_path=Path("ct.mha"), pet_path=Path("pet.mha"), pet_unit=detect_pet_unit(pet))


def stochastic_weights(folder: Path, *, block=BLOCK, patch=(16, 16, 16), n_folds=1, **entry) -> Path:
    """A weights folder: per fold a TinyNet's plain ONNX and its stochastic twin, and the uncertainty block."""
    folder.mkdir(parents=True, exist_ok=True)
    files, twins = [], []
    for fold in range(n_folds):
        torch.manual_seed(fold)
        net = TinyNet().eval()
        with torch.no_grad():
            net.conv2.bias.copy_(torch.tensor([1.0, 0.0, -0.5]))
        export_onnx(net, folder / f"fold{fold}.onnx", n_channels=2, patch_zyx=patch)
        export_stochastic(net, folder / f"fold{fold}.stochastic.onnx", n_channels=2, patch_zyx=patch, head="softmax",
                          rate=0.2, module="TinyNet")
        files.append(f"fold{fold}.onnx")
        twins.append(f"fold{fold}.stochastic.onnx")
    model = model_entry(files=files, stochastic_files=twins, patch_size_zyx=list(patch), **entry)
    return write_weights(folder, models=[model], extra={"uncertainty": block} if block is not None else {})


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return stochastic_weights(tmp_path_factory.mktemp("unc") / "w")


@pytest.fixture(scope="module")
def case():
    return make_case(*small_case())


def run(case, recipe, **options):
    return Segmenter(recipe, device="cpu").predict_case(case, uncertainty=UncertaintyOptions(**options))


# ------------------------------------------------------------------------------------------------- the recipe block

@pytest.mark.parametrize("change, words", [
    ({"extra": 1}, "unknown key(s) ['extra']"),
    ({"passes": 0}, "'passes'"),
    ({"passes": 2.0}, "'passes'"),
    ({"dropout_rate": 1.0}, "'dropout_rate'"),
    ({"dropout_rate": True}, "'dropout_rate'"),
    ({"seed": -1}, "'seed'"),
    ({"time_budget_s": 0}, "'time_budget_s'"),
    ({"augmentations": {"mixup": {}}}, "unknown augmentation(s) ['mixup']"),
    ({"augmentations": {"rotation": {"max_degrees": 10}}}, "max_degrees"),
    ({"augmentations": {"rotation": {"max_degrees": 5, "axis": 0}}}, "'rotation' takes exactly"),
    ({"augmentations": {"flip": {"axes_zyx": [0, 0]}}}, "axes_zyx"),
    ({"augmentations": {"flip": {"axes_zyx": [3]}}}, "axes_zyx"),
    ({"augmentations": {"noise": {"std": 0}}}, "noise 'std'"),
    ({"augmentations": {}, "dropout_rate": 0}, "every pass is the same"),
])
def test_block_is_validated_strictly(change, words):
    with pytest.raises(RecipeError) as error:
        parse_uncertainty({**BLOCK, **change}, "recipe.json uncertainty")
    assert words in str(error.value) and "recipe.json uncertainty" in str(error.value)


def test_block_missing_key_named():
    block = dict(BLOCK)
    del block["seed"]
    with pytest.raises(RecipeError, match=r"missing required key\(s\) \['seed'\]"):
        parse_uncertainty(block, "u")


def test_recipe_refuses_dropout_without_twins_and_sigmoid_heads(tmp_path):
    folder = write_weights(tmp_path / "a", extra={"uncertainty": BLOCK})
    with pytest.raises(RecipeError, match="has no 'stochastic_files'"):
        load_recipe(folder)
    folder = write_weights(tmp_path / "b", extra={"uncertainty": {**BLOCK, "dropout_rate": 0}},
                           models=[model_entry(head={"type": "sigmoid", "regions": [[1, 2], [2]],
                                                     "region_labels": [1, 2]})],
                           linear={"weight": [[0, 1], [0, 1]], "bias": [0, 0]})
    with pytest.raises(RecipeError, match="need softmax heads"):
        load_recipe(folder)
    folder = write_weights(tmp_path / "c", models=[model_entry(files=["model.onnx"], stochastic_files=["a.onnx",
                                                                                                      "b.onnx"])])
    with pytest.raises(RecipeError, match="one stochastic twin per fold"):
        load_recipe(folder)
    folder = write_weights(tmp_path / "d", models=[model_entry(stochastic_files=["missing.onnx"])])
    with pytest.raises(RecipeError, match="missing.onnx does not exist"):
        load_recipe(folder)


def test_no_block_is_a_recipe_error_when_maps_are_asked_for(case, tmp_path):
    recipe = load_recipe(write_weights(tmp_path / "w"))
    with pytest.raises(RecipeError, match="has no 'uncertainty' block"):
        run(case, recipe)


# ------------------------------------------------------------------------------------------ hash dropout (the twin)

def test_twin_masks_equal_the_numpy_reference_and_the_rate(tmp_path):
    """A network that is only dropout (elementwise, then channel-wise) shows its mask: onnxruntime's equals the
    reference arithmetic bit for bit; the drop fraction is the rate; seeds, sites and tiles differ."""

    class OnlyDropout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Dropout(0.3), torch.nn.Dropout3d(0.3)

        def forward(self, x):
            return self.b(self.a(x))

    path = tmp_path / "d.onnx"
    twin = StochasticNetwork(OnlyDropout())
    x = torch.ones(1, 3, 6, 7, 8)
    torch.onnx.export(twin, (x, torch.zeros(1, dtype=torch.int64), torch.tensor(0.3)), str(path), dynamo=False,
                      input_names=["input", "dropout_seed", "dropout_rate"], output_names=["logits"],
                      opset_version=17, dynamic_axes={"input": {0: "N"}, "dropout_seed": {0: "N"}, "logits": {0: "N"}})
    model = StochasticModel(path, device="cpu")
    seeds = np.array([11, 2**31 - 2], np.int64)
    out = model.run(np.ones((2, 3, 6, 7, 8), np.float32), seeds, 0.3)
    for n, seed in enumerate(seeds):
        keep = keep_mask_reference(seed, 0, (3, 6, 7, 8), 0.3) & keep_mask_reference(seed, 1, (3, 6, 7, 8), 0.3,
                                                                                      channelwise=True)
        np.testing.assert_allclose(out[n], keep / np.float32(0.7) / np.float32(0.7), rtol=1e-6)
    assert not np.array_equal(out[0], out[1])
    # batching does not change a tile's mask: the seed is per tile
    np.testing.assert_array_equal(model.run(np.ones((1, 3, 6, 7, 8), np.float32), seeds[1:], 0.3), out[1:])
    big = keep_mask_reference(3, 0, (8, 40, 40, 40), 0.05)
    assert abs((1 - big.mean()) - 0.05) < 4 * math.sqrt(0.05 * 0.95 / big.size)
    flat = big.astype(float)
    assert abs(np.corrcoef(flat[..., :-1].ravel(), flat[..., 1:].ravel())[0, 1]) < 0.01  # no runs along x
    assert (keep_mask_reference(3, 1, (8, 40, 40, 40), 0.05) != big).any()  # another site, another mask
    assert keep_mask_reference(3, 0, (8, 40, 40, 40), 0.0).all()


def test_twin_export_is_proven_and_refuses_networks_without_dropout(tmp_path):
    net = TinyNet().eval()
    record = export_stochastic(net, tmp_path / "t.onnx", n_channels=2, patch_zyx=(8, 8, 8), head="softmax", rate=0.2,
                               module="TinyNet")
    assert record["proof"]["torch_at_rate"]["passed"] and record["proof"]["torch_without_dropout_at_rate_0"]["passed"]
    assert record["sites"] == [{"site": 0, "channelwise": False, "trained_rate": 0.2}]
    assert isinstance(net.drop, torch.nn.Dropout)  # the caller's network is not modified
    plain = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 1))
    with pytest.raises(ExportError, match="no nn.Dropout module"):
        export_stochastic(plain, tmp_path / "p.onnx", n_channels=2, patch_zyx=(8, 8, 8), head="softmax", rate=0.2,
                          module="Plain")


# ------------------------------------------------------------------------------------- augmentations and inverses

GRID = Grid((36, 30, 24), (2.0, 2.5, 3.0), (-30.0, -20.0, -10.0), oblique_direction())


def smooth(points):
    return (np.sin(points[:, 0] / 9.0) + np.cos(points[:, 1] / 11.0) * np.sin(points[:, 2] / 13.0)
            + 0.002 * points[:, 0] * points[:, 1])


def test_flip_is_inverted_exactly():
    rng = np.random.default_rng(0)
    array = rng.normal(size=(3, 5, 6, 7)).astype(np.float32)
    for axis in range(3):
        flipped = tta.flip(array, axis)
        assert not np.array_equal(flipped, array)
        np.testing.assert_array_equal(tta.flip(flipped, axis), array)
        assert flipped.flags.c_contiguous


@pytest.mark.parametrize("axis_zyx, degrees", [(0, 5.0), (1, -3.5), (2, 4.2)])
def test_rotation_forward_and_inverse_recover_a_smooth_field(axis_zyx, degrees):
    """The field sampled onto the turned grid (the forward), resampled back onto the model grid (the inverse),
    equals the field on the model grid within linear interpolation's error bound; without the inverse it would
    not."""
    turned = tta.rotated_grid(GRID, axis_zyx=axis_zyx, degrees=degrees)
    # the turned grid's voxel centres enclose every voxel centre of the model grid
    index = turned.physical_to_index(GRID.index_to_physical(np.argwhere(np.ones(GRID.size_xyz, bool))))
    assert index.min() >= 0 and np.all(index.max(axis=0) <= np.asarray(turned.size_xyz) - 1)
    fine = image_from_function(smooth, size_xyz=(130, 120, 110), spacing_xyz_mm=(1.0, 1.0, 1.0),
                               origin_xyz_mm=(-65.0, -40.0, -35.0), direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    on_turned = sample(fine, turned, interpolation="linear", fill_value=0.0)
    back = tta.resample_back(on_turned[None], source=turned, target=GRID, fill_values=[0.0])[0]
    truth = smooth(GRID.index_to_physical(np.argwhere(np.ones(GRID.size_zyx, bool))[:, ::-1])).reshape(
        GRID.size_zyx)
    # every second derivative of the field is below 0.02 /mm²: linear interpolation errs by at most h²/8 · 0.02 per
    # axis, here twice (onto the turned grid from the 1 mm image, and back)
    bound = sum(h**2 / 8 * 0.02 for h in GRID.spacing_xyz_mm) + sum(h**2 / 8 * 0.02 for h in (1.0, 1.0, 1.0))
    error = np.abs(back - truth)
    assert error.max() < bound, (error.max(), bound)
    assert np.abs(on_turned[tuple(slice(0, n) for n in GRID.size_zyx)] - truth).max() > 10 * error.max()


def test_draws_are_a_function_of_the_seed():
    augmentations = Augmentations(0.1, (1, 2), 5.0)
    draws = [tta.draw(augmentations, np.random.default_rng([7, p])) for p in range(200)]
    assert draws == [tta.draw(augmentations, np.random.default_rng([7, p])) for p in range(200)]
    assert {d.kind for d in draws} == {"noise", "flip", "rotation"}
    assert {d.axis_zyx for d in draws if d.kind == "flip"} == {1, 2}
    assert all(-5 <= d.degrees <= 5 for d in draws if d.kind == "rotation")
    assert tta.draw(Augmentations(), np.random.default_rng(0)).kind == "none"


def test_predictive_entropy_values():
    third = np.full((2, 2, 2), 1 / 3, np.float32)
    assert np.allclose(predictive_entropy([third] * 3), math.log(3), atol=1e-6)
    assert predictive_entropy([third] * 3).max() <= np.float32(math.log(3))
    one, zero = np.ones((2, 2, 2), np.float32), np.zeros((2, 2, 2), np.float32)
    assert np.array_equal(predictive_entropy([one, zero, zero]), zero)
    half = np.full((2, 2, 2), 0.5, np.float32)
    assert np.allclose(predictive_entropy([half, half, zero]), math.log(2))


# ------------------------------------------------------------------------------------------------------- the maps

def test_maps_are_deterministic_for_a_seed_and_differ_for_another(case, weights):
    recipe = load_recipe(weights)
    first, second = run(case, recipe), run(case, recipe)
    other = run(case, recipe, seed=8)
    for a, b in zip(first.uncertainty.probabilities + [first.uncertainty.entropy],
                    second.uncertainty.probabilities + [second.uncertainty.entropy]):
        assert np.array_equal(a, b)
    assert not np.array_equal(first.uncertainty.entropy, other.uncertainty.entropy)
    record = first.report.data["uncertainty"]
    assert record["passes"] == 3 and record["seed"] == 7 and record["dropout_rate"] == 0.2
    assert [d["pass"] for d in record["augmentations"]] == [0, 1, 2]
    assert other.report.data["uncertainty"]["seed"] == 8
    assert list(record["stochastic_files"]) == ["pet_threshold"]
    assert list(record["stochastic_files"]["pet_threshold"]) == ["fold0.stochastic.onnx"]
    # the mask is the recipe's deterministic prediction, whatever the passes
    assert np.array_equal(sitk.GetArrayViewFromImage(first.mask), sitk.GetArrayViewFromImage(other.mask))


def test_maps_are_probabilities_and_entropy_in_range(case, weights, tmp_path):
    prediction = run(case, load_recipe(weights))
    maps = prediction.uncertainty
    total = sum(maps.probabilities)
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    assert all(p.min() >= 0 and p.max() <= 1 + 1e-6 for p in maps.probabilities)
    assert maps.entropy.min() >= 0 and maps.entropy.max() <= np.float32(math.log(3))
    assert maps.entropy.max() > 0.01  # dropout and augmentations do disagree somewhere
    np.testing.assert_allclose(maps.entropy, predictive_entropy(maps.probabilities))
    written = write_maps(maps, case.ct_grid, tmp_path / "u")
    assert sorted(Path(p).name for p in written.values()) == sorted(FILES)
    for name in FILES:
        image = sitk.ReadImage(str(tmp_path / "u" / name))
        assert image.GetPixelID() == sitk.sitkFloat32
        assert Grid.of(image).same_as(case.ct_grid, tol=0.0)
    entropy = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "u" / "entropy.mha")))
    np.testing.assert_array_equal(entropy[maps.roi_slices_zyx], maps.entropy)
    summary = prediction.report.data["uncertainty"]
    labels = sitk.GetArrayViewFromImage(prediction.mask)[maps.roi_slices_zyx]
    for lesion in summary["lesions"]:
        assert 0 <= lesion["mean_entropy"] <= math.log(3)
    if (labels == 1).any():
        assert summary["mean_entropy"]["GTVp"] == pytest.approx(float(maps.entropy[labels == 1].mean()), abs=1e-5)


def test_time_budget_runs_a_prefix_and_says_so(case, tmp_path):
    folder = stochastic_weights(tmp_path / "w", block={**BLOCK, "time_budget_s": 1e-6})
    limited = run(case, load_recipe(folder))
    assert limited.report.data["uncertainty"]["passes"] == 1
    assert limited.report.data["uncertainty"]["passes_requested"] == 3
    assert any("ran 1 of 3 passes" in line and "time_budget_s" in line for line in limited.report.data["fallbacks"])
    one = run(case, load_recipe(stochastic_weights(tmp_path / "w1", block={**BLOCK, "passes": 1})))
    assert np.array_equal(limited.uncertainty.entropy, one.uncertainty.entropy)


def test_augmentation_only_needs_no_twin(case, tmp_path):
    """dropout_rate 0: the plain folds run each pass's augmentation (here: every kind, 4 passes, mirroring off)."""
    block = {**BLOCK, "dropout_rate": 0, "passes": 4}
    folder = write_weights(tmp_path / "w", models=[model_entry(mirror_axes_zyx=[0, 1, 2])],
                           extra={"uncertainty": block})
    prediction = run(case, load_recipe(folder))
    record = prediction.report.data["uncertainty"]
    assert record["passes"] == 4 and record["dropout_rate"] == 0
    assert prediction.uncertainty.entropy.max() <= np.float32(math.log(3))


def test_uncertainty_cli_writes_three_files_beside_and_the_report(tmp_path, weights):
    from conftest import run_container, write_gc_input

    ct, pet = small_case()
    root = write_gc_input(tmp_path / "input", ct, pet)
    out, report = tmp_path / "output", tmp_path / "report.json"
    code = run_container(root, out, weights, report, "--uncertainty", tmp_path / "maps", "--uncertainty-seed", 3)
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == sorted(FILES)
    assert [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()] == [
        "images/tumor-lymph-node-segmentation/output.mha"]
    data = json.loads(report.read_text())
    assert data["uncertainty"]["seed"] == 3 and set(data["uncertainty"]["files"]) == set(FILES)
    stages = list(data["stages_s"])
    assert stages.index("uncertainty") < stages.index("write_uncertainty") < stages.index("write")


def test_unwritable_uncertainty_folder_is_an_error_and_leaves_no_mask(tmp_path, weights):
    from conftest import run_container, write_gc_input

    ct, pet = small_case()
    root = write_gc_input(tmp_path / "input", ct, pet)
    (tmp_path / "file").write_text("x")
    code = run_container(root, tmp_path / "output", weights, tmp_path / "r.json", "--uncertainty",
                         tmp_path / "file" / "maps")
    assert code == 2
    assert not (tmp_path / "output").exists() or not any(p.is_file() for p in (tmp_path / "output").rglob("*"))

