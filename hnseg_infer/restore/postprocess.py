"""Post-processing of the decoded label map: connected-component clean-up, as the source systems do it.

Labels: 0 background, 1 primary tumour (GTVp), 2 lymph nodes (GTVn). Arrays are in (z, y, x) index order; the
voxel spacing is given in (x, y, z) mm, as SimpleITK reports it, and reversed here where an array axis needs it.

Steps, in this order, each recorded with every component it removed:

1. ``min_volume``: per label, drop 26-connected components whose volume (voxels × voxel volume, mm³) is below the
   label's threshold (SJTU_lab426's and BIGS2's small false-positive removal).
2. ``keep_largest_gtvp``: keep only the largest GTVp component.
3. ``gtvn_distance_to_gtvp``: drop GTVn components farther than a distance (mm) from GTVp (BIGS2's prior). The
   distance of a component is the minimum, over its voxels, of the Euclidean distance transform of ~GTVp computed
   with the anisotropic spacing: the distance between the closest voxel centres of the two structures, so a node
   touching GTVp across a face is one voxel step away. Without any GTVp the nodes are kept and the record says so.

Removed components become background (0). The input array is never modified.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import cc3d
import numpy as np
from scipy import ndimage

from hnseg_infer.errors import RecipeError
from hnseg_infer.labels import GTVN, GTVP, LABEL_NAMES
from hnseg_infer.recipe.frozen import FrozenMap

_LABEL_KEYS = {"GTVp": GTVP, "GTVn": GTVN, "1": GTVP, "2": GTVN}
CONFIG_KEYS = ("min_volume_mm3", "keep_largest_gtvp", "gtvn_max_distance_to_gtvp_mm")
CONNECTIVITY = 26
_WHERE = "recipe 'postprocess'"


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _label_of(key, where: str) -> int:
    """1/2, "1"/"2" or "GTVp"/"GTVn" → 1/2; anything else is a RecipeError."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool) and int(key) in LABEL_NAMES:
        return int(key)
    if isinstance(key, str) and key in _LABEL_KEYS:
        return _LABEL_KEYS[key]
    raise RecipeError(f"{where}: 'min_volume_mm3' key {key!r} is not a label; use one of {sorted(_LABEL_KEYS)}")


@dataclass(frozen=True)
class PostprocessConfig:
    """What post-processing to do. Values are validated on construction (RecipeError naming the key and value).

    min_volume_mm3: per label (1/2), components with a smaller volume are removed; 0 or a missing label keeps all.
    keep_largest_gtvp: keep only the largest label-1 component.
    gtvn_max_distance_to_gtvp_mm: drop GTVn components whose distance to GTVp exceeds this (None: off).
    """

    min_volume_mm3: Mapping[int, float] = field(default_factory=FrozenMap)
    keep_largest_gtvp: bool = False
    gtvn_max_distance_to_gtvp_mm: float | None = None

    def __post_init__(self):
        if not isinstance(self.min_volume_mm3, Mapping):
            raise RecipeError(f"{_WHERE}: 'min_volume_mm3' must be an object mapping GTVp/GTVn to mm³, "
                              f"got {self.min_volume_mm3!r}")
        volumes: dict[int, float] = {}
        for key, value in self.min_volume_mm3.items():
            label = _label_of(key, _WHERE)
            name = LABEL_NAMES[label]
            if label in volumes:
                raise RecipeError(f"{_WHERE}: 'min_volume_mm3' gives {name} twice (as {key!r} and another key)")
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise RecipeError(f"{_WHERE}: 'min_volume_mm3' for {name} must be a finite number >= 0 mm³, "
                                  f"got {value!r}")
            volumes[label] = float(value)
        object.__setattr__(self, "min_volume_mm3", FrozenMap(volumes))  # a private copy with int keys
        if not isinstance(self.keep_largest_gtvp, (bool, np.bool_)):
            raise RecipeError(f"{_WHERE}: 'keep_largest_gtvp' must be true or false, got {self.keep_largest_gtvp!r}")
        object.__setattr__(self, "keep_largest_gtvp", bool(self.keep_largest_gtvp))
        distance = self.gtvn_max_distance_to_gtvp_mm
        if distance is not None:
            if not _is_number(distance) or not math.isfinite(distance) or distance < 0:
                raise RecipeError(f"{_WHERE}: 'gtvn_max_distance_to_gtvp_mm' must be a finite number >= 0 mm or "
                                  f"null, got {distance!r}")
            object.__setattr__(self, "gtvn_max_distance_to_gtvp_mm", float(distance))

    @classmethod
    def from_dict(cls, d: dict) -> PostprocessConfig:
        """From the recipe's "postprocess" object; only CONFIG_KEYS are allowed, all optional."""
        if not isinstance(d, dict):
            raise RecipeError(f"{_WHERE} must be a JSON object, got {type(d).__name__}")
        unknown = sorted(str(k) for k in d if k not in CONFIG_KEYS)
        if unknown:
            raise RecipeError(f"{_WHERE}: unknown key(s) {unknown}; allowed keys: {sorted(CONFIG_KEYS)}")
        return cls(min_volume_mm3=d.get("min_volume_mm3", {}),
                   keep_largest_gtvp=d.get("keep_largest_gtvp", False),
                   gtvn_max_distance_to_gtvp_mm=d.get("gtvn_max_distance_to_gtvp_mm"))

    def to_dict(self) -> dict:
        """JSON-serialisable, in from_dict's form."""
        return {"min_volume_mm3": {LABEL_NAMES[k]: v for k, v in sorted(self.min_volume_mm3.items())},
                "keep_largest_gtvp": self.keep_largest_gtvp,
                "gtvn_max_distance_to_gtvp_mm": self.gtvn_max_distance_to_gtvp_mm}


@dataclass(frozen=True)
class _Components:
    """The 26-connected components of one label: ids 1..n in `ids_zyx`, with per-id voxel counts and centroids."""

    ids_zyx: np.ndarray
    n: int
    voxel_counts: np.ndarray  # index 0 is the background
    centroids_zyx: np.ndarray  # (n + 1, 3), in the cropped array's indices


def _components(mask_zyx: np.ndarray) -> _Components:
    if not mask_zyx.any():
        return _Components(np.zeros(mask_zyx.shape, np.uint32), 0, np.zeros(1, np.int64), np.zeros((1, 3)))
    ids, n = cc3d.connected_components(mask_zyx, connectivity=CONNECTIVITY, return_N=True)
    stats = cc3d.statistics(ids)
    counts = np.asarray(stats["voxel_counts"], np.int64)
    centroids = np.asarray(stats["centroids"], np.float64).reshape(-1, 3)
    return _Components(ids, int(n), counts, centroids)


def _describe(comps: _Components, cid: int, *, label: int, voxel_volume_mm3: float, offset_zyx) -> dict:
    count = int(comps.voxel_counts[cid])
    return {"label": label, "name": LABEL_NAMES[label], "voxels": count,
            "volume_mm3": round(count * voxel_volume_mm3, 3),
            "centroid_index_zyx": [round(float(c) + o, 2) for c, o in zip(comps.centroids_zyx[cid], offset_zyx)]}


def _remove(out_zyx: np.ndarray, comps: _Components, ids: list[int]) -> None:
    if ids:
        drop = np.zeros(comps.n + 1, bool)
        drop[ids] = True
        out_zyx[drop[comps.ids_zyx]] = 0


def _check_inputs(labels_zyx, spacing_xyz_mm) -> tuple[float, float, float]:
    if not isinstance(labels_zyx, np.ndarray) or labels_zyx.ndim != 3:
        raise ValueError(f"labels_zyx must be a 3-D array, got {getattr(labels_zyx, 'shape', type(labels_zyx))}")
    if not (np.issubdtype(labels_zyx.dtype, np.integer) or labels_zyx.dtype == bool):
        raise ValueError(f"labels_zyx must hold integer labels, got dtype {labels_zyx.dtype}")
    spacing = tuple(float(s) for s in spacing_xyz_mm)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_xyz_mm must be 3 positive numbers, got {spacing_xyz_mm!r}")
    return spacing


def postprocess(labels_zyx: np.ndarray, *, spacing_xyz_mm, config: PostprocessConfig) -> tuple[np.ndarray, dict]:
    """Apply `config` to a (z, y, x) label map with voxel spacing `spacing_xyz_mm` (x, y, z) in mm.

    Returns a new uint8 array of the same shape and a JSON-serialisable record of every removed component.
    """
    spacing_xyz = _check_inputs(labels_zyx, spacing_xyz_mm)
    spacing_zyx = spacing_xyz[::-1]
    voxel_volume_mm3 = float(np.prod(spacing_xyz))
    if labels_zyx.size and (int(labels_zyx.min()) < 0 or int(labels_zyx.max()) > GTVN):
        raise ValueError(f"labels_zyx holds values in [{labels_zyx.min()}, {labels_zyx.max()}]; expected only 0, 1, 2")

    result = labels_zyx.astype(np.uint8, copy=True)
    record = {"config": config.to_dict(), "spacing_xyz_mm": list(spacing_xyz), "connectivity": CONNECTIVITY,
              "voxel_volume_mm3": voxel_volume_mm3,
              "voxels_before": {LABEL_NAMES[k]: int(np.count_nonzero(result == k)) for k in LABEL_NAMES},
              "steps": []}

    # Work on the bounding box of the foreground: components and distances are the same there, and it is small.
    nonzero = np.nonzero(result.any(axis=(1, 2)))[0], np.nonzero(result.any(axis=(0, 2)))[0], \
        np.nonzero(result.any(axis=(0, 1)))[0]
    if all(len(a) for a in nonzero):
        offset_zyx = tuple(int(a[0]) for a in nonzero)
        crop = result[tuple(slice(int(a[0]), int(a[-1]) + 1) for a in nonzero)]  # a view: edits reach `result`
    else:
        offset_zyx, crop = (0, 0, 0), result[0:0, 0:0, 0:0]
    describe = dict(voxel_volume_mm3=voxel_volume_mm3, offset_zyx=offset_zyx)

    # 1. small components
    step = {"step": "min_volume", "enabled": any(v > 0 for v in config.min_volume_mm3.values()),
            "min_volume_mm3": {LABEL_NAMES[k]: v for k, v in sorted(config.min_volume_mm3.items())}, "removed": []}
    for label, threshold in sorted(config.min_volume_mm3.items()):
        if threshold <= 0:
            continue
        comps = _components(crop == label)
        small = [cid for cid in range(1, comps.n + 1) if comps.voxel_counts[cid] * voxel_volume_mm3 < threshold]
        step["removed"] += [_describe(comps, cid, label=label, **describe) for cid in small]
        _remove(crop, comps, small)
    record["steps"].append(step)

    # 2. largest GTVp
    step = {"step": "keep_largest_gtvp", "enabled": config.keep_largest_gtvp, "kept": None, "removed": []}
    if config.keep_largest_gtvp:
        comps = _components(crop == GTVP)
        if comps.n:
            largest = 1 + int(np.argmax(comps.voxel_counts[1:]))  # ties: the lowest id, deterministic
            step["kept"] = _describe(comps, largest, label=GTVP, **describe)
            others = [cid for cid in range(1, comps.n + 1) if cid != largest]
            step["removed"] = [_describe(comps, cid, label=GTVP, **describe) for cid in others]
            _remove(crop, comps, others)
    record["steps"].append(step)

    # 3. GTVn distance to GTVp
    max_distance = config.gtvn_max_distance_to_gtvp_mm
    step = {"step": "gtvn_distance_to_gtvp", "enabled": max_distance is not None,
            "max_distance_mm": max_distance, "removed": []}
    if max_distance is not None:
        gtvp = crop == GTVP
        comps = _components(crop == GTVN)
        if not gtvp.any():
            step["skipped"] = "no GTVp left: GTVn kept unchanged"
        elif comps.n:
            distance_mm = ndimage.distance_transform_edt(~gtvp, sampling=spacing_zyx)
            nearest = ndimage.minimum(distance_mm, labels=comps.ids_zyx, index=np.arange(1, comps.n + 1))
            far = []
            for cid, d in zip(range(1, comps.n + 1), np.atleast_1d(nearest)):
                if d > max_distance:
                    far.append(cid)
                    step["removed"].append({**_describe(comps, cid, label=GTVN, **describe),
                                            "distance_mm": round(float(d), 3)})
            _remove(crop, comps, far)
    record["steps"].append(step)

    record["voxels_after"] = {LABEL_NAMES[k]: int(np.count_nonzero(result == k)) for k in LABEL_NAMES}
    return result, record
