"""Paste-back restoration (recipe "restore": "paste_nearest", SNU) and the crop sidecar: labels decoded on the model
grid land at the right physical place on CT grids with any direction and anisotropic spacing; the recipe key is
validated strictly; the sidecar's crop indices agree with the grids, and a paste-back redone from the sidecar
alone gives the mask that was written."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from builders import make_case, model_entry, oblique_direction, write_weights
from conftest import LESION_CENTER_XYZ_MM, LESION_RADIUS_MM, small_case, write_gc_input

from hnseg_infer.cli.main import main as hnseg_main
from hnseg_infer.errors import InputError, RecipeError
from hnseg_infer.geometry.grid import IDENTITY, Box, Grid
from hnseg_infer.io.sidecar import SIDECAR_SCHEMA, grid_from_exact, labels_file_for, redo_paste_back
from hnseg_infer.recipe.load import load_recipe
from hnseg_infer.restore.paste_back import ModelLabels, paste_nearest
from hnseg_infer.segmenter import Segmenter

PERMUTED_FLIPPED = (0.0, 0.0, -1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


# ------------------------------------------------------------------------------------------- geometry of the paste

def _model_labels() -> ModelLabels:
    """An LPS model grid at 1×1.5×3 mm with a GTVp block and a GTVn block."""
    grid = Grid.covering(Box((-40.0, -30.0, -45.0), (80.0, 60.0, 90.0)), (1.0, 1.5, 3.0))
    labels = np.zeros(grid.size_zyx, np.uint8)
    labels[10:17, 8:20, 30:52] = 1  # z, y, x model indices
    labels[20:24, 30:36, 60:66] = 2
    return ModelLabels("m", labels, grid)


def _expected_nearest(labels: ModelLabels, target: Grid) -> np.ndarray:
    """Nearest neighbour without ITK: each target voxel centre → the model voxel that holds it (round the
    continuous index), 0 outside the model grid."""
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in target.size_zyx), indexing="ij")
    index_xyz = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1)
    continuous = labels.grid.physical_to_index(target.index_to_physical(index_xyz))
    nearest = np.floor(continuous + 0.5).astype(int)
    inside = np.all((nearest >= 0) & (nearest < np.asarray(labels.grid.size_xyz)), axis=1)
    out = np.zeros(len(index_xyz), np.uint8)
    x, y, z = nearest[inside].T
    out[inside] = labels.labels_zyx[z, y, x]
    return out.reshape(target.size_zyx)


@pytest.mark.parametrize("direction", [IDENTITY, PERMUTED_FLIPPED, oblique_direction()],
                         ids=["identity", "permuted-flipped", "oblique"])
def test_a_labelled_block_on_the_model_grid_lands_at_its_physical_place_on_the_ct(direction):
    labels = _model_labels()
    # an anisotropic CT, offset so that no CT voxel centre lies on a model voxel boundary
    spacing = np.array([0.7, 1.3, 2.1])
    size = (150, 90, 60)
    d = np.asarray(direction).reshape(3, 3)
    origin = np.array([0.37, -0.21, 0.13]) - d @ (spacing * (np.asarray(size) - 1) / 2)
    ct = Grid(size, tuple(spacing), tuple(origin), tuple(direction))
    roi_grid, slices = ct.crop_to(labels.grid.box())
    restored = paste_nearest(labels, roi_grid)
    assert restored.dtype == np.uint8 and restored.shape == roi_grid.size_zyx
    np.testing.assert_array_equal(restored, _expected_nearest(labels, roi_grid))
    # in physical terms: the CT voxels labelled 1 are those whose centres lie in the block's physical box
    model = labels.grid
    block_lo = model.index_to_physical([30 - 0.5, 8 - 0.5, 10 - 0.5])[0]
    block_hi = model.index_to_physical([52 - 0.5, 20 - 0.5, 17 - 0.5])[0]
    canvas = np.zeros(ct.size_zyx, np.uint8)
    canvas[slices] = restored
    zyx = np.argwhere(canvas >= 0)
    centres = ct.index_to_physical(zyx[:, ::-1])
    in_block = np.all((centres > block_lo) & (centres < block_hi), axis=1)
    np.testing.assert_array_equal(canvas.ravel() == 1, in_block)
    assert in_block.sum() > 500  # the block covers many CT voxels in every direction
    assert set(np.unique(canvas)) == {0, 1, 2}


def test_ct_voxels_outside_the_model_grid_stay_background():
    labels = ModelLabels("m", np.ones((4, 5, 6), np.uint8), Grid((6, 5, 4), (2.0, 2.0, 3.0), (0.0, 0.0, 0.0)))
    target = Grid((20, 20, 12), (1.0, 1.0, 1.0), (-5.3, -5.3, -5.3))
    restored = paste_nearest(labels, target)
    np.testing.assert_array_equal(restored, _expected_nearest(labels, target))
    assert 0 < restored.sum() < restored.size


# -------------------------------------------------------------------------------------------------- the recipe

def _load(tmp_path, **extra):
    return load_recipe(write_weights(tmp_path / "w", extra=extra))


def test_restore_defaults_to_probabilities_and_takes_paste_nearest(tmp_path):
    assert _load(tmp_path / "a").stages[0].restore == "probabilities"
    assert _load(tmp_path / "b", restore="paste_nearest").stages[0].restore == "paste_nearest"


@pytest.mark.parametrize("value, message", [("nearest", "restore must be one of"), (1, "'restore' must be str"),
                                            (None, "'restore' must be str")])
def test_a_bad_restore_is_refused_by_the_loader(tmp_path, value, message):
    with pytest.raises(RecipeError, match=message):
        _load(tmp_path, restore=value)


def _cascade(tmp_path, first_extra: dict, last_extra: dict):
    first = {"name": "a", "roi": {"method": "ct_extent"}, "models": [model_entry(name="m1")], **first_extra}
    last = {"name": "b", "roi": {"method": "labels_bbox"}, "models": [model_entry(name="m2")], **last_extra}
    folder = write_weights(tmp_path / "w")
    recipe = json.loads((folder / "recipe.json").read_text())
    for key in ("roi", "models", "postprocess"):
        recipe.pop(key)
    recipe["stages"] = [first, last]
    (folder / "recipe.json").write_text(json.dumps(recipe))
    return load_recipe(folder)


def test_restore_belongs_to_the_last_cascade_stage(tmp_path):
    recipe = _cascade(tmp_path / "ok", {}, {"restore": "paste_nearest"})
    assert [s.restore for s in recipe.stages] == ["probabilities", "paste_nearest"]
    with pytest.raises(RecipeError, match=r"stages\[0\].*'restore' applies to the last stage only"):
        _cascade(tmp_path / "bad", {"restore": "paste_nearest"}, {})


# ------------------------------------------------------------------------------------------- through the pipeline

@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("paste")
    models = [model_entry(spacing_xyz_mm=[1.0, 1.0, 3.0])]
    return {restore: load_recipe(write_weights(root / restore, models=models, extra={"restore": restore}))
            for restore in ("probabilities", "paste_nearest")}


@pytest.mark.parametrize("direction", [PERMUTED_FLIPPED, oblique_direction()], ids=["permuted-flipped", "oblique"])
def test_paste_nearest_puts_the_lesion_where_probability_restoration_does(direction, recipes):
    ct, pet = small_case(ct_direction=direction)
    masks = {}
    for restore, recipe in recipes.items():
        prediction = Segmenter(recipe, device="cpu").predict_case(make_case(ct, pet))
        assert Grid.of(prediction.mask).same_as(Grid.of(ct), tol=0)
        masks[restore] = sitk.GetArrayFromImage(prediction.mask)
        assert prediction.report.data["crop"]["restore"] == restore
        assert (prediction.model_labels is not None) == (restore == "paste_nearest")
    a, b = (masks[k] == 1 for k in ("probabilities", "paste_nearest"))
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.85
    # the lesion (radius 7 mm) sits at its physical place: the labelled CT voxel centres' mean
    grid = Grid.of(ct)
    centroid = grid.index_to_physical(np.argwhere(b)[:, ::-1]).mean(axis=0)
    assert np.linalg.norm(centroid - LESION_CENTER_XYZ_MM) < 1.5
    volume_mm3 = b.sum() * grid.voxel_volume_mm3
    assert 0.6 < volume_mm3 / (4 / 3 * np.pi * LESION_RADIUS_MM ** 3) < 1.4


# ----------------------------------------------------------------------------------------------------- sidecar

def _inside(grid: Grid, points_xyz_mm) -> np.ndarray:
    local = grid.physical_to_index(points_xyz_mm)
    return np.all((local >= -0.5 - 1e-6) & (local <= np.asarray(grid.size_xyz) - 0.5 + 1e-6), axis=1)


def _predict_with_sidecar(tmp_path, weights, *, direction=PERMUTED_FLIPPED):
    ct, pet = small_case(ct_direction=direction)
    root = write_gc_input(tmp_path / "input", ct, pet)
    mask_path, sidecar = tmp_path / "mask.mha", tmp_path / "side" / "case.json"
    code = hnseg_main(["predict", "--ct", str(root / "images/ct/ct.mha"), "--pet", str(root / "images/pet/pet.mha"),
                       "--out", str(mask_path), "--weights", str(weights), "--sidecar", str(sidecar),
                       "--report", str(tmp_path / "report.json"), "--device", "cpu"])
    return code, mask_path, sidecar, ct, pet


@pytest.fixture(scope="module")
def paste_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("sidecar")
    models = [model_entry(spacing_xyz_mm=[1.0, 1.0, 3.0])]
    return {"paste": write_weights(root / "paste", models=models, extra={"restore": "paste_nearest"},
                                   postprocess={"min_volume_mm3": {"GTVp": 100}}),
            "probabilities": write_weights(root / "prob", models=models)}


def test_sidecar_crop_indices_agree_with_the_grids(tmp_path, paste_weights):
    code, mask_path, sidecar_path, ct, pet = _predict_with_sidecar(tmp_path, paste_weights["paste"])
    assert code == 0
    sidecar = json.loads(sidecar_path.read_text())
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sidecar"] == str(sidecar_path) and "sidecar" in report["stages_s"]
    assert sidecar["schema"] == SIDECAR_SCHEMA and sidecar["restore"] == "paste_nearest"
    assert sidecar["mask"] == str(mask_path)
    assert sidecar["roi"] == report["roi"] and sidecar["roi"]["method"] == "ct_extent"
    assert grid_from_exact(sidecar["ct"]["grid"]) == Grid.of(ct)  # exactly, not rounded
    assert grid_from_exact(sidecar["pet"]["grid"]) == Grid.of(pet)
    (model,) = sidecar["models"]
    model_grid = grid_from_exact(model["grid"])
    assert sidecar["labels_model"] == model["name"] and model_grid.spacing_xyz_mm == (1.0, 1.0, 3.0)
    assert model_grid.box().in_frame(IDENTITY).intersect(Box.from_dict(report["roi"]["box"])) is not None
    for image, key in ((ct, "ct_index_range"), (pet, "pet_index_range")):
        native, crop = Grid.of(image), model[key]
        start, stop = np.asarray(crop["start_xyz"]), np.asarray(crop["stop_xyz"])
        assert np.all(start >= 0) and np.all(stop <= native.size_xyz) and np.all(stop > start)
        # (the CT's axes are a permutation of the model grid's) every native voxel in the range has its centre
        # inside the model grid's extent, and the next one out along each axis does not (unless at the image edge)
        corners = np.array([[(start if bit else stop - 1)[axis] for axis, bit in enumerate(bits)]
                            for bits in np.ndindex(2, 2, 2)])
        assert _inside(model_grid, native.index_to_physical(corners)).all()
        for axis in range(3):
            for index, at_edge in ((start[axis] - 1, start[axis] == 0),
                                   (stop[axis], stop[axis] == native.size_xyz[axis])):
                probe = start.copy()
                probe[axis] = index
                assert at_edge or not _inside(model_grid, native.index_to_physical(probe))[0]
        bounds = np.asarray(crop["bounds_xyz"]["min"]), np.asarray(crop["bounds_xyz"]["max"])
        np.testing.assert_array_equal(start, np.maximum(np.ceil(bounds[0] - 1e-6), 0))
        np.testing.assert_array_equal(stop, np.minimum(np.floor(bounds[1] + 1e-6) + 1, native.size_xyz))
    # the paste region: the CT voxels inside the ROI box, and its grid is the CT's lattice there
    paste = sidecar["paste"]
    roi_grid, slices = Grid.of(ct).crop_to(Box.from_dict(report["roi"]["box"]))
    assert paste["ct_start_xyz"] == [s.start for s in slices[::-1]]
    assert paste["ct_stop_xyz"] == [s.stop for s in slices[::-1]]
    assert grid_from_exact(paste["grid"]) == roi_grid
    labels_file = sidecar["labels_file"]
    assert labels_file["name"] == labels_file_for(sidecar_path).name == "case.model_labels.npz"
    assert labels_file["shape_zyx"] == list(model_grid.size_zyx)


def test_a_paste_back_redone_from_the_sidecar_alone_gives_the_mask(tmp_path, paste_weights):
    code, mask_path, sidecar_path, ct, _ = _predict_with_sidecar(tmp_path, paste_weights["paste"],
                                                                  direction=oblique_direction())
    assert code == 0
    # only the sidecar and its labels file, moved elsewhere: the inputs and the weights are not needed
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for path in (sidecar_path, labels_file_for(sidecar_path)):
        path.rename(moved / path.name)
    redone = redo_paste_back(moved / sidecar_path.name)
    mask = sitk.ReadImage(str(mask_path))
    assert Grid.of(redone).same_as(Grid.of(mask), tol=0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(redone), sitk.GetArrayFromImage(mask))
    assert (sitk.GetArrayFromImage(mask) == 1).sum() > 100
    # a changed labels file is caught by its hash
    labels = moved / labels_file_for(sidecar_path).name
    labels.write_bytes(labels.read_bytes() + b"\0")
    with pytest.raises(InputError, match="sha256 does not match"):
        redo_paste_back(moved / sidecar_path.name)


def test_a_probability_restoration_records_its_crops_but_cannot_be_redone(tmp_path, paste_weights):
    code, _, sidecar_path, _, _ = _predict_with_sidecar(tmp_path, paste_weights["probabilities"])
    assert code == 0
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["restore"] == "probabilities" and sidecar["labels_file"] is None
    assert sidecar["labels_model"] is None and sidecar["models"][0]["ct_index_range"] is not None
    assert not labels_file_for(sidecar_path).exists()
    with pytest.raises(InputError, match="paste_nearest"):
        redo_paste_back(sidecar_path)


def test_an_unwritable_sidecar_is_an_error_and_no_mask_is_written(tmp_path, paste_weights, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    ct, pet = small_case()
    root = write_gc_input(tmp_path / "input", ct, pet)
    mask_path = tmp_path / "out" / "mask.mha"
    code = hnseg_main(["predict", "--ct", str(root / "images/ct/ct.mha"), "--pet", str(root / "images/pet/pet.mha"),
                       "--out", str(mask_path), "--weights", str(paste_weights["paste"]),
                       "--sidecar", str(blocker / "case.json"), "--device", "cpu"])
    assert code == 2 and not mask_path.exists()
    assert "cannot write the sidecar" in capsys.readouterr().err
