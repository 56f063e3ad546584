"""The recipe's typed form: frozen dataclasses, hashable, each with the `to_json` that parse.py inverts.

A Recipe holds what recipe.json declares; once loaded (load.py) its models' sha256 are the files' own and its
harmonisation references are read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from hnseg_infer.channels.harmonise import SpectrumReference
from hnseg_infer.channels.intensity import Op, SpectrumSwap
from hnseg_infer.recipe.budget import BudgetConfig
from hnseg_infer.recipe.frozen import FrozenMap, thaw
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
)
from hnseg_infer.restore.postprocess import PostprocessConfig
from hnseg_infer.uncertainty.config import UncertaintyConfig

SCHEMA_VERSION = 1


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
    """One recipe model: its fold files (and their sha256: as declared once parsed, as checked once loaded), its grid,
    input channels, tiling and head."""

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
        if self.sha256:  # verified on load: the files are the ones exported
            out["sha256"] = list(self.sha256)
        if self.stochastic_files:
            out["stochastic_files"] = [str(f.relative_to(folder)) for f in self.stochastic_files]
        if self.stochastic_sha256:
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
    return [op.spectrum for channel in model.channels for op in channel.ops if isinstance(op, SpectrumSwap)]


def _references(model: "ModelSpec") -> list[dict]:
    return [{"file": ref.path.name, "sha256": ref.sha256} for ref in spectrum_references(model)]
