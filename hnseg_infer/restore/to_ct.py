"""The last stage's restore strategy, chosen once when the recipe loads (the recipe's `restore`):

- `probabilities` (default): each model's probabilities interpolated onto the CT voxels inside the ROI box, averaged
  there and decoded (ensemble.py);
- `paste_nearest` (SNU): the ensemble decoded on the first model's grid, then nearest neighbour onto the CT voxels
  (paste_back.py); the model-grid labels are kept for the sidecar.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hnseg_infer.geometry.grid import Grid
from hnseg_infer.recipe.spec import StageSpec
from hnseg_infer.restore.ensemble import Ensemble, Member
from hnseg_infer.restore.paste_back import ModelLabels, paste_nearest


@dataclass(frozen=True)
class DecodeOnCt:
    ensemble: Ensemble

    def to_ct(self, members: list[Member], target: Grid) -> tuple[np.ndarray, ModelLabels | None]:
        return self.ensemble.decode(members, target), None


@dataclass(frozen=True)
class PasteNearest:
    ensemble: Ensemble
    model: str  # the first model: its grid is where the labels are decoded

    def to_ct(self, members: list[Member], target: Grid) -> tuple[np.ndarray, ModelLabels | None]:
        grid = members[0].grid
        labels = ModelLabels(self.model, self.ensemble.decode(members, grid), grid)
        return paste_nearest(labels, target), labels


Restorer = DecodeOnCt | PasteNearest


def restorer_for(stage: StageSpec, ensemble: Ensemble) -> Restorer:
    if stage.restore == "paste_nearest":
        return PasteNearest(ensemble, stage.models[0].name)
    return DecodeOnCt(ensemble)
