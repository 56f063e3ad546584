"""The SNU network (HECKTOR 2025, DESIGN §5): a 3-D U-Net whose skip features are gated by a PET-only spatial
attention sub-network (PSAM), with squeeze-and-excitation normalisation (SE Norm) in every conv block.

Export a trained one with `export/to_onnx.py torch --module hnseg_export.snu:SNUNet --kwargs '{...}'`.

What this follows:
- The SNU team's HECKTOR 2025 paper ("Molecular-Information-Guided Framework for Head and Neck Tumor and Lymph
  Node Segmentation in PET/CT Images", openreview 9n4hGkJBxn): a 3-D U-Net; PSAM "consumes the PET image to
  generate a spatial attention map that gates encoder skip features"; SE Normalisation; input 256×256×112.
  The paper's text available to us is the abstract only, so PSAM's inside is our choice: a small PET-only conv
  pyramid with one 1×1×1 conv + sigmoid per skip resolution, and the map multiplies that skip (no residual
  1 + a term: a zero map removes the skip, as "gates" says).
- SE Norm as in Iantsen et al., "Squeeze-and-Excitation Normalization for Automated Delineation of Head and
  Neck Primary Tumors in Combined PET and CT Images" (HECKTOR 2020 winner; github.com/iantsen/hecktor,
  src/layers.py FastSmoothSENorm): instance norm without affine (written out, see SENorm), then γ·x̂ + β with
  γ = sigmoid(SE_γ(x)) and β = tanh(SE_β(x)) per channel, each SE a 1×1×1 conv → ReLU → 1×1×1 conv on the
  channel means of the norm's input (reduction 2); conv blocks are conv → ReLU → SE Norm; encoder blocks are
  residual (a 1×1×1 conv block projects the shortcut when the width changes), decoder blocks plain, as there.
- U-Net plumbing in the nnU-Net manner: max-pool ×2 down, transposed conv ×2 up, widths doubling per level up
  to `max_features`; the network returns logits (the recipe's head applies softmax).

Input sizes must be divisible by 2^(depth-1) on every axis: the paper's 256×256×112 (x, y, z; patch_size_zyx
[112, 256, 256], z = 112 = 7·16) works up to depth 5.
"""

from __future__ import annotations

import torch
from torch import nn


def _squeeze_excite(channels: int, reduction: int) -> nn.Sequential:
    hidden = max(1, channels // reduction)
    return nn.Sequential(nn.Conv3d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv3d(hidden, channels, 1))


def _mean_zyx(x: torch.Tensor) -> torch.Tensor:
    """Channel means [N, C, 1, 1, 1], one axis at a time (see SENorm)."""
    return x.mean(dim=4, keepdim=True).mean(dim=3, keepdim=True).mean(dim=2, keepdim=True)


class SENorm(nn.Module):
    """Instance norm (no affine) recalibrated per channel and per sample: γ·x̂ + β, γ ∈ (0, 1), β ∈ (-1, 1).

    x̂ is F.instance_norm's (biased variance, eps 1e-5) written out with axis-by-axis means: onnxruntime's
    InstanceNormalization and whole-volume ReduceMean sum a channel in one float32 run, which on a 48×64×64 tile
    of ReLU outputs is off by ~1e-4 of the variance (the exported network then differs from PyTorch by ~1e-3);
    axis-by-axis sums are short and the export agrees to ~1e-5.
    """

    eps = 1e-5

    def __init__(self, channels: int, *, reduction: int = 2):
        super().__init__()
        self.gamma = _squeeze_excite(channels, reduction)
        self.beta = _squeeze_excite(channels, reduction)

    def recalibration(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """γ and β, each [N, C, 1, 1, 1], from the channel means of x (the squeeze)."""
        return self._recalibration(_mean_zyx(x))

    def _recalibration(self, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(self.gamma(mean)), torch.tanh(self.beta(mean))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = _mean_zyx(x)
        gamma, beta = self._recalibration(mean)
        centred = x - mean
        normalised = centred / torch.sqrt(_mean_zyx(centred * centred) + self.eps)
        return gamma * normalised + beta


class ConvSENorm(nn.Module):
    """conv (same padding) → ReLU → SE Norm."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3, reduction: int = 2):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.act = nn.ReLU(inplace=True)
        self.norm = SENorm(out_channels, reduction=reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.conv(x)))


class ResidualConvSENorm(nn.Module):
    """ConvSENorm plus a shortcut (identity, or a 1×1×1 ConvSENorm when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3, reduction: int = 2):
        super().__init__()
        self.block = ConvSENorm(in_channels, out_channels, kernel_size=kernel_size, reduction=reduction)
        self.shortcut = (nn.Identity() if in_channels == out_channels
                         else ConvSENorm(in_channels, out_channels, kernel_size=1, reduction=reduction))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + self.shortcut(x)


def _stack(block, in_channels: int, out_channels: int, n_blocks: int, reduction: int) -> nn.Sequential:
    return nn.Sequential(*[block(in_channels if i == 0 else out_channels, out_channels, reduction=reduction)
                           for i in range(n_blocks)])


class PSAM(nn.Module):
    """PET-guided spatial attention: from the PET channel alone, one sigmoid map [N, 1, z, y, x] per skip
    resolution (full, 1/2, 1/4, ...)."""

    def __init__(self, n_maps: int, *, features: int, reduction: int = 2):
        super().__init__()
        self.stages = nn.ModuleList(
            [ConvSENorm(1, features, reduction=reduction)]
            + [nn.Sequential(nn.MaxPool3d(2), ConvSENorm(features, features, reduction=reduction))
               for _ in range(n_maps - 1)])
        self.heads = nn.ModuleList([nn.Conv3d(features, 1, 1) for _ in range(n_maps)])

    def forward(self, pet: torch.Tensor) -> list[torch.Tensor]:
        maps, x = [], pet
        for stage, head in zip(self.stages, self.heads):
            x = stage(x)
            maps.append(torch.sigmoid(head(x)))
        return maps


class UpStage(nn.Module):
    """Transposed conv ×2, concatenation with the (gated) skip, conv blocks."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, *, n_blocks: int, reduction: int):
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, skip_channels, kernel_size=2, stride=2)
        self.blocks = _stack(ConvSENorm, 2 * skip_channels, out_channels, n_blocks, reduction)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.blocks(torch.cat([self.up(x), skip], dim=1))


class SNUNet(nn.Module):
    """[N, in_channels, z, y, x] → logits [N, n_classes, z, y, x]; the PSAM sees only channel `pet_channel`.

    depth: resolution levels (depth - 1 poolings); base_features doubles per level up to max_features;
    blocks_per_level: residual blocks per encoder level and plain blocks per decoder level;
    attention_features: PSAM width; reduction: SE squeeze ratio.
    """

    def __init__(self, in_channels: int = 2, n_classes: int = 3, pet_channel: int = 1, *, base_features: int = 24,
                 depth: int = 5, max_features: int = 320, blocks_per_level: int = 2, attention_features: int = 8,
                 reduction: int = 2):
        super().__init__()
        if not 0 <= pet_channel < in_channels:
            raise ValueError(f"pet_channel {pet_channel} is not one of the {in_channels} input channels")
        if depth < 2 or min(base_features, blocks_per_level, attention_features, reduction, n_classes) < 1:
            raise ValueError(f"need depth >= 2 and positive widths/counts, got depth={depth}, base_features="
                             f"{base_features}, blocks_per_level={blocks_per_level}, attention_features="
                             f"{attention_features}, reduction={reduction}, n_classes={n_classes}")
        self.pet_channel = pet_channel
        self.divisor = 2 ** (depth - 1)
        widths = [min(base_features * 2 ** level, max_features) for level in range(depth)]
        self.encoder = nn.ModuleList(
            [_stack(ResidualConvSENorm, in_channels, widths[0], blocks_per_level, reduction)]
            + [nn.Sequential(nn.MaxPool3d(2), _stack(ResidualConvSENorm, widths[level - 1], widths[level],
                                                      blocks_per_level, reduction))
               for level in range(1, depth)])
        self.psam = PSAM(depth - 1, features=attention_features, reduction=reduction)
        # decoder[level] brings level + 1 up to level, deepest first in forward
        self.decoder = nn.ModuleList([UpStage(widths[level + 1], widths[level], widths[level],
                                              n_blocks=blocks_per_level, reduction=reduction)
                                      for level in range(depth - 1)])
        self.head = nn.Conv3d(widths[0], n_classes, 1)

    def _check_shape(self, x: torch.Tensor) -> None:
        if torch.jit.is_tracing():
            return  # sizes are tensors in a trace; exporting a non-divisible patch fails at the skip concatenation
        spatial_zyx = tuple(x.shape[2:])
        if len(spatial_zyx) != 3 or any(size % self.divisor for size in spatial_zyx):
            raise ValueError(f"SNUNet input {tuple(x.shape)}: need [N, C, z, y, x] with z, y, x divisible by "
                             f"{self.divisor} (2^(depth-1)), e.g. 112×256×256")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_shape(x)
        attention = self.psam(x[:, self.pet_channel:self.pet_channel + 1])
        skips = []
        for level, stage in enumerate(self.encoder):
            x = stage(x)
            if level < len(self.decoder):
                skips.append(x * attention[level])  # the gate: PET attention × skip features
        for level in reversed(range(len(self.decoder))):
            x = self.decoder[level](x, skips[level])
        return self.head(x)
