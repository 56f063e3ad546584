"""The library API: one PET/CT case in, a validated mask on the exact CT grid out, with its run report.

read → validate → locate ROI → per model: grid, channels, sliding window, folds → ensemble and decode on the CT
voxels inside the ROI (one output channel at a time) → post-process → paste into the CT grid → validate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .io import Case, load_case, validate_mask
from .postprocess import postprocess
from .predict import build_input, load_folds, model_grid, predict_probabilities
from .recipe import Recipe
from .report import RunReport, label_volumes
from .restore import Member, OutputSpace, paste
from .roi import locate_roi


@dataclass
class Prediction:
    mask: sitk.Image
    report: RunReport


def predict_case(case: Case, recipe: Recipe, *, device: str = "auto", report: RunReport | None = None) -> Prediction:
    """Run the recipe on a validated case. Raises HnsegError subclasses on bad input, recipe or model."""
    report = report or RunReport()
    ct_grid = case.ct_grid
    report.set("inputs", {"ct": {"path": str(case.ct_path), "grid": ct_grid.to_dict()},
                          "pet": {"path": str(case.pet_path), "grid": case.pet_grid.to_dict()},
                          "pet_unit": case.pet_unit.to_dict()})
    report.set("recipe", recipe.to_dict())
    for warning in case.warnings:
        report.warn(warning)

    with report.stage("load_models"):
        folds = {spec.name: load_folds(spec, device=device) for spec in recipe.models}
    first = next(iter(folds.values()))[0]
    report.set("provider", first.provider)
    for fallback in {line for models in folds.values() for m in models for line in m.fallbacks}:
        report.fallback(fallback)

    with report.stage("locate_roi"):
        roi = locate_roi(recipe.roi.method, ct=case.ct, pet=case.pet,
                         suv_per_stored_value=case.pet_unit.suv_per_stored_value, params=recipe.roi.params)
    report.set("roi", {"method": roi.method, "fell_back": roi.fell_back, "box": roi.box.to_dict(),
                       "record": roi.record})
    for warning in roi.warnings:
        report.warn(warning)
    cropped = ct_grid.crop_to(roi.box)
    if cropped is None:
        raise InputError(f"the ROI found by {roi.method!r} ({roi.box.to_dict()}) holds no voxel of CT "
                         f"{case.ct_path}: check the CT's origin and direction")
    roi_grid, roi_slices_zyx = cropped
    report.set("roi_grid", roi_grid.to_dict())

    space = OutputSpace.for_models(recipe.models)
    members, models_record = [], []
    for spec in recipe.models:
        grid = model_grid(spec, roi.box, ct_grid)
        with report.stage(f"{spec.name}: sample_and_normalise"):
            image_czyx = build_input(case, grid, spec)
        with report.stage(f"{spec.name}: sliding_window"):
            probabilities = predict_probabilities(spec, folds[spec.name], image_czyx)
        del image_czyx
        members.append(Member(spec.weight, space.from_head(probabilities, spec.head), grid))
        models_record.append({"name": spec.name, "grid": grid.to_dict(), "folds": len(spec.files),
                              "patch_size_zyx": list(spec.patch_size_zyx),
                              "mirror_axes_zyx": list(spec.mirror_axes_zyx)})
    report.set("models", models_record)

    with report.stage("restore_to_ct_and_decode"):
        labels_zyx = space.decode_ensemble(members, roi_grid)
    del members
    with report.stage("postprocess"):
        labels_zyx, post_record = postprocess(labels_zyx, spacing_xyz_mm=ct_grid.spacing_xyz_mm,
                                              config=recipe.postprocess)
    report.set("postprocess", post_record)
    mask = paste(labels_zyx, roi_slices_zyx, ct_grid)
    validate_mask(mask, ct_grid)
    report.set("labels", label_volumes(labels_zyx, spacing_xyz_mm=ct_grid.spacing_xyz_mm))
    return Prediction(mask, report)


def predict_files(ct_path: Path, pet_path: Path, recipe: Recipe, *, device: str = "auto",
                  report: RunReport | None = None) -> Prediction:
    report = report or RunReport()
    with report.stage("read_and_validate"):
        case = load_case(ct_path, pet_path)
    return predict_case(case, recipe, device=device, report=report)
