"""The library API: one PET/CT case in, a validated mask on the exact CT grid out, with its run report.

read → validate → per stage of the recipe: locate its ROI (from the images, or from the labels of the stage before)
→ per model: grid, channels, sliding window, folds → ensemble. The last stage's ensemble is decoded on the CT voxels
inside its ROI (one output channel at a time) → post-process → paste into the CT grid → validate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hnseg_infer.channels.clicks import Clicks, check_before_run, check_landed
from hnseg_infer.errors import InputError, MissingPetError, RecipeError
from hnseg_infer.io.images import Case, load_case, validate_mask
from hnseg_infer.restore.paste_back import ModelLabels, crop_record, decode_on_model_grid, paste_nearest
from hnseg_infer.restore.postprocess import postprocess
from hnseg_infer.channels.build import build_input, harmonisation_notes, load_folds, model_grid, predict_probabilities
from hnseg_infer.recipe.load import Recipe, StageSpec
from hnseg_infer.report import RunReport, label_volumes
from hnseg_infer.restore.ensemble import Member, OutputSpace, paste
from hnseg_infer.roi.locate import StageLabels, locate_roi
from hnseg_infer.uncertainty.passes import UncertaintyMaps, UncertaintyOptions, estimate, resolve, summarise


@dataclass
class Prediction:
    mask: sitk.Image
    report: RunReport
    case: Case  # the inputs, for pictures drawn afterwards
    model_labels: ModelLabels | None = None  # restore paste_nearest: the labels on the model grid (for the sidecar)
    uncertainty: UncertaintyMaps | None = None  # when asked for: mean probabilities and entropy in the ROI


def predict_case(case: Case, recipe: Recipe, *, device: str = "auto", report: RunReport | None = None,
                 ct_only_reason: str | None = None, clicks: Clicks | None = None,
                 uncertainty: UncertaintyOptions | None = None) -> Prediction:
    """Run the recipe on a validated case. Raises HnsegError subclasses on bad input, recipe or model.
    A case without PET runs in CT-only mode (the recipe must allow it); `ct_only_reason` says why, for the report."""
    report = report or RunReport()
    if case.ct_only and not recipe.pet_optional:
        raise RecipeError(f"recipe {recipe.name!r} ({recipe.path}) needs PET (it does not set \"pet_optional\": "
                          f"true) but case {case.ct_path} has none: give its PET image")
    config = resolve(recipe, uncertainty) if uncertainty is not None else None  # clicks, uncertainty: refused early
    if clicks is not None:
        report.set("clicks", check_before_run(clicks, recipe, ct_grid=case.ct_grid, ct_path=case.ct_path))
    _record_inputs(case, recipe, report, ct_only_reason)
    folds = _load_models(recipe, device, report)

    previous = None
    for index, stage in enumerate(recipe.stages):
        prefix = f"{stage.name}: " if len(recipe.stages) > 1 else ""
        roi = _locate(case, stage, previous, report, prefix)
        members = _run_models(case, stage, folds, roi.box, report, prefix, clicks=clicks)
        if index < len(recipe.stages) - 1:
            previous = _stage_labels(stage, members, roi.box, report, prefix)
            del members
    if clicks is not None:
        check_landed(clicks)

    labels_zyx, roi_grid, roi_slices_zyx, model_labels = _restore_to_ct(case, stage, roi, members, report)
    del members
    with report.stage("postprocess"):
        labels_zyx, post_record = postprocess(labels_zyx, spacing_xyz_mm=case.ct_grid.spacing_xyz_mm,
                                              config=stage.postprocess)
    report.set("postprocess", post_record)
    maps = None
    if config is not None:
        with report.stage("uncertainty"):
            maps = estimate(case, stage, config, roi_box=roi.box, roi_grid=roi_grid, roi_slices_zyx=roi_slices_zyx,
                            folds=folds, device=device, report=report, clicks=clicks)
        report.set("uncertainty", summarise(maps, labels_zyx, spacing_xyz_mm=case.ct_grid.spacing_xyz_mm))
    mask = paste(labels_zyx, roi_slices_zyx, case.ct_grid)
    validate_mask(mask, case.ct_grid)
    report.set("labels", label_volumes(labels_zyx, spacing_xyz_mm=case.ct_grid.spacing_xyz_mm))
    return Prediction(mask, report, case, model_labels, maps)


def _record_inputs(case: Case, recipe: Recipe, report: RunReport, ct_only_reason: str | None) -> None:
    report.set("ct_only", case.ct_only)
    report.set("inputs", {"ct": {"path": str(case.ct_path), "grid": case.ct_grid.to_dict()},
                          "pet": None if case.ct_only else {"path": str(case.pet_path), "grid": case.pet_grid.to_dict()},
                          "pet_unit": None if case.ct_only else case.pet_unit.to_dict()})
    report.set("recipe", recipe.to_dict())
    if case.ct_only:
        report.warn(f"CT-only mode ({ct_only_reason or 'no PET image'}): every PET channel is zero-filled and "
                    f"ROI methods that need PET use a box at the top of the CT")
    for warning in case.warnings:
        report.warn(warning)


def _load_models(recipe: Recipe, device: str, report: RunReport) -> dict:
    """Every model's folds, by model name; the provider and any provider fallbacks go into the report."""
    with report.stage("load_models"):
        folds = {spec.name: load_folds(spec, device=device) for spec in recipe.models}
    report.set("provider", next(iter(folds.values()))[0].provider)
    for fallback in {line for models in folds.values() for m in models for line in m.fallbacks}:
        report.fallback(fallback)
    return folds


def _restore_to_ct(case: Case, stage: StageSpec, roi, members: list[Member], report: RunReport):
    """The last stage's ensemble as labels on the CT voxels inside its ROI: (labels zyx, that CT crop's grid, its
    slices in the CT, the model-grid labels when the stage restores by `paste_nearest`)."""
    cropped = case.ct_grid.crop_to(roi.box)
    if cropped is None:
        raise InputError(f"the ROI found by {roi.method!r} ({roi.box.to_dict()}) holds no voxel of CT "
                         f"{case.ct_path}: check the CT's origin and direction")
    roi_grid, roi_slices_zyx = cropped
    report.set("roi_grid", roi_grid.to_dict())
    model_labels = None
    with report.stage("restore_to_ct_and_decode"):
        if stage.restore == "paste_nearest":  # SNU: decoded on the model grid, then nearest neighbour (paste_back)
            model_labels = decode_on_model_grid(members, stage.models)
            labels_zyx = paste_nearest(model_labels, roi_grid)
        else:
            labels_zyx = OutputSpace.for_models(stage.models).decode_ensemble(members, roi_grid)
    report.set("crop", crop_record(case=case, stage=stage, roi=report.data["roi"],
                                   model_grids=[m.grid for m in members], paste_grid=roi_grid,
                                   paste_slices_zyx=roi_slices_zyx, labels=model_labels))
    return labels_zyx, roi_grid, roi_slices_zyx, model_labels


def _locate(case: Case, stage: StageSpec, previous: StageLabels | None, report: RunReport, prefix: str):
    with report.stage(f"{prefix}locate_roi"):
        roi = locate_roi(stage.roi.method, ct=case.ct, pet=case.pet, previous=previous,
                         suv_per_stored_value=case.suv_per_stored_value, params=stage.roi.params)
    record = {"method": roi.method, "fell_back": roi.fell_back, "box": roi.box.to_dict(), "record": roi.record}
    report.stage_record(stage.name)["roi"] = record
    report.set("roi", record)  # the last stage's: the box the mask comes from
    for warning in roi.warnings:
        report.warn(warning)
    return roi


def _stage_labels(stage: StageSpec, members: list[Member], roi_box, report: RunReport, prefix: str) -> StageLabels:
    """An earlier stage's labels, decoded on its first model's grid (the next ROI needs nothing finer)."""
    grid = members[0].grid
    with report.stage(f"{prefix}decode"):
        labels_zyx = OutputSpace.for_models(stage.models).decode_ensemble(members, grid)
        labels_zyx, post_record = postprocess(labels_zyx, spacing_xyz_mm=grid.spacing_xyz_mm,
                                              config=stage.postprocess)
    record = report.stage_record(stage.name)
    record["postprocess"] = post_record
    record["labels"] = label_volumes(labels_zyx, spacing_xyz_mm=grid.spacing_xyz_mm)
    return StageLabels(stage.name, labels_zyx, grid, roi_box)


def _run_models(case: Case, stage: StageSpec, folds: dict, roi_box, report: RunReport, prefix: str, *,
                clicks: Clicks | None = None) -> list[Member]:
    """Each model of the stage on its own grid in the ROI: probabilities in the stage's output space."""
    space = OutputSpace.for_models(stage.models)
    members, records = [], []
    for spec in stage.models:
        grid = model_grid(spec, roi_box, case.ct_grid)
        for note in harmonisation_notes(spec, grid):
            report.warn(f"{prefix}{spec.name}: {note}")
        with report.stage(f"{prefix}{spec.name}: sample_and_normalise"):
            image_czyx = build_input(case, grid, spec, clicks=clicks)
        with report.stage(f"{prefix}{spec.name}: sliding_window"):
            probabilities = predict_probabilities(spec, folds[spec.name], image_czyx)
        del image_czyx
        members.append(Member(spec.weight, space.from_head(probabilities, spec.head), grid, spec.resampling))
        records.append({"name": spec.name, "grid": grid.to_dict(), "folds": len(spec.files),
                        "patch_size_zyx": list(spec.patch_size_zyx), "mirror_axes_zyx": list(spec.mirror_axes_zyx)})
    report.stage_record(stage.name)["models"] = records
    return members


def predict_files(ct_path: Path, pet_path: Path | None, recipe: Recipe, *, device: str = "auto",
                  report: RunReport | None = None, ct_only: bool = False,
                  pet_missing: MissingPetError | None = None, clicks: Clicks | None = None,
                  uncertainty: UncertaintyOptions | None = None) -> Prediction:
    """Read, validate and predict one case. CT-only mode when the user asks for it (`ct_only`; a PET given is not
    read) or when there is no PET (`pet_path` None; `pet_missing` says where none was found); either needs a
    recipe with "pet_optional": true, else a RecipeError or the missing-PET InputError, before anything is read."""
    report = report or RunReport()
    reason = ct_only_reason(recipe, pet_path=pet_path, ct_only=ct_only, pet_missing=pet_missing)
    with report.stage("read_and_validate"):
        case = load_case(ct_path, None if reason else pet_path)
    return predict_case(case, recipe, device=device, report=report, ct_only_reason=reason, clicks=clicks,
                        uncertainty=uncertainty)


def ct_only_reason(recipe: Recipe, *, pet_path: Path | None, ct_only: bool,
                   pet_missing: MissingPetError | None = None) -> str | None:
    """Why the case runs CT-only (None: it runs on PET/CT); an error when the recipe does not allow it."""
    if ct_only:
        if not recipe.pet_optional:
            raise RecipeError(f"--ct-only: recipe {recipe.name!r} ({recipe.path}) does not allow CT-only mode (its "
                              f"models need PET; it does not set \"pet_optional\": true): drop --ct-only and give the "
                              f"PET, or use weights trained for CT-only input")
        return "asked for with --ct-only" + (f"; PET {pet_path} not read" if pet_path is not None else "")
    if pet_path is not None:
        return None
    if not recipe.pet_optional:
        needs = f"recipe {recipe.name!r} needs PET: it does not allow CT-only input (no \"pet_optional\": true)"
        if pet_missing is not None:
            raise InputError(f"{pet_missing} ({needs})") from pet_missing
        raise InputError(f"no PET image given: pass --pet PET.mha ({needs})")
    return f"no PET image in {pet_missing.folder}" if pet_missing is not None else "no PET image given"
