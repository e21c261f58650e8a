"""Building blocks shared by CloFormer and FAT, in the authors' form.

Module and attribute names mirror the authors' code so that ``state_dict()``
keys match their checkpoints exactly (``patch_embed.conv1.conv.1.running_var``).
Methods named ``deploy_<step>`` are the modules' answers to the deploy rewrites
(:mod:`cloformer_deploy.models.deploy`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from .configs import CloFormerConfig, FATConfig
from .deploy_modules import ChannelNorm
from .folds import fold_affine_into_linear


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

    def deploy_drop_training_only(self) -> nn.Module:
        return nn.Identity()

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


def downsample_shortcut(dim: int, out_dim: int, stride: int, kernel_size: int, depthwise: bool) -> nn.Module:
    """A block's shortcut: an identity, or (stride 2, a stage's last block) a strided conv, a batch norm and a
    1x1 conv to the next stage's width."""
    if stride == 1:
        return nn.Identity()
    groups = dim if depthwise else 1
    return nn.Sequential(
        nn.Conv2d(dim, dim, kernel_size, stride, kernel_size // 2, groups=groups),
        nn.BatchNorm2d(dim),
        nn.Conv2d(dim, out_dim, 1),
    )


class Block(nn.Module):
    """What the blocks of both families share: a pre-norm attention residual, then the downsampling shortcut
    beside a pre-norm feed-forward branch. Subclasses build the parts under the authors' names."""

    feed_forward_name: str  # the authors' attribute of the feed-forward branch: "mlp" (CloFormer), "ffn" (FAT)

    @property
    def feed_forward(self) -> nn.Module:
        return getattr(self, self.feed_forward_name)

    @property
    def halves(self) -> bool:
        """Whether the block halves the resolution (the last block of every stage but the last)."""
        return not isinstance(self.downsample, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return self.downsample(x) + self.drop_path(self.feed_forward(self.norm2(x)))

    def deploy_fold_norm_affine(self) -> None:
        for norm, reader in ((self.norm1, self.attn), (self.norm2, self.feed_forward)):
            if isinstance(norm, ChannelNorm):
                norm.move_affine_into(reader)


class Stage(nn.Module):
    """One stage's blocks in sequence (the authors' ``layers.<i>.blocks``)."""

    def __init__(self, blocks: list[Block]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x


class Backbone(nn.Module):
    """The frame both papers share: stem, four stages, GroupNorm, global pool, linear head.

    Subclasses say how a block is made (:meth:`make_block`); the stages are laid out here: each stage's
    last block halves the resolution and widens to the next stage's width, except in the last stage.
    With ``features_only`` the module returns the four stage maps at strides
    4, 8, 16 and 32 (stem output, outputs of stages 0 and 1, output of the last
    stage) and holds no norm or head, as detection and segmentation necks expect.
    """

    def __init__(
        self,
        cfg: CloFormerConfig | FATConfig,
        num_classes: int = 1000,
        in_chans: int = 3,
        features_only: bool = False,
        drop_path_rate: float | None = None,
    ):
        super().__init__()
        self.config = cfg
        self.num_classes = num_classes
        self.embed_dims = dims = list(cfg.embed_dims)
        self.features_only = features_only
        self.patch_embed = PatchEmbedding(in_chans, dims[0])
        self.layers = nn.ModuleList()
        if not features_only:
            self.norm = nn.GroupNorm(1, dims[-1])
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        # stages after the head: the order in which seeded random weights were always drawn
        rate = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        rates = stochastic_depth_rates(list(cfg.depths), rate)
        for i, depth in enumerate(cfg.depths):
            last_stage = i == len(cfg.depths) - 1
            blocks = [self.make_block(i, dims[i], dims[i], 1, rates[i][j]) for j in range(depth - 1)]
            blocks.append(
                self.make_block(
                    i, dims[i], dims[i] if last_stage else dims[i + 1], 1 if last_stage else 2, rates[i][-1]
                )
            )
            self.layers.append(Stage(blocks))

    def make_block(self, stage: int, dim: int, out_dim: int, stride: int, drop_path: float) -> Block:
        """Block of ``stage`` (hyperparameters from ``self.config``) taking ``dim`` channels to ``out_dim``."""
        raise NotImplementedError

    @property
    def feature_info(self) -> list[dict]:
        return [{"stride": 4 * 2**i, "channels": c} for i, c in enumerate(self.embed_dims)]

    def block_input_sizes(self, input_size: tuple[int, int]) -> Iterator[tuple[Block, int, int]]:
        """(block, height, width at the block's input) for every block, for a fixed input size."""
        h, w = input_size[0] // 4, input_size[1] // 4  # the stem's stride
        for stage in self.layers:
            for blk in stage.blocks:
                yield blk, h, w
                if blk.halves:
                    h, w = h // 2, w // 2

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

    def deploy_fold_norm_affine(self) -> None:
        # global average pooling commutes with a per-channel affine, so the final norm's moves into the head
        if (
            not self.features_only
            and isinstance(self.norm, ChannelNorm)
            and self.norm.affine
            and isinstance(self.head, nn.Linear)
        ):
            gamma, beta = self.norm.drop_affine()
            self.head = fold_affine_into_linear(self.head, gamma, beta)


def stochastic_depth_rates(depths: list[int], drop_path_rate: float) -> list[list[float]]:
    """Linearly increasing drop-path rates, split per stage (as in both papers)."""
    rates = [r.item() for r in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
    out, start = [], 0
    for d in depths:
        out.append(rates[start : start + d])
        start += d
    return out
