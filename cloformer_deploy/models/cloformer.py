"""CloFormer (Fan et al., "Rethinking Local Perception in Lightweight Vision Transformer").

The authors' form: the same computation and the same ``state_dict`` keys as the
reference implementation, so their checkpoints load with ``strict=True``.
Shapes are derived from the input at run time here; the deploy form
(:mod:`cloformer_deploy.models.deploy`) fixes them at construction.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .configs import CloFormerConfig
from .deploy_modules import StaticCloAttention
from .folds import fold_affine_into_conv1x1
from .layers import Backbone, Block, DropPath, downsample_shortcut


class AttnMap(nn.Module):
    """Context-aware weights of the local branch: 1x1 conv, swish, 1x1 conv."""

    def __init__(self, dim: int):
        super().__init__()
        self.act_block = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.SiLU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_block(x)


class EfficientAttention(nn.Module):
    """Local branches (shared-weight conv + context-aware weights) beside global attention on pooled keys."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        group_split: tuple[int, ...],
        kernel_sizes: tuple[int, ...],
        window_size: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        qkv_bias: bool = True,
    ):
        super().__init__()
        if sum(group_split) != num_heads or len(kernel_sizes) + 1 != len(group_split):
            raise ValueError(
                "group_split must list one head count per kernel size plus the global heads, "
                f"summing to num_heads={num_heads}"
            )
        self.dim = dim
        self.num_heads = num_heads
        self.dim_head = dim // num_heads
        self.scale = self.dim_head**-0.5
        self.window_size = window_size
        self.group_split = tuple(group_split)
        self.kernel_sizes = tuple(kernel_sizes)
        convs, act_blocks, qkvs = [], [], []
        for heads, k in zip(group_split[:-1], kernel_sizes):
            if heads == 0:
                continue
            ch = 3 * self.dim_head * heads
            convs.append(nn.Conv2d(ch, ch, k, 1, k // 2, groups=ch))
            act_blocks.append(AttnMap(self.dim_head * heads))
            qkvs.append(nn.Conv2d(dim, ch, 1, bias=qkv_bias))
        self.global_heads = group_split[-1]
        if self.global_heads:
            self.global_q = nn.Conv2d(dim, self.global_heads * self.dim_head, 1, bias=qkv_bias)
            self.global_kv = nn.Conv2d(dim, 2 * self.global_heads * self.dim_head, 1, bias=qkv_bias)
            self.avgpool = nn.AvgPool2d(window_size, window_size) if window_size != 1 else nn.Identity()
        self.convs = nn.ModuleList(convs)
        self.act_blocks = nn.ModuleList(act_blocks)
        self.qkvs = nn.ModuleList(qkvs)
        self.proj = nn.Conv2d(dim, dim, 1, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

    def local_branch(self, x, to_qkv, mixer, attn_map):
        b, _, h, w = x.shape
        q, k, v = mixer(to_qkv(x)).reshape(b, 3, -1, h, w).unbind(1)
        weights = torch.tanh(attn_map(q * k) * self.scale)
        return self.attn_drop(weights) * v

    def global_branch(self, x):
        b, _, h, w = x.shape
        d = self.dim_head
        q = self.global_q(x).reshape(b, -1, d, h * w).transpose(-1, -2)  # (b, m, hw, d)
        pooled = self.avgpool(x)
        n_kv = pooled.shape[-2] * pooled.shape[-1]
        k, v = self.global_kv(pooled).reshape(b, 2, -1, d, n_kv).permute(1, 0, 2, 4, 3).unbind(0)
        attn = self.attn_drop(torch.softmax(self.scale * q @ k.transpose(-1, -2), dim=-1))
        return (attn @ v).transpose(2, 3).reshape(b, -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = [self.local_branch(x, qkv, conv, amap) for qkv, conv, amap in zip(self.qkvs, self.convs, self.act_blocks)]
        if self.global_heads:
            out.append(self.global_branch(x))
        return self.proj_drop(self.proj(torch.cat(out, dim=1)))

    def deploy_static_shapes(self, h: int, w: int) -> StaticCloAttention:
        return StaticCloAttention(self, h, w)


class ConvFFN(nn.Module):
    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        kernel_size: int,
        stride: int,
        out_channels: int,
        drop: float = 0.0,
    ):
        super().__init__()
        self.fc1 = nn.Conv2d(in_channels, hidden_channels, 1)
        self.act = nn.GELU()
        self.dwconv = nn.Conv2d(
            hidden_channels, hidden_channels, kernel_size, stride, kernel_size // 2, groups=hidden_channels
        )
        self.fc2 = nn.Conv2d(hidden_channels, out_channels, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.dwconv(self.act(self.fc1(x))))
        return self.drop(self.fc2(x))

    def fold_input_affine(self, gamma: torch.Tensor, beta: torch.Tensor) -> bool:
        self.fc1 = fold_affine_into_conv1x1(self.fc1, gamma, beta)
        return True


class CloBlock(Block):
    feed_forward_name = "mlp"

    def __init__(
        self,
        dim: int,
        out_dim: int,
        num_heads: int,
        group_split,
        kernel_sizes,
        window_size: int,
        mlp_kernel_size: int,
        mlp_ratio: float,
        stride: int,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.attn = EfficientAttention(dim, num_heads, group_split, kernel_sizes, window_size, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.GroupNorm(1, dim)
        self.downsample = downsample_shortcut(dim, out_dim, stride, mlp_kernel_size, depthwise=False)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio), mlp_kernel_size, stride, out_dim)


class CloFormer(Backbone):
    config: CloFormerConfig

    def make_block(self, stage: int, dim: int, out_dim: int, stride: int, drop_path: float) -> CloBlock:
        c, i = self.config, stage
        return CloBlock(
            dim,
            out_dim,
            c.num_heads[i],
            c.group_splits[i],
            c.kernel_sizes[i],
            c.window_sizes[i],
            c.mlp_kernel_sizes[i],
            c.mlp_ratios[i],
            stride,
            c.qkv_bias,
            drop_path,
        )
