"""The deploy form: the authors' model rewritten for mobile compilers, step by named step.

``to_deploy`` copies the model and applies :data:`DEPLOY_STEPS` in order. Each step
is a small function that rewrites the copy in place and keeps the computed function
equal (up to float rounding) to the authors' form; ``tests/test_deploy.py`` checks
every step on its own. Adding a rewrite is adding a step here.

The folds are computed in float64 and stored in the model's dtype.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..inputs import InputError
from .cloformer import CloBlock, CloFormer, EfficientAttention
from .deploy_modules import (ChannelNorm, ErfcGELU, RingDepthwise, SigmoidSiLU, StaticCloAttention, StaticFASA,
                             constant_buffer)
from .fat import FAT, FASA, ConvFFN as FATConvFFN, FATBlock
from .layers import Backbone, DropPath

STRIDE = 32  # the stem (4) times three stride-2 stages; the pooling windows 8/4/2/1 tile exactly


class InputSizeError(InputError):
    pass


@dataclass(frozen=True)
class DeployStep:
    name: str
    fn: Callable[[nn.Module, tuple[int, int]], None]
    doc: str


# --- helpers ----------------------------------------------------------------------------------

def check_input_size(input_size) -> tuple[int, int]:
    """(H, W) as ints, each a positive multiple of 32, or an error naming the nearest valid sizes."""
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    h, w = (int(v) for v in input_size)
    if h <= 0 or w <= 0:
        raise InputSizeError(f"input size {h}x{w}: sizes must be positive multiples of {STRIDE}, such as 224 or 256x320")
    if h % STRIDE == 0 and w % STRIDE == 0:
        return h, w

    def near(v):
        lo = max(STRIDE, v // STRIDE * STRIDE)
        return sorted({lo, lo + STRIDE}) if v % STRIDE else [v]

    hs, ws = near(h), near(w)
    options = sorted({(a, b) for a in hs for b in ws}, key=lambda s: abs(s[0] - h) + abs(s[1] - w))
    nearest = " or ".join(f"{a}x{b}" for a, b in options[:2])
    raise InputSizeError(f"input size {h}x{w} is not a multiple of {STRIDE} in each dimension "
                         f"(the attention pooling windows 8/4/2/1 need it); use {nearest}")


def _blocks(model: Backbone):
    """(block, height, width at the block's input) for every block, from the fixed input size."""
    h, w = model.deploy_input_size
    h, w = h // 4, w // 4
    for layer in model.layers:
        for blk in layer.blocks:
            yield blk, h, w
            if not isinstance(blk.downsample, nn.Identity):
                h, w = h // 2, w // 2


def _fused_conv(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    out = nn.Conv2d(conv.in_channels, weight.shape[0], conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True)
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


def _scale_conv_rows(conv: nn.Conv2d, rows: slice, s: float) -> None:
    with torch.no_grad():
        conv.weight[rows] *= s
        if conv.bias is not None:
            conv.bias[rows] *= s


# --- the steps ---------------------------------------------------------------------------------

def drop_training_only(model: nn.Module, input_size) -> None:
    """Drop-path and dropout become identities; SyncBatchNorm becomes BatchNorm2d."""
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, (DropPath, nn.Dropout)):
                setattr(mod, child_name, nn.Identity())
            elif isinstance(child, nn.SyncBatchNorm):
                bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
                bn.load_state_dict(child.state_dict())
                setattr(mod, child_name, bn)


def static_shapes(model: nn.Module, input_size) -> None:
    """Attention modules become static-shape modules; GroupNorm(1, C) becomes an explicit ChannelNorm."""
    for blk, h, w in _blocks(model):
        if isinstance(blk.attn, EfficientAttention):
            blk.attn = StaticCloAttention(blk.attn, h, w)
        elif isinstance(blk.attn, FASA):
            blk.attn = StaticFASA(blk.attn, h, w)
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(mod, child_name, ChannelNorm.from_group_norm(child))


def fold_residuals(model: nn.Module, input_size) -> None:
    """FAT's ``x + dwconv(x)`` (positional encoding, stride-1 FFN) becomes one dwconv with +1 at the kernel centre."""
    def absorb_identity(conv: nn.Conv2d) -> None:
        assert conv.groups == conv.in_channels == conv.out_channels and conv.stride == (1, 1)
        kh, kw = conv.kernel_size
        with torch.no_grad():
            conv.weight[:, 0, kh // 2, kw // 2] += 1.0

    for mod in list(model.modules()):
        if isinstance(mod, FATBlock) and mod.cpe_residual:
            absorb_identity(mod.cpe)
            mod.cpe_residual = False
        if isinstance(mod, FATConvFFN) and mod.dw_residual:
            absorb_identity(mod.dwconv)
            mod.dw_residual = False


def fold_batchnorm(model: nn.Module, input_size) -> None:
    """Every BatchNorm2d right after a convolution is folded into that convolution's weights and bias."""
    for mod in list(model.modules()):
        if isinstance(mod, nn.Sequential):
            items = list(mod.named_children())
            keep: list[tuple[str, nn.Module]] = []
            for name, child in items:
                if isinstance(child, nn.BatchNorm2d) and keep and isinstance(keep[-1][1], nn.Conv2d):
                    keep[-1] = (keep[-1][0], fuse_conv_bn(keep[-1][1], child))
                else:
                    keep.append((name, child))
            if len(keep) != len(items):
                for name, _ in items:
                    delattr(mod, name)
                for name, child in keep:
                    mod.add_module(name, child)
        elif isinstance(mod, FATConvFFN) and isinstance(mod.bn, nn.BatchNorm2d) and not mod.dw_residual:
            mod.dwconv = fuse_conv_bn(mod.dwconv, mod.bn)
            mod.bn = nn.Identity()


def fold_attention_scale(model: nn.Module, input_size) -> None:
    """The attention scale d**-0.5 moves into weights: CloFormer's context-aware weights and global q; FAT's k."""
    for mod in list(model.modules()):
        if isinstance(mod, StaticCloAttention):
            if mod.local_scale is not None:
                for ab in mod.act_blocks:
                    _scale_conv_rows(ab.act_block[-1], slice(None), mod.local_scale)
                mod.local_scale = None
            if mod.global_heads and mod.global_scale is not None:
                if mod.in_proj is not None:
                    raise RuntimeError("fold_attention_scale must run before merge_parallel_convs")
                _scale_conv_rows(mod.global_q, slice(None), mod.global_scale)
                mod.global_scale = None
        elif isinstance(mod, StaticFASA) and mod.scale is not None:
            # q also feeds the local mixer, so the scale goes to the k half of the kv projection
            if mod.in_proj is not None:
                raise RuntimeError("fold_attention_scale must run before merge_parallel_convs")
            _scale_conv_rows(mod.kv, slice(0, mod.dim), mod.scale)
            mod.scale = None


def fold_norm_affine(model: nn.Module, input_size) -> None:
    """A ChannelNorm's gamma/beta move into the 1x1 convolutions (or the head) that read it, where exact.

    Average pooling commutes with a per-channel affine, so CloFormer's pooled kv and
    the classifier head qualify; FAT's refined downsampling (zero-padded strided
    depthwise convs) does not, so those norms keep their affine.
    """
    for mod in list(model.modules()):
        if isinstance(mod, CloBlock) and isinstance(mod.norm1, ChannelNorm) and isinstance(mod.attn, StaticCloAttention):
            a = mod.attn
            if a.in_proj is None and mod.norm1.affine:
                g, b = mod.norm1.drop_affine()
                a.qkvs = nn.ModuleList(fold_affine_into_conv1x1(c, g, b) for c in a.qkvs)
                if a.global_heads:
                    a.global_q = fold_affine_into_conv1x1(a.global_q, g, b)
                    a.global_kv = fold_affine_into_conv1x1(a.global_kv, g, b)
        if isinstance(mod, FATBlock) and isinstance(mod.norm1, ChannelNorm) and isinstance(mod.attn, StaticFASA):
            a = mod.attn
            if a.in_proj is None and mod.norm1.affine and isinstance(a.pool, nn.Identity):
                g, b = mod.norm1.drop_affine()
                a.q = fold_affine_into_conv1x1(a.q, g, b)
                a.kv = fold_affine_into_conv1x1(a.kv, g, b)
        if isinstance(mod, (CloBlock, FATBlock)) and isinstance(mod.norm2, ChannelNorm) and mod.norm2.affine:
            ffn = mod.mlp if isinstance(mod, CloBlock) else mod.ffn
            g, b = mod.norm2.drop_affine()
            ffn.fc1 = fold_affine_into_conv1x1(ffn.fc1, g, b)
    if isinstance(model, Backbone) and not model.features_only and isinstance(model.norm, ChannelNorm) \
            and model.norm.affine and isinstance(model.head, nn.Linear):
        g, b = model.norm.drop_affine()
        head = model.head
        w, bias = head.weight.detach().double(), head.bias.detach().double()
        new = nn.Linear(head.in_features, head.out_features)
        new.weight.data.copy_((w * g.double()).to(head.weight.dtype))
        new.bias.data.copy_((bias + w @ b.double()).to(head.weight.dtype))
        model.head = new


def _cat_convs(convs: list[nn.Conv2d]) -> nn.Conv2d:
    """1x1 convolutions reading the same input, as one convolution with their outputs stacked."""
    w = torch.cat([c.weight.detach() for c in convs], 0)
    b = torch.cat([c.bias.detach() if c.bias is not None else torch.zeros(c.out_channels) for c in convs], 0)
    return _fused_conv(convs[0], w.double(), b.double())


def _cat_depthwise(convs: list[nn.Conv2d]) -> nn.Conv2d:
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


def merge_parallel_convs(model: nn.Module, input_size) -> None:
    """Projections that read the same tensor become one convolution; the local depthwise mixers become one."""
    for mod in list(model.modules()):
        if isinstance(mod, StaticCloAttention) and mod.in_proj is None:
            convs, split = [], []
            if len(mod.qkvs):
                convs += list(mod.qkvs)
                split.append(sum(c.out_channels for c in mod.qkvs))
                mod.mixer = _cat_depthwise(list(mod.convs))
            if mod.global_heads:
                convs.append(mod.global_q)
                split.append(mod.global_q.out_channels)
                if isinstance(mod.pool, nn.Identity):  # window 1: kv reads the same input
                    convs.append(mod.global_kv)
                    split.append(mod.global_kv.out_channels)
                    mod.kv_in_proj = True
                    del mod.global_kv
            mod.in_proj = _cat_convs(convs)
            mod.in_proj_split = split
            del mod.qkvs, mod.convs
            if mod.global_heads:
                del mod.global_q
        elif isinstance(mod, StaticFASA) and mod.in_proj is None and isinstance(mod.pool, nn.Identity):
            mod.in_proj = _cat_convs([mod.q, mod.kv])
            del mod.q, mod.kv


def _rows(conv: nn.Conv2d, rows: slice) -> nn.Conv2d:
    """The output channels ``rows`` of a convolution, as a convolution of its own."""
    w = conv.weight.detach()[rows]
    groups = w.shape[0] if conv.groups == conv.out_channels else conv.groups
    out = nn.Conv2d(w.shape[1] * groups if groups > 1 else conv.in_channels, w.shape[0], conv.kernel_size,
                    conv.stride, conv.padding, conv.dilation, groups, bias=conv.bias is not None)
    out.weight.data.copy_(w)
    if conv.bias is not None:
        out.bias.data.copy_(conv.bias.detach()[rows])
    return out


def split_local_qkv(model: nn.Module, input_size) -> None:
    """CloFormer's local q, k and v as separate projection + depthwise pairs (the inverse of a merge).

    Not a default step: int8 XNNPACK in executorch 1.4.1 failed to compile a channel slice between
    quantised ops, so quantised exports take the unmerged form without slices. 1.5.1 compiles and runs
    the default form in int8 (CloFormer-XXS: one partition, measured once); the int8 form keeps this step
    until its drift and speed are compared on the new release.
    """
    for mod in list(model.modules()):
        if isinstance(mod, StaticCloAttention) and mod.local_split is None and len(mod.act_blocks):
            if mod.in_proj is not None:
                raise RuntimeError("split_local_qkv takes the form before merge_parallel_convs")
            branches = nn.ModuleList()
            for proj, mix, c in zip(mod.qkvs, mod.convs, mod.local_channels):
                parts = nn.ModuleDict()
                for i, n in enumerate("qkv"):
                    rows = slice(i * c, (i + 1) * c)
                    parts[n], parts[f"{n}_mix"] = _rows(proj, rows), _rows(mix, rows)
                branches.append(parts)
            mod.local_split = branches
            del mod.qkvs, mod.convs


def split_wide_depthwise(model: nn.Module, input_size) -> None:
    """Depthwise convolutions wider than 5x5 as a 5x5 core plus dilated ring pieces, summed.

    Not a default step: it is for XNNPACK, whose depthwise kernels stop at 25 taps (wider ones run
    as a slow grouped GEMM); ONNX Runtime runs the single wide convolution faster than the pieces.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and child.kernel_size[0] > 5 and RingDepthwise.splits(child):
                setattr(parent, name, RingDepthwise(child))


def single_reduce_norm(model: nn.Module, input_size) -> None:
    """Channel norms take their mean over (C, H, W) in one reduction instead of two spatial means.

    Not a default step: the two-stage mean is what XNNPACK takes. For ONNX Runtime it removes 104
    nodes from CloFormer-XXS; its speed effect is within noise (one interleaved A/B: -0.3 ms, another: 0).
    """
    for mod in model.modules():
        if isinstance(mod, ChannelNorm):
            mod.single_reduce = True


def _replace_modules(model: nn.Module, kind: type, make: Callable[[], nn.Module]) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is kind:
                setattr(parent, name, make())


def silu_as_sigmoid_product(model: nn.Module, input_size) -> None:
    """SiLU as x * sigmoid(x): ExecuTorch turns an fp16 silu into fp32 ops between casts XNNPACK does not take."""
    _replace_modules(model, nn.SiLU, SigmoidSiLU)


def gelu_as_erfc_polynomial(model: nn.Module, input_size) -> None:
    """GELU from abs/exp/div/mul/add (erfc to 1.5e-7): XNNPACK has no fp16 GELU."""
    _replace_modules(model, nn.GELU, ErfcGELU)


def norm_constants_as_buffers(model: nn.Module, input_size) -> None:
    """Channel norms' epsilon as a tensor of the model's dtype: a float scalar becomes an fp32 constant and a cast."""
    for mod in model.modules():
        if isinstance(mod, ChannelNorm):
            constant_buffer(mod, "eps_tensor", mod.eps)


# largest |x - mean| a channel norm's input may reach, after scaling, on the calibration images: its square
# (4096) leaves fp16 (max 65504) 16x headroom for images brighter or busier than those
NORM_DEVIATION_LIMIT = 64.0


@torch.no_grad()
def scale_norm_inputs(model: nn.Module, images: torch.Tensor, limit: float = NORM_DEVIATION_LIMIT) -> dict[str, int]:
    """Scale each channel norm's input by a power of two so that its squared deviations fit fp16.

    A norm is scale-free: norm_eps(x) = norm_(eps / s^2)(x / s). With s a power of two both sides are
    equal in fp32 bit for bit; in fp16, where a deviation of 256 squares to inf, it keeps the variance
    finite. s is the smallest power of two bringing the largest deviation seen on ``images`` (real
    photographs) under ``limit``; norms already under it are left alone. Returns log2(s) per scaled norm.
    Call after :func:`norm_constants_as_buffers`, on the fp32 model.
    """
    peaks: dict[str, float] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, ChannelNorm):
            def record(mod, args, out, name=name):
                x = args[0] * mod.input_scale if mod.input_scale is not None else args[0]
                deviation = (x - x.mean(dim=(1, 2, 3), keepdim=True)).abs().max().item()
                peaks[name] = max(peaks.get(name, 0.0), deviation)
            hooks.append(mod.register_forward_hook(record))
    try:
        for i in range(0, len(images), 8):
            model(images[i:i + 8])
    finally:
        for h in hooks:
            h.remove()
    shifts: dict[str, int] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, ChannelNorm) and peaks.get(name, 0.0) > limit:
            shift = math.ceil(math.log2(peaks[name] / limit))
            if mod.eps_tensor is None:
                raise ValueError("scale_norm_inputs needs norm_constants_as_buffers first")
            constant_buffer(mod, "input_scale", 2.0 ** -shift)
            mod.eps_tensor.mul_(4.0 ** -shift)
            shifts[name] = shift
    return shifts


DEPLOY_STEPS: list[DeployStep] = [
    DeployStep(f.__name__, f, (f.__doc__ or "").strip().splitlines()[0])
    for f in (drop_training_only, static_shapes, fold_residuals, fold_batchnorm, fold_attention_scale,
              fold_norm_affine, merge_parallel_convs)
]


# rewrites that are not part of the default form, applied after it on request
EXTRA_STEPS = {"split_local_qkv": split_local_qkv, "split_wide_depthwise": split_wide_depthwise,
               "single_reduce_norm": single_reduce_norm, "silu_as_sigmoid_product": silu_as_sigmoid_product,
               "gelu_as_erfc_polynomial": gelu_as_erfc_polynomial,
               "norm_constants_as_buffers": norm_constants_as_buffers}
# what fp16 XNNPACK needs to run the whole network in one partition
FP16_XNNPACK_STEPS = ["silu_as_sigmoid_product", "gelu_as_erfc_polynomial", "norm_constants_as_buffers"]
DEFAULT_STEPS = [s.name for s in DEPLOY_STEPS]
# the default steps without merged projections (taken by ONNX and by quantised XNNPACK)
UNMERGED_STEPS = [n for n in DEFAULT_STEPS if n != "merge_parallel_convs"]
# the form quantised XNNPACK exports take: no merged projections, no channel slices between quantised ops
QUANTIZATION_FRIENDLY = (UNMERGED_STEPS, ["split_local_qkv"])


def to_deploy(model: nn.Module, input_size=(224, 224), steps: list[str] | None = None,
              extra_steps: tuple[str, ...] | list[str] = ()) -> nn.Module:
    """A new, export-ready module computing the same function as ``model`` for inputs of ``input_size``.

    ``model`` is left untouched. ``steps`` restricts the rewrites to a prefix or
    subset by name (for testing and for bisecting a numerical problem).
    """
    if not isinstance(model, (CloFormer, FAT)):
        raise TypeError(f"to_deploy takes a model from cloformer_deploy.create_model, not {type(model).__name__}")
    size = check_input_size(input_size)
    known = [s.name for s in DEPLOY_STEPS]
    if steps is not None or extra_steps:
        unknown = [s for s in (steps or []) if s not in known] + [s for s in extra_steps if s not in EXTRA_STEPS]
        if unknown:
            raise ValueError(f"unknown deploy steps {unknown}; known: {known + list(EXTRA_STEPS)}")
    out = copy.deepcopy(model).eval()
    out.deploy_input_size = size
    for step in DEPLOY_STEPS:
        if steps is None or step.name in steps:
            step.fn(out, size)
    for name in extra_steps:
        EXTRA_STEPS[name](out, size)
    out.deploy_steps = [s.name for s in DEPLOY_STEPS if steps is None or s.name in steps] + list(extra_steps)
    for p in out.parameters():
        p.requires_grad_(False)
    return out
