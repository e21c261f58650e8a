"""FAT (Fan et al., "Lightweight Vision Transformer with Bidirectional Interaction", NeurIPS 2023).

The authors' form, key-compatible with their checkpoints. The optional
implicit-GEMM large-kernel convolution of the reference code is a CUDA speed-up
with the same parameters as ``nn.Conv2d``; plain convolutions are used here.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .configs import FATConfig
from .layers import Backbone, DropPath, stochastic_depth_rates


def _dwconv(dim: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(dim, dim, kernel_size, stride, kernel_size // 2, groups=dim)


def refined_downsample(dim: int, window_size: int, kernel_size: int = 5) -> nn.Module:
    """log2(window) stride-2 depthwise convs with batch norms, 1x1 convs between them."""
    if window_size == 1:
        return nn.Identity()
    steps = {2: 1, 4: 2, 8: 3}.get(window_size)
    if steps is None:
        raise ValueError(f"FAT window sizes must be 1, 2, 4 or 8, not {window_size}")
    block = nn.Sequential()
    for n in range(steps):
        block.add_module(f"conv{n}", _dwconv(dim, kernel_size, 2))
        block.add_module(f"bn{n}", nn.BatchNorm2d(dim))
        if n != steps - 1:
            block.add_module(f"linear{n}", nn.Conv2d(dim, dim, 1))
    return block


class FASA(nn.Module):
    """Fully adaptive self-attention: global attention on pooled keys, gated against a local depthwise path."""

    def __init__(self, dim: int, kernel_size: int, num_heads: int, window_size: int):
        super().__init__()
        self.q = nn.Conv2d(dim, dim, 1)
        self.kv = nn.Conv2d(dim, dim * 2, 1)
        self.local_mixer = _dwconv(dim, kernel_size)
        self.mixer = nn.Conv2d(dim, dim, 1)
        self.dim_head = dim // num_heads
        self.pool = refined_downsample(dim, window_size, 5)
        self.window_size = window_size
        self.scale = self.dim_head ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        d = self.dim_head
        q_local = self.q(x)
        q = q_local.reshape(b, -1, d, h * w).transpose(-1, -2)  # (b, m, hw, d)
        pooled = self.pool(x)
        n_kv = pooled.shape[-2] * pooled.shape[-1]
        k, v = self.kv(pooled).reshape(b, 2, -1, d, n_kv).permute(1, 0, 2, 4, 3).unbind(0)
        attn = torch.softmax(self.scale * q @ k.transpose(-1, -2), -1)
        global_feat = (attn @ v).transpose(-1, -2).reshape(b, c, h, w)
        local_feat = self.local_mixer(q_local)
        local_feat = local_feat * torch.sigmoid(local_feat)
        local_feat = local_feat * torch.sigmoid(global_feat)
        return self.mixer(local_feat * global_feat)


class ConvFFN(nn.Module):
    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int, stride: int, out_channels: int):
        super().__init__()
        self.stride = stride
        self.fc1 = nn.Conv2d(in_channels, hidden_channels, 1)
        self.act = nn.GELU()
        self.dwconv = _dwconv(hidden_channels, kernel_size, stride)
        self.bn = nn.BatchNorm2d(hidden_channels)
        self.fc2 = nn.Conv2d(hidden_channels, out_channels, 1)
        # stride-1 FFNs add the depthwise conv's input back; the deploy form folds it into the kernel
        self.dw_residual = stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        x = x + self.dwconv(x) if self.dw_residual else self.dwconv(x)
        return self.fc2(self.bn(x))


class FATBlock(nn.Module):
    def __init__(self, dim: int, out_dim: int, kernel_size: int, num_heads: int, window_size: int,
                 mlp_kernel_size: int, mlp_ratio: float, stride: int, drop_path: float = 0.0):
        super().__init__()
        self.cpe = _dwconv(dim, kernel_size)
        self.cpe_residual = True  # x + cpe(x); folded into the kernel by the deploy form
        self.norm1 = nn.GroupNorm(1, dim)
        self.attn = FASA(dim, kernel_size, num_heads, window_size)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.GroupNorm(1, dim)
        if stride == 1:
            self.downsample = nn.Identity()
        else:
            self.downsample = nn.Sequential(
                _dwconv(dim, mlp_kernel_size, stride),
                nn.BatchNorm2d(dim),
                nn.Conv2d(dim, out_dim, 1),
            )
        self.ffn = ConvFFN(dim, int(dim * mlp_ratio), mlp_kernel_size, stride, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.cpe(x) if self.cpe_residual else self.cpe(x)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return self.downsample(x) + self.drop_path(self.ffn(self.norm2(x)))


class FATLayer(nn.Module):
    def __init__(self, cfg: FATConfig, i: int, drop_paths: list[float]):
        super().__init__()
        dim = cfg.embed_dims[i]
        last = i == len(cfg.depths) - 1
        out_dim = dim if last else cfg.embed_dims[i + 1]
        args = (cfg.kernel_sizes[i], cfg.num_heads[i], cfg.window_sizes[i], cfg.mlp_kernel_sizes[i], cfg.mlp_ratios[i])
        blocks = [FATBlock(dim, dim, *args, 1, drop_paths[j]) for j in range(cfg.depths[i] - 1)]
        blocks.append(FATBlock(dim, out_dim, *args, 1 if last else 2, drop_paths[-1]))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x


class FAT(Backbone):
    def __init__(self, cfg: FATConfig, num_classes: int = 1000, in_chans: int = 3,
                 features_only: bool = False, drop_path_rate: float | None = None):
        super().__init__(in_chans, num_classes, list(cfg.embed_dims), features_only)
        self.config = cfg
        rates = stochastic_depth_rates(list(cfg.depths), cfg.drop_path_rate if drop_path_rate is None else drop_path_rate)
        self.layers.extend(FATLayer(cfg, i, rates[i]) for i in range(len(cfg.depths)))
