"""Synthetic FDG PET/CT phantoms in the grand-challenge layout, for tests, benchmarks, the demo and training.

Anatomy is defined analytically in physical space (mm, LPS: +x left, +y posterior, +z superior; the vertex of the
head at z ≈ 5) as named, possibly rotated ellipsoids, then evaluated at the voxel centres of a CT grid and of a
coarser PET grid with its own z-range and origin, so any direction, origin or spacing shows the same patient.
Deterministic from the seed.

The anatomy varies with the seed: a primary tumour (label 1, GTVp) around the oropharynx made of 2-4 overlapping
lobes, sometimes with a faint necrotic core; 0-4 cervical nodes (label 2, GTVn; 5-30 mm, SUV 2.5-10) at levels
II-IV down either side of the neck, never touching the tumour, each other or the glands; parotid and submandibular
glands and tonsils with moderate uptake as distractors; brain, heart and bladder uptake; subcutaneous fat. Every
shape has a name (SHAPE_NAMES), so `Phantom.region_zyx(grid, ("head", "neck"))` gives region masks on any grid.

`make_phantom` takes the acquisition geometry as keywords (defaults: a fixed, simple geometry used by the tests);
`hecktor_acquisition(seed)` draws HECKTOR-like keywords (CT 512² at 0.9-1.0 mm with 1.5-3.3 mm slices, PET
128-200² at 2.7-5.5 mm with its own z-range, resolution and noise), as the `hnseg phantom` command uses them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from hnseg_infer.geometry.grid import IDENTITY, Box, Grid

FOV_Z_RANGE_MM = {"head-only": (-300.0, 10.0), "head-neck": (-420.0, 10.0), "whole-body": (-1000.0, 10.0),
                  "no-head": (-200.0, 0.0)}
NECK_BOTTOM_Z_MM = -300.0  # every head-and-neck lesion lies above this
LESION_FLOOR_Z_MM = {"head-only": NECK_BOTTOM_Z_MM, "head-neck": NECK_BOTTOM_Z_MM, "whole-body": NECK_BOTTOM_Z_MM,
                     "no-head": -145.0}  # the lowest lesion point per fov: the PET always reaches 10 mm below it
BQML_PER_SUV = 5000.0  # ~350 MBq in 70 kg
PET_FWHM_MM = 6.0
PET_NOISE_FRACTION = 0.1  # multiplicative, per PET voxel
CT_NOISE_HU = 10.0
SOFT_TISSUE_HU = 40.0
FAT_HU, FAT_SUV = -100.0, 0.3
BRAIN_CENTER_XYZ_MM = (0.0, 8.0, -70.0)
HEART_CENTER_XYZ_MM = (20.0, -10.0, -470.0)
BLADDER_CENTER_XYZ_MM = (0.0, 10.0, -800.0)
SHAPE_NAMES = ("body", "head", "neck", "skull", "brain", "spine", "airway", "parotid", "submandibular", "tonsil",
               "lung", "heart", "liver", "bladder", "leg", "bone", "tumour", "node", "necrosis")


@dataclass(frozen=True)
class Ellipsoid:
    """A uniform ellipsoid: `radii` along its principal axes, the columns of the 3×3 row-major `axes` (identity:
    along x, y, z). `hu`/`suv` None leave the CT/PET as painted before; `label` is painted on the reference."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    hu: float | None  # None: leave the CT as it is
    suv: float | None
    label: int = 0
    name: str = ""
    axes: tuple[float, ...] = IDENTITY

    def _axes(self) -> np.ndarray:
        return np.asarray(self.axes, dtype=np.float64).reshape(3, 3)

    def inside(self, points: np.ndarray) -> np.ndarray:
        """Which physical points (N, 3, xyz mm) lie inside."""
        u = ((np.atleast_2d(points) - self.center) @ self._axes()) / self.radii
        return (u ** 2).sum(axis=1) <= 1.0

    def half_extent_xyz_mm(self) -> np.ndarray:
        """Half the size of the axis-aligned box that holds the ellipsoid."""
        return np.sqrt(((self._axes() * np.asarray(self.radii)) ** 2).sum(axis=1))

    def inside_block_zyx(self, grid: Grid, lo_xyz: np.ndarray, hi_xyz: np.ndarray) -> np.ndarray:
        """Inside-mask of the voxel centres of a block of `grid` (indices lo..hi-1, xyz), as a zyx array.
        The normalised coordinate u = A^T (p - c) / r is affine in the voxel index, so it is built by broadcasting
        one vector per index axis (no per-voxel coordinate array). When each u component follows one index axis
        (an axis-aligned ellipsoid on a grid whose direction permutes/flips the axes), the sum of squares is
        separable: a 2D (z, y) remainder compared with a 1D x term, one pass over the block."""
        radii = np.asarray(self.radii, dtype=np.float64)
        rot = self._axes().T
        scale = (rot @ np.asarray(grid.direction, dtype=np.float64).reshape(3, 3)
                 * np.asarray(grid.spacing_xyz_mm)) / radii[:, None]
        scale[np.abs(scale) < 1e-12] = 0.0
        offset = rot @ (np.asarray(grid.origin_xyz_mm) - self.center) / radii
        ranges = [np.arange(lo_xyz[b], hi_xyz[b], dtype=np.float64) for b in range(3)]
        shapes = ((1, 1, -1), (1, -1, 1), (-1, 1, 1))  # index axis x, y, z as zyx broadcast shapes
        out_shape = tuple(int(hi_xyz[b] - lo_xyz[b]) for b in (2, 1, 0))
        nonzero = scale != 0
        if np.all(nonzero.sum(axis=1) == 1) and np.all(nonzero.sum(axis=0) == 1):
            terms = [None, None, None]  # per index axis b: u_a(i_b)^2, 1D
            for a in range(3):
                b = int(np.flatnonzero(nonzero[a])[0])
                terms[b] = (offset[a] + scale[a, b] * ranges[b]) ** 2
            remainder_zy = 1.0 - terms[2][:, None] - terms[1][None, :]
            return terms[0][None, None, :] <= remainder_zy[:, :, None]
        total = np.zeros(out_shape, np.float32)
        for a in range(3):
            u = np.float32(offset[a])
            for b in range(3):
                if scale[a, b] != 0:
                    u = u + (scale[a, b] * ranges[b]).astype(np.float32).reshape(shapes[b])
            total += np.broadcast_to(u, total.shape) ** 2
        return total <= 1.0


def _check_names(names) -> tuple[str, ...]:
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = sorted(set(names) - set(SHAPE_NAMES))
    if unknown:
        raise ValueError(f"unknown shape name(s) {unknown}; known: {list(SHAPE_NAMES)}")
    return names


@dataclass(frozen=True)
class Phantom:
    """A synthetic study: CT (float32 HU), PET (float32, SUV or Bq/mL) on its own grid, and the reference label
    (uint8 on the CT grid: 1 GTVp, 2 GTVn); `shapes` is the analytic anatomy in physical space, in painting order.
    `tumour_center_xyz_mm` is the centroid of the primary tumour (the union of its lobes)."""

    ct: sitk.Image  # float32 HU
    pet: sitk.Image  # float32, SUV or Bq/mL
    label: sitk.Image  # uint8 on the CT grid
    tumour_center_xyz_mm: tuple[float, float, float]
    shapes: tuple[Ellipsoid, ...]

    def named(self, names: str | Iterable[str]) -> tuple[Ellipsoid, ...]:
        names = _check_names(names)
        return tuple(s for s in self.shapes if s.name in names)

    def region_zyx(self, grid: Grid, names: str | Iterable[str]) -> np.ndarray:
        """Bool zyx array on `grid`: voxel centres inside any shape with one of the `names` (e.g. ("head", "neck")
        for a head-and-neck mask), whatever was painted over them."""
        return _union_zyx(self.named(names), grid)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation on grids

def _index_block(shape: Ellipsoid, grid: Grid) -> tuple[np.ndarray, np.ndarray] | None:
    """The range of voxel indices (xyz, inclusive lo, exclusive hi) whose centres may lie inside the shape."""
    half = shape.half_extent_xyz_mm()
    box = Box(tuple(np.subtract(shape.center, half)), tuple(2 * half))
    index = grid.physical_to_index(box.corners_xyz_mm())
    lo = np.maximum(np.floor(index.min(axis=0)), 0).astype(int)
    hi = np.minimum(np.ceil(index.max(axis=0)) + 1, grid.size_xyz).astype(int)
    return (lo, hi) if np.all(hi > lo) else None


def _slabs(shape: Ellipsoid, grid: Grid, max_voxels: int):
    """(inside mask, zyx region) of a shape on a grid, a slab of slices at a time to bound memory."""
    block = _index_block(shape, grid)
    if block is None:
        return
    lo, hi = block
    step = max(1, max_voxels // int((hi[0] - lo[0]) * (hi[1] - lo[1])))
    for k0 in range(lo[2], hi[2], step):
        k1 = min(k0 + step, hi[2])
        inside = shape.inside_block_zyx(grid, np.array([lo[0], lo[1], k0]), np.array([hi[0], hi[1], k1]))
        yield inside, (slice(k0, k1), slice(lo[1], hi[1]), slice(lo[0], hi[0]))


def _union_zyx(shapes, grid: Grid, max_voxels: int = 1 << 23) -> np.ndarray:
    mask = np.zeros(grid.size_zyx, bool)
    for shape in shapes:
        for inside, region in _slabs(shape, grid, max_voxels):
            mask[region] |= inside
    return mask


def _evaluate(shapes, grid: Grid, *, background_hu: float = -1000.0, max_voxels: int = 1 << 23,
              want: str = "hu suv label"):
    """HU, SUV and label volumes (zyx) on a grid (None for those not in `want`), painted in order: each shape is
    tested only inside its own index block."""
    hu = np.full(grid.size_zyx, background_hu, np.float32) if "hu" in want else None
    suv = np.zeros(grid.size_zyx, np.float32) if "suv" in want else None
    label = np.zeros(grid.size_zyx, np.uint8) if "label" in want else None
    for shape in shapes:
        for inside, region in _slabs(shape, grid, max_voxels):
            if hu is not None and shape.hu is not None:
                np.copyto(hu[region], np.float32(shape.hu), where=inside)
            if suv is not None and shape.suv is not None:
                np.copyto(suv[region], np.float32(shape.suv), where=inside)
            if label is not None:
                np.copyto(label[region], np.uint8(shape.label), where=inside)
    return hu, suv, label


def _uptake_zyx(shapes, grid: Grid, *, supersample: int = 5, small_voxels: int = 1 << 16) -> np.ndarray:
    """SUV on a (coarse PET) grid with partial volume: shapes whose index block is small (lesions, glands, heart)
    are painted by their fractional coverage of each voxel, from a supersample× finer grid averaged back, so a
    5 mm node on a 5 mm PET grid neither vanishes nor fills a whole voxel; large shapes by their voxel centres."""
    suv = np.zeros(grid.size_zyx, np.float32)
    ss = int(supersample)
    d = np.asarray(grid.direction, dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(grid.spacing_xyz_mm)
    fine = replace(grid, size_xyz=tuple(int(n) * ss for n in grid.size_xyz), spacing_xyz_mm=tuple(spacing / ss),
                   origin_xyz_mm=tuple(np.asarray(grid.origin_xyz_mm) - d @ (spacing * (ss - 1) / (2 * ss))))
    for shape in shapes:
        block = None if shape.suv is None else _index_block(shape, grid)
        if block is None:
            continue
        lo, hi = block
        if np.prod(hi - lo) > small_voxels:
            for inside, region in _slabs(shape, grid, 1 << 23):
                np.copyto(suv[region], np.float32(shape.suv), where=inside)
            continue
        lo, hi = np.maximum(lo - 1, 0), np.minimum(hi + 1, grid.size_xyz)
        n = hi - lo
        inside = shape.inside_block_zyx(fine, lo * ss, hi * ss).reshape(n[2], ss, n[1], ss, n[0], ss)
        fraction = inside.sum(axis=(1, 3, 5), dtype=np.float32) / np.float32(ss ** 3)
        region = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
        suv[region] += fraction * (np.float32(shape.suv) - suv[region])
    return suv


def _centroid_xyz_mm(shapes) -> tuple[float, float, float]:
    """Centroid of the union of shapes, on a 0.5 mm lattice (independent of any image grid)."""
    lo = np.min([np.subtract(s.center, s.half_extent_xyz_mm()) for s in shapes], axis=0)
    hi = np.max([np.add(s.center, s.half_extent_xyz_mm()) for s in shapes], axis=0)
    grid = Grid.covering(Box(tuple(lo - 1), tuple(hi - lo + 2)), (0.5, 0.5, 0.5))
    zyx = np.argwhere(_union_zyx(shapes, grid))
    return tuple(float(v) for v in grid.index_to_physical(zyx[:, ::-1].mean(axis=0))[0])


# ----------------------------------------------------------------------------------------------------------------
# Anatomy

def _rotation(rng: np.random.Generator, max_angle_rad: float = np.pi) -> tuple[float, ...]:
    """A random rotation (row-major 3×3) by at most `max_angle_rad` about a random axis."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(-max_angle_rad, max_angle_rad)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    return tuple(float(v) for v in rot.ravel())


def _fill_points(shape: Ellipsoid, margin_mm: float = 0.0, pitch_mm: float = 1.5) -> np.ndarray:
    """Points of a `pitch_mm` lattice (and the axis tips) inside the shape grown by `margin_mm` along its radii."""
    radii = np.asarray(shape.radii) + margin_mm
    axes = [np.arange(-r, r + 1e-9, pitch_mm) if r > pitch_mm else np.array([0.0]) for r in radii]
    local = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    local = np.concatenate([local[((local / radii) ** 2).sum(axis=1) <= 1.0], np.diag(radii), -np.diag(radii)])
    return np.asarray(shape.center) + local @ np.asarray(shape.axes, dtype=np.float64).reshape(3, 3).T


def _inside_union(points: np.ndarray, shapes) -> np.ndarray:
    inside = np.zeros(len(points), bool)
    for s in shapes:
        inside |= s.inside(points)
    return inside


def _clear_of(shape: Ellipsoid, others, gap_mm: float) -> bool:
    """No point of the shape grown by gap_mm lies in any of the others (a true overlap would leave a
    gap_mm-deep intersection, which the 1.5 mm lattice cannot miss)."""
    return not _inside_union(_fill_points(shape, gap_mm), others).any()


def _head_and_neck(rng: np.random.Generator) -> list[Ellipsoid]:
    """Head, neck, skull, brain, spine, airway and the salivary glands and tonsils (distractors with uptake)."""
    shapes = [Ellipsoid((0, 5, -95), (75, 95, 100), SOFT_TISSUE_HU, 1.0, name="head"),
              Ellipsoid((0, 10, -215), (58, 62, 115), SOFT_TISSUE_HU, 1.0, name="neck"),
              # bone shell: the brain paints its inside
              Ellipsoid((0, 5, -80), (68, 88, 82), 700, 0.5, name="skull"),
              Ellipsoid(BRAIN_CENTER_XYZ_MM, (60, 80, 68), 30, float(rng.uniform(8.0, 12.0)), name="brain"),
              Ellipsoid((0, 38, -235), (12, 13, 90), 500, 0.8, name="spine"),  # cervical spine
              Ellipsoid((0, -40, -165), (30, 20, 12), -1000, 0.0, name="airway"),  # oral cavity / pharynx
              Ellipsoid((0, -18, -245), (9, 9, 70), -1000, 0.0, name="airway")]  # larynx / trachea
    parotid, submandibular, tonsil = rng.uniform(1.5, 3.5), rng.uniform(1.5, 3.0), rng.uniform(2.0, 5.0)
    for s in (-1, 1):
        shapes.append(Ellipsoid((s * 46, 12, -150), (14, 18, 20), 30, float(parotid * rng.uniform(0.85, 1.15)),
                                name="parotid"))
        shapes.append(Ellipsoid((s * 30, -33, -208), (12, 10, 10), 45, float(submandibular * rng.uniform(0.85, 1.15)),
                                name="submandibular"))
        shapes.append(Ellipsoid((s * 16, -15, -172), (8, 8, 10), 45, float(tonsil * rng.uniform(0.85, 1.15)),
                                name="tonsil"))
    return shapes


def _trunk(fov: str, rng: np.random.Generator) -> list[Ellipsoid]:
    """Body below the neck: trunk (first: everything paints over it), then lungs, heart, liver, bladder, legs."""
    shapes = [Ellipsoid((0, 15, -640), (170, 115, 400), SOFT_TISSUE_HU, 0.9, name="body"),
              Ellipsoid((0, 70, -640), (16, 16, 400), 500, 0.8, name="spine"),
              Ellipsoid((-85, 15, -420), (60, 75, 120), -800, 0.5, name="lung"),
              Ellipsoid((85, 15, -420), (60, 75, 120), -800, 0.5, name="lung"),
              Ellipsoid(HEART_CENTER_XYZ_MM, (50, 45, 50), SOFT_TISSUE_HU, float(rng.uniform(2.0, 10.0)), name="heart")]
    if fov == "whole-body":
        shapes += [Ellipsoid((-60, 20, -600), (90, 70, 65), 55, float(rng.uniform(1.8, 2.8)), name="liver"),
                   Ellipsoid(BLADDER_CENTER_XYZ_MM, (40, 35, 35), 10, float(rng.uniform(18.0, 40.0)), name="bladder"),
                   Ellipsoid((-90, 10, -1000), (70, 70, 220), SOFT_TISSUE_HU, 0.8, name="leg"),
                   Ellipsoid((90, 10, -1000), (70, 70, 220), SOFT_TISSUE_HU, 0.8, name="leg")]
    return shapes


def _primary_tumour(rng: np.random.Generator, container) -> list[Ellipsoid]:
    """GTVp around the oropharynx: 2-4 overlapping, tilted lobes (SUV 5-15, CT +20..+40 HU over soft tissue),
    with a faint, hypodense necrotic core one time in three. Re-drawn until it lies inside the head and neck."""
    for _ in range(100):
        suv, hu = rng.uniform(5.0, 15.0), SOFT_TISSUE_HU + rng.uniform(20.0, 40.0)
        center = np.array((rng.uniform(-12, 12), rng.uniform(-20, -5), rng.uniform(-195, -175)))
        main = Ellipsoid(tuple(center), tuple(rng.uniform(7.0, 16.0, 3).round(1)), float(hu),
                         float(suv), 1, "tumour", _rotation(rng))
        lobes = [main]
        for _ in range(int(rng.integers(1, 4))):
            direction = rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
            radii = rng.uniform(5.0, 12.0, 3).round(1)
            offset = direction * rng.uniform(0.4, 0.9) * min(main.radii)  # the lobe centre is inside the main lobe
            lobes.append(Ellipsoid(tuple(center + offset), tuple(radii), float(hu + rng.uniform(-5, 5)),
                                   float(suv * rng.uniform(0.8, 1.2)), 1, "tumour", _rotation(rng)))
        if rng.uniform() < 1 / 3:
            lobes.append(Ellipsoid(tuple(center), tuple(np.multiply(main.radii, rng.uniform(0.35, 0.6)).round(1)),
                                   float(SOFT_TISSUE_HU + rng.uniform(-15, 5)), float(suv * rng.uniform(0.15, 0.45)),
                                   1, "necrosis", main.axes))
        if all(_inside_union(_fill_points(lobe, 2.0, 3.0), container).all() for lobe in lobes):
            return lobes
    raise RuntimeError("could not place the primary tumour")  # pragma: no cover


NODE_LEVELS_Z_MM = {"II": (-220.0, -185.0), "III": (-248.0, -220.0), "IV": (-270.0, -248.0)}


def _nodes(rng: np.random.Generator, container, avoid) -> list[Ellipsoid]:
    """0-4 cervical nodes (GTVn) at levels II-IV, either side: 5-30 mm (largest diameter; small ones likelier),
    SUV 2.5-10 (faint ones too), CT +10..+30 HU, the larger sometimes with a necrotic core. A node is re-drawn
    until it lies inside the neck and 3 mm clear of the tumour, the other nodes, glands, spine and airway; one
    that cannot be placed in 50 draws is left out."""
    nodes = []
    count = int(rng.choice(5, p=(0.2, 0.3, 0.25, 0.15, 0.1)))
    for _ in range(count):
        level = NODE_LEVELS_Z_MM[str(rng.choice(list(NODE_LEVELS_Z_MM)))]
        side = rng.choice((-1, 1))
        diameter = float(np.exp(rng.uniform(np.log(5.0), np.log(30.0))))
        radii = tuple(float(max(2.5, diameter / 2 * f)) for f in (1.0, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)))
        radii = tuple(np.round(rng.permutation(radii), 2))
        suv = float(rng.uniform(2.5, 10.0))
        hu = float(SOFT_TISSUE_HU + rng.uniform(10.0, 30.0))
        axes = _rotation(rng, np.pi / 6)
        for _ in range(50):
            center = (side * rng.uniform(20, 48), rng.uniform(-15, 25), rng.uniform(*level))
            node = Ellipsoid(center, radii, hu, suv, 2, "node", axes)
            if _inside_union(_fill_points(node, 3.0, 3.0), container).all() and _clear_of(node, avoid + nodes, 3.0):
                nodes.append(node)
                break
    cores = [Ellipsoid(n.center, tuple(np.multiply(n.radii, 0.5).round(2)), SOFT_TISSUE_HU + 5.0, n.suv * 0.3, 2,
                       "necrosis", n.axes) for n in nodes if max(n.radii) > 9.0 and rng.uniform() < 0.5]
    return nodes + cores


def anatomy(seed: int, fov: str = "head-neck") -> tuple[Ellipsoid, ...]:
    """The phantom's shapes (cheap: no images), in painting order (later ones overwrite earlier ones): lesions
    last, so they win over glands. The head, neck and lesions of a seed are the same in every fov (their own random
    stream; the trunk has another)."""
    if fov not in FOV_Z_RANGE_MM:
        raise ValueError(f"fov must be one of {list(FOV_Z_RANGE_MM)}, got {fov!r}")
    head_rng, trunk_rng = (np.random.default_rng([int(seed), stream]) for stream in (1, 2))
    if fov == "no-head":  # a thigh (through the whole field of view) with a large hot sarcoma beside the femur:
        # the sarcoma is as big, wide and hot as a brain, so only the missing skull tells it from a head
        return (Ellipsoid((0, 0, -100), (120, 105, 400), SOFT_TISSUE_HU, 0.8, name="leg"),
                Ellipsoid((-15, 5, -100), (15, 15, 400), 700, 0.3, name="bone"),
                Ellipsoid((52, -35, -90), (52, 50, 55), 50, float(head_rng.uniform(8, 15)), 1, "tumour"))
    trunk = _trunk(fov, trunk_rng) if fov in ("head-neck", "whole-body") else []
    head_neck = _head_and_neck(head_rng)
    container = [s for s in head_neck if s.name in ("head", "neck")]
    tumour = _primary_tumour(head_rng, container)
    avoid = tumour + [s for s in head_neck if s.name in ("parotid", "submandibular", "tonsil", "spine", "airway")]
    nodes = _nodes(head_rng, container, avoid)
    # subcutaneous fat: the body (8-25 mm) and neck (3-9 mm) outlines are fat shells around soft tissue (their own
    # stream, so the lesions of a seed do not depend on it); the head has none
    fat_rng = np.random.default_rng([int(seed), 5])
    outlines = [(s, (8.0, 25.0)) for s in trunk[:1]] + [(head_neck[1], (3.0, 9.0))]  # body, neck
    fat = [replace(s, hu=FAT_HU, suv=FAT_SUV) for s, _ in outlines]
    inner = [replace(s, radii=tuple(np.subtract(s.radii, fat_rng.uniform(*mm)).round(1))) for s, mm in outlines]
    return tuple(fat + inner + head_neck[:1] + head_neck[2:] + trunk[1:] + tumour + nodes)


# ----------------------------------------------------------------------------------------------------------------
# Acquisition

def hecktor_acquisition(seed: int) -> dict:
    """`make_phantom` keywords for a HECKTOR-like acquisition, drawn from the seed (its own random stream, so the
    anatomy of a seed does not depend on it): CT 512² at 0.9-1.0 mm, 1.5-3.3 mm slices, its field of view centred
    up to 15 mm off the patient in-plane and -5..+8 mm in z; PET 128-200² voxels at 2.7-5.5 mm in-plane (a
    500-720 mm field), 2.7-5.0 mm slices, starting up to 100 mm above or 50 mm below the CT's bottom (never above
    the lesions) and ending 5-40 mm above its top; PET resolution 5-8 mm FWHM and 6-18 % noise."""
    rng = np.random.default_rng([int(seed), 0xACC])
    ct_xy = round(float(rng.uniform(0.9, 1.0)), 4)
    ct_z = float(rng.choice((1.5, 2.0, 2.5, 3.0, 3.27, round(float(rng.uniform(1.5, 3.3)), 2))))
    pet_n = int(rng.choice((128, 144, 168, 192, 200)))
    pet_xy = round(float(np.clip(rng.uniform(500.0, 720.0) / pet_n, 2.7, 5.5)), 4)
    pet_z = round(float(rng.uniform(2.7, 5.0)), 3)
    shift = (float(rng.uniform(-15, 15)), float(rng.uniform(-15, 15)), float(rng.uniform(-5, 8)))
    return {"ct_spacing_xyz_mm": (ct_xy, ct_xy, ct_z), "ct_size_xy": 512, "ct_origin_shift_mm": shift,
            "pet_spacing_xyz_mm": (pet_xy, pet_xy, pet_z), "pet_size_xyz": (pet_n, pet_n, None),
            "pet_z_margins_mm": (float(rng.uniform(-100.0, 50.0)), float(rng.uniform(5.0, 40.0))),
            "pet_fwhm_mm": float(rng.uniform(5.0, 8.0)), "pet_noise_fraction": float(rng.uniform(0.06, 0.18))}


def _add_ct_noise(hu: np.ndarray, rng: np.random.Generator, sigma: float, pool_slices: int = 32, pad: int = 64):
    """Add Gaussian noise to a CT volume in place: drawn for a pool of slices and reused per slab at random
    in-plane offsets (drawing ~200 M normals for a whole-body CT would take seconds)."""
    nz, ny, nx = hu.shape
    pool = rng.standard_normal((min(pool_slices, nz), ny + pad, nx + pad), dtype=np.float32) * np.float32(sigma)
    for k0 in range(0, nz, pool.shape[0]):
        k1 = min(k0 + pool.shape[0], nz)
        oy, ox = rng.integers(0, pad + 1, 2)
        hu[k0:k1] += pool[: k1 - k0, oy:oy + ny, ox:ox + nx]


def _pet_suv_zyx(shapes, grid: Grid, rng: np.random.Generator, *, fwhm_mm: float = PET_FWHM_MM,
                 noise_fraction: float = PET_NOISE_FRACTION) -> np.ndarray:
    """The PET in SUV on its grid: the shapes' uptake (with partial volume), blurred to `fwhm_mm`, with
    multiplicative noise."""
    suv = _uptake_zyx(shapes, grid)
    sigma_zyx_vox = [fwhm_mm / 2.355 / s for s in grid.spacing_xyz_mm[::-1]]
    suv = gaussian_filter(suv, sigma_zyx_vox)
    return np.clip(suv * (1 + noise_fraction * rng.standard_normal(suv.shape, dtype=np.float32)), 0, None)


def acquisition_grids(fov: str = "head-neck", *, ct_spacing_xyz_mm=(0.98, 0.98, 2.0), ct_size_xy: int = 512,
                      pet_spacing_xyz_mm=(4.0, 4.0, 4.0), ct_direction=IDENTITY, ct_origin_shift_mm=(0.0, 0.0, 0.0),
                      pet_size_xyz=None, pet_z_margins_mm=(20.0, 30.0), **_) -> tuple[Grid, Grid]:
    """The CT and PET grids of `make_phantom` with these keywords (cheap: no images); other keywords are ignored.

    The CT covers ct_size_xy × ct_spacing_x mm in-plane and the fov's z-range (FOV_Z_RANGE_MM), shifted by
    `ct_origin_shift_mm`, on a lattice with `ct_direction`. The PET (identity direction, centred in-plane on
    x = y = 0) covers a wider field than the CT in-plane (1.2×) unless `pet_size_xyz` fixes its voxel counts; in z
    it starts `pet_z_margins_mm[0]` below the fov's bottom (negative: above) and ends `pet_z_margins_mm[1]` above
    its top, unless pet_size_xyz[2] (not None) fixes its slice count (same bottom). The PET always reaches 10 mm
    below the fov's lowest lesion point (LESION_FLOOR_Z_MM), so it holds every lesion."""
    if fov not in FOV_Z_RANGE_MM:
        raise ValueError(f"fov must be one of {list(FOV_Z_RANGE_MM)}, got {fov!r}")
    z_lo, z_hi = FOV_Z_RANGE_MM[fov]
    fov_xy = ct_size_xy * ct_spacing_xyz_mm[0]
    ct_box = Box.around(np.add((0.0, 0.0, (z_lo + z_hi) / 2), ct_origin_shift_mm), (fov_xy, fov_xy, z_hi - z_lo))
    ct_grid = Grid.covering(ct_box.in_frame(ct_direction), ct_spacing_xyz_mm)
    pet_bottom = min(z_lo - pet_z_margins_mm[0], LESION_FLOOR_Z_MM[fov] - 10.0)
    size_xyz = (None, None, None) if pet_size_xyz is None else tuple(pet_size_xyz)
    pet_extent = [fov_xy * 1.2 if n is None else n * s for n, s in zip(size_xyz[:2], pet_spacing_xyz_mm[:2])]
    pet_extent.append(z_hi + pet_z_margins_mm[1] - pet_bottom if size_xyz[2] is None
                      else size_xyz[2] * pet_spacing_xyz_mm[2])
    pet_grid = Grid.covering(Box((-pet_extent[0] / 2, -pet_extent[1] / 2, pet_bottom), tuple(pet_extent)),
                             pet_spacing_xyz_mm)
    return ct_grid, pet_grid


def make_phantom(*, seed: int, fov: str = "head-neck", ct_spacing_xyz_mm=(0.98, 0.98, 2.0), ct_size_xy: int = 512,
                 pet_spacing_xyz_mm=(4.0, 4.0, 4.0), ct_direction=IDENTITY, ct_origin_shift_mm=(0.0, 0.0, 0.0),
                 pet_unit: str = "suv", pet_size_xyz=None, pet_z_margins_mm=(20.0, 30.0),
                 pet_fwhm_mm: float = PET_FWHM_MM, pet_noise_fraction: float = PET_NOISE_FRACTION) -> Phantom:
    """A phantom for one field of view ("head-only", "head-neck", "whole-body", "no-head": a thigh).

    The anatomy depends on the seed and fov only (`anatomy`); the grids on the geometry keywords
    (`acquisition_grids`); CT noise is CT_NOISE_HU, the PET is blurred to `pet_fwhm_mm` with multiplicative noise
    `pet_noise_fraction`. `pet_unit` "bqml" multiplies SUV by BQML_PER_SUV. `hecktor_acquisition(seed)` draws
    HECKTOR-like geometry keywords."""
    if pet_unit not in ("suv", "bqml"):
        raise ValueError(f"pet_unit must be 'suv' or 'bqml', got {pet_unit!r}")
    ct_grid, pet_grid = acquisition_grids(
        fov, ct_spacing_xyz_mm=ct_spacing_xyz_mm, ct_size_xy=ct_size_xy, pet_spacing_xyz_mm=pet_spacing_xyz_mm,
        ct_direction=ct_direction, ct_origin_shift_mm=ct_origin_shift_mm, pet_size_xyz=pet_size_xyz,
        pet_z_margins_mm=pet_z_margins_mm)
    shapes = anatomy(seed, fov)
    ct_rng, pet_rng = (np.random.default_rng([int(seed), stream]) for stream in (3, 4))  # PET noise: not CT-grid bound
    hu, _, label = _evaluate(shapes, ct_grid, want="hu label")
    _add_ct_noise(hu, ct_rng, CT_NOISE_HU)
    suv = _pet_suv_zyx(shapes, pet_grid, pet_rng, fwhm_mm=pet_fwhm_mm, noise_fraction=pet_noise_fraction)
    pet = suv * np.float32(BQML_PER_SUV) if pet_unit == "bqml" else suv
    tumour_center = _centroid_xyz_mm([s for s in shapes if s.label == 1])
    return Phantom(ct_grid.image_from_array(hu), pet_grid.image_from_array(pet.astype(np.float32)),
                   ct_grid.image_from_array(label), tumour_center, shapes)


def write_case(phantom: Phantom, out_dir: Path) -> Path:
    """out_dir/input/images/{ct,pet}/<uuid>.mha and out_dir/reference/<uuid>.mha (CT as int16, as scanners store it)."""
    out_dir = Path(out_dir)
    name = str(uuid.uuid5(uuid.NAMESPACE_URL, repr(phantom.tumour_center_xyz_mm)))
    for sub, image in (("input/images/ct", sitk.Cast(sitk.Round(phantom.ct), sitk.sitkInt16)),
                       ("input/images/pet", phantom.pet), ("reference", phantom.label)):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(out_dir / sub / f"{name}.mha"), useCompression=True)
    return out_dir
