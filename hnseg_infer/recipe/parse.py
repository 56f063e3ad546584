"""Parsing a recipe: its JSON content validated into the frozen dataclasses of spec.py, without touching a file.

Strict: unknown keys and bad values are RecipeErrors naming the file, key and value. The files a recipe names (the
models, their stochastic twins, harmonisation references) are checked and read by load.py.
"""

from __future__ import annotations

from pathlib import Path

from hnseg_infer.channels.intensity import SOURCES, SpectrumSwap, validate_ops
from hnseg_infer.errors import RecipeError
from hnseg_infer.recipe.budget import BudgetConfig, parse_budget
from hnseg_infer.recipe.frozen import freeze
from hnseg_infer.recipe.spec import (
    SCHEMA_VERSION,
    ChannelSpec,
    GridSpec,
    HeadSpec,
    ModelSpec,
    MonaiTiling,
    NnunetTiling,
    Recipe,
    RoiSpec,
    StageSpec,
)
from hnseg_infer.recipe.vocabulary import (
    ChannelSource,
    FoldAverage,
    GridSpacing,
    HeadType,
    Interpolation,
    Orientation,
    Resampling,
    Restore,
    Tiling,
    values,
)
from hnseg_infer.restore.postprocess import PostprocessConfig
from hnseg_infer.roi.locate import NEEDS_PREVIOUS_STAGE, check_params
from hnseg_infer.uncertainty.config import check_stage, parse_stochastic_files, parse_uncertainty

ORIENTATIONS, INTERPOLATIONS, RESAMPLINGS = values(Orientation), values(Interpolation), values(Resampling)
FOLD_AVERAGES, GRID_SPACINGS = values(FoldAverage), values(GridSpacing)
RESTORES, TILINGS = values(Restore), values(Tiling)


def parse_recipe(raw: dict, path: Path, *, sha256: str = "") -> Recipe:
    """Validate a recipe's JSON content, `path` being where it lies (its folder holds the files it names)."""
    path = Path(path)
    where = str(path)
    r = _Reader(raw, where)
    version = r.take("schema_version", kind=int)
    if version != SCHEMA_VERSION:
        raise RecipeError(f"{where}: schema_version {version} is not supported (this hnseg reads {SCHEMA_VERSION}): "
                          f"re-export the weights with this version's export/to_onnx.py")
    name = r.take("name", kind=str)
    description = r.take("description", default="", kind=str)
    pet_optional = r.take("pet_optional", default=False, kind=bool)
    uncertainty = r.take("uncertainty", default=None)
    budget = r.take("budget", default=None)
    if "stages" in r.obj:  # a cascade
        stage_objs = r.take("stages", kind=list)
        if not stage_objs:
            raise RecipeError(f"{where}: 'stages' is empty")
        stages = tuple(_stage(obj, f"{where} stages[{i}]", path.parent, first=i == 0,
                              last=i == len(stage_objs) - 1)
                       for i, obj in enumerate(stage_objs))
        r.done(("schema_version", "name", "description", "pet_optional", "uncertainty", "budget", "stages"))
    else:  # one stage: its keys at the top level
        stage_keys = ("roi", "models", "postprocess", "restore")
        stage = {"name": "main", **{key: r.obj.pop(key) for key in stage_keys if key in r.obj}}
        r.done(("schema_version", "name", "description", "pet_optional", "uncertainty", "budget", "stages",
                *stage_keys))
        stages = (_stage(stage, where, path.parent, first=True, last=True),)
    _check_unique([s.name for s in stages], "stage", where)
    _check_unique([m.name for s in stages for m in s.models], "model", where)
    if uncertainty is not None:
        uncertainty = parse_uncertainty(uncertainty, f"{where} uncertainty")
        check_stage(uncertainty, stages[-1], f"{where} uncertainty")
    budget = BudgetConfig() if budget is None else parse_budget(budget, f"{where} budget", stages)
    return Recipe(path, name, stages, sha256, pet_optional, uncertainty, description, budget)


def _stage(obj, where: str, folder: Path, *, first: bool, last: bool = True) -> StageSpec:
    r = _Reader(obj, where)
    name = r.take("name", kind=str)
    roi_reader = _Reader(r.take("roi"), f"{where} roi")
    method = roi_reader.take("method", kind=str)
    try:
        roi = RoiSpec(method, freeze(check_params(method, roi_reader.take("params", default={}, kind=dict))))
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from exc
    roi_reader.done(("method", "params"))
    if first and method in NEEDS_PREVIOUS_STAGE:
        raise RecipeError(f"{where}: ROI method {method!r} reads the labels of a previous stage, but this is the "
                          f"first stage: start with an image method")
    model_objs = r.take("models", kind=list)
    if not model_objs:
        raise RecipeError(f"{where}: 'models' is empty")
    models = tuple(parse_model(m, f"{where} models[{i}]", folder) for i, m in enumerate(model_objs))
    _check_heads_combine(models, where)
    postprocess = PostprocessConfig.from_dict(r.take("postprocess", default={}, kind=dict))
    restore = _restore(r, where, last=last)
    r.done(("name", "roi", "models", "postprocess", "restore"))
    return StageSpec(name, roi, models, postprocess, restore)


def _restore(r: _Reader, where: str, *, last: bool) -> str:
    if not last and "restore" in r.obj:
        raise RecipeError(f"{where}: 'restore' applies to the last stage only (an earlier stage's labels are decoded "
                          f"on its first model's grid for the next ROI): remove it here")
    restore = r.take("restore", default="probabilities", kind=str)
    if restore not in RESTORES:
        raise RecipeError(f"{where}: restore must be one of {RESTORES}, got {restore!r}")
    return Restore(restore)


class _Reader:
    """Pops keys from one JSON object and complains, with the object's location, about missing or unknown ones."""

    def __init__(self, obj, where: str):
        if not isinstance(obj, dict):
            raise RecipeError(f"{where} must be a JSON object, got {type(obj).__name__}")
        self.obj, self.where = dict(obj), where

    def take(self, key, *, default=..., kind=None):
        if key not in self.obj:
            if default is ...:
                raise RecipeError(f"{self.where}: missing required key {key!r}")
            return default
        value = self.obj.pop(key)
        if kind is not None and not isinstance(value, kind):
            raise RecipeError(f"{self.where}: {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    def done(self, allowed: tuple[str, ...]):
        if self.obj:
            raise RecipeError(f"{self.where}: unknown key(s) {sorted(self.obj)}; allowed keys: {sorted(allowed)}")


def _numbers(value, n, where, key, kind=float):
    if not (isinstance(value, list) and len(value) == n and all(isinstance(v, (int, float)) for v in value)):
        raise RecipeError(f"{where}: {key!r} must be a list of {n} numbers, got {value!r}")
    out = tuple(kind(v) for v in value)
    if any(v <= 0 for v in out):
        raise RecipeError(f"{where}: {key!r} must be positive, got {value!r}")
    return out


def _channel(obj, where) -> ChannelSpec:
    keys = ("source", "interpolation", "ops", "ops_before_sampling")
    r = _Reader(obj, where)
    source = r.take("source", kind=str)
    if source not in SOURCES:
        raise RecipeError(f"{where}: source must be one of {SOURCES}, got {source!r}")
    interpolation = r.take("interpolation", default="linear", kind=str)
    if interpolation not in INTERPOLATIONS:
        raise RecipeError(f"{where}: interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    ops = validate_ops(r.take("ops", default=[], kind=list), source=source, where=where)
    before = r.take("ops_before_sampling", default=False, kind=bool)
    if before and any(isinstance(op, SpectrumSwap) for op in ops):
        raise RecipeError(f"{where}: op 'spectrum_swap' works on the model grid's slices (its reference was computed "
                          f"there); it cannot run before sampling: set ops_before_sampling false")
    r.done(keys)
    return ChannelSpec(ChannelSource(source), Interpolation(interpolation), ops, before)


def _head(obj, where) -> HeadSpec:
    keys = ("type", "labels", "regions", "region_labels")
    r = _Reader(obj, where)
    kind = r.take("type", kind=str)
    if kind == "softmax":
        labels = tuple(r.take("labels", kind=list))
        if sorted(labels) != sorted(set(labels)) or not set(labels) <= {0, 1, 2} or 0 not in labels:
            raise RecipeError(f"{where}: softmax 'labels' must be distinct values of {{0,1,2}} including 0, "
                              f"got {labels}")
        r.done(keys)
        return HeadSpec(HeadType.SOFTMAX, labels=labels)
    if kind == "sigmoid":
        regions = tuple(tuple(region) for region in r.take("regions", kind=list))
        region_labels = tuple(r.take("region_labels", kind=list))
        if len(regions) != len(region_labels) or not regions:
            raise RecipeError(f"{where}: 'regions' and 'region_labels' must be non-empty lists of equal length")
        if not all(set(region) <= {1, 2} and region for region in regions) or not set(region_labels) <= {1, 2}:
            raise RecipeError(f"{where}: regions must be non-empty sets of labels 1/2, got {regions}")
        r.done(keys)
        return HeadSpec(HeadType.SIGMOID, regions=regions, region_labels=region_labels)
    raise RecipeError(f"{where}: head type must be 'softmax' or 'sigmoid', got {kind!r}")


def parse_model(obj, where: str, folder: Path) -> ModelSpec:
    """One recipe model entry, validated (`where` names it in messages). Its files are named in `folder`, not read:
    `sha256` holds the hashes the recipe declares (none: empty) until recipe/load.py checks the files."""
    keys = ("name", "files", "spacing_xyz_mm", "orientation", "patch_size_zyx", "channels", "head", "fold_average",
            "step_fraction", "mirror_axes_zyx", "tile_batch", "gaussian", "weight", "transpose_forward", "provenance",
            "tiling", "overlap", "grid_spacing", "stochastic_files", "resampling", "pet_to_ct", "sha256",
            "stochastic_sha256")
    r = _Reader(obj, where)
    name = r.take("name", kind=str)
    where = f"{where} ({name})"
    files = _file_names(r.take("files", kind=list), folder, where, "files")
    if not files:
        raise RecipeError(f"{where}: 'files' lists no model file")
    spacing = _numbers(r.take("spacing_xyz_mm"), 3, where, "spacing_xyz_mm")
    orientation = r.take("orientation", default="lps", kind=str)
    if orientation not in ORIENTATIONS:
        raise RecipeError(f"{where}: orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    patch = _numbers(r.take("patch_size_zyx"), 3, where, "patch_size_zyx", kind=int)
    channels = tuple(_channel(c, f"{where} channels[{i}]")
                     for i, c in enumerate(r.take("channels", kind=list)))
    if not channels:
        raise RecipeError(f"{where}: 'channels' is empty")
    head = _head(r.take("head"), f"{where} head")
    fold_average = r.take("fold_average", default="probabilities", kind=str)
    if fold_average not in FOLD_AVERAGES:
        raise RecipeError(f"{where}: fold_average must be one of {FOLD_AVERAGES}, got {fold_average!r}")
    tiling_kind, overlap, step = _tiling(r, where)
    mirror = tuple(r.take("mirror_axes_zyx", default=[], kind=list))
    if not set(mirror) <= {0, 1, 2} or len(set(mirror)) != len(mirror):
        raise RecipeError(f"{where}: mirror_axes_zyx must be distinct axes of 0, 1, 2, got {list(mirror)}")
    tile_batch = r.take("tile_batch", default=1, kind=int)
    if tile_batch < 1:
        raise RecipeError(f"{where}: tile_batch must be >= 1, got {tile_batch}")
    gaussian = r.take("gaussian", default=True, kind=bool)
    weight = float(r.take("weight", default=1.0, kind=(int, float)))
    if weight <= 0:
        raise RecipeError(f"{where}: weight must be > 0, got {weight}")
    transpose = tuple(r.take("transpose_forward", default=[0, 1, 2], kind=list))
    if sorted(transpose) != [0, 1, 2]:
        raise RecipeError(f"{where}: transpose_forward must be a permutation of [0, 1, 2], got {list(transpose)}")
    provenance = freeze(r.take("provenance", default={}, kind=dict))
    grid_spacing = r.take("grid_spacing", default="exact", kind=str)
    if grid_spacing not in GRID_SPACINGS:
        raise RecipeError(f"{where}: grid_spacing must be one of {GRID_SPACINGS}, got {grid_spacing!r}")
    stochastic = parse_stochastic_files(r.take("stochastic_files", default=[]), n_files=len(files), where=where)
    stochastic = _file_names(list(stochastic), folder, where, "stochastic_files")
    resampling, pet_to_ct = _resampling(r, where, orientation)
    sha256 = _declared_sha256(r.take("sha256", default=None), files, where, "sha256")
    stochastic_sha256 = _declared_sha256(r.take("stochastic_sha256", default=None), stochastic, where,
                                         "stochastic_sha256")
    r.done(keys)
    grid = GridSpec(spacing, Orientation(orientation), GridSpacing(grid_spacing), transpose, Resampling(resampling),
                    Interpolation(pet_to_ct))
    if tiling_kind == Tiling.MONAI:
        tiling = MonaiTiling(patch, overlap, tile_batch, gaussian, mirror)
    else:
        tiling = NnunetTiling(patch, step, tile_batch, gaussian, mirror)
    return ModelSpec(name=name, files=files, sha256=sha256, grid=grid,
                     channels=channels, head=head, tiling=tiling, fold_average=FoldAverage(fold_average),
                     weight=weight, provenance=provenance, stochastic_files=stochastic,
                     stochastic_sha256=stochastic_sha256)


def _file_names(names: list, folder: Path, where: str, key: str) -> tuple[Path, ...]:
    """`folder`/name for each name (relative to the recipe's folder; `hnseg pack-model` refuses one outside it)."""
    for name in names:
        if not isinstance(name, str) or not name:
            raise RecipeError(f"{where}: {key!r} must list file names (relative to the weights folder), got {name!r}")
    return tuple(Path(folder) / name for name in names)


def _declared_sha256(recorded, files: tuple[Path, ...], where: str, key: str) -> tuple[str, ...]:
    """The sha256 the recipe records for its files (at export), one hex string per file; none recorded: ()."""
    if recorded is None:
        return ()
    if not (isinstance(recorded, list) and len(recorded) == len(files) and all(
            isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdefABCDEF" for c in h) for h in recorded)):
        raise RecipeError(f"{where}: '{key}' must list one sha256 (64 hex digits) per model file, got {recorded!r}")
    return tuple(h.lower() for h in recorded)


def _resampling(r: _Reader, where: str, orientation: str) -> tuple[str, str]:
    """(resampling, pet_to_ct): `pet_to_ct` belongs to nnU-Net resampling, which needs the CT's axes."""
    resampling = r.take("resampling", default="direct", kind=str)
    if resampling not in RESAMPLINGS:
        raise RecipeError(f"{where}: resampling must be one of {RESAMPLINGS}, got {resampling!r}")
    if resampling == "nnunet" and orientation != "ct":
        raise RecipeError(f"{where}: resampling \"nnunet\" resamples along the CT's own axes: it needs orientation "
                          f"\"ct\", got {orientation!r}")
    if resampling != "nnunet" and "pet_to_ct" in r.obj:
        raise RecipeError(f"{where}: pet_to_ct is read only with resampling \"nnunet\" (got resampling "
                          f"{resampling!r}): remove it or set resampling \"nnunet\"")
    pet_to_ct = r.take("pet_to_ct", default="linear", kind=str)
    if pet_to_ct not in INTERPOLATIONS:
        raise RecipeError(f"{where}: pet_to_ct must be one of {INTERPOLATIONS}, got {pet_to_ct!r}")
    return resampling, pet_to_ct


def _tiling(r: _Reader, where: str) -> tuple[str, float | None, float]:
    """(tiling, overlap, step_fraction): nnU-Net tiling takes step_fraction (default 0.5), MONAI tiling takes
    overlap (required: MONAI models are trained and validated with their own); each refuses the other's key."""
    tiling = r.take("tiling", default="nnunet", kind=str)
    if tiling not in TILINGS:
        raise RecipeError(f"{where}: tiling must be one of {TILINGS}, got {tiling!r}")
    if tiling == "monai":
        if "step_fraction" in r.obj:
            raise RecipeError(f"{where}: 'step_fraction' is nnU-Net tiling's; tiling 'monai' places tiles by "
                              f"'overlap': remove 'step_fraction'")
        overlap = r.take("overlap", kind=(int, float))
        if not 0 <= overlap < 1:
            raise RecipeError(f"{where}: overlap must be in [0, 1), got {overlap}")
        return tiling, float(overlap), 1.0 - float(overlap)
    if "overlap" in r.obj:
        raise RecipeError(f"{where}: 'overlap' is MONAI tiling's; set \"tiling\": \"monai\" or use 'step_fraction'")
    step = float(r.take("step_fraction", default=0.5, kind=(int, float)))
    if not 0 < step <= 1:
        raise RecipeError(f"{where}: step_fraction must be in (0, 1], got {step}")
    return tiling, None, step


def _check_heads_combine(models: tuple[ModelSpec, ...], where: str) -> None:
    """Sigmoid models in one ensemble must share their regions (softmax models are converted to them)."""
    region_sets = {(m.head.regions, m.head.region_labels) for m in models if m.head.type == "sigmoid"}
    if len(region_sets) > 1:
        raise RecipeError(f"{where}: sigmoid models declare different regions {sorted(region_sets)}; an ensemble "
                          f"needs one region set")


def _check_unique(names: list[str], kind: str, where: str) -> None:
    if repeated := sorted({n for n in names if names.count(n) > 1}):
        raise RecipeError(f"{where}: {kind} name(s) {repeated} used more than once; give each {kind} its own name")
