"""Paste-back restoration (SNU): labels decoded on a model grid, mapped onto the CT voxels by nearest neighbour.

Restoration `paste_nearest` (a recipe's `"restore": "paste_nearest"`, last stage; to_ct.py): the ensemble is decoded
(argmax, or the region thresholds) on the first model's grid, and those labels are mapped onto the CT voxels inside
the ROI box by nearest neighbour, background everywhere else. This is SNU's restoration — argmax on the 1×1×3 mm
crop, pasted into a zero canvas, nearest neighbour to the CT — without building the canvas: the CT voxels outside
the model grid take the canvas's zeros. The default, `probabilities`, interpolates each probability channel onto the
CT voxels and decodes there (ensemble.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hnseg_infer.geometry.grid import Grid, sample_labels


@dataclass(frozen=True)
class ModelLabels:
    """Labels decoded on a model grid (before the paste-back)."""

    model: str  # the recipe model whose grid this is
    labels_zyx: np.ndarray  # uint8
    grid: Grid


def paste_nearest(labels: ModelLabels, target: Grid) -> np.ndarray:
    """uint8 [z, y, x] on `target` (CT voxels): each voxel takes the label of the model-grid voxel that holds its
    centre (nearest neighbour), 0 outside the model grid (the zero canvas)."""
    image = labels.grid.image_from_array(np.ascontiguousarray(labels.labels_zyx, dtype=np.uint8))
    return sample_labels(image, target).astype(np.uint8, copy=False)
