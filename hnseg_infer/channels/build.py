"""A model's input: its grid inside the ROI box, and its channels sampled straight from the native CT/PET (one
interpolation; nnU-Net models: nnUNetPredictor's path from the CT's voxels), with their intensity ops."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from hnseg_infer.channels.clicks import PROMPT_SOURCES, Clicks
from hnseg_infer.channels.clicks import encode as encode_clicks
from hnseg_infer.channels.intensity import SpectrumSwap, apply_ops
from hnseg_infer.geometry.grid import IDENTITY, INTERPOLATORS, Box, Grid, sample, sample_nnunet
from hnseg_infer.io.images import FILL_VALUE, Case
from hnseg_infer.recipe.spec import ChannelSpec, ModelSpec

RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # grid axes towards Right, Anterior, Superior (in LPS terms)


def model_grid(spec: ModelSpec, roi_box: Box, ct_grid: Grid) -> Grid:
    """The model's voxel grid: the ROI box at the model's spacing, along LPS axes, along RAS axes (MONAI's
    Orientationd(axcodes="RAS")) or along the CT's own axes."""
    frame = {"lps": IDENTITY, "ras": RAS, "ct": ct_grid.direction}[spec.grid.orientation]
    return Grid.covering(roi_box.in_frame(frame), spec.grid.spacing_xyz_mm, fit_box=spec.grid.grid_spacing == "fit_roi")


def build_input(case: Case, grid: Grid, spec: ModelSpec, *, clicks: Clicks | None = None) -> np.ndarray:
    """float32 [C, z, y, x]: each channel sampled once onto the grid, its ops applied after (or, where the channel
    says, before) sampling. "direct" resampling samples the native CT and PET; "nnunet" resampling samples both
    from the CT's voxels by nnU-Net's rule. In CT-only mode every PET channel is zeros (no ops), as CT-only models
    are trained."""
    nnunet = spec.grid.resampling == "nnunet"
    images = _on_ct_voxels(case, grid, spec) if nnunet else {"ct": case.ct, "pet": case.pet}
    resample = sample_nnunet if nnunet else sample
    sampled: dict[tuple[str, str], np.ndarray] = {}  # the same source/interpolation is sampled once per model
    suv_factor = case.suv_per_stored_value
    channels = []
    for channel in spec.channels:
        if channel.source in PROMPT_SOURCES:  # click prompts: spheres on this grid, zeros without clicks
            channels.append(apply_ops(encode_clicks(clicks, channel.source, grid), channel.ops,
                                      suv_per_stored_value=suv_factor))
            continue
        if channel.source == "zero" or (channel.source == "pet" and case.ct_only):  # CT-only: PET zero-filled
            channels.append(np.zeros(grid.size_zyx, dtype=np.float32))
            continue
        if channel.ops_before_sampling:
            channels.append(_ops_then_sample(images[channel.source], grid, channel, suv_factor, resample))
            continue
        key = (channel.source, channel.interpolation)
        if key not in sampled:
            sampled[key] = resample(images[channel.source], grid, interpolation=channel.interpolation,
                                    fill_value=FILL_VALUE[channel.source])
        channels.append(apply_ops(sampled[key], channel.ops, suv_per_stored_value=suv_factor))
    return np.stack(channels)


def _on_ct_voxels(case: Case, grid: Grid, spec: ModelSpec) -> dict[str, sitk.Image]:
    """nnU-Net's input images: the CT's voxels around the grid, and the PET interpolated onto them by the model's
    `pet_to_ct` (nnU-Net takes its channels on one grid; its user's data conversion put the PET there)."""
    ct = _around(case.ct, grid)
    images = {"ct": ct}
    if not case.ct_only and any(channel.source == "pet" for channel in spec.channels):
        images["pet"] = sitk.Resample(case.pet, ct, sitk.Transform(), INTERPOLATORS[spec.grid.pet_to_ct],
                                      FILL_VALUE["pet"], sitk.sitkFloat32)
    return images


def _around(image: sitk.Image, grid: Grid, *, margin: int = 3) -> sitk.Image:
    """The image's voxels around the grid's box, `margin` more each side (the interpolation's support); the whole
    image when the box covers it, or misses it entirely (then every grid voxel takes the fill)."""
    native = Grid.of(image)
    index_xyz = native.physical_to_index(grid.box().corners_xyz_mm())
    lo = np.maximum(np.floor(index_xyz.min(axis=0)).astype(int) - margin, 0)
    hi = np.minimum(np.ceil(index_xyz.max(axis=0)).astype(int) + margin + 1, native.size_xyz)
    if np.any(hi <= lo) or (np.array_equal(lo, 0) and np.array_equal(hi, native.size_xyz)):
        return image
    return image[int(lo[0]):int(hi[0]), int(lo[1]):int(hi[1]), int(lo[2]):int(hi[2])]


def harmonisation_notes(spec: ModelSpec, grid: Grid) -> list[str]:
    """What a model's spectrum_swap ops do on a grid whose size is not their reference's (a mapped reference)."""
    return [note for channel in spec.channels for op in channel.ops if isinstance(op, SpectrumSwap)
            if (note := op.spectrum.block_for(grid.size_zyx, op.radius)[1])]


def _ops_then_sample(image: sitk.Image, grid: Grid, channel: ChannelSpec, suv_factor: float, resample) -> np.ndarray:
    """The ops applied to the image's voxels around the grid (statistics taken there), then resampled onto the grid
    and clipped to the range of the normalised voxels (nnU-Net's resize clips its spline overshoot so).
    Outside the image: the channel's lowest value (air, no uptake), as the raw fill values are."""
    region = _around(image, grid)
    # a view, not a copy: the ops make their own arrays (a native CT is ~0.25 GB in float32)
    values = apply_ops(sitk.GetArrayViewFromImage(region), channel.ops, suv_per_stored_value=suv_factor)
    low, high = float(values.min()), float(values.max())
    normalised = sitk.GetImageFromArray(values)
    del values
    normalised.CopyInformation(region)
    return np.clip(resample(normalised, grid, interpolation=channel.interpolation, fill_value=low), low, high)
