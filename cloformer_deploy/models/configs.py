"""Architecture hyperparameters of both families, as plain data: importing them costs no torch import."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CloFormerConfig:
    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    # heads per local (high-frequency) branch, then the heads of the global branch
    group_splits: tuple[tuple[int, ...], ...]
    # depthwise kernel of each local branch
    kernel_sizes: tuple[tuple[int, ...], ...]
    window_sizes: tuple[int, ...] = (8, 4, 2, 1)
    mlp_kernel_sizes: tuple[int, ...] = (5, 5, 5, 5)
    mlp_ratios: tuple[float, ...] = (4, 4, 4, 4)
    qkv_bias: bool = True
    drop_path_rate: float = 0.0


@dataclass(frozen=True)
class FATConfig:
    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    kernel_sizes: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_sizes: tuple[int, ...] = (8, 4, 2, 1)
    mlp_kernel_sizes: tuple[int, ...] = (5, 5, 5, 5)
    mlp_ratios: tuple[float, ...] = (4, 4, 4, 4)
    drop_path_rate: float = 0.0
