"""The recipe's closed vocabularies, one StrEnum each: a member compares and serialises as its string, so recipe.json
and the report read as before, and a value outside the vocabulary is refused where the recipe is parsed."""

from __future__ import annotations

import sys
from enum import Enum

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10, the image's (Ubuntu 22.04): StrEnum as 3.11 defines it, str() and format() give the value
    class StrEnum(str, Enum):
        __str__ = str.__str__
        __format__ = str.__format__


class Orientation(StrEnum):
    """The model grid's axes: patient LPS axes; the CT's own axes (as nnU-Net, or MONAI without Orientationd, sees
    arrays); or RAS axes, LPS with x and y flipped (MONAI's Orientationd(axcodes="RAS"))."""

    LPS = "lps"
    CT = "ct"
    RAS = "ras"


class Interpolation(StrEnum):
    LINEAR = "linear"
    BSPLINE = "bspline"


class Resampling(StrEnum):
    """A model's path between the native images, its grid and the CT (recipe/load.py ModelSpec.resampling)."""

    DIRECT = "direct"
    NNUNET = "nnunet"


class FoldAverage(StrEnum):
    PROBABILITIES = "probabilities"
    LOGITS = "logits"


class GridSpacing(StrEnum):
    EXACT = "exact"  # the grid has the model's spacing exactly
    FIT_ROI = "fit_roi"  # voxel count rounded, spacing adjusted to fill the ROI box (nnU-Net's whole-image resize)


class Restore(StrEnum):
    """How the last stage's labels reach the CT grid (restore/to_ct.py)."""

    PROBABILITIES = "probabilities"
    PASTE_NEAREST = "paste_nearest"


class Tiling(StrEnum):
    """The sliding window's tile placement and Gaussian: nnU-Net's or MONAI's."""

    NNUNET = "nnunet"
    MONAI = "monai"


class HeadType(StrEnum):
    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


class ChannelSource(StrEnum):
    """Where a model input channel comes from; clicks_*: the click prompts (channels/clicks.py)."""

    CT = "ct"
    PET = "pet"
    ZERO = "zero"
    CLICKS_GTVP = "clicks_gtvp"
    CLICKS_GTVN = "clicks_gtvn"


def values(vocabulary: type[StrEnum]) -> tuple[str, ...]:
    """The allowed strings, in declaration order (as the error messages list them)."""
    return tuple(member.value for member in vocabulary)
