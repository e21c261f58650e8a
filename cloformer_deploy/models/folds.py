"""Weight arithmetic of the deploy rewrites: convolutions fused, folded, stacked and cut, in float64.

The blocks call these from their ``deploy_<step>`` methods (see :mod:`.deploy`); results are stored
in the convolution's dtype and device.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _fused_conv(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    out = nn.Conv2d(
        conv.in_channels,
        weight.shape[0],
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
    )
    out.weight.data.copy_(weight.to(conv.weight.dtype))
    out.bias.data.copy_(bias.to(conv.weight.dtype))
    return out.to(conv.weight.device)


def _conv_params64(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return w, b


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    w, b = _conv_params64(conv)
    std = (bn.running_var.double() + bn.eps).sqrt()
    gamma = bn.weight.double() if bn.affine else torch.ones_like(std)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(std)
    k = gamma / std
    return _fused_conv(conv, w * k.reshape(-1, 1, 1, 1), (b - bn.running_mean.double()) * k + beta)


def fold_affine_into_conv1x1(conv: nn.Conv2d, gamma: torch.Tensor, beta: torch.Tensor) -> nn.Conv2d:
    """conv(gamma * x + beta) as one conv: scale the input columns, push beta into the bias."""
    assert conv.kernel_size == (1, 1) and conv.groups == 1
    w, b = _conv_params64(conv)
    g, bt = gamma.double(), beta.double()
    w2 = w * g.reshape(1, -1, 1, 1)
    return _fused_conv(conv, w2, b + w[:, :, 0, 0] @ bt)


def fold_affine_into_linear(linear: nn.Linear, gamma: torch.Tensor, beta: torch.Tensor) -> nn.Linear:
    """linear(gamma * x + beta) as one linear layer."""
    w, b = linear.weight.detach().double(), linear.bias.detach().double()
    out = nn.Linear(linear.in_features, linear.out_features)
    out.weight.data.copy_((w * gamma.double()).to(linear.weight.dtype))
    out.bias.data.copy_((b + w @ beta.double()).to(linear.weight.dtype))
    return out


def absorb_identity(conv: nn.Conv2d) -> None:
    """``x + conv(x)`` as ``conv(x)``: +1 at the centre of a stride-1 depthwise kernel."""
    assert conv.groups == conv.in_channels == conv.out_channels and conv.stride == (1, 1)
    kh, kw = conv.kernel_size
    with torch.no_grad():
        conv.weight[:, 0, kh // 2, kw // 2] += 1.0


def scale_conv_rows(conv: nn.Conv2d, rows: slice, s: float) -> None:
    with torch.no_grad():
        conv.weight[rows] *= s
        if conv.bias is not None:
            conv.bias[rows] *= s


def cat_convs(convs: list[nn.Conv2d]) -> nn.Conv2d:
    """1x1 convolutions reading the same input, as one convolution with their outputs stacked."""
    w = torch.cat([c.weight.detach() for c in convs], 0)
    b = torch.cat([c.bias.detach() if c.bias is not None else torch.zeros(c.out_channels) for c in convs], 0)
    return _fused_conv(convs[0], w.double(), b.double())


def cat_depthwise(convs: list[nn.Conv2d]) -> nn.Conv2d:
    """Depthwise convolutions on consecutive channel groups as one, smaller kernels zero-padded to the largest."""
    k = max(c.kernel_size[0] for c in convs)
    ws = []
    for c in convs:
        p = (k - c.kernel_size[0]) // 2
        ws.append(nn.functional.pad(c.weight.detach().double(), (p, p, p, p)))
    w, b = torch.cat(ws, 0), torch.cat([c.bias.detach().double() for c in convs], 0)
    out = nn.Conv2d(w.shape[0], w.shape[0], k, 1, k // 2, groups=w.shape[0])
    out.weight.data.copy_(w.to(convs[0].weight.dtype))
    out.bias.data.copy_(b.to(convs[0].weight.dtype))
    return out
