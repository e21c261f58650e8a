"""Building blocks shared by CloFormer and FAT, in the authors' form.

Module and attribute names mirror the authors' code so that ``state_dict()``
keys match their checkpoints exactly (``patch_embed.conv1.conv.1.running_var``).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class DropPath(nn.Module):
    """Stochastic depth per sample; an identity in eval mode (no parameters)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class ConvBNReLU(nn.Module):
    """Conv -> BatchNorm -> ReLU, kept inside ``.conv`` as the authors' ``BasicBlock`` does."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PatchEmbedding(nn.Module):
    """The convolutional stem of both papers: stride 4, then a GroupNorm(1, C)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 96):
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels, out_channels // 2, 3, 2)
        self.conv2 = ConvBNReLU(out_channels // 2, out_channels, 3, 2)
        self.conv3 = ConvBNReLU(out_channels, out_channels, 3, 1)
        self.conv4 = ConvBNReLU(out_channels, out_channels, 3, 1)
        self.conv5 = nn.Conv2d(out_channels, out_channels, 1, 1, 0)
        self.layernorm = nn.GroupNorm(1, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.conv3(x)
        x = self.conv4(x)
        x = self.conv5(x)
        return self.layernorm(x)


class Backbone(nn.Module):
    """The frame both papers share: stem, four stages, GroupNorm, global pool, linear head.

    With ``features_only`` the module returns the four stage maps at strides
    4, 8, 16 and 32 (stem output, outputs of stages 0 and 1, output of the last
    stage) and holds no norm or head, as detection and segmentation necks expect.
    """

    def __init__(self, in_chans: int, num_classes: int, embed_dims: list[int], features_only: bool):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dims = list(embed_dims)
        self.features_only = features_only
        self.patch_embed = PatchEmbedding(in_chans, embed_dims[0])
        self.layers = nn.ModuleList()
        if not features_only:
            self.norm = nn.GroupNorm(1, embed_dims[-1])
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()

    @property
    def feature_info(self) -> list[dict]:
        return [{"stride": 4 * 2**i, "channels": c} for i, c in enumerate(self.embed_dims)]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        maps = [x]
        for i, layer in enumerate(self.layers):
            x = layer(x)
            # stages 0..2 end by halving the resolution; stage 2's output (stride 32)
            # is refined by stage 3, whose output is the stride-32 map.
            if i < 2 or i == len(self.layers) - 1:
                maps.append(x)
        return maps

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_features(x)
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.avgpool(self.norm(x))
        return self.head(x.flatten(1))


def stochastic_depth_rates(depths: list[int], drop_path_rate: float) -> list[list[float]]:
    """Linearly increasing drop-path rates, split per stage (as in both papers)."""
    rates = [r.item() for r in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
    out, start = [], 0
    for d in depths:
        out.append(rates[start:start + d])
        start += d
    return out
