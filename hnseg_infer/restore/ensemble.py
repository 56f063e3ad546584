"""From model grids back to the CT: each model's probabilities are interpolated once onto the CT voxels inside
the ROI box (the common ROI grid), averaged there, decoded to labels, and pasted into a CT-sized background."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from hnseg_infer.geometry.grid import Grid, sample, sample_nnunet
from hnseg_infer.recipe.load import HeadSpec, ModelSpec

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

    def decode_ensemble(self, members: list["Member"], target: Grid) -> np.ndarray:
        """uint8 labels on `target` from the members' weighted mean probabilities, one output channel at a time
        (each interpolated linearly onto `target` by its model's resampling rule, so that at most two channel-sized
        float arrays exist): argmax over labels (first label on ties), or nnU-Net's region order (later regions
        paint over earlier ones). A lone model with nnU-Net resampling is interpolated as nnU-Net does, in logit
        space: log-probabilities (the logits less one value per voxel: the same argmax) or a sigmoid's logits."""
        total_weight = sum(m.weight for m in members)
        in_logits = len(members) == 1 and members[0].resampling == "nnunet"
        to_logits = (_log_probability if self.kind == "labels" else _log_odds) if in_logits else None
        labels = np.zeros(target.size_zyx, np.uint8)
        best = None
        for k, fill in enumerate(self.fill_values()):
            channel = None
            for member in members:
                term = member.channel_on(k, target, fill, transform=to_logits)
                term *= member.weight / total_weight
                channel = term if channel is None else np.add(channel, term, out=channel)
            if self.kind == "regions":
                labels[channel > (0.0 if in_logits else 0.5)] = self.region_labels[k]
            elif best is None:
                best = channel
            else:
                labels[channel > best] = LABELS[k]
                np.maximum(best, channel, out=best)
        return labels


@dataclass(frozen=True)
class Member:
    """One model's probabilities in the output space's channels, on its own grid."""

    weight: float
    channels: list[np.ndarray]
    grid: Grid
    resampling: str = "direct"  # the model's: "nnunet" restores by nnU-Net's rule (nearest across thick CT slices)

    def channel_on(self, k: int, target: Grid, fill_value: float, *, transform=None) -> np.ndarray:
        """Output channel k (through `transform`, when given) interpolated linearly onto `target` by the model's
        resampling rule."""
        values = np.ascontiguousarray(self.channels[k], dtype=np.float32)
        if transform is not None:
            values, fill_value = transform(values), float(transform(np.float32(fill_value)))
        resample = sample_nnunet if self.resampling == "nnunet" else sample
        return resample(self.grid.image_from_array(values), target, interpolation="linear", fill_value=fill_value)


TINY = np.float32(1e-30)  # keeps the logarithms of float32 probabilities finite


def _log_probability(p: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(p, TINY))


def _log_odds(p: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(p, TINY)) - np.log(np.maximum(1 - p, TINY))


def paste(labels_zyx: np.ndarray, slices_zyx: tuple[slice, slice, slice], ct_grid: Grid) -> sitk.Image:
    """The sub-grid labels in a background canvas with exactly the CT's geometry."""
    canvas = np.zeros(ct_grid.size_zyx, np.uint8)
    canvas[slices_zyx] = labels_zyx
    return ct_grid.image_from_array(canvas)
