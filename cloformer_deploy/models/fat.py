"""FAT (Fan et al., "Lightweight Vision Transformer with Bidirectional Interaction", NeurIPS 2023).

The authors' form, key-compatible with their checkpoints. The optional
implicit-GEMM large-kernel convolution of the reference code is a CUDA speed-up
with the same parameters as ``nn.Conv2d``; plain convolutions are used here.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .configs import FATConfig
from .deploy_modules import StaticFASA
from .folds import absorb_identity, fold_affine_into_conv1x1, fuse_conv_bn
from .layers import Backbone, Block, DropPath, downsample_shortcut


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
        self.scale = self.dim_head**-0.5

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

    def deploy_static_shapes(self, h: int, w: int) -> StaticFASA:
        return StaticFASA(self, h, w)


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

    def fold_input_affine(self, gamma: torch.Tensor, beta: torch.Tensor) -> bool:
        self.fc1 = fold_affine_into_conv1x1(self.fc1, gamma, beta)
        return True

    def deploy_fold_residuals(self) -> None:
        if self.dw_residual:
            absorb_identity(self.dwconv)
            self.dw_residual = False

    def deploy_fold_batchnorm(self) -> None:
        # the batch norm reads x + dwconv(x): it folds into the conv once fold_residuals has put x in the kernel
        if isinstance(self.bn, nn.BatchNorm2d) and not self.dw_residual:
            self.dwconv = fuse_conv_bn(self.dwconv, self.bn)
            self.bn = nn.Identity()


class FATBlock(Block):
    feed_forward_name = "ffn"

    def __init__(
        self,
        dim: int,
        out_dim: int,
        kernel_size: int,
        num_heads: int,
        window_size: int,
        mlp_kernel_size: int,
        mlp_ratio: float,
        stride: int,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.cpe = _dwconv(dim, kernel_size)
        self.cpe_residual = True  # x + cpe(x); folded into the kernel by the deploy form
        self.norm1 = nn.GroupNorm(1, dim)
        self.attn = FASA(dim, kernel_size, num_heads, window_size)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.GroupNorm(1, dim)
        self.downsample = downsample_shortcut(dim, out_dim, stride, mlp_kernel_size, depthwise=True)
        self.ffn = ConvFFN(dim, int(dim * mlp_ratio), mlp_kernel_size, stride, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.cpe(x) if self.cpe_residual else self.cpe(x)
        return super().forward(x)

    def deploy_fold_residuals(self) -> None:
        if self.cpe_residual:
            absorb_identity(self.cpe)
            self.cpe_residual = False


class FAT(Backbone):
    config: FATConfig

    def make_block(self, stage: int, dim: int, out_dim: int, stride: int, drop_path: float) -> FATBlock:
        c, i = self.config, stage
        return FATBlock(
            dim,
            out_dim,
            c.kernel_sizes[i],
            c.num_heads[i],
            c.window_sizes[i],
            c.mlp_kernel_sizes[i],
            c.mlp_ratios[i],
            stride,
            drop_path,
        )
