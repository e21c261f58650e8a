"""The deploy form: the authors' model rewritten for mobile compilers, step by named step.

``to_deploy`` copies the model and applies :data:`DEPLOY_STEPS` in order. Each step
is a small function that rewrites the copy in place and keeps the computed function
equal (up to float rounding) to the authors' form; ``tests/test_deploy.py`` checks
every step on its own. Adding a rewrite is adding a step here.

A step knows no block's fields: it asks the modules (:func:`ask_modules`), and a module
takes part by defining ``deploy_<step name>()``, which rewrites it in place or returns its
replacement. PyTorch's own modules, which cannot carry such methods, are rewritten by
rules the step names. The folds are computed in float64 and stored in the model's dtype.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .deploy_modules import ChannelNorm, ErfcGELU, RingDepthwise, SigmoidSiLU, constant_buffer
from .folds import fuse_conv_bn
from .layers import Backbone
from .registry import STRIDE, InputSizeError, check_input_size  # noqa: F401  (the deploy form's size rule)


@dataclass(frozen=True)
class DeployStep:
    name: str
    fn: Callable[[nn.Module, tuple[int, int]], None]
    doc: str


# --- helpers ----------------------------------------------------------------------------------

TorchRules = dict[type, Callable[[nn.Module], "nn.Module | None"]]


def _rewrite(module: nn.Module, method: str | None, args: tuple, torch_rules: TorchRules) -> nn.Module | None:
    ask = getattr(module, method, None) if method else None
    rule = torch_rules.get(type(module))
    new = ask(*args) if ask is not None else rule(module) if rule is not None else None
    if new is not None:
        return new  # already in its rewritten form
    for name, child in list(module.named_children()):
        replacement = _rewrite(child, method, args, torch_rules)
        if replacement is not None:
            setattr(module, name, replacement)
    return None


def ask_modules(root: nn.Module, step: str | None, *args, torch_rules: TorchRules | None = None) -> None:
    """Ask ``root`` and every module below it, parents first, to rewrite itself for ``step``.

    A module that defines ``deploy_<step>(*args)`` rewrites itself in place (returns None) or returns the
    module that replaces it; modules of the exact types in ``torch_rules`` are handed to the rule, with the
    same contract (``step`` None: only the rules apply). A replacement is not asked again; the children of a
    module rewritten in place are.
    """
    if _rewrite(root, f"deploy_{step}" if step else None, args, torch_rules or {}) is not None:
        raise RuntimeError(f"{type(root).__name__} cannot replace itself in the step {step}")


def _fold_sequence_batchnorm(seq: nn.Sequential) -> None:
    """A BatchNorm2d right after a convolution in a Sequential, folded into it (in place, names kept)."""
    items = list(seq.named_children())
    keep: list[tuple[str, nn.Module]] = []
    for name, child in items:
        if isinstance(child, nn.BatchNorm2d) and keep and isinstance(keep[-1][1], nn.Conv2d):
            keep[-1] = (keep[-1][0], fuse_conv_bn(keep[-1][1], child))
        else:
            keep.append((name, child))
    if len(keep) != len(items):
        for name, _ in items:
            delattr(seq, name)
        for name, child in keep:
            seq.add_module(name, child)


def _batchnorm_from_sync(sync: nn.SyncBatchNorm) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(sync.num_features, sync.eps, sync.momentum, sync.affine, sync.track_running_stats)
    bn.load_state_dict(sync.state_dict())
    return bn


# --- the steps ---------------------------------------------------------------------------------


def drop_training_only(model: nn.Module, input_size) -> None:
    """Drop-path and dropout become identities; SyncBatchNorm becomes BatchNorm2d."""
    ask_modules(
        model,
        "drop_training_only",
        torch_rules={nn.Dropout: lambda m: nn.Identity(), nn.SyncBatchNorm: _batchnorm_from_sync},
    )


def static_shapes(model: Backbone, input_size) -> None:
    """Attention modules become static-shape modules; GroupNorm(1, C) becomes an explicit ChannelNorm."""
    for block, h, w in model.block_input_sizes(input_size):
        ask_modules(block, "static_shapes", h, w)
    ask_modules(model, None, torch_rules={nn.GroupNorm: ChannelNorm.from_group_norm})


def fold_residuals(model: nn.Module, input_size) -> None:
    """FAT's ``x + dwconv(x)`` (positional encoding, stride-1 FFN) becomes one dwconv with +1 at the kernel centre."""
    ask_modules(model, "fold_residuals")


def fold_batchnorm(model: nn.Module, input_size) -> None:
    """Every BatchNorm2d right after a convolution is folded into that convolution's weights and bias."""
    ask_modules(model, "fold_batchnorm", torch_rules={nn.Sequential: _fold_sequence_batchnorm})


def fold_attention_scale(model: nn.Module, input_size) -> None:
    """The attention scale d**-0.5 moves into weights: CloFormer's context-aware weights and global q; FAT's k."""
    ask_modules(model, "fold_attention_scale")


def fold_norm_affine(model: nn.Module, input_size) -> None:
    """A ChannelNorm's gamma/beta move into the 1x1 convolutions (or the head) that read it, where exact.

    Each reader says whether it can take them exactly (``fold_input_affine``): average pooling
    commutes with a per-channel affine, so CloFormer's pooled kv and the classifier head qualify;
    FAT's refined downsampling (zero-padded strided depthwise convs) does not.
    """
    ask_modules(model, "fold_norm_affine")


def merge_parallel_convs(model: nn.Module, input_size) -> None:
    """Projections that read the same tensor become one convolution; the local depthwise mixers become one."""
    ask_modules(model, "merge_parallel_convs")


def split_wide_depthwise(model: nn.Module, input_size) -> None:
    """Depthwise convolutions wider than 5x5 as a 5x5 core plus dilated ring pieces, summed.

    Not a default step: it is for XNNPACK, whose depthwise kernels stop at 25 taps (wider ones run
    as a slow grouped GEMM); ONNX Runtime runs the single wide convolution faster than the pieces.
    """
    ask_modules(
        model,
        None,
        torch_rules={
            nn.Conv2d: lambda c: RingDepthwise(c) if c.kernel_size[0] > 5 and RingDepthwise.splits(c) else None
        },
    )


def single_reduce_norm(model: nn.Module, input_size) -> None:
    """Channel norms take their mean over (C, H, W) in one reduction instead of two spatial means.

    Not a default step: the two-stage mean is what XNNPACK takes. For ONNX Runtime it removes 104
    nodes from CloFormer-XXS; its speed effect is within noise (one interleaved A/B: -0.3 ms, another: 0).
    """
    ask_modules(model, "single_reduce_norm")


def keys_first_attention(model: nn.Module, input_size) -> None:
    """Global attention as v @ softmax(k^T q) over the keys' axis: no matmul's right operand is a transpose.

    Not a default step: it is for LiteRT, whose converter makes a batch-1 matmul with a transposed right
    operand (single-head attention's attn @ v) a FULLY_CONNECTED with computed weights, which its XNNPACK
    delegate leaves outside; the softmax over a non-last axis is decomposed into ops XNNPACK takes.
    """
    ask_modules(model, "keys_first_attention")


def pool_as_depthwise_conv(model: nn.Module, input_size) -> None:
    """The attention's average pooling as a depthwise convolution of constant weights 1/k^2 (the same average).

    Not a default step: it is for LiteRT int8, whose XNNPACK delegate takes no int8 AVERAGE_POOL_2D but does take
    int8 depthwise convolutions (1/k^2 quantises exactly with a per-channel scale).
    """
    ask_modules(model, "pool_as_depthwise_conv")


def silu_as_sigmoid_product(model: nn.Module, input_size) -> None:
    """SiLU as x * sigmoid(x): ExecuTorch turns an fp16 silu into fp32 ops between casts XNNPACK does not take."""
    ask_modules(model, None, torch_rules={nn.SiLU: lambda m: SigmoidSiLU()})


def gelu_as_erfc_polynomial(model: nn.Module, input_size) -> None:
    """GELU from abs/exp/div/mul/add (erfc to 1.5e-7): XNNPACK has no fp16 GELU."""
    ask_modules(model, None, torch_rules={nn.GELU: lambda m: ErfcGELU()})


def variance_from_two_differences(model: nn.Module, input_size) -> None:
    """Channel norms' variance as mean((x - m) * (x - m)) with each difference computed: fp16 stays fp16 in XNNPACK.

    In PyTorch the values are the same bit for bit. XNNPACK (executorch 1.5.1) rewrites the mean of a value times
    itself as a mean of squares, which its fp16 fallback does not list: on any CPU it runs that node in fp32, and
    every node after it too, with an fp32 copy of each weight they read (docs/exporting.md).
    """
    ask_modules(model, "variance_from_two_differences")


def norm_constants_as_buffers(model: nn.Module, input_size) -> None:
    """Channel norms' epsilon as a tensor of the model's dtype: a float scalar becomes an fp32 constant and a cast."""
    ask_modules(model, "norm_constants_as_buffers")


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
            model(images[i : i + 8])
    finally:
        for h in hooks:
            h.remove()
    shifts: dict[str, int] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, ChannelNorm) and peaks.get(name, 0.0) > limit:
            shift = math.ceil(math.log2(peaks[name] / limit))
            if mod.eps_tensor is None:
                raise ValueError("scale_norm_inputs needs norm_constants_as_buffers first")
            constant_buffer(mod, "input_scale", 2.0**-shift)
            mod.eps_tensor.mul_(4.0**-shift)
            shifts[name] = shift
    return shifts


DEPLOY_STEPS: list[DeployStep] = [
    DeployStep(f.__name__, f, (f.__doc__ or "").strip().splitlines()[0])
    for f in (
        drop_training_only,
        static_shapes,
        fold_residuals,
        fold_batchnorm,
        fold_attention_scale,
        fold_norm_affine,
        merge_parallel_convs,
    )
]


# rewrites that are not part of the default form, applied after it on request
EXTRA_STEPS = {
    f.__name__: f
    for f in (
        split_wide_depthwise,
        single_reduce_norm,
        keys_first_attention,
        pool_as_depthwise_conv,
        silu_as_sigmoid_product,
        gelu_as_erfc_polynomial,
        variance_from_two_differences,
        norm_constants_as_buffers,
    )
}
# what fp16 XNNPACK needs to run the whole network in one partition
FP16_XNNPACK_STEPS = [
    "silu_as_sigmoid_product",
    "gelu_as_erfc_polynomial",
    "variance_from_two_differences",
    "norm_constants_as_buffers",
]
DEFAULT_STEPS = [s.name for s in DEPLOY_STEPS]
# the default steps without merged projections (taken by ONNX: channel slices cost it layout reorders)
UNMERGED_STEPS = [n for n in DEFAULT_STEPS if n != "merge_parallel_convs"]


def to_deploy(
    model: nn.Module,
    input_size=(224, 224),
    steps: list[str] | None = None,
    extra_steps: tuple[str, ...] | list[str] = (),
) -> nn.Module:
    """A new, export-ready module computing the same function as ``model`` for inputs of ``input_size``.

    ``model`` is left untouched. ``steps`` restricts the rewrites to a prefix or
    subset by name (for testing and for bisecting a numerical problem).
    """
    if not isinstance(model, Backbone):
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


def deploy_form(model: nn.Module, input_size, recorded_steps: list[str]) -> nn.Module:
    """The deploy form a manifest entry records by its ``deploy_steps`` (steps, then extra steps), made again."""
    known = {s.name for s in DEPLOY_STEPS}
    return to_deploy(
        model,
        input_size,
        steps=[s for s in recorded_steps if s in known],
        extra_steps=[s for s in recorded_steps if s not in known],
    )
