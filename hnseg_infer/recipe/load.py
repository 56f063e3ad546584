"""Loading a recipe: `weights/<name>/recipe.json` found, read, parsed (parse.py) and its files checked.

This is where the recipe's file I/O lives: the model files must exist and match the sha256 the recipe declares,
and the harmonisation references are read. Errors are RecipeErrors naming the file and the fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from hnseg_infer.channels.harmonise import check_fits
from hnseg_infer.channels.intensity import load_spectra
from hnseg_infer.errors import RecipeError
from hnseg_infer.geometry.grid import Box, Grid
from hnseg_infer.io.atomic import file_sha256
from hnseg_infer.recipe.parse import parse_recipe
from hnseg_infer.recipe.spec import ModelSpec, Recipe, RoiSpec, spectrum_references
from hnseg_infer.recipe.vocabulary import GridSpacing, Orientation
from hnseg_infer.roi.locate import box_size_mm

RECIPE_FILE = "recipe.json"
SKIP_HASH_CHECK_ENV = "HNSEG_SKIP_HASH_CHECK"  # "1": model files need not match the sha256 their recipe records


def find_recipe(weights_dir: Path) -> Path:
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise RecipeError(f"weights folder {weights_dir} does not exist: pass --weights DIR holding {RECIPE_FILE} "
                          f"and the ONNX models")
    path = weights_dir / RECIPE_FILE
    if not path.is_file():
        raise RecipeError(f"no {RECIPE_FILE} in weights folder {weights_dir}: export a model with export/to_onnx.py "
                          f"or point --weights at a folder that has one")
    return path


def resolve_weights(folder: Path) -> Path:
    """A weights folder: one holding recipe.json, or exactly one sub-folder that does (weights/<name>/recipe.json)."""
    folder = Path(folder)
    if (folder / RECIPE_FILE).is_file() or not folder.is_dir():
        return folder  # load_recipe reports a missing folder clearly
    candidates = sorted(p.parent for p in folder.glob(f"*/{RECIPE_FILE}"))
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise RecipeError(f"weights folder {folder} holds several recipes ({', '.join(p.name for p in candidates)}): "
                          f"pass --weights {folder}/<name> to choose one")
    return folder


def load_recipe(weights_dir: Path) -> Recipe:
    """Read `weights_dir/recipe.json`, parse it (parse.py) and load the files it names (load_files)."""
    path = find_recipe(weights_dir)
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path} is not valid JSON ({exc}): fix or re-export it") from exc
    return load_files(parse_recipe(raw, path, sha256=file_sha256(path)))


def load_files(recipe: Recipe) -> Recipe:
    """The parsed `recipe` with its files checked: every model file (and stochastic twin) present and hashed, the
    hashes compared with those the recipe declares, the harmonisation references read and fitted to their ROI."""
    flat = len(recipe.stages) == 1 and recipe.stages[0].name == "main"  # to_json's one-stage form
    stages = []
    for s, stage in enumerate(recipe.stages):
        where = str(recipe.path) if flat else f"{recipe.path} stages[{s}]"
        models = tuple(_load_model(m, recipe.path.parent, f"{where} models[{i}] ({m.name})")
                       for i, m in enumerate(stage.models))
        for i, model in enumerate(models):
            _check_references_fit(model, stage.roi, f"{where} models[{i}] ({model.name})")
        stages.append(replace(stage, models=models))
    return replace(recipe, stages=tuple(stages))


def _load_model(model: ModelSpec, folder: Path, where: str) -> ModelSpec:
    for path in model.files:
        if not path.is_file():
            raise RecipeError(f"{where}: model file {path} does not exist: re-export the model or fix 'files'")
    for path in model.stochastic_files:
        if not path.is_file():
            raise RecipeError(f"{where}: stochastic model file {path} does not exist: re-export the model with "
                              f"--uncertainty or fix 'stochastic_files'")
    channels = tuple(replace(c, ops=load_spectra(c.ops, folder=folder, where=f"{where} channels[{i}]"))
                     for i, c in enumerate(model.channels))
    return replace(model, channels=channels, sha256=_verified_sha256(model.files, model.sha256, where),
                   stochastic_sha256=_verified_sha256(model.stochastic_files, model.stochastic_sha256, where))



def _verified_sha256(files: tuple[Path, ...], declared: tuple[str, ...], where: str) -> tuple[str, ...]:
    """Each file's sha256, checked against the one the recipe declared at export (when it declares them): a model
    file replaced by another of the same signature would otherwise run silently. HNSEG_SKIP_HASH_CHECK=1 skips the
    comparison for weights edited on purpose (the hashes are still computed and reported)."""
    actual = tuple(file_sha256(f) for f in files)
    if not declared or os.environ.get(SKIP_HASH_CHECK_ENV) == "1":
        return actual
    for path, want, got in zip(files, declared, actual):
        if want != got:
            raise RecipeError(f"{where}: model file {path} has sha256 {got[:16]}... but the recipe records "
                              f"{want[:16]}... (written at export): the file was replaced or changed; re-export the "
                              f"weights, or set {SKIP_HASH_CHECK_ENV}=1 if you changed them on purpose")
    return actual


def _check_references_fit(model: ModelSpec, roi: RoiSpec, where: str) -> None:
    """A harmonisation reference must fit the model grid of a fixed-size ROI (e.g. 200×200×310 mm at 1 mm:
    310×200×200 voxels). Variable-size ROIs, and grids along the CT's own axes, are checked at run time."""
    size_mm = box_size_mm(roi.method, roi.params)
    references = spectrum_references(model)
    if not references or size_mm is None or model.grid.orientation == Orientation.CT:
        return
    grid = Grid.covering(Box((0.0, 0.0, 0.0), size_mm), model.grid.spacing_xyz_mm,
                         fit_box=model.grid.grid_spacing == GridSpacing.FIT_ROI)
    for reference in references:
        check_fits(reference, grid.size_zyx, where=f"{where}, ROI {roi.method!r} {list(size_mm)} mm at "
                                                   f"{list(model.grid.spacing_xyz_mm)} mm")
