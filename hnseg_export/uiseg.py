"""The HN-UISeg network shape: a residual-encoder U-Net over 4 channels (CT, PET and the GTVp/GTVn click prompts)
with dropout in every stage, so Monte-Carlo dropout has sites to switch on. Ready for the torch route:

    python export/to_onnx.py torch --module hnseg_export.uiseg:ResEncUNet \\
        --kwargs '{"features": [32, 64, 128, 256, 320], "blocks": [1, 3, 4, 6, 6], "dropout": 0.05}' \\
        --state-dict fold0.pt ... --model-spec spec.json --uncertainty '{...}' --out weights/hn-uiseg

Encoder stage s: a strided 3×3×3 convolution (stride 2 from the second stage on), then `blocks[s]` residual
blocks (conv-norm-LeakyReLU-conv-norm + identity, LeakyReLU), then Dropout. Decoder: transposed convolution,
concatenation with the skip, a conv-norm-LeakyReLU pair, Dropout; a 1×1×1 convolution to the class logits.
Instance norm with affine parameters, as nnU-Net's ResidualEncoderUNet.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1),
                         nn.InstanceNorm3d(c_out, affine=True), nn.LeakyReLU(0.01, inplace=True))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = _conv(channels, channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm2 = nn.InstanceNorm3d(channels, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x):
        return self.act(self.norm2(self.conv2(self.conv1(x))) + x)


class ResEncUNet(nn.Module):
    def __init__(self, in_channels: int = 4, n_classes: int = 3, features=(32, 64, 128, 256, 320),
                 blocks=(1, 3, 4, 6, 6), dropout: float = 0.05):
        super().__init__()
        if len(features) != len(blocks) or len(features) < 2:
            raise ValueError(f"features {list(features)} and blocks {list(blocks)} need the same length (>= 2)")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.encoder = nn.ModuleList()
        c_in = in_channels
        for stage, (c, n) in enumerate(zip(features, blocks)):
            self.encoder.append(nn.Sequential(_conv(c_in, c, stride=1 if stage == 0 else 2),
                                              *(ResidualBlock(c) for _ in range(n)), nn.Dropout(dropout)))
            c_in = c
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for c_deep, c_skip in zip(features[::-1][:-1], features[::-1][1:]):
            self.up.append(nn.ConvTranspose3d(c_deep, c_skip, 2, stride=2))
            self.decoder.append(nn.Sequential(_conv(2 * c_skip, c_skip), _conv(c_skip, c_skip), nn.Dropout(dropout)))
        self.head = nn.Conv3d(features[0], n_classes, 1)

    def forward(self, x):
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for up, decode in zip(self.up, self.decoder):
            x = decode(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)
