"""The crop record and its sidecar file: everything needed to redo a paste-back, beside the mask.

The crop record (`crop_record`, in the run report under "crop", in `Prediction.crop`, and written with
`write_sidecar` as a JSON file beside the mask) holds, in full float precision, the CT and PET grids, the ROI (box
and the method's record), each model grid with the index ranges of the native CT and PET voxels it covers, the CT
index range the labels were pasted into, the restoration and the post-processing. With `paste_nearest` the sidecar
names an .npz file holding the labels on the model grid (an array, zyx, no geometry: the sidecar supplies it);
`redo_paste_back` rebuilds the mask from the two files alone.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hnseg_infer.errors import InputError, OutputError
from hnseg_infer.geometry.grid import Grid
from hnseg_infer.io.atomic import write_bytes_atomic
from hnseg_infer.io.images import Case
from hnseg_infer.recipe.spec import StageSpec
from hnseg_infer.restore.paste_back import ModelLabels, paste_nearest
from hnseg_infer.restore.postprocess import PostprocessConfig, postprocess

SIDECAR_SCHEMA = "hnseg.crop_sidecar/1"
LABELS_KEY = "labels_zyx"


# ------------------------------------------------------------------------------------------------ the record

def grid_exact(grid: Grid) -> dict:
    """A grid in full precision (Grid.to_dict rounds for reading; a paste-back needs the exact lattice)."""
    return {"size_xyz": [int(s) for s in grid.size_xyz], "spacing_xyz_mm": [float(s) for s in grid.spacing_xyz_mm],
            "origin_xyz_mm": [float(o) for o in grid.origin_xyz_mm], "direction": [float(d) for d in grid.direction]}


def grid_from_exact(d: dict) -> Grid:
    return Grid(tuple(int(s) for s in d["size_xyz"]), tuple(float(s) for s in d["spacing_xyz_mm"]),
                tuple(float(o) for o in d["origin_xyz_mm"]), tuple(float(v) for v in d["direction"]))


def index_range(native: Grid, grid: Grid) -> dict | None:
    """Which voxels of a native image a grid covers: `start_xyz`/`stop_xyz` (half-open, like Python slices), the
    native index range whose voxel centres lie within the bounds of the grid's extent, clipped to the image (when
    the grid's axes are the image's, up to order and sign, exactly the native voxels inside the extent);
    `bounds_xyz`, min and max of the continuous native indices of the extent's corners, unclipped (beyond -0.5 or
    size - 0.5 the grid reaches outside the image, where its voxels took the fill value: padding). None when
    no native voxel centre is within the bounds."""
    cropped = native.crop_to(grid.box())
    if cropped is None:
        return None
    slices_xyz = cropped[1][::-1]
    bounds = native.physical_to_index(grid.box().corners_xyz_mm())
    return {"start_xyz": [s.start for s in slices_xyz], "stop_xyz": [s.stop for s in slices_xyz],
            "bounds_xyz": {"min": bounds.min(axis=0).tolist(), "max": bounds.max(axis=0).tolist()}}


def crop_record(*, case: Case, stage: StageSpec, roi: dict, model_grids: list[Grid], paste_grid: Grid,
                paste_slices_zyx: tuple[slice, slice, slice], labels: ModelLabels | None) -> dict:
    """JSON-serialisable provenance of the last stage's crops and paste-back (see the module docstring).
    `roi` is the report's ROI entry (method, fell_back, box, record); `model_grids` the stage's model grids in
    recipe order; `paste_grid`/`paste_slices_zyx` the CT voxels the labels were restored onto; `labels` the
    model-grid labels of a paste_nearest restoration (None otherwise)."""
    slices_xyz = paste_slices_zyx[::-1]
    pet_grid = None if case.pet is None else case.pet_grid  # None in a CT-only run
    return {
        "schema": SIDECAR_SCHEMA,
        "restore": stage.restore,
        "stage": stage.name,
        "ct": {"path": str(case.ct_path), "grid": grid_exact(case.ct_grid)},
        "pet": None if pet_grid is None else {"path": str(case.pet_path), "grid": grid_exact(pet_grid)},
        "roi": roi,
        "models": [{"name": spec.name, "grid": grid_exact(grid), "ct_index_range": index_range(case.ct_grid, grid),
                    "pet_index_range": None if pet_grid is None else index_range(pet_grid, grid)}
                   for spec, grid in zip(stage.models, model_grids)],
        "labels_model": labels.model if labels is not None else None,
        "paste": {"ct_start_xyz": [s.start for s in slices_xyz], "ct_stop_xyz": [s.stop for s in slices_xyz],
                  "grid": grid_exact(paste_grid)},
        "postprocess": stage.postprocess.to_dict(),
    }


# ------------------------------------------------------------------------------------------------ the sidecar

def labels_file_for(sidecar: Path) -> Path:
    """The model-grid labels beside a sidecar: `case.json` → `case.model_labels.npz`."""
    sidecar = Path(sidecar)
    stem = sidecar.name[:-len(".json")] if sidecar.name.endswith(".json") else sidecar.name
    return sidecar.with_name(f"{stem}.model_labels.npz")


def write_sidecar(path: Path, record: dict, labels: ModelLabels | None, *, mask_path: Path | None = None) -> dict:
    """The crop record as JSON at `path` and, with paste_nearest labels, the model-grid labels beside it (.npz,
    referenced by name and sha256). Returns what was written; OutputError when a file cannot be written."""
    path = Path(path)
    sidecar = dict(record)
    if mask_path is not None:
        sidecar["mask"] = str(mask_path)
    try:
        if labels is not None:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **{LABELS_KEY: np.ascontiguousarray(labels.labels_zyx, dtype=np.uint8)})
            data = buffer.getvalue()
            labels_path = labels_file_for(path)
            write_bytes_atomic(labels_path, data)
            sidecar["labels_file"] = {"name": labels_path.name, "key": LABELS_KEY, "dtype": "uint8", "axes": "zyx",
                                      "shape_zyx": list(labels.labels_zyx.shape),
                                      "sha256": hashlib.sha256(data).hexdigest()}
        else:
            sidecar["labels_file"] = None
        write_bytes_atomic(path, (json.dumps(sidecar, indent=2) + "\n").encode())
    except OutputError as exc:  # the writer's cause: the OS's reason
        raise OutputError(f"cannot write the sidecar {path}: {exc.__cause__}; check that its folder is writable") from exc
    return sidecar


def redo_paste_back(sidecar_path: Path) -> sitk.Image:
    """The mask rebuilt from a sidecar and its labels file alone: the model-grid labels given the recorded model
    grid, nearest neighbour onto the recorded CT paste region, the recorded post-processing, pasted into a zero
    canvas with the CT's geometry. InputError for a sidecar without labels (restore 'probabilities') or a labels
    file that does not match."""
    sidecar_path = Path(sidecar_path)
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read the sidecar {sidecar_path} ({exc}): give the JSON written by --sidecar") from exc
    if sidecar.get("schema") != SIDECAR_SCHEMA:
        raise InputError(f"{sidecar_path}: schema {sidecar.get('schema')!r} is not {SIDECAR_SCHEMA!r}")
    entry = sidecar.get("labels_file")
    if entry is None:
        raise InputError(f"{sidecar_path}: restore {sidecar['restore']!r} keeps no model-grid labels; only a recipe "
                         f"with \"restore\": \"paste_nearest\" can be redone from its sidecar")
    labels_path = sidecar_path.with_name(entry["name"])
    data = labels_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise InputError(f"{labels_path}: sha256 does not match the one in {sidecar_path}: the labels were changed")
    labels_zyx = np.load(io.BytesIO(data))[entry["key"]]
    model = next(m for m in sidecar["models"] if m["name"] == sidecar["labels_model"])
    labels = ModelLabels(model["name"], labels_zyx, grid_from_exact(model["grid"]))
    ct = grid_from_exact(sidecar["ct"]["grid"])
    paste = sidecar["paste"]
    start, stop = np.asarray(paste["ct_start_xyz"]), np.asarray(paste["ct_stop_xyz"])
    target = Grid(tuple((stop - start).tolist()), ct.spacing_xyz_mm, tuple(ct.index_to_physical(start)[0].tolist()),
                  ct.direction)
    restored = paste_nearest(labels, target)
    restored, _ = postprocess(restored, spacing_xyz_mm=ct.spacing_xyz_mm,
                              config=PostprocessConfig.from_dict(sidecar["postprocess"]))
    canvas = np.zeros(ct.size_zyx, np.uint8)
    canvas[tuple(slice(int(a), int(b)) for a, b in zip(start[::-1], stop[::-1]))] = restored
    return ct.image_from_array(canvas)
