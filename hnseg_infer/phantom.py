"""Synthetic FDG PET/CT phantoms in the grand-challenge layout, for tests, benchmarks and the demo.

Anatomy is defined analytically in physical space (mm, LPS: +x left, +y posterior, +z superior; the vertex of the
head at z ≈ 0), then evaluated at the voxel centres of a CT grid and of a coarser PET grid with its own z-range
and origin, so any direction, origin or spacing shows the same patient. Deterministic from the seed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from .grid import IDENTITY, Box, Grid

FOV_Z_RANGE_MM = {"head-only": (-260.0, 10.0), "head-neck": (-420.0, 10.0), "whole-body": (-1000.0, 10.0),
                  "no-head": (-200.0, 0.0)}
BQML_PER_SUV = 5000.0  # ~350 MBq in 70 kg
PET_FWHM_MM = 6.0
BRAIN_CENTER_XYZ_MM = (0.0, 8.0, -70.0)
HEART_CENTER_XYZ_MM = (20.0, -10.0, -470.0)
BLADDER_CENTER_XYZ_MM = (0.0, 10.0, -800.0)
CT_NOISE_HU = 10.0
PET_NOISE_FRACTION = 0.1  # multiplicative, per PET voxel


@dataclass(frozen=True)
class Ellipsoid:
    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    hu: float | None  # None: leave the CT as it is
    suv: float | None
    label: int = 0

    def inside(self, points: np.ndarray) -> np.ndarray:
        """Which physical points (N, 3, xyz mm) lie inside."""
        return (((points - self.center) / self.radii) ** 2).sum(axis=1) <= 1.0

    def inside_block_zyx(self, grid: Grid, lo_xyz: np.ndarray, hi_xyz: np.ndarray) -> np.ndarray:
        """Inside-mask of the voxel centres of a block of `grid` (indices lo..hi-1, xyz), as a zyx array.
        The normalised coordinate u = (p - c) / r is affine in the voxel index, so it is built by broadcasting
        one vector per index axis (no per-voxel coordinate array), in float32."""
        radii = np.asarray(self.radii)
        scale = np.asarray(grid.direction).reshape(3, 3) * np.asarray(grid.spacing_xyz_mm) / radii[:, None]
        offset = (np.asarray(grid.origin_xyz_mm) - self.center) / radii
        ranges = [np.arange(lo_xyz[b], hi_xyz[b], dtype=np.float64) for b in range(3)]
        shapes = ((1, 1, -1), (1, -1, 1), (-1, 1, 1))  # index axis x, y, z as zyx broadcast shapes
        total = np.zeros([hi_xyz[b] - lo_xyz[b] for b in (2, 1, 0)], np.float32)
        for a in range(3):
            u = np.float32(offset[a])
            for b in range(3):
                if scale[a, b] != 0:
                    u = u + (scale[a, b] * ranges[b]).astype(np.float32).reshape(shapes[b])
            total += np.broadcast_to(u, total.shape) ** 2
        return total <= 1.0


@dataclass(frozen=True)
class Phantom:
    """A synthetic study: CT (float32 HU), PET (float32, SUV or Bq/mL) on its own grid, and the reference label
    (uint8 on the CT grid: 1 GTVp, 2 GTVn); `shapes` is the analytic anatomy in physical space."""

    ct: sitk.Image  # float32 HU
    pet: sitk.Image  # float32, SUV or Bq/mL
    label: sitk.Image  # uint8 on the CT grid
    tumour_center_xyz_mm: tuple[float, float, float]
    shapes: tuple[Ellipsoid, ...]


def _anatomy(fov: str, rng: np.random.Generator) -> list[Ellipsoid]:
    """Shapes in painting order (later ones overwrite earlier ones)."""
    if fov == "no-head":  # a thigh (through the whole field of view) with a large hot sarcoma beside the femur:
        # the sarcoma is as big, wide and hot as a brain, so only the missing skull tells it from a head
        return [Ellipsoid((0, 0, -100), (120, 105, 400), 40, 0.8),
                Ellipsoid((-15, 5, -100), (15, 15, 400), 700, 0.3),
                Ellipsoid((52, -35, -90), (52, 50, 55), 50, float(rng.uniform(8, 15)), 1)]
    shapes = [Ellipsoid((0, 5, -95), (75, 95, 100), 40, 1.0),  # head
              Ellipsoid((0, 10, -200), (55, 60, 80), 40, 1.0),  # neck
              Ellipsoid((0, 5, -80), (68, 88, 82), 700, 0.5),  # skull (bone shell: brain paints its inside)
              Ellipsoid(BRAIN_CENTER_XYZ_MM, (60, 80, 68), 30, 9.0),  # brain
              Ellipsoid((0, -40, -165), (30, 20, 12), -1000, 0.0)]  # oral cavity / pharynx air
    if fov == "whole-body" or fov == "head-neck":
        shapes.insert(0, Ellipsoid((0, 15, -640), (170, 115, 400), 40, 0.9))  # trunk
        shapes += [Ellipsoid((-85, 15, -420), (60, 75, 120), -800, 0.5),  # lungs
                   Ellipsoid((85, 15, -420), (60, 75, 120), -800, 0.5),
                   Ellipsoid(HEART_CENTER_XYZ_MM, (50, 45, 50), 40, 4.0)]  # heart
    if fov == "whole-body":
        shapes += [Ellipsoid(BLADDER_CENTER_XYZ_MM, (40, 35, 35), 10, 20.0),  # bladder
                   Ellipsoid((-90, 10, -1000), (70, 70, 220), 40, 0.8),  # legs
                   Ellipsoid((90, 10, -1000), (70, 70, 220), 40, 0.8)]
    shapes += [Ellipsoid((s * 50, 10, -150), (14, 18, 20), 30, 2.5) for s in (-1, 1)]  # parotids
    shapes += [Ellipsoid((s * 16, -15, -172), (8, 8, 10), 45, 3.5) for s in (-1, 1)]  # tonsils
    center = (rng.uniform(-12, 12), rng.uniform(-20, -5), rng.uniform(-195, -175))
    radii = tuple(rng.uniform(9, 18, size=3).round(1))
    shapes.append(Ellipsoid(center, radii, 60, float(rng.uniform(6, 15)), 1))  # primary tumour
    for _ in range(int(rng.integers(0, 3))):  # 0-2 cervical nodes, 6-28 mm, faint to hot
        side = rng.choice((-1, 1))
        node_center = (side * rng.uniform(30, 50), rng.uniform(-5, 20), rng.uniform(-245, -195))
        shapes.append(Ellipsoid(node_center, (rng.uniform(3, 14),) * 3, 50, float(rng.uniform(3, 8)), 2))
    return shapes


def _index_block(shape: Ellipsoid, grid: Grid) -> tuple[np.ndarray, np.ndarray] | None:
    """The range of voxel indices (xyz, inclusive lo, exclusive hi) whose centres may lie inside the shape."""
    box = Box(tuple(np.subtract(shape.center, shape.radii)), tuple(np.multiply(shape.radii, 2)))
    index = grid.physical_to_index(box.corners_xyz_mm())
    lo = np.maximum(np.floor(index.min(axis=0)), 0).astype(int)
    hi = np.minimum(np.ceil(index.max(axis=0)) + 1, grid.size_xyz).astype(int)
    return (lo, hi) if np.all(hi > lo) else None


def _evaluate(shapes, grid: Grid, *, background_hu: float = -1000.0, max_voxels: int = 1 << 23):
    """HU, SUV and label volumes (zyx) on a grid: each shape is tested only inside its own index block, a slab of
    slices at a time to bound memory."""
    hu = np.full(grid.size_zyx, background_hu, np.float32)
    suv = np.zeros(grid.size_zyx, np.float32)
    label = np.zeros(grid.size_zyx, np.uint8)
    for shape in shapes:
        block = _index_block(shape, grid)
        if block is None:
            continue
        lo, hi = block
        step = max(1, max_voxels // int((hi[0] - lo[0]) * (hi[1] - lo[1])))
        for k0 in range(lo[2], hi[2], step):
            k1 = min(k0 + step, hi[2])
            inside = shape.inside_block_zyx(grid, np.array([lo[0], lo[1], k0]), np.array([hi[0], hi[1], k1]))
            region = (slice(k0, k1), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
            if shape.hu is not None:
                hu[region][inside] = shape.hu
            if shape.suv is not None:
                suv[region][inside] = shape.suv
            label[region][inside] = shape.label
    return hu, suv, label


def _pet_suv_zyx(shapes, grid: Grid, rng: np.random.Generator) -> np.ndarray:
    """The PET in SUV on its grid: the shapes' uptake, blurred to PET_FWHM_MM, with multiplicative noise."""
    _, suv, _ = _evaluate(shapes, grid)
    sigma_zyx_vox = [PET_FWHM_MM / 2.355 / s for s in grid.spacing_xyz_mm[::-1]]
    suv = gaussian_filter(suv, sigma_zyx_vox)
    return np.clip(suv * (1 + PET_NOISE_FRACTION * rng.standard_normal(suv.shape, dtype=np.float32)), 0, None)


def make_phantom(*, seed: int, fov: str = "head-neck", ct_spacing_xyz_mm=(0.98, 0.98, 2.0), ct_size_xy: int = 512,
                 pet_spacing_xyz_mm=(4.0, 4.0, 4.0), ct_direction=IDENTITY, ct_origin_shift_mm=(0.0, 0.0, 0.0),
                 pet_unit: str = "suv", pet_size_xyz=None) -> Phantom:
    """A phantom for one field of view ("head-only", "head-neck", "whole-body", "no-head": a thigh).

    The CT covers ct_size_xy × ct_spacing_x mm in-plane and the fov's z-range (FOV_Z_RANGE_MM), shifted by
    `ct_origin_shift_mm`, on a lattice with `ct_direction`. The PET (identity direction) covers a wider field than
    the CT in-plane (1.2×), starts 20 mm lower and ends 30 mm higher, unless `pet_size_xyz` fixes its voxel counts
    (centred in-plane, same bottom). `pet_unit` "bqml" multiplies SUV by BQML_PER_SUV."""
    if fov not in FOV_Z_RANGE_MM:
        raise ValueError(f"fov must be one of {list(FOV_Z_RANGE_MM)}, got {fov!r}")
    if pet_unit not in ("suv", "bqml"):
        raise ValueError(f"pet_unit must be 'suv' or 'bqml', got {pet_unit!r}")
    rng = np.random.default_rng(seed)
    shapes = _anatomy(fov, rng)
    z_lo, z_hi = FOV_Z_RANGE_MM[fov]
    fov_xy = ct_size_xy * ct_spacing_xyz_mm[0]
    ct_box = Box.around(np.add((0.0, 0.0, (z_lo + z_hi) / 2), ct_origin_shift_mm), (fov_xy, fov_xy, z_hi - z_lo))
    ct_grid = Grid.covering(ct_box.in_frame(ct_direction), ct_spacing_xyz_mm)
    hu, _, label = _evaluate(shapes, ct_grid)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(CT_NOISE_HU)
    pet_extent = ((fov_xy * 1.2, fov_xy * 1.2, z_hi - z_lo + 50.0) if pet_size_xyz is None
                  else tuple(np.multiply(pet_size_xyz, pet_spacing_xyz_mm)))
    pet_grid = Grid.covering(Box((-pet_extent[0] / 2, -pet_extent[1] / 2, z_lo - 20.0), pet_extent), pet_spacing_xyz_mm)
    suv = _pet_suv_zyx(shapes, pet_grid, rng)
    pet = suv * np.float32(BQML_PER_SUV) if pet_unit == "bqml" else suv
    tumour = next(s for s in shapes if s.label == 1)
    return Phantom(ct_grid.image_from_array(hu), pet_grid.image_from_array(pet.astype(np.float32)),
                   ct_grid.image_from_array(label), tuple(map(float, tumour.center)), tuple(shapes))


def write_case(phantom: Phantom, out_dir: Path) -> Path:
    """out_dir/input/images/{ct,pet}/<uuid>.mha and out_dir/reference/<uuid>.mha (CT as int16, as scanners store it)."""
    out_dir = Path(out_dir)
    name = str(uuid.uuid5(uuid.NAMESPACE_URL, repr(phantom.tumour_center_xyz_mm)))
    for sub, image in (("input/images/ct", sitk.Cast(sitk.Round(phantom.ct), sitk.sitkInt16)),
                       ("input/images/pet", phantom.pet), ("reference", phantom.label)):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(out_dir / sub / f"{name}.mha"), useCompression=True)
    return out_dir
