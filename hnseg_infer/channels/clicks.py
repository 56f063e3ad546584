"""Click prompts for interactive refinement (HN-UISeg): physical points labelled GTVp/GTVn, positive or negative,
encoded as spheres of radius 3 voxels in a model's prompt channels on its own grid.

The clicks file (JSON; every key required unless marked optional, no others allowed):

    {"coordinate_system": "LPS",                       # optional: "LPS" (ITK, the default) or "RAS" (3D Slicer)
     "clicks": [{"point_mm": [x, y, z], "label": "GTVn", "type": "positive"},
                {"point_mm": [x, y, z], "label": "GTVp", "type": "negative"}]}

`point_mm` is a physical point in millimetres (ITK's LPS: x towards the patient's left, y posterior, z superior;
with "RAS", x and y are negated on reading). A recipe channel with source `clicks_gtvp` / `clicks_gtvn` holds the
GTVp / GTVn clicks: every voxel of the model grid within 3 voxels (Euclidean distance in voxel units, so an
ellipsoid in mm on an anisotropic grid) of a click's point is +1 for a positive click and −1 for a negative one,
0 elsewhere; where spheres overlap the later click wins. Without clicks (hnseg predict) the prompt channels are 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hnseg_infer.errors import InputError, RecipeError
from hnseg_infer.geometry.grid import Grid

PROMPT_SOURCES = {"clicks_gtvp": "GTVp", "clicks_gtvn": "GTVn"}
LABELS = ("GTVp", "GTVn")
TYPES = {"positive": 1.0, "negative": -1.0}
COORDINATE_SYSTEMS = ("LPS", "RAS")
RADIUS_VOXELS = 3.0
CLICK_KEYS = ("point_mm", "label", "type")
FILE_KEYS = ("clicks", "coordinate_system")
EXAMPLE = '{"clicks": [{"point_mm": [12.5, -40.0, 85.0], "label": "GTVn", "type": "positive"}]}'


@dataclass(frozen=True)
class Click:
    point_xyz_mm: tuple[float, float, float]  # LPS
    label: str  # "GTVp" or "GTVn"
    value: float  # +1 positive, -1 negative
    index: int  # its position in the file, for messages

    def to_dict(self) -> dict:
        return {"point_lps_mm": list(self.point_xyz_mm), "label": self.label,
                "type": "positive" if self.value > 0 else "negative"}


@dataclass
class Clicks:
    path: Path
    clicks: tuple[Click, ...]
    landed: set[int] = field(default_factory=set)  # clicks whose sphere touched some model grid

    def for_label(self, label: str) -> tuple[Click, ...]:
        return tuple(c for c in self.clicks if c.label == label)

    def to_dict(self) -> dict:
        return {"file": str(self.path), "clicks": [c.to_dict() for c in self.clicks]}


def load_clicks(path: Path) -> Clicks:
    """Read and validate a clicks file; InputError naming the file, the click and the fix."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(f"clicks file {path} does not exist: pass --clicks FILE.json, e.g. {EXAMPLE}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"clicks file {path} cannot be read ({error}): pass a UTF-8 JSON file") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"clicks file {path} is not valid JSON ({error}): fix it; the expected form is "
                         f"{EXAMPLE}") from error
    if not isinstance(data, dict):
        raise InputError(f"clicks file {path} must hold a JSON object with a 'clicks' list, got "
                         f"{type(data).__name__}; the expected form is {EXAMPLE}")
    if unknown := sorted(set(data) - set(FILE_KEYS)):
        raise InputError(f"clicks file {path}: unknown key(s) {unknown}; allowed: {list(FILE_KEYS)}")
    system = data.get("coordinate_system", "LPS")
    if system not in COORDINATE_SYSTEMS:
        raise InputError(f"clicks file {path}: coordinate_system must be one of {list(COORDINATE_SYSTEMS)}, got "
                         f"{system!r} (LPS is ITK's and the .mha files'; RAS is 3D Slicer's)")
    items = data.get("clicks")
    if not isinstance(items, list) or not items:
        raise InputError(f"clicks file {path}: 'clicks' must be a non-empty list of clicks, got {items!r}; e.g. "
                         f"{EXAMPLE}")
    return Clicks(path, tuple(_click(item, i, path, system) for i, item in enumerate(items)))


def _click(item, i: int, path: Path, system: str) -> Click:
    where = f"clicks file {path}: click {i}"
    if not isinstance(item, dict):
        raise InputError(f"{where} must be an object {{'point_mm': [x, y, z], 'label': 'GTVp'|'GTVn', "
                         f"'type': 'positive'|'negative'}}, got {item!r}")
    if missing := [key for key in CLICK_KEYS if key not in item]:
        raise InputError(f"{where} misses {missing}; each click needs {list(CLICK_KEYS)}")
    if unknown := sorted(set(item) - set(CLICK_KEYS)):
        raise InputError(f"{where} has unknown key(s) {unknown}; allowed: {list(CLICK_KEYS)}")
    point = item["point_mm"]
    if not (isinstance(point, list) and len(point) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in point)):
        raise InputError(f"{where}: 'point_mm' must be 3 finite numbers [x, y, z] in mm, got {point!r}")
    if item["label"] not in LABELS:
        raise InputError(f"{where}: 'label' must be 'GTVp' or 'GTVn', got {item['label']!r}")
    if item["type"] not in TYPES:
        raise InputError(f"{where}: 'type' must be 'positive' or 'negative', got {item['type']!r}")
    x, y, z = (float(v) for v in point)
    lps = (-x, -y, z) if system == "RAS" else (x, y, z)
    return Click(lps, item["label"], TYPES[item["type"]], i)


def check_inside(clicks: Clicks, ct_grid: Grid, *, ct_path: Path) -> None:
    """Every click must lie in the CT's extent."""
    box = ct_grid.box()
    d = np.asarray(box.direction).reshape(3, 3)
    for click in clicks.clicks:
        local = d.T @ (np.asarray(click.point_xyz_mm) - np.asarray(box.corner_xyz_mm))
        if np.any(local < 0) or np.any(local > np.asarray(box.size_xyz_mm)):
            raise InputError(f"clicks file {clicks.path}: click {click.index} at {list(click.point_xyz_mm)} mm (LPS) "
                             f"lies outside CT {ct_path} (centre {box.center_xyz_mm.round(1).tolist()} mm): check "
                             f"the coordinates and their coordinate_system (LPS or RAS)")


def prompt_sources(recipe) -> set[str]:
    """The prompt channel sources the recipe's models take."""
    return {channel.source for model in recipe.models for channel in model.channels
            if channel.source in PROMPT_SOURCES}


def check_recipe_takes(recipe, clicks: Clicks) -> None:
    """Refinement needs a model with a prompt channel for each clicked label: RecipeError otherwise."""
    sources = prompt_sources(recipe)
    if not sources:
        raise RecipeError(f"recipe {recipe.path} ({recipe.name!r}) has no model with a click-prompt channel (channel "
                          f"source 'clicks_gtvp' or 'clicks_gtvn'), so clicks cannot change its prediction: refine "
                          f"with weights trained on click prompts (e.g. HN-UISeg), or use 'hnseg predict'")
    taken = {PROMPT_SOURCES[s] for s in sources}
    for click in clicks.clicks:
        if click.label not in taken:
            raise RecipeError(f"clicks file {clicks.path}: click {click.index} is a {click.label} click, but recipe "
                              f"{recipe.path} has prompt channels for {sorted(taken)} only: remove the click or use "
                              f"weights with a 'clicks_{click.label.lower()}' channel")


def check_landed(clicks: Clicks) -> None:
    """Every click must have reached some model grid (after the run); a click outside every ROI changes nothing."""
    if missed := [c for c in clicks.clicks if c.index not in clicks.landed]:
        listed = ", ".join(f"click {c.index} at {list(c.point_xyz_mm)} mm" for c in missed)
        raise InputError(f"clicks file {clicks.path}: {listed} lie(s) outside the region the models see (the ROI "
                         f"boxes in the run report), so they would change nothing: remove them, or move them onto "
                         f"the lesion")


def encode(clicks: Clicks | None, source: str, grid: Grid) -> np.ndarray:
    """float32 [z, y, x] prompt channel of `source` on `grid`: ±1 within 3 voxels of each click, 0 elsewhere."""
    channel = np.zeros(grid.size_zyx, np.float32)
    if clicks is None:
        return channel
    size_xyz = np.asarray(grid.size_xyz)
    for click in clicks.for_label(PROMPT_SOURCES[source]):
        centre = grid.physical_to_index(click.point_xyz_mm)[0]  # continuous, xyz
        lo = np.maximum(np.ceil(centre - RADIUS_VOXELS), 0).astype(int)
        hi = np.minimum(np.floor(centre + RADIUS_VOXELS), size_xyz - 1).astype(int)
        if np.any(hi < lo):
            continue
        axes = [np.arange(lo[a], hi[a] + 1) - centre[a] for a in range(3)]
        dz, dy, dx = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
        inside = dx**2 + dy**2 + dz**2 <= RADIUS_VOXELS**2
        if not inside.any():
            continue
        block = channel[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
        block[inside] = click.value
        clicks.landed.add(click.index)
    return channel


def check_before_run(clicks: Clicks, recipe, *, ct_grid: Grid, ct_path: Path) -> dict:
    """The checks that need no model run: the recipe takes these clicks, and they lie in the CT. Returns the
    report's entry."""
    check_recipe_takes(recipe, clicks)
    check_inside(clicks, ct_grid, ct_path=ct_path)
    return {**clicks.to_dict(), "radius_voxels": RADIUS_VOXELS, "encoding": "+1 positive, -1 negative, 0 elsewhere"}
