"""Static-shape modules of the deploy form.

Every size used by a reshape is a Python int computed at construction from the
input size; ``forward`` never reads ``x.shape``. The batch dimension is written
as ``-1`` so the same module serves any static batch an exporter traces with.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cloformer import EfficientAttention
from .fat import FASA


class ChannelNorm(nn.Module):
    """GroupNorm(1, C) spelled out: normalise over (C, H, W), then an optional per-channel affine.

    Written with mean/sub/mul/rsqrt so that every compiler sees plain arithmetic.
    After ``fold_norm_affine`` most instances carry no affine at all.
    """

    def __init__(self, num_channels: int, eps: float, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.num_channels = num_channels
        self.eps = float(eps)
        if weight is not None:
            self.weight = nn.Parameter(weight.detach().reshape(1, num_channels, 1, 1).clone())
            self.bias = nn.Parameter(bias.detach().reshape(1, num_channels, 1, 1).clone())
        else:
            self.weight = self.bias = None

    @classmethod
    def from_group_norm(cls, gn: nn.GroupNorm) -> "ChannelNorm":
        if gn.num_groups != 1:
            raise ValueError("only GroupNorm(1, C) is a channel norm")
        return cls(gn.num_channels, gn.eps, gn.weight if gn.affine else None, gn.bias if gn.affine else None)

    @property
    def affine(self) -> bool:
        return self.weight is not None

    def drop_affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Remove and return (gamma, beta) as flat vectors, for folding into the next layer."""
        if self.weight is None:
            return None
        gamma, beta = self.weight.detach().flatten(), self.bias.detach().flatten()
        self.weight = self.bias = None
        return gamma, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        xc = x - mean
        var = (xc * xc).mean(dim=(1, 2, 3), keepdim=True)
        y = xc * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight + self.bias
        return y

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"


def _split_qkv(t: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = torch.split(t, [c, c, c], dim=1)
    return q, k, v


class StaticCloAttention(nn.Module):
    """CloFormer's attention for one fixed spatial size.

    Starts as the authors' arithmetic; rewrite steps then fold the attention scale
    (``local_scale``/``global_scale`` become None) and merge the input projections
    (``in_proj``) and depthwise mixers (``mixer``).
    """

    def __init__(self, attn: EfficientAttention, h: int, w: int):
        super().__init__()
        self.h, self.w = h, w
        self.dim = attn.dim
        self.dim_head = attn.dim_head
        self.window_size = attn.window_size
        heads = [g for g in attn.group_split[:-1] if g]
        self.local_channels = [attn.dim_head * g for g in heads]
        self.global_heads = attn.global_heads
        self.qkvs, self.convs, self.act_blocks = attn.qkvs, attn.convs, attn.act_blocks
        self.local_scale: float | None = attn.scale
        self.global_scale: float | None = attn.scale
        if self.global_heads:
            self.global_q, self.global_kv = attn.global_q, attn.global_kv
            self.pool = attn.avgpool
            self.n_kv = (h // self.window_size) * (w // self.window_size)
        self.proj = attn.proj
        # set by merge_parallel_convs
        self.in_proj: nn.Conv2d | None = None
        self.in_proj_split: list[int] = []
        self.mixer: nn.Conv2d | None = None
        self.kv_in_proj = False  # window 1: the kv projection shares the input and is merged too

    def _local(self, qkv: torch.Tensor, c: int, act_block: nn.Module) -> torch.Tensor:
        q, k, v = _split_qkv(qkv, c)
        a = act_block(q * k)
        if self.local_scale is not None:
            a = a * self.local_scale
        return torch.tanh(a) * v

    def _global(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        m, d, hw = self.global_heads, self.dim_head, self.h * self.w
        q = q.reshape(-1, m, d, hw).transpose(-1, -2)
        k, v = kv.reshape(-1, 2, m, d, self.n_kv).permute(1, 0, 2, 4, 3).unbind(0)
        if self.global_scale is not None:
            q = self.global_scale * q
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return (attn @ v).transpose(2, 3).reshape(-1, m * d, self.h, self.w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        if self.in_proj is None:
            qkvs = [mix(proj(x)) for proj, mix in zip(self.qkvs, self.convs)]
            gq = self.global_q(x) if self.global_heads else None
            gkv = self.global_kv(self.pool(x)) if self.global_heads else None
        else:
            parts = list(torch.split(self.in_proj(x), self.in_proj_split, dim=1))
            gkv = parts.pop() if self.kv_in_proj else (self.global_kv(self.pool(x)) if self.global_heads else None)
            gq = parts.pop() if self.global_heads else None
            local = parts[0] if parts else None
            if local is not None:
                local = self.mixer(local)
                qkvs = list(torch.split(local, [3 * c for c in self.local_channels], dim=1))
            else:
                qkvs = []
        for qkv, c, act_block in zip(qkvs, self.local_channels, self.act_blocks):
            out.append(self._local(qkv, c, act_block))
        if self.global_heads:
            out.append(self._global(gq, gkv))
        return self.proj(torch.cat(out, dim=1) if len(out) > 1 else out[0])


class StaticFASA(nn.Module):
    """FAT's fully adaptive self-attention for one fixed spatial size."""

    def __init__(self, attn: FASA, h: int, w: int):
        super().__init__()
        self.h, self.w = h, w
        self.dim = attn.q.in_channels
        self.dim_head = attn.dim_head
        self.num_heads = self.dim // attn.dim_head
        self.window_size = attn.window_size
        self.n_kv = (h // attn.window_size) * (w // attn.window_size)
        self.q, self.kv, self.pool = attn.q, attn.kv, attn.pool
        self.local_mixer, self.mixer = attn.local_mixer, attn.mixer
        self.scale: float | None = attn.scale
        self.in_proj: nn.Conv2d | None = None  # q and kv merged (window 1 only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, d, hw = self.num_heads, self.dim_head, self.h * self.w
        if self.in_proj is None:
            q_local, kv = self.q(x), self.kv(self.pool(x))
        else:
            q_local, kv = torch.split(self.in_proj(x), [self.dim, 2 * self.dim], dim=1)
        q = q_local.reshape(-1, m, d, hw).transpose(-1, -2)
        k, v = kv.reshape(-1, 2, m, d, self.n_kv).permute(1, 0, 2, 4, 3).unbind(0)
        if self.scale is not None:
            q = self.scale * q
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        global_feat = (attn @ v).transpose(-1, -2).reshape(-1, self.dim, self.h, self.w)
        local_feat = F.silu(self.local_mixer(q_local))
        local_feat = local_feat * torch.sigmoid(global_feat)
        return self.mixer(local_feat * global_feat)
