"""Train the demo cascade (SJTU's two-stage coarse-to-fine ensemble, DESIGN.md §5, in miniature) on synthetic
phantoms on a CPU, save each model in its native format, export it with export/to_onnx.py and assemble
`weights/demo` (ONNX files + one recipe.json with three stages).

    .venv/bin/python export/train_demo.py [--out weights/demo] [--work /tmp/hnseg-train] [--models NAME ...]
                                          [--cases N] [--iterations N | --iteration-scale F] [--threads N] [--quick]

The committed weights were made in two halves side by side, one torch thread each, then assembled (~35 min):

    .venv/bin/python export/train_demo.py --models fine_nnunet localise_head --threads 1 --no-assemble &
    .venv/bin/python export/train_demo.py --models fine_segresnetds coarse --threads 1 --no-assemble; wait
    .venv/bin/python export/train_demo.py --models

The four models (recipe names), each trained from scratch, one fold, fp32:

  localise_head      nnU-Net PlainConvUNet, CT only, 2×2×3 mm on the `ct_top` box (512×512×384 mm from the top of
                     the CT): 256×256×128 voxels; target: the head-and-neck region (label 1)
  coarse             nnU-Net PlainConvUNet on [CT, PET], 2 mm, in the `labels_bbox` box of the localiser's labels
                     (+10 mm); labels 0/1/2
  fine_nnunet        nnU-Net ResidualEncoderUNet on [x, x², x^(1/3), y] (x: CT window [-110, 190] → [-1, 1], y: PET
                     SUV window [0, 20] → [0, 1]), 1 mm, in the `labels_centroid_cube` box (144 mm) of the coarse labels
  fine_segresnetds   MONAI SegResNetDS (deep supervision) on [CT, PET] as an Auto3DSeg segresnet checkpoint
                     (normalize_mode "range" for CT, "pet" for PET, RAS, 1 mm), same box; averaged with fine_nnunet

Every training input is made by the inference code itself: the ROI box by `hnseg_infer.roi.locate` (from the reference
labels, jittered), the model grid by `predict.model_grid` and the channels by `predict.build_input` with the very
channel specs the exporter writes (checked against the exported recipe, which fails the run if they differ).
Phantoms come from `hnseg_infer.tools.phantom.make_phantom(**hecktor_acquisition(seed))` with training seeds 1000-1999
(0-999 are for evaluation and the demo); the CT is rounded to int16 as `write_case` stores it.

Work folder (--work, default /tmp/hnseg-train): cache/ (model inputs and labels as .npy per case, reused by later
runs), native/ (the nnU-Net results folders and the Auto3DSeg checkpoint), export/ (to_onnx.py's weights folders),
logs/ (loss and time per model). Seeds are fixed: the same command gives the same weights (CPU, same torch).
`--quick` is a smoke run (2 small phantoms, coarse model grids, 2 iterations) for the tests.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hnseg_infer.channels.build import build_input, model_grid  # noqa: E402
from hnseg_infer.channels.intensity import validate_ops  # noqa: E402
from hnseg_infer.geometry.grid import Box, Grid, sample_labels  # noqa: E402
from hnseg_infer.io.images import Case, detect_pet_unit  # noqa: E402
from hnseg_infer.recipe.load import load_recipe  # noqa: E402
from hnseg_infer.recipe.spec import ChannelSpec, GridSpec  # noqa: E402
from hnseg_infer.recipe.vocabulary import GridSpacing, Interpolation, Orientation, Resampling  # noqa: E402
from hnseg_infer.roi.locate import StageLabels, locate_roi  # noqa: E402

TRAIN_SEEDS = range(1000, 2000)  # 0-999: evaluation and the demo
FOV_CYCLE = ("head-neck", "head-only", "head-neck", "whole-body", "head-neck", "head-neck")
CT_WINDOW = {"op": "window", "min": -110.0, "max": 190.0, "to": [-1.0, 1.0]}
PET_SUV_WINDOW = ({"op": "suv"}, {"op": "window", "min": 0.0, "max": 20.0, "to": [0.0, 1.0]})
LOCALISER_BOX_MM = [512.0, 512.0, 384.0]
COARSE_MARGIN_MM = 10.0
FINE_CUBE_MM = [144.0, 144.0, 144.0]
COARSE_JITTER_MM = 6.0  # each face of the reference head-and-neck box moves by up to this
FINE_JITTER_MM = 20.0  # the fine cube's centre moves by up to this along each axis
STAGES = (  # (stage, ROI, post-processing of its labels); models by their `stage`
    ("localise_head", {"method": "ct_top", "params": {"size_mm": LOCALISER_BOX_MM}}, {"keep_largest_gtvp": True}),
    ("coarse", {"method": "labels_bbox", "params": {"margin_mm": COARSE_MARGIN_MM}},
     {"min_volume_mm3": {"GTVp": 500, "GTVn": 100}}),
    ("fine", {"method": "labels_centroid_cube", "params": {"size_mm": FINE_CUBE_MM, "fallback": "brain_peak_head_crop",
                                                 "contain_labels": True}},
     {"min_volume_mm3": {"GTVp": 500, "GTVn": 50}, "keep_largest_gtvp": True}),
)


# ----------------------------------------------------------------------------------------------------- the models

@dataclass(frozen=True)
class ModelPlan:
    """One model: how inference feeds it (grid and channels, as its exported recipe entry will say) and how it is
    built and trained. Axis orders: `patch` and `flip_axes` in the network's order (nnU-Net: z, y, x; MONAI: x, y,
    z of the RAS grid, i.e. transpose_forward [2, 1, 0])."""

    name: str
    stage: str
    route: str  # "nnunet" or "monai"
    sources: tuple[str, ...]
    ops: tuple[tuple[dict, ...], ...]  # per channel, as the recipe's channel ops
    spacing_xyz_mm: tuple[float, float, float]
    labels: tuple[int, ...]
    patch: tuple[int, int, int]
    iterations: int
    batch_size: int = 2
    learning_rate: float = 2e-3
    foreground_fraction: float = 0.67  # of the patches, centred near a labelled voxel (a random label, then voxel)
    features: tuple[int, ...] = (8, 16, 32, 64)
    blocks: tuple[int, ...] = (2, 2, 2, 2)  # convolutions (plain) or residual blocks (ResEnc) per encoder stage
    architecture: str = "PlainConvUNet"  # nnU-Net's; "SegResNetDS" for the monai route
    channel_names: tuple[str, ...] = ()
    flip_axes: tuple[int, ...] = (2,)  # left-right, the anatomy's symmetry
    transpose_forward: tuple[int, int, int] = (0, 1, 2)
    max_cases: int | None = None  # trained on the first max_cases training cases (None: all)
    # inference settings in the recipe other than the export's (nnU-Net's defaults), e.g. the localiser's
    inference: tuple[tuple[str, object], ...] = ()

    @property
    def orientation(self) -> str:
        return "ct" if self.route == "nnunet" else "ras"

    @property
    def grid_spacing(self) -> str:
        return "fit_roi" if self.route == "nnunet" else "exact"

    @property
    def resampling(self) -> str:
        return "nnunet" if self.route == "nnunet" else "direct"

    pet_to_ct = "linear"  # nnU-Net resampling: the PET put on the CT's voxels first, as the export's default says

    @property
    def grid(self) -> GridSpec:
        """The model grid as the exported recipe's entry will say (what model_grid and build_input read)."""
        return GridSpec(tuple(self.spacing_xyz_mm), Orientation(self.orientation), GridSpacing(self.grid_spacing),
                        tuple(self.transpose_forward), Resampling(self.resampling), Interpolation(self.pet_to_ct))

    @property
    def channels(self) -> tuple[ChannelSpec, ...]:
        """The channel specs of the exported recipe: nnU-Net normalises the native image, then B-spline resamples
        (ops_before_sampling); MONAI resamples linearly, then normalises."""
        nnunet = self.route == "nnunet"
        return tuple(ChannelSpec(s, "bspline" if nnunet else "linear", validate_ops(o, source=s, where=self.name),
                                 nnunet) for s, o in zip(self.sources, self.ops))


def _monai_range_ops(low: float, high: float) -> tuple[dict, ...]:
    """Auto3DSeg normalize_mode "range": ScaleIntensityRange(low, high → -1, 1, no clip), then a sigmoid (as
    hnseg_export.from_monai maps it)."""
    factor = (1.0 - -1.0) / (high - low)
    return ({"op": "scale", "factor": factor, "offset": -1.0 - low * factor}, {"op": "sigmoid"})


def model_plans() -> dict[str, ModelPlan]:
    return {plan.name: plan for plan in (
        ModelPlan("localise_head", "localise_head", "nnunet", ("ct",), ((CT_WINDOW,),), (2.0, 2.0, 3.0), (0, 1),
                  patch=(48, 96, 96), iterations=450, features=(4, 8, 16, 32), foreground_fraction=0.34,
                  channel_names=("CT",), max_cases=12,
                  # it only places the coarse box: tiles without overlap and no mirroring cut its passes from 250
                  # to 27 (-25 s of 52 s on the demo case) at equal accuracy on 12 unseen cases (docs/benchmarks.md)
                  inference=(("step_fraction", 1.0), ("mirror_axes_zyx", ()))),
        ModelPlan("coarse", "coarse", "nnunet", ("ct", "pet"), ((CT_WINDOW,), PET_SUV_WINDOW), (2.0, 2.0, 2.0),
                  (0, 1, 2), patch=(64, 64, 64), iterations=750, features=(8, 16, 32, 64),
                  channel_names=("CT", "PET")),
        ModelPlan("fine_nnunet", "fine", "nnunet", ("ct", "ct", "ct", "pet"),
                  ((CT_WINDOW,), (CT_WINDOW, {"op": "power", "exponent": 2}), (CT_WINDOW, {"op": "cbrt"}),
                   PET_SUV_WINDOW), (1.0, 1.0, 1.0), (0, 1, 2), patch=(48, 48, 48), iterations=1700,
                  architecture="ResidualEncoderUNet", features=(8, 16, 32, 48, 64), blocks=(1, 1, 2, 2, 2),
                  channel_names=("CT", "CT_squared", "CT_cbrt", "PET")),
        ModelPlan("fine_segresnetds", "fine", "monai", ("ct", "pet"),
                  (_monai_range_ops(-110.0, 190.0), ({"op": "suv"}, {"op": "min_over_std"}, {"op": "sigmoid"})),
                  (1.0, 1.0, 1.0), (0, 1, 2), patch=(48, 48, 48), iterations=1500, architecture="SegResNetDS",
                  features=(8,), blocks=(1, 2, 2, 2), flip_axes=(0,), transpose_forward=(2, 1, 0)),
    )}


def quick_plan(plan: ModelPlan) -> ModelPlan:
    """The smoke-run version: coarser grids (fewer voxels to sample), small patches, 2 iterations."""
    scale = {"localise_head": 2.0, "coarse": 2.0, "fine_nnunet": 3.0, "fine_segresnetds": 3.0}[plan.name]
    return replace(plan, spacing_xyz_mm=tuple(s * scale for s in plan.spacing_xyz_mm), patch=(32, 32, 32), iterations=2,
                   batch_size=1, max_cases=None)


# ------------------------------------------------------------------------------------------------------ the cases

@dataclass(frozen=True)
class TrainingCase:
    seed: int
    fov: str
    pet_unit: str

    @property
    def name(self) -> str:
        return f"seed{self.seed}_{self.fov}_{self.pet_unit}"


def training_cases(n: int) -> list[TrainingCase]:
    """Seeds 1000, 1001, ...: mostly head-and-neck fields of view, some head-only and whole-body, the PET unit
    alternating in pairs (so each field of view sees both units)."""
    if n > len(TRAIN_SEEDS):
        raise SystemExit(f"--cases {n}: at most {len(TRAIN_SEEDS)} training seeds")
    return [TrainingCase(TRAIN_SEEDS[i], FOV_CYCLE[i % len(FOV_CYCLE)], ("suv", "bqml")[(i // 2) % 2])
            for i in range(n)]


def acquisition(case: TrainingCase, *, quick: bool) -> dict:
    from hnseg_infer.tools.phantom import hecktor_acquisition

    keywords = dict(hecktor_acquisition(case.seed))
    if quick:  # a coarse CT: cheap to make and to sample
        keywords.update(ct_size_xy=200, ct_spacing_xyz_mm=(2.5, 2.5, 4.0))
    return keywords


def _ct_coverage_zyx(grid: Grid, ct_grid: Grid) -> np.ndarray:
    """Bool zyx: the grid's voxel centres that lie inside the CT's voxels (a separable test along shared axes)."""
    if not np.allclose(grid.direction, ct_grid.direction, atol=1e-6):
        raise ValueError("the coverage test needs a grid along the CT's axes")
    inside = []
    for axis in range(3):  # x, y, z index of the grid → continuous index of the CT along the same axis
        index = np.zeros((grid.size_xyz[axis], 3))
        index[:, axis] = np.arange(grid.size_xyz[axis])
        ct_index = ct_grid.physical_to_index(grid.index_to_physical(index))[:, axis]
        inside.append((ct_index >= -0.5) & (ct_index <= ct_grid.size_xyz[axis] - 0.5))
    x, y, z = inside
    return z[:, None, None] & y[None, :, None] & x[None, None, :]


def _network_order(array: np.ndarray, transpose_forward) -> np.ndarray:
    """A [C,] z, y, x array in the network's axis order."""
    lead = array.ndim - 3
    return np.ascontiguousarray(array.transpose(*range(lead), *(lead + a for a in transpose_forward)))


def _jitter_box(box: Box, rng: np.random.Generator, *, faces_mm: float = 0.0, shift_mm: float = 0.0) -> Box:
    lo = np.asarray(box.corner_xyz_mm) + rng.uniform(-faces_mm, faces_mm, 3)
    hi = np.asarray(box.corner_xyz_mm) + np.asarray(box.size_xyz_mm) + rng.uniform(-faces_mm, faces_mm, 3)
    shift = rng.uniform(-shift_mm, shift_mm, 3)
    return Box(tuple((lo + shift).tolist()), tuple((hi - lo).tolist()), box.direction)


def _cache_key(plan: ModelPlan, quick: bool) -> str:
    """Changes whenever what the cached inputs depend on changes (grid, channels, ROI rule, quick)."""
    data = {k: v for k, v in asdict(plan).items()
            if k in ("sources", "ops", "spacing_xyz_mm", "route", "transpose_forward", "stage")}
    data.update(quick=quick, rois=[s[1] for s in STAGES], coarse_jitter=COARSE_JITTER_MM,
                fine_jitter=FINE_JITTER_MM, version=2)  # 2: nnU-Net models sampled by nnU-Net's rule
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


def cache_dir(work: Path, plan: ModelPlan, quick: bool) -> Path:
    return work / "cache" / f"{plan.name}-{_cache_key(plan, quick)}"


def prepare_cases(cases: list[TrainingCase], plans: list[ModelPlan], work: Path, *, quick: bool, log) -> None:
    """For each case, the inputs and labels of every plan (network axis order), unless cached already."""
    import SimpleITK as sitk

    from hnseg_infer.tools.phantom import make_phantom

    started = time.time()
    for number, case in enumerate(cases):
        todo = [p for p in plans if case in cases_of(p, cases)
                and not (cache_dir(work, p, quick) / f"{case.name}.y.npy").is_file()]
        if not todo:
            continue
        t0 = time.time()
        phantom = make_phantom(seed=case.seed, fov=case.fov, pet_unit=case.pet_unit, **acquisition(case, quick=quick))
        ct = sitk.Cast(sitk.Round(phantom.ct), sitk.sitkInt16)  # as write_case stores it and io reads it
        hnseg_case = Case(ct, phantom.pet, Path(f"{case.name}_ct.mha"), Path(f"{case.name}_pet.mha"),
                          detect_pet_unit(phantom.pet))
        rng = np.random.default_rng([case.seed, 77])
        rois = _reference_rois(phantom, hnseg_case, rng, quick=quick)
        for plan in todo:
            box = rois[plan.stage]
            grid = model_grid(plan, box, hnseg_case.ct_grid)
            x = build_input(hnseg_case, grid, plan)
            if plan.stage == "localise_head":
                y = _head_neck_zyx(phantom, grid, hnseg_case.ct_grid).astype(np.uint8)
            else:
                y = sample_labels(phantom.label, grid)
            folder = cache_dir(work, plan, quick)
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / f"{case.name}.x.npy", _network_order(x.astype(np.float32), plan.transpose_forward))
            np.save(folder / f"{case.name}.y.npy", _network_order(y.astype(np.uint8), plan.transpose_forward))
        log(f"case {number + 1}/{len(cases)} {case.name}: {', '.join(p.name for p in todo)} in "
            f"{time.time() - t0:.1f} s (PET unit detected: {hnseg_case.pet_unit.unit})")
    log(f"cases ready in {time.time() - started:.0f} s")


def _head_neck_zyx(phantom, grid: Grid, ct_grid: Grid) -> np.ndarray:
    """The localiser's target: the phantom's head and neck shapes, where the CT shows them."""
    return phantom.region_zyx(grid, ("head", "neck")) & _ct_coverage_zyx(grid, ct_grid)


def _reference_rois(phantom, case: Case, rng: np.random.Generator, *, quick: bool) -> dict[str, Box]:
    """The ROI box of each stage as the pipeline computes it from perfect labels of the stage before, jittered:
    ct_top; labels_bbox of the reference head and neck on the localiser's grid (faces ±COARSE_JITTER_MM);
    labels_centroid_cube of the reference lesions on the coarse grid (centre ±FINE_JITTER_MM)."""
    plans = {p.stage: p for p in model_plans().values()}
    if quick:
        plans = {stage: quick_plan(p) for stage, p in plans.items()}
    images = {"ct": case.ct, "pet": case.pet, "suv_per_stored_value": case.pet_unit.suv_per_stored_value}
    (_, loc_roi, _), (_, coarse_roi, _), (_, fine_roi, _) = STAGES
    loc_box = locate_roi(loc_roi["method"], params=loc_roi["params"], **images).box
    loc_grid = model_grid(plans["localise_head"], loc_box, case.ct_grid)
    head_neck = _head_neck_zyx(phantom, loc_grid, case.ct_grid)
    coarse_box = locate_roi(coarse_roi["method"], params=coarse_roi["params"],
                            previous=StageLabels("localise_head", head_neck, loc_grid, loc_box), **images).box
    coarse_box = _jitter_box(coarse_box, rng, faces_mm=COARSE_JITTER_MM)
    coarse_grid = model_grid(plans["coarse"], coarse_box, case.ct_grid)
    lesions = sample_labels(phantom.label, coarse_grid)
    fine_box = locate_roi(fine_roi["method"], params=fine_roi["params"],
                          previous=StageLabels("coarse", lesions, coarse_grid, coarse_box), **images).box
    return {"localise_head": loc_box, "coarse": coarse_box,
            "fine": _jitter_box(fine_box, rng, shift_mm=FINE_JITTER_MM)}


def cases_of(plan: ModelPlan, cases: list[TrainingCase]) -> list[TrainingCase]:
    return cases if plan.max_cases is None else cases[: plan.max_cases]


# --------------------------------------------------------------------------------------------------- the training

class Patches:
    """Random training patches of one model's cached cases: a fraction centred near labelled voxels (a label
    present in the case drawn uniformly, so small node labels get as many patches as the tumour), the rest
    anywhere; random left-right flips."""

    def __init__(self, folder: Path, names: list[str], plan: ModelPlan, rng: np.random.Generator):
        self.plan, self.rng = plan, rng
        self.x = [np.load(folder / f"{n}.x.npy", mmap_mode="r") for n in names]
        self.y = [np.load(folder / f"{n}.y.npy") for n in names]
        self.foreground = []
        for y in self.y:
            per_label = {}
            for label in plan.labels[1:]:
                where = np.argwhere(y == label)
                if len(where):
                    per_label[label] = where[rng.choice(len(where), min(len(where), 4000), replace=False)]
            self.foreground.append(per_label)

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for _ in range(self.plan.batch_size):
            i = int(self.rng.integers(len(self.x)))
            x, y = self._crop(i, self.rng.uniform() < self.plan.foreground_fraction)
            for axis in self.plan.flip_axes:
                if self.rng.uniform() < 0.5:
                    x, y = np.flip(x, axis + 1), np.flip(y, axis)
            xs.append(np.ascontiguousarray(x))
            ys.append(np.ascontiguousarray(y))
        return np.stack(xs), np.stack(ys)

    def _crop(self, i: int, near_foreground: bool) -> tuple[np.ndarray, np.ndarray]:
        x, y, patch = self.x[i], self.y[i], np.asarray(self.plan.patch)
        shape = np.asarray(y.shape)
        span = np.maximum(shape - patch, 0)
        if near_foreground and self.foreground[i]:
            labels = sorted(self.foreground[i])
            points = self.foreground[i][labels[int(self.rng.integers(len(labels)))]]
            voxel = points[int(self.rng.integers(len(points)))]
            lo = np.clip(voxel - self.rng.integers(0, patch), 0, span)
        else:
            lo = np.array([self.rng.integers(0, s + 1) for s in span])
        region = tuple(slice(int(a), int(a + p)) for a, p in zip(lo, patch))
        xp, yp = np.asarray(x[(slice(None), *region)], np.float32), y[region]
        if np.any(np.asarray(yp.shape) < patch):  # a grid smaller than the patch: zeros, as the window pads
            pad = [(0, int(p - s)) for s, p in zip(yp.shape, patch)]
            xp, yp = np.pad(xp, [(0, 0)] + pad), np.pad(yp, pad)
        return xp, yp


def dice_ce_loss(logits, target, n_classes: int):
    """Cross-entropy + (1 − soft Dice of the foreground labels over the batch), nnU-Net's DC_and_CE with batch
    Dice."""
    import torch
    import torch.nn.functional as F

    ce = F.cross_entropy(logits, target)
    probabilities = torch.softmax(logits, 1)
    onehot = F.one_hot(target, n_classes).permute(0, 4, 1, 2, 3).to(probabilities.dtype)
    dims = (0, 2, 3, 4)
    intersection = (probabilities * onehot).sum(dims)
    dice = (2 * intersection + 1e-5) / (probabilities.sum(dims) + onehot.sum(dims) + 1e-5)
    return ce + 1.0 - dice[1:].mean()


def deep_supervision_loss(outputs, target, n_classes: int, *, drop_lowest: bool):
    """Weighted sum over the outputs (full resolution first), weights 1/2^k normalised; nnU-Net gives the lowest
    resolution weight 0 (`drop_lowest`). The target is resampled to each output by nearest neighbour."""
    import torch.nn.functional as F

    weights = np.array([1 / 2 ** k for k in range(len(outputs))])
    if drop_lowest and len(outputs) > 1:
        weights[-1] = 0
    weights /= weights.sum()
    total = 0.0
    for weight, output in zip(weights, outputs):
        if weight == 0:
            continue
        scaled = target if output.shape[2:] == target.shape[1:] else F.interpolate(
            target[:, None].float(), size=output.shape[2:], mode="nearest")[:, 0].long()
        total = total + float(weight) * dice_ce_loss(output, scaled, n_classes)
    return total


def train(plan: ModelPlan, network, patches: Patches, *, iterations: int, seed: int, max_minutes: float, log) -> dict:
    """Adam with a poly learning-rate decay; returns the training log (loss every 10 iterations, times)."""
    import torch

    torch.manual_seed(seed)
    # channels-last: oneDNN's 3-D convolutions (and above all their backward pass) run ~5x faster on a CPU so
    network = network.to(memory_format=torch.channels_last_3d)
    network.train()
    optimiser = torch.optim.AdamW(network.parameters(), lr=plan.learning_rate, weight_decay=3e-5)
    history, window, started = [], [], time.time()
    n_classes = len(plan.labels)
    for iteration in range(iterations):
        for group in optimiser.param_groups:
            group["lr"] = plan.learning_rate * (1 - iteration / iterations) ** 0.9
        x, y = patches.batch()
        outputs = network(torch.from_numpy(x).contiguous(memory_format=torch.channels_last_3d))
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        loss = deep_supervision_loss(outputs, torch.from_numpy(y).long(), n_classes,
                                     drop_lowest=plan.route == "nnunet")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
        optimiser.step()
        window.append(loss.item())
        elapsed = time.time() - started
        if (iteration + 1) % 10 == 0 or iteration + 1 == iterations:
            history.append({"iteration": iteration + 1, "loss": round(float(np.mean(window)), 4),
                            "seconds": round(elapsed, 1)})
            window = []
            if (iteration + 1) % 50 == 0 or iteration + 1 == iterations:
                log(f"{plan.name}: iteration {iteration + 1}/{iterations}, loss {history[-1]['loss']:.4f}, "
                    f"{elapsed:.0f} s ({elapsed / (iteration + 1):.2f} s/iteration)")
        if elapsed > max_minutes * 60 and iteration + 1 < iterations:
            log(f"{plan.name}: stopped at iteration {iteration + 1}/{iterations}: the time limit of {max_minutes} min "
                f"was reached (the run is not reproducible iteration for iteration)")
            break
    network.eval()
    return {"iterations_planned": iterations, "iterations_done": iteration + 1, "seconds": round(time.time() - started, 1),
            "final_loss": history[-1]["loss"] if history else None, "history": history}


# -------------------------------------------------------------------------------------------- native formats

def nnunet_plans(plan: ModelPlan) -> tuple[dict, dict]:
    from hnseg_export import nnunet_results

    n = len(plan.features)
    network_kwargs = nnunet_results.arch_kwargs(
        architecture=plan.architecture, features=plan.features, kernel_sizes=[[3, 3, 3]] * n,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * (n - 1), blocks_per_stage=plan.blocks)
    spacing_zyx = list(plan.spacing_xyz_mm[::-1])
    plans = nnunet_results.plans_dict(dataset_name=_dataset_name(plan), architecture=plan.architecture,
                                      network_kwargs=network_kwargs, patch_size=plan.patch, spacing=spacing_zyx,
                                      normalization=["NoNormalization"] * len(plan.sources),
                                      batch_size=plan.batch_size, median_shape=list(plan.patch))
    labels = ({"background": 0, "head_neck": 1} if plan.labels == (0, 1)
              else {"background": 0, "GTVp": 1, "GTVn": 2})
    dataset = nnunet_results.dataset_dict(channel_names=plan.channel_names, labels=labels)
    return plans, dataset


def _dataset_name(plan: ModelPlan) -> str:
    number = {"localise_head": 961, "coarse": 962, "fine_nnunet": 963}[plan.name]
    return f"Dataset{number}_DemoHN{''.join(w.capitalize() for w in plan.name.split('_'))}"


def monai_config(plan: ModelPlan, bundle_root: Path) -> dict:
    """An Auto3DSeg segresnet hyper_parameters config, resolved as Segmenter saves it in model.pt; what
    hnseg_export.from_monai.read_auto3dseg reads: the network, roi_size, RAS, resampling to 1 mm, CT "range"
    (intensity_bounds = CT_WINDOW) and the PET as an extra modality with normalize_mode "pet", the window."""
    roi_size = list(plan.patch)  # MONAI's x, y, z
    return {
        "bundle_root": str(bundle_root), "ckpt_path": "$@bundle_root + '/model'", "modality": "ct", "fold": 0,
        "input_channels": len(plan.sources), "output_classes": len(plan.labels), "class_names": None,
        "class_index": None, "roi_size": roi_size, "orientation_ras": True, "crop_foreground": False,
        "resample": True, "resample_resolution": list(plan.spacing_xyz_mm), "normalize_mode": "range",
        "intensity_bounds": [CT_WINDOW["min"], CT_WINDOW["max"]], "extra_modalities": {"image2": "pet"},
        "sigmoid": False, "cache_image_int16": False, "learning_rate": plan.learning_rate,
        "num_images_per_batch": plan.batch_size,
        "network": {"_target_": "SegResNetDS", "init_filters": plan.features[0], "blocks_down": list(plan.blocks),
                    "norm": "INSTANCE", "in_channels": len(plan.sources), "out_channels": len(plan.labels),
                    "dsdepth": 3},
        "sliding_inferrer": {"_target_": "SlidingWindowInfererAdapt", "roi_size": roi_size, "sw_batch_size": 1,
                             "overlap": 0.5, "mode": "gaussian"},
    }


def build_network(plan: ModelPlan, work: Path):
    """The network as its framework builds it for training (deep supervision on)."""
    if plan.route == "nnunet":
        from hnseg_export import nnunet_results

        plans, dataset = nnunet_plans(plan)
        return nnunet_results.build_network(plans, dataset, deep_supervision=True)
    from monai.networks.nets import SegResNetDS

    kwargs = {k: v for k, v in monai_config(plan, work)["network"].items() if k != "_target_"}
    return SegResNetDS(**kwargs)


def save_native(plan: ModelPlan, network, work: Path, training_log: dict) -> Path:
    """nnU-Net: the trained model folder; MONAI: an Auto3DSeg fold checkpoint (model.pt). Returns what the
    exporter takes."""
    import torch

    state = {k: v.detach().contiguous().clone() for k, v in network.state_dict().items()}  # standard layout
    log_record = {k: v for k, v in training_log.items() if k != "history"}
    if plan.route == "nnunet":
        from hnseg_export import nnunet_results

        plans, dataset = nnunet_plans(plan)
        folder = nnunet_results.results_folder(work / "native" / "nnunet", _dataset_name(plan))
        if folder.exists():
            shutil.rmtree(folder)
        return nnunet_results.write_results_folder(folder, plans=plans, dataset=dataset, fold_weights={0: state},
                                                   mirror_axes=plan.flip_axes,
                                                   current_epoch=training_log["iterations_done"],
                                                   extra={"hnseg_training": log_record})
    bundle = work / "native" / "monai" / "segresnetds_0"
    path = bundle / "model" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "config": monai_config(plan, bundle),
                "epoch": training_log["iterations_done"], "best_metric": -float(training_log["final_loss"] or 0)},
               path)
    return path


def native_source(plan: ModelPlan, work: Path) -> Path:
    if plan.route == "nnunet":
        from hnseg_export import nnunet_results

        return nnunet_results.results_folder(work / "native" / "nnunet", _dataset_name(plan))
    return work / "native" / "monai" / "segresnetds_0" / "model" / "model.pt"


# ---------------------------------------------------------------------------------------------------- export

def _to_onnx_main():
    spec = importlib.util.spec_from_file_location("hnseg_to_onnx", ROOT / "export" / "to_onnx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def export(plan: ModelPlan, work: Path, log) -> Path:
    """export/to_onnx.py on the native model; its weights folder under work/export/<name>."""
    out = work / "export" / plan.name
    out.parent.mkdir(parents=True, exist_ok=True)
    source = native_source(plan, work)
    if plan.route == "nnunet":
        argv = ["nnunet", str(source), "--folds", "0", "--channel-sources", *plan.sources,
                "--channel-ops", json.dumps([list(ops) for ops in plan.ops])]
    else:
        argv = ["monai", str(source), "--channel-sources", *plan.sources]
    argv += ["--name", plan.name, "--out", str(out), "--overwrite"]
    started = time.time()
    if _to_onnx_main()(argv) != 0:
        raise SystemExit(f"export of {plan.name} failed: export/to_onnx.py {' '.join(argv)}")
    _check_recipe_matches(plan, out)
    log(f"{plan.name}: exported in {time.time() - started:.0f} s → {out}")
    return out


def _check_recipe_matches(plan: ModelPlan, folder: Path) -> None:
    """The exported recipe must feed the model exactly as it was trained: grid and channels."""
    (spec,) = load_recipe(folder).models
    want = {"spacing_xyz_mm": tuple(plan.spacing_xyz_mm), "orientation": plan.orientation,
            "grid_spacing": plan.grid_spacing, "transpose_forward": tuple(plan.transpose_forward),
            "patch_size_zyx": tuple(plan.patch), "head": tuple(plan.labels),
            "resampling": (plan.resampling, plan.pet_to_ct)}
    got = {"spacing_xyz_mm": tuple(spec.grid.spacing_xyz_mm), "orientation": spec.grid.orientation,
           "grid_spacing": spec.grid.grid_spacing, "transpose_forward": tuple(spec.grid.transpose_forward),
           "patch_size_zyx": tuple(spec.tiling.patch_size_zyx), "head": tuple(spec.head.labels),
           "resampling": (spec.grid.resampling, spec.grid.pet_to_ct)}
    differ = [f"{key}: trained {want[key]}, recipe {got[key]}" for key in want
              if (not np.allclose(want[key], got[key], rtol=0, atol=1e-9) if key == "spacing_xyz_mm"
                  else want[key] != got[key])]
    if len(spec.channels) != len(plan.channels):
        differ.append(f"channels: trained {len(plan.channels)}, recipe {len(spec.channels)}")
    for k, (trained, exported) in enumerate(zip(plan.channels, spec.channels)):
        if (trained.source, trained.interpolation, trained.ops_before_sampling) != (
                exported.source, exported.interpolation, exported.ops_before_sampling) \
                or not _same_ops([op.to_json() for op in trained.ops], [op.to_json() for op in exported.ops]):
            differ.append(f"channel {k}: trained {trained}, recipe {exported}")
    if differ:
        raise SystemExit(f"{folder / 'recipe.json'} does not feed {plan.name} as it was trained: " + "; ".join(differ))


def _same_ops(a, b) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if set(x) != set(y):
            return False
        for key in x:
            u, v = x[key], y[key]
            if isinstance(u, str) or isinstance(v, str):
                if u != v:
                    return False
            elif not np.allclose(np.asarray(u, float), np.asarray(v, float), rtol=1e-9, atol=1e-12):
                return False
    return True


def assemble(plans: dict[str, ModelPlan], work: Path, out: Path, log) -> Path:
    """weights/demo: each model's ONNX file(s) renamed <model>_<file>, and one recipe with the three stages."""
    stages = []
    staging = out.parent / f".{out.name}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for stage, roi, postprocess in STAGES:
        entries = []
        for plan in (p for p in plans.values() if p.stage == stage):
            folder = work / "export" / plan.name
            exported = json.loads((folder / "recipe.json").read_text())
            (entry,) = exported["models"]
            renamed = {f: f"{plan.name}_{f}" for f in entry["files"]}
            for old, new in renamed.items():
                shutil.copyfile(folder / old, staging / new)
            entry = {**entry, **dict(plan.inference), "name": plan.name, "files": [renamed[f] for f in entry["files"]],
                     "weight": 1.0}
            proof = entry.get("provenance", {}).get("proof")
            if isinstance(proof, dict):
                entry["provenance"]["proof"] = {renamed.get(k, k): v for k, v in proof.items()}
            entries.append(entry)
        stages.append({"name": stage, "roi": roi, "models": entries, "postprocess": postprocess})
    recipe = {"schema_version": 1, "name": "demo-cascade",
              "description": "Demo cascade after SJTU_lab426 (HECKTOR 2025): head localiser (nnU-Net, CT), coarse "
                             "GTVp/GTVn (nnU-Net, CT+PET, 2 mm), fine ensemble in a 144 mm cube (nnU-Net ResEnc on "
                             "x, x², x^(1/3), PET + MONAI SegResNetDS), tiny networks trained on synthetic phantoms "
                             "by export/train_demo.py: a demonstration, not a clinical model",
              "stages": stages}
    (staging / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    load_recipe(staging)  # the runtime's own validation
    if out.exists():
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    log(f"assembled {out}: " + ", ".join(f"{n} {s / 1e6:.2f} MB" for n, s in sizes.items()))
    return out


# ------------------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    plans = model_plans()
    parser.add_argument("--out", type=Path, default=ROOT / "weights" / "demo", help="the weights folder to write")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hnseg-train"),
                        help="caches, native model folders, exports and logs (default /tmp/hnseg-train)")
    parser.add_argument("--models", nargs="*", choices=list(plans), default=list(plans),
                        help="train and export only these; the others are taken from --work as an earlier run left "
                             "them (default: all four; none: only assemble --out from --work)")
    parser.add_argument("--cases", type=int, default=40, help="training phantoms (default 40; seeds from 1000)")
    parser.add_argument("--iterations", type=int, default=None, help="iterations for every trained model")
    parser.add_argument("--iteration-scale", type=float, default=1.0, help="multiply each model's iterations")
    parser.add_argument("--max-minutes", type=float, default=22.0,
                        help="stop a model's training after this many minutes (default 22)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (default 2; on a machine shared with other jobs 1 is often several "
                             "times faster: oneDNN's threads wait for each other)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 small phantoms, coarse grids, 2 iterations per model (for tests)")
    parser.add_argument("--no-assemble", action="store_true", help="train and export only; leave --out alone")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    work = args.work
    (work / "logs").mkdir(parents=True, exist_ok=True)
    log_file = (work / "logs" / "train_demo.log").open("a")

    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    if args.quick:
        plans = {name: quick_plan(plan) for name, plan in plans.items()}
    n_cases = 2 if args.quick else args.cases
    cases = training_cases(n_cases)
    selected = [plans[name] for name in args.models]
    log(f"train_demo: {len(cases)} cases, models {[p.name for p in selected]}, work {work}, quick {args.quick}")
    prepare_cases(cases, selected, work, quick=args.quick, log=log)

    summary = {}
    for plan in selected:
        iterations = args.iterations or max(1, round(plan.iterations * args.iteration_scale))
        names = [c.name for c in cases_of(plan, cases)]
        seed = 4242 + list(plans).index(plan.name)  # the same whichever models are selected
        patches = Patches(cache_dir(work, plan, args.quick), names, plan, np.random.default_rng(seed))
        torch.manual_seed(seed)
        network = build_network(plan, work)
        n_parameters = sum(p.numel() for p in network.parameters())
        log(f"{plan.name}: {plan.architecture} {n_parameters} parameters, patch {plan.patch}, batch "
            f"{plan.batch_size}, {len(names)} cases, {iterations} iterations")
        training_log = train(plan, network, patches, iterations=iterations, seed=seed,
                             max_minutes=args.max_minutes, log=log)
        training_log.update(parameters=n_parameters, cases=names)
        (work / "logs" / f"{plan.name}.json").write_text(json.dumps(training_log, indent=1))
        save_native(plan, network, work, training_log)
        export(plan, work, log)
        summary[plan.name] = {k: training_log[k] for k in ("iterations_done", "seconds", "final_loss", "parameters")}

    summary_path = work / "logs" / "summary.json"  # merged with the models of earlier runs in this work folder
    merged = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary_path.write_text(json.dumps({**merged, **summary}, indent=1))
    for name, record in summary.items():
        log(f"{name}: {record['iterations_done']} iterations in {record['seconds']:.0f} s, final loss "
            f"{record['final_loss']}, {record['parameters']} parameters")
    if args.no_assemble:
        return 0
    missing = [name for name in plans if not (work / "export" / name / "recipe.json").is_file()]
    if missing:
        log(f"not assembling {args.out}: no export of {missing} in {work / 'export'} (train them with --models)")
        return 1
    assemble(plans, work, args.out, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
