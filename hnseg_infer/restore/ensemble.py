"""From model grids back to the CT: each model's probabilities are interpolated once onto the CT voxels inside
the ROI box (the common ROI grid), averaged there, decoded to labels, and pasted into a CT-sized background."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from hnseg_infer.geometry.grid import Grid, sample, sample_nnunet
from hnseg_infer.labels import LABELS
from hnseg_infer.recipe.spec import HeadSpec, ModelSpec
from hnseg_infer.recipe.vocabulary import Resampling


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


@dataclass(frozen=True)
class Ensemble:
    """How a stage's models combine, fixed when the recipe loads: the output space, and whether its lone model is
    restored in logit space (a lone model with nnU-Net resampling is interpolated as nnU-Net does: log-probabilities,
    i.e. the logits less one value per voxel, the same argmax; or a sigmoid's logits). Ensembles average
    probabilities."""

    space: OutputSpace
    in_logits: bool = False

    @staticmethod
    def for_models(models: tuple[ModelSpec, ...]) -> "Ensemble":
        return Ensemble(OutputSpace.for_models(models), len(models) == 1 and models[0].grid.resampling == Resampling.NNUNET)

    def member(self, spec: ModelSpec, probabilities_kzyx: np.ndarray, grid: Grid) -> "Member":
        return Member(spec.weight, self.space.from_head(probabilities_kzyx, spec.head), grid, spec.grid.resampling)

    def _mean_channel(self, members: list["Member"], k: int, fill: float, target: Grid) -> np.ndarray:
        """Output channel k's weighted mean over the members on `target` (in logit space for a lone nnU-Net
        model), each member interpolated linearly by its model's resampling rule."""
        to_logits = (_log_probability if self.space.kind == "labels" else _log_odds) if self.in_logits else None
        total_weight = sum(m.weight for m in members)
        channel = None
        for member in members:
            term = member.channel_on(k, target, fill, transform=to_logits)
            term *= member.weight / total_weight
            channel = term if channel is None else np.add(channel, term, out=channel)
        return channel

    def decode(self, members: list["Member"], target: Grid) -> np.ndarray:
        """uint8 labels on `target` from the members' weighted mean, one output channel at a time (so that at most
        two channel-sized float arrays exist): argmax over labels (first label on ties), or nnU-Net's region order
        (later regions paint over earlier ones)."""
        labels = np.zeros(target.size_zyx, np.uint8)
        best = None
        for k, fill in enumerate(self.space.fill_values()):
            channel = self._mean_channel(members, k, fill, target)
            if self.space.kind == "regions":
                labels[channel > (0.0 if self.in_logits else 0.5)] = self.space.region_labels[k]
            elif best is None:
                best = channel
            else:
                labels[channel > best] = LABELS[k]
                np.maximum(best, channel, out=best)
        return labels

    def probabilities(self, members: list["Member"], target: Grid) -> list[np.ndarray]:
        """The per-label probabilities on `target` that `decode` decides on (labels space): the weighted mean of
        probabilities, or for a lone nnU-Net model the softmax of its interpolated log-probabilities."""
        channels = [self._mean_channel(members, k, fill, target) for k, fill in enumerate(self.space.fill_values())]
        if not self.in_logits:
            return channels
        top = np.maximum.reduce(channels)
        exps = [np.exp(c - top) for c in channels]
        total = sum(exps)
        return [(e / total).astype(np.float32, copy=False) for e in exps]


@dataclass(frozen=True)
class Member:
    """One model's probabilities in the output space's channels, on its own grid."""

    weight: float
    channels: list[np.ndarray]
    grid: Grid
    resampling: Resampling = Resampling.DIRECT  # the model's: NNUNET restores by nnU-Net's rule (nearest across thick
    # CT slices)

    def channel_on(self, k: int, target: Grid, fill_value: float, *, transform=None) -> np.ndarray:
        """Output channel k (through `transform`, when given) interpolated linearly onto `target` by the model's
        resampling rule."""
        values = np.ascontiguousarray(self.channels[k], dtype=np.float32)
        if transform is not None:
            values, fill_value = transform(values), float(transform(np.float32(fill_value)))
        resample = sample_nnunet if self.resampling == Resampling.NNUNET else sample
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
