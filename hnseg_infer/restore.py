"""From model grids back to the CT: each model's probabilities are interpolated once onto the CT voxels inside
the ROI box (the common ROI grid), averaged there, decoded to labels, and pasted into a CT-sized background."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .grid import Grid
from .recipe import HeadSpec, ModelSpec

LABELS = (0, 1, 2)


@dataclass(frozen=True)
class OutputSpace:
    """What the ensemble averages: per-label probabilities (all heads softmax) or per-region ones."""

    kind: str  # "labels" or "regions"
    regions: tuple[tuple[int, ...], ...] = ()
    region_labels: tuple[int, ...] = ()

    @staticmethod
    def for_models(models: tuple[ModelSpec, ...]) -> "OutputSpace":
        sigmoid = [m.head for m in models if m.head.type == "sigmoid"]
        if not sigmoid:
            return OutputSpace("labels")
        return OutputSpace("regions", sigmoid[0].regions, sigmoid[0].region_labels)

    @property
    def n_channels(self) -> int:
        return len(LABELS) if self.kind == "labels" else len(self.regions)

    def from_head(self, probabilities_kzyx: np.ndarray, head: HeadSpec) -> list[np.ndarray]:
        """A model's probabilities as this space's channels (views or sums, no copies of the whole stack)."""
        if head.type == "sigmoid":
            return list(probabilities_kzyx)
        by_label = dict(zip(head.labels, probabilities_kzyx))
        zero = np.zeros(probabilities_kzyx.shape[1:], np.float32)
        if self.kind == "labels":
            return [by_label.get(label, zero) for label in LABELS]
        # softmax → region probability: the sum of the probabilities of the labels the region covers (an array even
        # when the softmax model predicts none of them)
        return [sum((by_label[label] for label in region if label in by_label), zero) for region in self.regions]

    def fill_values(self) -> list[float]:
        """Probabilities outside a model's grid: certain background."""
        return [1.0, 0.0, 0.0] if self.kind == "labels" else [0.0] * len(self.regions)

    def decode(self, probabilities_kzyx: np.ndarray) -> np.ndarray:
        """uint8 labels: argmax over labels, or nnU-Net's region order (later regions paint over earlier ones)."""
        if self.kind == "labels":
            return np.argmax(probabilities_kzyx, axis=0).astype(np.uint8)
        labels = np.zeros(probabilities_kzyx.shape[1:], np.uint8)
        for probability, label in zip(probabilities_kzyx, self.region_labels):
            labels[probability > 0.5] = label
        return labels


def resample_channels(channels_zyx: list[np.ndarray], source: Grid, target: Grid, fill_values: list[float]) -> np.ndarray:
    """Linear interpolation of each channel from `source` onto `target` (float32 [K, z, y, x])."""
    out = np.empty((len(channels_zyx), *target.size_zyx), np.float32)
    reference = target.reference_image()
    for k, (channel, fill) in enumerate(zip(channels_zyx, fill_values)):
        image = source.image_from_array(np.ascontiguousarray(channel, dtype=np.float32))
        resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, fill, sitk.sitkFloat32)
        out[k] = sitk.GetArrayViewFromImage(resampled)
    return out


def paste(labels_zyx: np.ndarray, slices_zyx: tuple[slice, slice, slice], ct_grid: Grid) -> sitk.Image:
    """The sub-grid labels in a background canvas with exactly the CT's geometry."""
    canvas = np.zeros(ct_grid.size_zyx, np.uint8)
    canvas[slices_zyx] = labels_zyx
    return ct_grid.image_from_array(canvas)
