"""The library API: models loaded once, then one PET/CT case after another into a mask on the exact CT grid.

    seg = Segmenter.from_weights("weights/demo", device="cpu")   # recipe validated, every session created here
    prediction = seg.predict(ct="ct.mha", pet="pet.mha")          # reads, validates and runs; no new session
    prediction.mask                                               # SimpleITK uint8 image on the CT grid

The flow of `predict`: read → validate → per stage of the recipe: locate its ROI (from the images, or from the
labels of the stage before) → per model: grid, channels, sliding window, folds → ensemble. The last stage's
ensemble is restored onto the CT voxels inside its ROI (the restore strategy the recipe chose) → post-process →
uncertainty maps (when asked for) → paste into the CT grid → validate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from hnseg_infer.channels.build import build_input, harmonisation_notes, model_grid
from hnseg_infer.channels.clicks import Clicks, check_before_run, check_landed, load_clicks
from hnseg_infer.clock import Deadline
from hnseg_infer.errors import InputError, MissingPetError, RecipeError
from hnseg_infer.geometry.grid import Box
from hnseg_infer.inference.anytime import Planner, run_stage
from hnseg_infer.inference.backend import describe
from hnseg_infer.inference.calibration import read_calibration
from hnseg_infer.inference.runner import LoadedModel
from hnseg_infer.io.images import Case, load_case, validate_mask
from hnseg_infer.io.sidecar import crop_record
from hnseg_infer.recipe.load import load_recipe, resolve_weights
from hnseg_infer.recipe.spec import Recipe, StageSpec
from hnseg_infer.report import RunReport, label_volumes
from hnseg_infer.restore.ensemble import Ensemble, Member, paste
from hnseg_infer.restore.paste_back import ModelLabels
from hnseg_infer.restore.postprocess import postprocess
from hnseg_infer.restore.to_ct import Restorer, restorer_for
from hnseg_infer.roi.locate import RoiResult, StageLabels, locate_roi
from hnseg_infer.uncertainty.passes import UncertaintyMaps, UncertaintyOptions, estimate, resolve, summarise

ImageOrPath = str | Path | sitk.Image


@dataclass(frozen=True)
class StageRoi:
    """Where one stage of the recipe ran: its name and the ROI its method found."""

    stage: str
    roi: RoiResult


@dataclass(frozen=True)
class Prediction:
    """One case's result. `mask`: uint8 labels (0, 1 GTVp, 2 GTVn) on exactly the CT grid; `report`: the finished
    run report; `rois`: each stage's ROI, in order; `crop`: the crop/paste-back provenance (io/sidecar.py);
    `uncertainty`: the maps when asked for; `case`: the validated inputs (for pictures drawn afterwards);
    `model_labels`: with restore paste_nearest, the labels on the model grid (for the sidecar)."""

    mask: sitk.Image
    report: RunReport
    rois: tuple[StageRoi, ...]
    crop: dict
    case: Case
    uncertainty: UncertaintyMaps | None = None
    model_labels: ModelLabels | None = None


class Segmenter:
    """A recipe with its models loaded: `predict` runs it on one case after another without reloading anything."""

    def __init__(self, recipe: Recipe, *, device: str = "auto", backend: str = "auto", precision: str = "f32",
                 allow_trt_build: bool = False):
        """Create every model's sessions (validated against the recipe) and choose each stage's ensembling and the
        last stage's restore strategy, once. `backend`: "auto" (OpenVINO on the CPU where it runs the model, else
        onnxruntime), "onnxruntime" or "openvino"; `precision` "bf16" asks OpenVINO for bf16, proven against f32
        on each model's first tile batch (inference/backend.py). `allow_trt_build`: let onnxruntime build a
        TensorRT engine where no prebuilt one is stamped for this GPU (minutes; by default such a model runs on
        CUDA)."""
        start = time.perf_counter()
        self.recipe, self.device, self.backend = recipe, device, backend
        self.models = {spec.name: LoadedModel.load(spec, device=device, backend=backend, precision=precision,
                                                   allow_trt_build=allow_trt_build)
                       for spec in recipe.models}
        self.load_s = time.perf_counter() - start
        self.ensembles = {stage.name: Ensemble.for_models(stage.models) for stage in recipe.stages}
        self.restorer: Restorer = restorer_for(recipe.stages[-1], self.ensembles[recipe.stages[-1].name])
        self._load_reported = False
        # seconds per tile for the budget's planner: seeded from calibration.json where it fits this machine, then
        # measured under a budget and kept for the next cases
        self.seconds_per_tile, self.calibration = read_calibration(recipe.path.parent, self.models)
        self.recipe_s: float | None = None  # the recipe's load and hashing, when from_weights did it

    @classmethod
    def from_weights(cls, weights: str | Path, *, device: str = "auto", backend: str = "auto",
                     precision: str = "f32", allow_trt_build: bool = False) -> "Segmenter":
        """A weights folder (recipe.json and its model files), or a folder holding exactly one such folder."""
        start = time.perf_counter()
        try:
            recipe = load_recipe(resolve_weights(Path(weights)))  # validated, every file hashed
        except PermissionError as exc:  # a folder or file of the weights this user may not read
            raise RecipeError(f"weights {exc.filename} cannot be read by this user ({exc.strerror}): make the "
                              f"weights folder {weights} readable (chmod -R a+rX)") from exc
        recipe_s = time.perf_counter() - start
        segmenter = cls(recipe, device=device, backend=backend, precision=precision, allow_trt_build=allow_trt_build)
        segmenter.recipe_s = recipe_s
        return segmenter

    @property
    def provider(self) -> str:
        return next(iter(self.models.values())).folds[0].provider

    def predict(self, ct: ImageOrPath, pet: ImageOrPath | None = None, *, clicks: Clicks | str | Path | None = None,
                uncertainty: UncertaintyOptions | bool | None = None, ct_only: bool = False,
                pet_missing: MissingPetError | None = None, report: RunReport | None = None,
                ct_series: str | None = None, pet_series: str | None = None, time_budget_s: float | None = None,
                deadline: Deadline | None = None) -> Prediction:
        """Read, validate and predict one case (paths, DICOM series folders or SimpleITK images; `ct_series`,
        `pet_series`: the SeriesInstanceUID to take from a folder holding several). CT-only mode when asked for
        (`ct_only`; a PET given is not read) or when there is no PET (`pet_missing` says where none was found);
        either needs a recipe with "pet_optional": true. `uncertainty`: True or UncertaintyOptions for the recipe's
        maps. `report`: collect into this report (a caller that writes it after a failure passes its own).
        `time_budget_s` (None or 0: none): seconds from this call within which the case should finish; or
        `deadline`, counted from elsewhere (the process start, clock.py). Under a budget the models run anytime
        (inference/anytime.py) and report["budget"] says what was left out; without one it is null.
        Raises HnsegError subclasses on bad input, recipe or model."""
        deadline = deadline if deadline is not None else Deadline.from_budget(time_budget_s)
        report = report if report is not None else RunReport()
        reason = ct_only_reason(self.recipe, pet=pet, ct_only=ct_only, pet_missing=pet_missing)
        if isinstance(clicks, (str, Path)):
            clicks = load_clicks(Path(clicks))
        with report.stage("read_and_validate"):
            case = load_case(ct, None if reason else pet, ct_series=ct_series, pet_series=pet_series)
        return self.predict_case(case, clicks=clicks, uncertainty=uncertainty, report=report, ct_only_reason=reason,
                                 deadline=deadline)

    def predict_case(self, case: Case, *, clicks: Clicks | None = None,
                     uncertainty: UncertaintyOptions | bool | None = None, report: RunReport | None = None,
                     ct_only_reason: str | None = None, deadline: Deadline | None = None) -> Prediction:
        """Run the recipe on a case already read and validated (`load_case`), within `deadline` when given."""
        recipe = self.recipe
        report = report if report is not None else RunReport()
        planner = None if deadline is None else Planner(deadline, recipe.budget, self.seconds_per_tile)
        if case.ct_only and not recipe.pet_optional:
            raise RecipeError(f"recipe {recipe.name!r} ({recipe.path}) needs PET (it does not set \"pet_optional\": "
                              f"true) but case {case.ct_path} has none: give its PET image")
        config = _uncertainty_config(recipe, uncertainty)  # clicks, uncertainty: refused before anything runs
        if clicks is not None:
            report.set("clicks", check_before_run(clicks, recipe, ct_grid=case.ct_grid, ct_path=case.ct_path))
        self._record(case, report, ct_only_reason)

        previous, rois = None, []
        for index, stage in enumerate(recipe.stages):
            prefix = f"{stage.name}: " if len(recipe.stages) > 1 else ""
            roi = self._locate(case, stage, previous, report, prefix)
            rois.append(StageRoi(stage.name, roi))
            last = index == len(recipe.stages) - 1
            members = self._run_models(case, stage, roi.box, report, prefix, clicks=clicks, planner=planner,
                                       last_stage=last)
            if index < len(recipe.stages) - 1:
                previous = self._stage_labels(stage, members, roi.box, report, prefix)
                del members
        if clicks is not None:
            check_landed(clicks)

        labels_zyx, roi_grid, roi_slices_zyx, model_labels, crop = self._restore(case, stage, roi, members, report)
        del members
        with report.stage("postprocess"):
            labels_zyx, post_record = postprocess(labels_zyx, spacing_xyz_mm=case.ct_grid.spacing_xyz_mm,
                                                  config=stage.postprocess)
        report.set("postprocess", post_record)
        maps = None
        if config is not None:
            with report.stage("uncertainty"):
                maps = estimate(case, stage, config, roi_box=roi.box, roi_grid=roi_grid,
                                roi_slices_zyx=roi_slices_zyx, models=self.models,
                                ensemble=self.ensembles[stage.name], report=report, clicks=clicks,
                                planner=planner)
            if maps is not None:
                report.set("uncertainty", summarise(maps, labels_zyx, spacing_xyz_mm=case.ct_grid.spacing_xyz_mm))
        mask = paste(labels_zyx, roi_slices_zyx, case.ct_grid)
        validate_mask(mask, case.ct_grid)
        self._record_engines(report)
        report.set("labels", label_volumes(labels_zyx, spacing_xyz_mm=case.ct_grid.spacing_xyz_mm))
        _record_budget(report, planner, self.calibration)
        self._report_run_fallbacks(report)
        report.finish("ok")
        return Prediction(mask, report, tuple(rois), crop, case, maps, model_labels)

    # ------------------------------------------------------------------------------------------------ the stages

    def _record(self, case: Case, report: RunReport, ct_only_reason: str | None) -> None:
        """The inputs, the recipe and the models' provider into the report (with the load time on first use)."""
        report.set("ct_only", case.ct_only)
        report.set("inputs", {"ct": {"path": str(case.ct_path), "grid": case.ct_grid.to_dict(),
                                     **_dicom_record(case.ct_dicom)},
                              "pet": None if case.ct_only else {"path": str(case.pet_path),
                                                                "grid": case.pet_grid.to_dict(),
                                                                **_dicom_record(case.pet_dicom)},
                              "pet_unit": None if case.ct_only else case.pet_unit.to_dict()})
        report.set("recipe", self.recipe.to_dict())
        if case.ct_only:
            report.warn(f"CT-only mode ({ct_only_reason or 'no PET image'}): every PET channel is zero-filled and "
                        f"ROI methods that need PET use a box at the top of the CT")
        for warning in case.warnings:
            report.warn(warning)
        if not self._load_reported:  # the models were loaded once, for this and every later case
            if self.recipe_s is not None:
                report.add_stage_time("load_recipe", self.recipe_s)
            report.add_stage_time("load_models", self.load_s)
            self._load_reported = True
        report.set("provider", self.provider)
        self._record_engines(report)

    def _record_engines(self, report: RunReport) -> None:
        """Each model's engine and the fallbacks so far (a bf16 proof adds its own on the first batch)."""
        report.set("backend", {name: describe(model.folds[0]) for name, model in self.models.items()})
        for line in dict.fromkeys(line for model in self.models.values() for line in model.fallbacks):
            if line not in report.data["fallbacks"]:
                report.fallback(line)

    def _report_run_fallbacks(self, report: RunReport) -> None:
        """The sessions' out-of-memory steps during this case (onnx_engine.py), once each, then forgotten."""
        for model in self.models.values():
            for fold in model.folds:
                lines = getattr(fold, "run_fallbacks", None)  # a session; a test's plain callable has none
                if lines:
                    for line in lines:
                        report.fallback(line)
                    lines.clear()

    def _locate(self, case: Case, stage: StageSpec, previous: StageLabels | None, report: RunReport,
                prefix: str) -> RoiResult:
        with report.stage(f"{prefix}locate_roi"):
            roi = locate_roi(stage.roi.method, ct=case.ct, pet=case.pet, previous=previous,
                             suv_per_stored_value=case.suv_per_stored_value, params=stage.roi.params)
        record = roi_record(roi)
        report.stage_record(stage.name)["roi"] = record
        report.set("roi", record)  # the last stage's: the box the mask comes from
        for warning in roi.warnings:
            report.warn(warning)
        return roi

    def _run_models(self, case: Case, stage: StageSpec, roi_box: Box, report: RunReport, prefix: str, *,
                    clicks: Clicks | None, planner: Planner | None = None, last_stage: bool = True) -> list[Member]:
        """Each model of the stage on its own grid in the ROI: probabilities in the stage's output space (under a
        budget, the members and passes the planner let run)."""
        if planner is not None:
            return self._run_models_anytime(case, stage, roi_box, report, prefix, clicks=clicks, planner=planner,
                                            last_stage=last_stage)
        ensemble = self.ensembles[stage.name]
        members, records = [], []
        for spec in stage.models:
            grid = model_grid(spec, roi_box, case.ct_grid)
            for note in harmonisation_notes(spec, grid):
                report.warn(f"{prefix}{spec.name}: {note}")
            with report.stage(f"{prefix}{spec.name}: sample_and_normalise"):
                image_czyx = build_input(case, grid, spec, clicks=clicks)
            with report.stage(f"{prefix}{spec.name}: sliding_window"):
                probabilities = self.models[spec.name].probabilities(image_czyx)
            del image_czyx
            members.append(ensemble.member(spec, probabilities, grid))
            records.append({"name": spec.name, "grid": grid.to_dict(), "folds": len(spec.files),
                            "patch_size_zyx": list(spec.tiling.patch_size_zyx),
                            "mirror_axes_zyx": list(spec.tiling.mirror_axes_zyx)})
        report.stage_record(stage.name)["models"] = records
        return members

    def _run_models_anytime(self, case: Case, stage: StageSpec, roi_box: Box, report: RunReport, prefix: str, *,
                            clicks: Clicks | None, planner: Planner, last_stage: bool) -> list[Member]:
        sampling_s = []

        def input_of(spec, grid):
            for note in harmonisation_notes(spec, grid):
                report.warn(f"{prefix}{spec.name}: {note}")
            start = time.perf_counter()
            with report.stage(f"{prefix}{spec.name}: sample_and_normalise"):
                image_czyx = build_input(case, grid, spec, clicks=clicks)
            sampling_s.append(time.perf_counter() - start)
            return image_czyx

        start = time.perf_counter()
        runs = run_stage(stage, self.models, planner, last_stage=last_stage, input_of=input_of,
                         grid_of=lambda spec: model_grid(spec, roi_box, case.ct_grid))
        # the passes of every model of the stage (their sampling is timed on its own above)
        report.add_stage_time(f"{prefix}anytime_passes", time.perf_counter() - start - sum(sampling_s))
        ensemble = self.ensembles[stage.name]
        members = [ensemble.member(run.spec, run.probabilities(), run.grid) for run in runs]
        report.stage_record(stage.name)["models"] = [
            {"name": run.spec.name, "grid": run.grid.to_dict(), "folds": len(run.sums),
             "patch_size_zyx": list(run.spec.tiling.patch_size_zyx), "mirror_axes_zyx": list(run.axes)}
            for run in runs]
        return members

    def _stage_labels(self, stage: StageSpec, members: list[Member], roi_box: Box, report: RunReport,
                      prefix: str) -> StageLabels:
        """An earlier stage's labels, decoded on its first model's grid (the next ROI needs nothing finer)."""
        grid = members[0].grid
        with report.stage(f"{prefix}decode"):
            labels_zyx = self.ensembles[stage.name].decode(members, grid)
            labels_zyx, post_record = postprocess(labels_zyx, spacing_xyz_mm=grid.spacing_xyz_mm,
                                                  config=stage.postprocess)
        record = report.stage_record(stage.name)
        record["postprocess"] = post_record
        record["labels"] = label_volumes(labels_zyx, spacing_xyz_mm=grid.spacing_xyz_mm)
        return StageLabels(stage.name, labels_zyx, grid, roi_box)

    def _restore(self, case: Case, stage: StageSpec, roi: RoiResult, members: list[Member], report: RunReport):
        """The last stage's ensemble as labels on the CT voxels inside its ROI: (labels zyx, that CT crop's grid, its
        slices in the CT, the model-grid labels of a paste_nearest restore, the crop record)."""
        cropped = case.ct_grid.crop_to(roi.box)
        if cropped is None:
            raise InputError(f"the ROI found by {roi.method!r} ({roi.box.to_dict()}) holds no voxel of CT "
                             f"{case.ct_path}: check the CT's origin and direction")
        roi_grid, roi_slices_zyx = cropped
        report.set("roi_grid", roi_grid.to_dict())
        with report.stage("restore_to_ct_and_decode"):
            labels_zyx, model_labels = self.restorer.to_ct(members, roi_grid)
        crop = crop_record(case=case, stage=stage, roi=roi_record(roi), model_grids=[m.grid for m in members],
                           paste_grid=roi_grid, paste_slices_zyx=roi_slices_zyx, labels=model_labels)
        report.set("crop", crop)
        return labels_zyx, roi_grid, roi_slices_zyx, model_labels, crop


def _record_budget(report: RunReport, planner: Planner | None, calibration: dict | None) -> None:
    """report["budget"]: null without a budget; else what ran, what was left out, predicted and actual time, and
    the calibration that seeded the costs (calibration.json, when there is one)."""
    if planner is None:
        report.set("budget", None)
        return
    record = planner.record(clock_start=planner.deadline.label)
    record["actual_s"] = round(planner.deadline.elapsed_s(), 3)
    record["calibration"] = calibration
    report.set("budget", record)
    if warning := planner.warning():
        report.warn(warning)


def roi_record(roi: RoiResult) -> dict:
    return {"method": roi.method, "fell_back": roi.fell_back, "box": roi.box.to_dict(), "record": roi.record}


def _uncertainty_config(recipe: Recipe, uncertainty: UncertaintyOptions | bool | None):
    if uncertainty is None or uncertainty is False:
        return None
    return resolve(recipe, UncertaintyOptions() if uncertainty is True else uncertainty)


def ct_only_reason(recipe: Recipe, *, pet: ImageOrPath | None, ct_only: bool,
                   pet_missing: MissingPetError | None = None) -> str | None:
    """Why the case runs CT-only (None: it runs on PET/CT); an error when the recipe does not allow it."""
    if ct_only:
        if not recipe.pet_optional:
            raise RecipeError(f"--ct-only: recipe {recipe.name!r} ({recipe.path}) does not allow CT-only mode (its "
                              f"models need PET; it does not set \"pet_optional\": true): drop --ct-only and give the "
                              f"PET, or use weights trained for CT-only input")
        return "asked for with --ct-only" + (f"; PET {pet} not read" if isinstance(pet, (str, Path)) else "")
    if pet is not None:
        return None
    if not recipe.pet_optional:
        needs = f"recipe {recipe.name!r} needs PET: it does not allow CT-only input (no \"pet_optional\": true)"
        if pet_missing is not None:
            raise InputError(f"{pet_missing} ({needs})") from pet_missing
        raise InputError(f"no PET image given: pass --pet PET.mha ({needs})")
    return f"no PET image in {pet_missing.folder}" if pet_missing is not None else "no PET image given"


def _dicom_record(series) -> dict:
    """The series UID and file count of an input read from a DICOM series ({} for an image file)."""
    return {} if series is None else {"dicom_series_uid": series.series_uid, "dicom_files": len(series.files)}
