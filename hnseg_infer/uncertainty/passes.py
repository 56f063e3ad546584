"""Uncertainty maps (HN-UISeg): N stochastic passes over the last stage's models → mean class probabilities and
voxel-wise predictive entropy on the CT grid, and the mean entropy inside each predicted lesion.

Each pass draws one test-time augmentation (tta.py) and, with a dropout rate > 0, runs every fold's stochastic
twin (inference/stochastic.py) with dropout active; the pass's probabilities are brought back onto the model grid by the
augmentation's inverse and averaged over the passes. The mean is ensembled over the models (their recipe weights)
on the CT voxels inside the ROI box, as the mask's probabilities are; the entropy −Σₖ p̄ₖ log p̄ₖ (natural log, over
background, GTVp, GTVn) is computed there, in [0, log 3]. Outside the ROI: certain background (p = 1, 0, 0;
entropy 0). Mirroring is off in these passes (each pass's own augmentation replaces it). The mask itself stays
the recipe's deterministic prediction.

Determinism: every random draw comes from numpy's SeedSequence keyed by (seed, pass, ...) and the dropout masks
from integer arithmetic on per-tile seeds, so one seed gives bit-identical maps on a given machine and provider.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import cc3d
import numpy as np

from hnseg_infer.channels.build import build_input, model_grid
from hnseg_infer.errors import OutputError, RecipeError
from hnseg_infer.geometry.grid import Grid
from hnseg_infer.inference.anytime import Planner, n_tiles
from hnseg_infer.inference.runner import LoadedModel
from hnseg_infer.inference.stochastic import tile_seed
from hnseg_infer.io.images import Case, write_image_atomic
from hnseg_infer.labels import LABEL_NAMES, LABELS
from hnseg_infer.report import RunReport
from hnseg_infer.restore.ensemble import Ensemble
from hnseg_infer.uncertainty import tta
from hnseg_infer.uncertainty.config import UncertaintyConfig

FILES = {"probabilities_gtvp.mha": ("probability", 1), "probabilities_gtvn.mha": ("probability", 2),
         "entropy.mha": ("entropy", None)}
MAX_ENTROPY = math.log(len(LABELS))
IMAGE_SOURCES = ("ct", "pet")


@dataclass(frozen=True)
class UncertaintyOptions:
    """What the caller asks for beyond the recipe's block: another seed or number of passes."""

    seed: int | None = None
    passes: int | None = None


@dataclass
class UncertaintyMaps:
    """Mean probabilities per label (0, 1, 2) and the entropy, float32 on the CT voxels inside the ROI box."""

    probabilities: list[np.ndarray]
    entropy: np.ndarray
    roi_slices_zyx: tuple[slice, slice, slice]
    record: dict


def resolve(recipe, options: UncertaintyOptions) -> UncertaintyConfig:
    """The recipe's block with the caller's overrides; RecipeError when the recipe has none."""
    config = recipe.uncertainty
    if config is None:
        raise RecipeError(f"recipe {recipe.path} ({recipe.name!r}) has no 'uncertainty' block, so it cannot make "
                          f"uncertainty maps: export the model with export/to_onnx.py torch --uncertainty, or add "
                          f"the block (passes, dropout_rate, seed, augmentations) to the recipe")
    if options.passes is not None and not (isinstance(options.passes, int) and options.passes >= 1):
        raise RecipeError(f"the number of uncertainty passes must be an integer >= 1, got {options.passes!r}")
    if options.seed is not None and not (isinstance(options.seed, int) and options.seed >= 0):
        raise RecipeError(f"the uncertainty seed must be a non-negative integer, got {options.seed!r}")
    return replace(config, seed=config.seed if options.seed is None else options.seed,
                   passes=config.passes if options.passes is None else options.passes)


def estimate(case: Case, stage, config: UncertaintyConfig, *, roi_box, roi_grid: Grid, roi_slices_zyx, models: dict,
             ensemble: Ensemble, report: RunReport, clicks=None, planner: Planner | None = None
             ) -> UncertaintyMaps | None:
    """Run the passes over `stage`'s models and return the maps on `roi_grid` (the CT voxels in the ROI box).
    `models`: the loaded models by name (inference/runner.py; their plain folds run when the dropout rate is 0);
    `ensemble`: the stage's, so that the maps' probabilities are restored as the mask's are. Under the case's time
    budget (`planner`) a pass runs only if it fits before the budget less its reserve, the mask's writing: None
    when not even the first one did."""
    loaded = [models[spec.name] for spec in stage.models]
    if config.dropout_rate > 0:
        _load_stochastic(loaded, report)
    grids = [model_grid(spec, roi_box, case.ct_grid) for spec in stage.models]
    totals = [None] * len(stage.models)
    draws, durations, first_pass_s = [], [], _first_pass_s(planner, stage, grids)
    for p in range(config.passes):
        if why := _no_time_for(p, durations, config, report, planner, first_pass_s=first_pass_s):
            report.fallback(f"uncertainty: ran {p} of {config.passes} passes: {why}")
            if p == 0:
                report.warn(f"uncertainty maps not made: {why}")
                return None
            break
        start = time.perf_counter()
        draw = tta.draw(config.augmentations, np.random.default_rng([config.seed, p]))
        draws.append({"pass": p, **draw.to_dict()})
        for m, (model, grid) in enumerate(zip(loaded, grids)):
            runs = None if config.dropout_rate == 0 else [
                twin.bind(config.dropout_rate, _seeds(config.seed, p, m, f))
                for f, twin in enumerate(model.stochastic())]
            probabilities = _one_pass(case, model, grid, draw, runs, clicks=clicks,
                                      noise_rng=np.random.default_rng([config.seed, p, m, 1]))
            totals[m] = probabilities if totals[m] is None else np.add(totals[m], probabilities, out=totals[m])
        durations.append(time.perf_counter() - start)
    n_passes = len(durations)
    members = [ensemble.member(model.spec, total / np.float32(n_passes), grid)
               for model, total, grid in zip(loaded, totals, grids)]
    probabilities = ensemble.probabilities(members, roi_grid)
    record = {"passes": n_passes, "passes_requested": config.passes, "seed": config.seed,
              "dropout_rate": config.dropout_rate, "augmentations_allowed": config.augmentations.to_dict(),
              "augmentations": draws, "stage": stage.name, "models": [spec.name for spec in stage.models],
              "mirroring": "off in the stochastic passes", "pass_s": [round(d, 3) for d in durations],
              "entropy": "natural log over background, GTVp, GTVn", "max_entropy": round(MAX_ENTROPY, 6)}
    if config.dropout_rate > 0:
        record["stochastic_files"] = {spec.name: dict(zip((f.name for f in spec.stochastic_files),
                                                          spec.stochastic_sha256)) for spec in stage.models}
    return UncertaintyMaps(probabilities, predictive_entropy(probabilities), roi_slices_zyx, record)


def _first_pass_s(planner: Planner | None, stage, grids) -> float | None:
    """A pass's predicted seconds: each model's measured seconds per tile (this run's) times its tiles, one fold."""
    costs = [planner.costs.get(spec.name) for spec in stage.models] if planner is not None else [None]
    if None in costs:
        return None
    return sum(cost * n_tiles(spec, grid.size_zyx) for cost, spec, grid in zip(costs, stage.models, grids))


def _no_time_for(p: int, durations: list[float], config: UncertaintyConfig, report: RunReport,
                 planner: Planner | None, *, first_pass_s: float | None) -> str | None:
    """Why pass `p` should not start (None: it may): the recipe's time_budget_s (from the case's start; the first
    pass always runs under it) or the case's time budget."""
    predicted = float(np.mean(durations)) if durations else first_pass_s
    if p and config.time_budget_s is not None and time.time() + predicted > report.started + config.time_budget_s:
        return f"another pass (~{predicted:.1f} s) would end past the recipe's time_budget_s {config.time_budget_s:g} s"
    if planner is not None and not planner.fits(predicted, last_stage=True):
        cost = "" if predicted is None else f" (~{predicted:.1f} s)"
        return (f"{'another' if p else 'a'} pass{cost} would end past the time budget of {planner.deadline.budget_s:g} "
                f"s less its reserve of {planner.reserve_s:g} s, {planner.deadline.left_s():.1f} s being left")
    return None


def _seeds(seed: int, p: int, m: int, f: int):
    return lambda n: tile_seed(seed, p, m, f, n)


def _load_stochastic(loaded: list[LoadedModel], report: RunReport) -> None:
    """The stochastic twins, opened on the first uncertainty run of this Segmenter and kept for the next cases."""
    with report.stage("uncertainty: load_stochastic_models"):
        twins = [twin for model in loaded for twin in model.stochastic()]
    for line in sorted({line for twin in twins for line in twin.fallbacks}):
        report.fallback(line)


def _one_pass(case: Case, model: LoadedModel, grid: Grid, draw: tta.Draw, runs, *, clicks,
              noise_rng) -> np.ndarray:
    """One model's fold-averaged head probabilities [K, z, y, x] on `grid` for one pass: the augmentation, the
    network (stochastic twins `runs`, or the plain folds; no mirroring), the inverse augmentation."""
    spec = model.spec
    pass_grid = tta.rotated_grid(grid, axis_zyx=draw.axis_zyx, degrees=draw.degrees) if draw.kind == "rotation" \
        else grid
    image = build_input(case, pass_grid, spec, clicks=clicks)
    if draw.kind == "noise":
        tta.add_noise(image, image_channels=[c for c, ch in enumerate(spec.channels) if ch.source in IMAGE_SOURCES],
                      std_fraction=draw.noise_std, rng=noise_rng)
    elif draw.kind == "flip":
        image = tta.flip(image, draw.axis_zyx)
    probabilities = model.probabilities(image, runs=runs, mirror=False)
    del image
    if draw.kind == "flip":
        return tta.flip(probabilities, draw.axis_zyx)
    if draw.kind == "rotation":
        fills = [1.0 if label == 0 else 0.0 for label in spec.head.labels]
        return tta.resample_back(probabilities, source=pass_grid, target=grid, fill_values=fills)
    return probabilities


def predictive_entropy(probabilities: list[np.ndarray]) -> np.ndarray:
    """−Σₖ pₖ log pₖ (0 log 0 = 0), float32, clipped to [0, log K] against rounding."""
    entropy = np.zeros(probabilities[0].shape, np.float64)
    for p in probabilities:
        p = np.clip(p, 0.0, 1.0).astype(np.float64)
        entropy -= p * np.log(np.maximum(p, 1e-30))
    return np.clip(entropy, 0.0, np.float32(math.log(len(probabilities)))).astype(np.float32)


def summarise(maps: UncertaintyMaps, labels_zyx: np.ndarray, *, spacing_xyz_mm) -> dict:
    """The report's uncertainty entry: the run's record, mean entropy over the ROI and inside each label, and one
    line per predicted lesion (26-connected component of the post-processed labels)."""
    voxel_ml = float(np.prod(spacing_xyz_mm)) / 1000
    entropy = maps.entropy
    summary = {**maps.record, "mean_entropy": {"roi": _mean(entropy, np.ones(entropy.shape, bool))}, "lesions": []}
    for label, name in LABEL_NAMES.items():
        mask = labels_zyx == label
        summary["mean_entropy"][name] = _mean(entropy, mask)
        if not mask.any():
            continue
        components = cc3d.connected_components(mask, connectivity=26)
        for component in range(1, int(components.max()) + 1):
            inside = components == component
            summary["lesions"].append({"label": name, "component": component, "voxels": int(inside.sum()),
                                       "volume_ml": round(int(inside.sum()) * voxel_ml, 3),
                                       "mean_entropy": _mean(entropy, inside),
                                       "mean_probability": _mean(maps.probabilities[label], inside)})
    return summary


def _mean(values: np.ndarray, mask: np.ndarray) -> float | None:
    return round(float(values[mask].mean()), 6) if mask.any() else None


def write_maps(maps: UncertaintyMaps, ct_grid: Grid, out_dir: Path) -> dict[str, str]:
    """DIR/probabilities_gtvp.mha, probabilities_gtvn.mha and entropy.mha: float32 on exactly the CT grid, one
    at a time (each CT-sized canvas is freed before the next). Returns {file name: path}."""
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create the uncertainty folder {out_dir} ({error.strerror}): pass a writable "
                          f"--uncertainty DIR") from error
    written = {}
    for name, (kind, label) in FILES.items():
        canvas = np.zeros(ct_grid.size_zyx, np.float32)  # outside the ROI: p(GTV) = 0, entropy 0
        canvas[maps.roi_slices_zyx] = maps.probabilities[label] if kind == "probability" else maps.entropy
        path = Path(out_dir) / name
        write_image_atomic(ct_grid.image_from_array(canvas), path)
        written[name] = str(path)
        del canvas
    return written
