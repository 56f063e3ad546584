"""Add spectrum-swapping CT harmonisation (SSIMH, BIGS2) to an exported weights folder.

The reference subject's CT is cropped and sampled exactly as the model will sample a case's CT channel: the
recipe's ROI method on the reference (its PET when given; without one the CT-only box, a box of the method's size
at the top of the CT, which is the reference CT's own extent when it was already cropped to the ROI at the top),
the model's grid in that box (same spacing, orientation and size), the CT channel's interpolation. The
low-frequency DCT block of each axial slice of that grid (hnseg_infer.channels.harmonise) goes into a .npz beside the
weights, and {"op": "spectrum_swap", "reference": FILE, "radius": τ} becomes the first op of each CT channel
(after sampling, before the normalisation), replacing an earlier one. The reference file and recipe.json are
each written atomically, and the recipe is read back through the runtime's validator; if that fails, both are
restored as they were.
"""

from __future__ import annotations

import json
from pathlib import Path

from hnseg_infer.channels.build import model_grid
from hnseg_infer.channels.harmonise import DEFAULT_RADIUS, REFERENCE_FILE, low_frequency_block, save_reference
from hnseg_infer.errors import ExportError, HnsegError
from hnseg_infer.geometry.grid import Box, Grid, sample
from hnseg_infer.io.atomic import file_sha256, write_atomic
from hnseg_infer.io.images import FILL_VALUE, load_case
from hnseg_infer.recipe.load import RECIPE_FILE, load_files, load_recipe
from hnseg_infer.recipe.parse import parse_recipe
from hnseg_infer.recipe.spec import ModelSpec, StageSpec
from hnseg_infer.roi.locate import NEEDS_PREVIOUS_STAGE, box_size_mm, locate_roi


def add_reference(weights: Path, reference_ct: Path, *, reference_pet: Path | None = None,
                  radius: int = DEFAULT_RADIUS, model: str | None = None) -> dict:
    """Compute the reference of one model's CT channels and insert the op; returns what was done (JSON-able)."""
    weights = Path(weights)
    if not isinstance(radius, int) or radius < 1:
        raise ExportError(f"--radius must be an integer >= 1, got {radius!r}")
    try:
        recipe = load_recipe(weights)
    except HnsegError as error:
        raise ExportError(f"{weights}: {error}") from error
    stage, spec = _target(recipe.stages, model, weights)
    channels = [i for i, c in enumerate(spec.channels) if c.source == "ct"]
    if bad := [i for i in channels if spec.channels[i].ops_before_sampling]:
        raise ExportError(f"model {spec.name!r} CT channel(s) {bad} normalise before sampling "
                          f"(ops_before_sampling); spectrum_swap works on the model grid's slices")
    interpolations = sorted({spec.channels[i].interpolation for i in channels})
    if len(interpolations) > 1:
        raise ExportError(f"model {spec.name!r} samples its CT channels with different interpolations "
                          f"{interpolations}; one reference cannot serve them all")
    if stage.roi.method in NEEDS_PREVIOUS_STAGE:
        raise ExportError(f"model {spec.name!r} runs in stage {stage.name!r}, whose ROI ({stage.roi.method}) comes "
                          f"from the labels of the stage before: its box cannot be reproduced on a reference CT "
                          f"without running the cascade")

    try:
        case = load_case(reference_ct, reference_pet)
        roi = locate_roi(stage.roi.method, ct=case.ct, pet=case.pet, suv_per_stored_value=case.suv_per_stored_value,
                         params=stage.roi.params)
    except HnsegError as error:
        raise ExportError(f"reference {reference_ct}: {error}") from error
    if roi.fell_back and not case.ct_only:
        raise ExportError(f"reference {reference_ct}: ROI method {stage.roi.method!r} did not find its anatomy "
                          f"({'; '.join(roi.warnings)}): use a reference subject with the head in view, or leave "
                          f"out --pet to take a box at the top of the reference CT")
    grid = model_grid(spec, roi.box, case.ct_grid)
    _check_size(grid, spec, stage)
    ct_zyx = sample(case.ct, grid, interpolation=interpolations[0], fill_value=FILL_VALUE["ct"])
    block = low_frequency_block(ct_zyx, radius)

    file_name = REFERENCE_FILE if len(recipe.models) == 1 else f"{Path(REFERENCE_FILE).stem}.{spec.name}.npz"
    record = {"model": spec.name, "channels": channels, "file": file_name, "radius": radius,
              "reference_ct": {"path": str(reference_ct), "sha256": file_sha256(Path(reference_ct))},
              "reference_pet": None if reference_pet is None else {"path": str(reference_pet),
                                                                   "sha256": file_sha256(Path(reference_pet))},
              "roi": {"method": stage.roi.method, "box": roi.box.to_dict(), "record": roi.record},
              "grid": grid.to_dict(), "grid_size_zyx": list(grid.size_zyx), "interpolation": interpolations[0]}
    _write(weights, file_name, block, grid.size_zyx, stage=stage, spec=spec, channels=channels, radius=radius,
           record=record)
    record["sha256"] = file_sha256(weights / file_name)
    return record


def _target(stages: tuple[StageSpec, ...], model: str | None, weights: Path) -> tuple[StageSpec, ModelSpec]:
    candidates = [(s, m) for s in stages for m in s.models if any(c.source == "ct" for c in m.channels)]
    if model is not None:
        found = [(s, m) for s, m in candidates if m.name == model]
        if not found:
            raise ExportError(f"{weights}: no model {model!r} with a CT channel; models with one: "
                              f"{[m.name for _, m in candidates]}")
        return found[0]
    if len(candidates) != 1:
        raise ExportError(f"{weights}: {len(candidates)} models have a CT channel "
                          f"({[m.name for _, m in candidates]}): choose one with --model NAME")
    return candidates[0]


def _check_size(grid: Grid, spec: ModelSpec, stage: StageSpec) -> None:
    """The grid must be the one the recipe declares for a fixed-size ROI (the loader checks the same)."""
    size_mm = box_size_mm(stage.roi.method, stage.roi.params)
    if size_mm is None or spec.grid.orientation == "ct":
        return
    expected = Grid.covering(Box((0.0, 0.0, 0.0), size_mm), spec.grid.spacing_xyz_mm,
                             fit_box=spec.grid.grid_spacing == "fit_roi").size_zyx
    if tuple(grid.size_zyx) != tuple(expected):
        raise ExportError(f"the reference's model grid is {list(grid.size_zyx)} (z, y, x) but the recipe's ROI "
                          f"{list(size_mm)} mm at {list(spec.grid.spacing_xyz_mm)} mm gives {list(expected)}")


def _write(weights: Path, file_name: str, block, size_zyx, *, stage: StageSpec, spec: ModelSpec,
           channels: list[int], radius: int, record: dict) -> None:
    """The reference file, then recipe.json (each atomically), then the runtime's validator; on failure both are
    put back as they were."""
    recipe_path = weights / RECIPE_FILE
    old_recipe = recipe_path.read_text()
    reference_path = weights / file_name
    old_reference = reference_path.read_bytes() if reference_path.is_file() else None
    raw = json.loads(old_recipe)
    entry = _raw_model(raw, stage, spec)
    for index in channels:
        channel = entry["channels"][index]
        ops = [op for op in channel.get("ops", []) if op.get("op") != "spectrum_swap"]
        channel["ops"] = [{"op": "spectrum_swap", "reference": file_name, "radius": radius}, *ops]
    entry.setdefault("provenance", {})["harmonisation"] = record
    save_reference(reference_path, block, size_zyx)
    try:
        recipe = load_files(parse_recipe(raw, recipe_path))  # written by the runtime's own writer, then read back
        _write_text_atomic(recipe_path, json.dumps(recipe.to_json(), indent=2) + "\n")
        load_recipe(weights)
    except (HnsegError, OSError) as error:
        _write_text_atomic(recipe_path, old_recipe)
        if old_reference is None:
            reference_path.unlink(missing_ok=True)
        else:
            reference_path.write_bytes(old_reference)
        raise ExportError(f"{recipe_path}: the recipe with the harmonisation does not validate ({error}); nothing "
                          f"was changed") from error


def _raw_model(raw: dict, stage: StageSpec, spec: ModelSpec) -> dict:
    models = raw["models"] if "stages" not in raw else next(s for s in raw["stages"] if s["name"] == stage.name)["models"]
    return next(m for m in models if m["name"] == spec.name)


def _write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
