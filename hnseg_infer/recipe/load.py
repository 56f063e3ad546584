"""The recipe: `weights/<name>/recipe.json`, written by export/, validated once here into frozen dataclasses.

Everything that defines how the models run lives in the recipe (ROI method, per-model grid, channels, head,
tiling, TTA, fold averaging, post-processing), so a new system is a new recipe, not a code branch. Loading is
strict: unknown keys, missing files and bad values are RecipeErrors naming the file, key and value.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from hnseg_infer.channels.harmonise import SpectrumReference, check_fits
from hnseg_infer.channels.intensity import SOURCES, Op, SpectrumSwap, validate_ops
from hnseg_infer.errors import RecipeError
from hnseg_infer.geometry.grid import Box, Grid
from hnseg_infer.io.atomic import file_sha256
from hnseg_infer.recipe.budget import BudgetConfig, parse_budget
from hnseg_infer.recipe.frozen import FrozenMap, freeze, thaw
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
from hnseg_infer.roi.locate import NEEDS_PREVIOUS_STAGE, box_size_mm, check_params
from hnseg_infer.uncertainty.config import UncertaintyConfig, check_stage, parse_stochastic_files, parse_uncertainty

SCHEMA_VERSION = 1
RECIPE_FILE = "recipe.json"
SKIP_HASH_CHECK_ENV = "HNSEG_SKIP_HASH_CHECK"  # "1": model files need not match the sha256 their recipe records
ORIENTATIONS, INTERPOLATIONS, RESAMPLINGS = values(Orientation), values(Interpolation), values(Resampling)
FOLD_AVERAGES, GRID_SPACINGS = values(FoldAverage), values(GridSpacing)
RESTORES, TILINGS = values(Restore), values(Tiling)


@dataclass(frozen=True)
class ChannelSpec:
    source: ChannelSource
    interpolation: Interpolation
    ops: tuple[Op, ...]
    # nnU-Net normalises the native image and then resamples it: a clip before interpolation moves edges (air/body)
    # differently from one after it. True reproduces that order.
    ops_before_sampling: bool = False

    def to_json(self) -> dict:
        return {"source": self.source, "interpolation": self.interpolation, "ops": [op.to_json() for op in self.ops],
                "ops_before_sampling": self.ops_before_sampling}


@dataclass(frozen=True)
class HeadSpec:
    """softmax: one output per label (`labels[k]` is channel k's label value).
    sigmoid: one output per region (`regions[k]` is the set of labels it covers); decoding paints, in order,
    `region_labels[k]` wherever region k's probability > 0.5, as nnU-Net's regions_class_order."""

    type: HeadType
    labels: tuple[int, ...] = ()
    regions: tuple[tuple[int, ...], ...] = ()
    region_labels: tuple[int, ...] = ()

    @property
    def n_outputs(self) -> int:
        return len(self.labels) if self.type == "softmax" else len(self.regions)

    def to_json(self) -> dict:
        if self.type == HeadType.SOFTMAX:
            return {"type": self.type, "labels": list(self.labels)}
        return {"type": self.type, "regions": [list(r) for r in self.regions],
                "region_labels": list(self.region_labels)}


@dataclass(frozen=True)
class GridSpec:
    """Where a model's voxels lie and how the images reach them."""

    spacing_xyz_mm: tuple[float, float, float]
    orientation: Orientation = Orientation.LPS
    # "exact": the grid has spacing_xyz_mm exactly; "fit_roi": the voxel count is rounded and the spacing adjusted
    # so that the voxels fill the ROI box exactly (nnU-Net's resampling of a whole image).
    grid_spacing: GridSpacing = GridSpacing.EXACT
    # The grid axes (0 z, 1 y, 2 x) in the order the network takes them, as nnU-Net's plans `transpose_forward`:
    # the input is array.transpose(0, *[a + 1 for a in transpose_forward]). The tiling's patch_size_zyx and
    # mirror_axes_zyx count in the network's order.
    transpose_forward: tuple[int, int, int] = (0, 1, 2)
    # "direct": each channel interpolated once from its native image onto the model grid, probabilities linearly
    # onto the CT. "nnunet": as nnUNetPredictor on a case whose channels are on the CT's voxels: the PET put there
    # first (by `pet_to_ct` interpolation, as the training data's conversion did), then nnU-Net's resampling rule
    # (grid.sample_nnunet) to the model grid and, linearly, back to the CT. Needs orientation "ct".
    resampling: Resampling = Resampling.DIRECT
    pet_to_ct: Interpolation = Interpolation.LINEAR

    def to_json(self) -> dict:
        out = {"spacing_xyz_mm": list(self.spacing_xyz_mm), "orientation": self.orientation,
               "grid_spacing": self.grid_spacing, "transpose_forward": list(self.transpose_forward),
               "resampling": self.resampling}
        if self.resampling == Resampling.NNUNET:  # pet_to_ct belongs to nnU-Net resampling only
            out["pet_to_ct"] = self.pet_to_ct
        return out


class _Tiling:
    """What both tilings share; each places its tiles by its own field (`placement`), so a meaningless one cannot
    be set."""

    kind: ClassVar[Tiling]
    placement: ClassVar[str]

    def window(self) -> dict:
        """The keywords of inference.sliding_window.predict_sliding_window, mirroring aside."""
        return {"patch_zyx": self.patch_size_zyx, "tiling": self.kind, self.placement: getattr(self, self.placement),
                "tile_batch": self.tile_batch, "gaussian": self.gaussian}

    def to_json(self) -> dict:
        return {"tiling": self.kind, "patch_size_zyx": list(self.patch_size_zyx),
                self.placement: getattr(self, self.placement), "tile_batch": self.tile_batch,
                "gaussian": self.gaussian, "mirror_axes_zyx": list(self.mirror_axes_zyx)}


@dataclass(frozen=True)
class NnunetTiling(_Tiling):
    """nnU-Net's sliding window: tiles placed by `step_fraction` of the patch, nnU-Net's Gaussian."""

    patch_size_zyx: tuple[int, int, int]
    step_fraction: float = 0.5
    tile_batch: int = 1
    gaussian: bool = True
    mirror_axes_zyx: tuple[int, ...] = ()
    kind: ClassVar[Tiling] = Tiling.NNUNET
    placement: ClassVar[str] = "step_fraction"


@dataclass(frozen=True)
class MonaiTiling(_Tiling):
    """MONAI's sliding_window_inference: tiles placed by `overlap` (required: MONAI models are validated with their
    own), MONAI's Gaussian."""

    patch_size_zyx: tuple[int, int, int]
    overlap: float
    tile_batch: int = 1
    gaussian: bool = True
    mirror_axes_zyx: tuple[int, ...] = ()
    kind: ClassVar[Tiling] = Tiling.MONAI
    placement: ClassVar[str] = "overlap"


@dataclass(frozen=True)
class ModelSpec:
    """One recipe model: its fold files (and their sha256), its grid, input channels, tiling and head."""

    name: str
    files: tuple[Path, ...]
    sha256: tuple[str, ...]
    grid: GridSpec
    channels: tuple[ChannelSpec, ...]
    head: HeadSpec
    tiling: NnunetTiling | MonaiTiling
    fold_average: FoldAverage = FoldAverage.PROBABILITIES
    weight: float = 1.0
    provenance: FrozenMap | None = None  # what export/ recorded (source, proof of equivalence); not interpreted
    # Monte-Carlo dropout: one stochastic twin per fold (inference/stochastic.py), used only by uncertainty passes.
    stochastic_files: tuple[Path, ...] = ()
    stochastic_sha256: tuple[str, ...] = ()

    def to_json(self, folder: Path) -> dict:
        """The recipe entry; file names relative to the weights `folder`."""
        out = {"name": self.name, "files": [str(f.relative_to(folder)) for f in self.files], **self.grid.to_json(),
               "channels": [c.to_json() for c in self.channels], "head": self.head.to_json(),
               "fold_average": self.fold_average, **self.tiling.to_json(), "weight": self.weight,
               "provenance": thaw(self.provenance)}
        out["sha256"] = list(self.sha256)  # verified on load: the files are the ones exported
        if self.stochastic_files:
            out["stochastic_files"] = [str(f.relative_to(folder)) for f in self.stochastic_files]
            out["stochastic_sha256"] = list(self.stochastic_sha256)
        return out


@dataclass(frozen=True)
class RoiSpec:
    method: str
    params: FrozenMap  # checked, every default filled (roi/locate.py)

    def to_json(self) -> dict:
        return {"method": self.method, "params": thaw(self.params)}


@dataclass(frozen=True)
class StageSpec:
    """One stage of a cascade: an ROI, the models run in it, and the post-processing of their labels. Each stage's
    labels feed the next stage's ROI; the last stage's labels are the mask."""

    name: str
    roi: RoiSpec
    models: tuple[ModelSpec, ...]
    postprocess: PostprocessConfig
    # How the last stage's labels reach the CT grid (RESTORES): probabilities interpolated onto the CT voxels then
    # decoded (restore/ensemble.py), or SNU's labels decoded on the model grid then nearest neighbour
    # (restore/paste_back.py).
    restore: Restore = Restore.PROBABILITIES

    def to_json(self, folder: Path, *, last: bool) -> dict:
        out = {"name": self.name, "roi": self.roi.to_json(), "models": [m.to_json(folder) for m in self.models],
               "postprocess": self.postprocess.to_dict()}
        if last:  # an earlier stage takes no restore
            out["restore"] = self.restore
        return out


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. Equal recipes run the same way: `path` and the file's `sha256` say where one was read
    and do not take part in comparisons, so that parse_recipe(r.to_json(), r.path) == r."""

    path: Path = field(compare=False)
    name: str
    stages: tuple[StageSpec, ...]
    sha256: str = field(compare=False)
    # True when every model may run without PET (trained with its PET channels zero-filled, as HN-UISeg's): a case
    # without a PET image, or --ct-only, then runs in CT-only mode. False: a missing PET is an input error.
    pet_optional: bool = False
    uncertainty: UncertaintyConfig | None = None  # the optional `uncertainty` block (uncertainty/config.py)
    description: str = ""
    budget: BudgetConfig = BudgetConfig()  # the optional `budget` block (recipe/budget.py); its defaults if none

    def to_json(self) -> dict:
        """recipe.json's content, every default written out; a one-stage recipe named "main" in the flat form."""
        folder = self.path.parent
        out = {"schema_version": SCHEMA_VERSION, "name": self.name, "description": self.description,
               "pet_optional": self.pet_optional}
        if self.uncertainty is not None:
            out["uncertainty"] = self.uncertainty.to_dict()
        if self.budget.declared:
            out["budget"] = self.budget.to_dict()
        stages = [stage.to_json(folder, last=i == len(self.stages) - 1) for i, stage in enumerate(self.stages)]
        if len(stages) == 1 and stages[0]["name"] == "main":
            out.update({key: value for key, value in stages[0].items() if key != "name"})
        else:
            out["stages"] = stages
        return out

    @property
    def models(self) -> tuple[ModelSpec, ...]:
        return tuple(m for stage in self.stages for m in stage.models)

    @property
    def postprocess(self) -> PostprocessConfig:
        return self.stages[-1].postprocess

    def to_dict(self) -> dict:
        return {"path": str(self.path), "name": self.name, "sha256": self.sha256, "pet_optional": self.pet_optional,
                "stages": [{"name": stage.name, "roi": stage.roi.method,
                            "models": [{"name": m.name, "files": [f.name for f in m.files], "sha256": list(m.sha256),
                                        **({"references": refs} if (refs := _references(m)) else {})}
                                       for m in stage.models]} for stage in self.stages]}


def spectrum_references(model: "ModelSpec") -> list[SpectrumReference]:
    """The harmonisation references a model's channel ops load (files beside the weights)."""
    return [op.reference for channel in model.channels for op in channel.ops if isinstance(op, SpectrumSwap)]


def _references(model: "ModelSpec") -> list[dict]:
    return [{"file": ref.path.name, "sha256": ref.sha256} for ref in spectrum_references(model)]


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


def _channel(obj, where, folder: Path) -> ChannelSpec:
    keys = ("source", "interpolation", "ops", "ops_before_sampling")
    r = _Reader(obj, where)
    source = r.take("source", kind=str)
    if source not in SOURCES:
        raise RecipeError(f"{where}: source must be one of {SOURCES}, got {source!r}")
    interpolation = r.take("interpolation", default="linear", kind=str)
    if interpolation not in INTERPOLATIONS:
        raise RecipeError(f"{where}: interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    ops = validate_ops(r.take("ops", default=[], kind=list), source=source, where=where, folder=folder)
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
    """One recipe model entry, validated (`where` names it in messages; `folder` holds its files)."""
    keys = ("name", "files", "spacing_xyz_mm", "orientation", "patch_size_zyx", "channels", "head", "fold_average",
            "step_fraction", "mirror_axes_zyx", "tile_batch", "gaussian", "weight", "transpose_forward", "provenance",
            "tiling", "overlap", "grid_spacing", "stochastic_files", "resampling", "pet_to_ct", "sha256",
            "stochastic_sha256")
    r = _Reader(obj, where)
    name = r.take("name", kind=str)
    where = f"{where} ({name})"
    files = tuple(folder / f for f in r.take("files", kind=list))
    if not files:
        raise RecipeError(f"{where}: 'files' lists no model file")
    for f in files:
        if not f.is_file():
            raise RecipeError(f"{where}: model file {f} does not exist: re-export the model or fix 'files'")
    spacing = _numbers(r.take("spacing_xyz_mm"), 3, where, "spacing_xyz_mm")
    orientation = r.take("orientation", default="lps", kind=str)
    if orientation not in ORIENTATIONS:
        raise RecipeError(f"{where}: orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    patch = _numbers(r.take("patch_size_zyx"), 3, where, "patch_size_zyx", kind=int)
    channels = tuple(_channel(c, f"{where} channels[{i}]", folder)
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
    stochastic = parse_stochastic_files(r.take("stochastic_files", default=[]), n_files=len(files), where=where,
                                        folder=folder)
    resampling, pet_to_ct = _resampling(r, where, orientation)
    sha256 = _verified_sha256(files, r.take("sha256", default=None), where, "sha256")
    stochastic_sha256 = _verified_sha256(stochastic, r.take("stochastic_sha256", default=None), where,
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


def _verified_sha256(files: tuple[Path, ...], recorded, where: str, key: str) -> tuple[str, ...]:
    """Each file's sha256, checked against the one the recipe recorded at export (when it records them): a model
    file replaced by another of the same signature would otherwise run silently. HNSEG_SKIP_HASH_CHECK=1 skips the
    comparison for weights edited on purpose (the hashes are still computed and reported)."""
    actual = tuple(file_sha256(f) for f in files)
    if recorded is None:
        return actual
    if not (isinstance(recorded, list) and len(recorded) == len(files) and all(isinstance(h, str) for h in recorded)):
        raise RecipeError(f"{where}: '{key}' must list one sha256 (hex string) per model file, got {recorded!r}")
    if os.environ.get(SKIP_HASH_CHECK_ENV) == "1":
        return actual
    for path, want, got in zip(files, recorded, actual):
        if want.lower() != got:
            raise RecipeError(f"{where}: model file {path} has sha256 {got[:16]}... but the recipe records "
                              f"{want[:16]}... (written at export): the file was replaced or changed; re-export the "
                              f"weights, or set {SKIP_HASH_CHECK_ENV}=1 if you changed them on purpose")
    return actual


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
    """Read and validate `weights_dir/recipe.json`."""
    path = find_recipe(weights_dir)
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path} is not valid JSON ({exc}): fix or re-export it") from exc
    return parse_recipe(raw, path, sha256=file_sha256(path))


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
    for i, model in enumerate(models):
        _check_references_fit(model, roi, f"{where} models[{i}] ({model.name})")
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


def _check_unique(names: list[str], kind: str, where: str) -> None:
    if repeated := sorted({n for n in names if names.count(n) > 1}):
        raise RecipeError(f"{where}: {kind} name(s) {repeated} used more than once; give each {kind} its own name")
