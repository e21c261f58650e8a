"""The deploy form: each rewrite keeps the function, shapes are static, the input model is untouched."""

from __future__ import annotations

import copy

import pytest
import torch

import cloformer_deploy as cd
from cloformer_deploy.models import DEPLOY_STEPS, InputSizeError
from cloformer_deploy.models.cloformer import CloFormer, CloFormerConfig
from cloformer_deploy.models.deploy_modules import ChannelNorm

from helpers import max_abs, randomise_norms

STEP_NAMES = [s.name for s in DEPLOY_STEPS]

# the authors' default config.py: two local branches with different kernels, so mixers really merge
TWO_BRANCH = CloFormerConfig(
    embed_dims=(32, 64, 128, 256),
    depths=(1, 1, 2, 1),
    num_heads=(2, 4, 8, 16),
    group_splits=((1, 1), (1, 1, 2), (2, 2, 4), (4, 12)),
    kernel_sizes=((5,), (5, 3), (5, 3), (3,)),
)


def _model(name):
    torch.manual_seed(1)
    model = CloFormer(TWO_BRANCH, num_classes=10) if name == "two_branch" else cd.create_model(name, num_classes=10)
    return randomise_norms(model.eval(), seed=3)


@pytest.fixture(
    scope="module", params=["cloformer_xxs", "cloformer_global", "cloformer_no_global", "fat_b0", "two_branch"]
)
def model_and_input(request):
    torch.manual_seed(2)
    return _model(request.param), torch.randn(2, 3, 64, 96)


@pytest.mark.parametrize("upto", range(1, len(STEP_NAMES) + 1), ids=STEP_NAMES)
def test_each_rewrite_step_keeps_the_function(model_and_input, upto):
    model, x = model_and_input
    deploy = cd.to_deploy(model, (64, 96), steps=STEP_NAMES[:upto])
    with torch.no_grad():
        ref, out = model(x), deploy(x)
    assert max_abs(out, ref) <= 1e-5 * max(1.0, ref.abs().max().item())


def test_rewrites_reach_their_targets():
    for name in ("cloformer_xxs", "fat_b0", "two_branch"):
        d = cd.to_deploy(_model(name), (64, 64))
        kinds = {type(m).__name__ for m in d.modules()}
        assert not kinds & {"BatchNorm2d", "SyncBatchNorm", "GroupNorm", "Dropout", "DropPath"}, kinds
        assert all(
            s.local_scale is None and s.global_scale is None
            for s in d.modules()
            if type(s).__name__ == "StaticCloAttention"
        )
        assert all(s.scale is None for s in d.modules() if type(s).__name__ == "StaticFASA")
        affine = [m for m in d.modules() if isinstance(m, ChannelNorm) and m.affine]
        if name.startswith("cloformer") or name == "two_branch":
            # only the stem's norm keeps its affine: it feeds a residual
            assert len(affine) == 1
        else:
            # FAT: stem + blocks whose kv path is a padded strided depthwise conv (stages 0-2)
            assert len(affine) == 1 + 2 + 2 + 6
    merged = [
        m
        for m in cd.to_deploy(_model("two_branch"), (64, 64)).modules()
        if type(m).__name__ == "StaticCloAttention" and len(m.local_channels) == 2
    ]
    assert merged and all(m.mixer.kernel_size == (5, 5) and m.in_proj is not None for m in merged)


class _ShapeProbe(torch.Tensor):
    """A tensor that records every read of its shape (``.shape``, ``.size()``) during forward."""

    reads: list = []
    _readers = (torch.Tensor.shape.__get__, torch.Tensor.size)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls._readers:
            cls.reads.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("name", ["cloformer_xxs", "fat_b0", "two_branch"])
def test_forward_never_reads_input_shape(name):
    model = _model(name)
    x = torch.randn(1, 3, 64, 96).as_subclass(_ShapeProbe)
    _ShapeProbe.reads = []
    with torch.no_grad():
        model(x)
    assert _ShapeProbe.reads, "the probe must see the authors' form read shapes"
    _ShapeProbe.reads = []
    with torch.no_grad():
        cd.to_deploy(model, (64, 96))(x)
    assert _ShapeProbe.reads == []


def test_deploy_form_is_bound_to_its_size():
    d = cd.to_deploy(_model("cloformer_xxs"), (64, 64))
    with pytest.raises(RuntimeError):
        d(torch.randn(1, 3, 96, 96))


def test_input_model_is_untouched():
    model = _model("fat_b0")
    before = copy.deepcopy(model.state_dict())
    types = [type(m) for m in model.modules()]
    cd.to_deploy(model, (64, 64))
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("size, hint", [((230, 300), "224x288"), ((100, 100), "96x96"), ((16, 64), "32x64")])
def test_size_not_multiple_of_32_names_nearest(size, hint):
    with pytest.raises(InputSizeError, match=hint):
        cd.to_deploy(_model("cloformer_xxs"), size)


def test_unknown_step_is_an_error():
    with pytest.raises(ValueError, match="fold_batchnorm"):
        cd.to_deploy(_model("cloformer_xxs"), (64, 64), steps=["fold_everything"])


@pytest.mark.parametrize("name", ["cloformer_xxs", "two_branch"])
def test_unmerged_form_keeps_the_function(name):
    from cloformer_deploy.models.deploy import UNMERGED_STEPS

    model = _model(name)
    x = torch.randn(2, 3, 64, 96)
    d = cd.to_deploy(model, (64, 96), steps=UNMERGED_STEPS)
    with torch.no_grad():
        ref, out = model(x), d(x)
    assert max_abs(out, ref) <= 1e-5 * max(1.0, ref.abs().max().item())
    attn = [m for m in d.modules() if type(m).__name__ == "StaticCloAttention"]
    assert attn and all(m.in_proj is None for m in attn)


@pytest.mark.parametrize("kernel, stride", [(7, 1), (9, 1), (9, 2), (11, 2)])
def test_ring_depthwise_equals_the_wide_convolution(kernel, stride):
    from cloformer_deploy.models.deploy_modules import RingDepthwise, ring_taps

    pieces = ring_taps(kernel)
    taps = [t for _, _, ts in pieces for t in ts]
    r = kernel // 2
    assert sorted(taps) == [(i, j) for i in range(-r, r + 1) for j in range(-r, r + 1)]  # each tap exactly once
    assert all(s[0] * s[1] <= 25 for s, _, _ in pieces)
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(6, 6, kernel, stride, kernel // 2, groups=6).eval()
    ring = RingDepthwise(conv).eval()
    x = torch.randn(2, 6, 15, 22)  # odd, non-square: the output grid must match at the borders too
    with torch.no_grad():
        ref, out = conv(x), ring(x)
    assert out.shape == ref.shape
    assert max_abs(out, ref) <= 1e-5


def test_ring_depthwise_refuses_what_it_cannot_split():
    from cloformer_deploy.models.deploy_modules import RingDepthwise

    with pytest.raises(ValueError, match="depthwise"):
        RingDepthwise(torch.nn.Conv2d(4, 8, 7, padding=3, groups=4))
    with pytest.raises(ValueError, match="up to 11x11"):
        RingDepthwise(torch.nn.Conv2d(4, 4, 13, padding=6, groups=4))


@pytest.mark.parametrize("name", ["cloformer_xxs", "fat_b0", "two_branch"])
def test_split_wide_depthwise_keeps_the_function(name):
    model = _model(name)
    x = torch.randn(2, 3, 64, 96)
    d = cd.to_deploy(model, (64, 96), extra_steps=["split_wide_depthwise"])
    with torch.no_grad():
        ref, out = model(x), d(x)
    assert max_abs(out, ref) <= 1e-5 * max(1.0, ref.abs().max().item())
    wide = [
        m
        for m in d.modules()
        if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1 and m.kernel_size[0] * m.kernel_size[1] > 25
    ]
    assert wide == []
    rings = [m for m in d.modules() if type(m).__name__ == "RingDepthwise"]
    assert bool(rings) == (name != "two_branch")  # the two-branch config has no kernel beyond 5x5


@pytest.mark.parametrize("name", ["cloformer_xxs", "fat_b0"])
def test_every_format_form_keeps_the_function(name):
    """The form each exporter takes at each precision (default steps minus some, plus format-only steps)."""
    from cloformer_deploy.formats import BACKENDS

    model = _model(name)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
    forms = {
        tuple(map(tuple, f))
        for b in BACKENDS.values()
        for p in b.precisions
        if (f := b.deploy_steps(p, {})) is not None
    }
    assert len(forms) >= 3  # ONNX, XNNPACK fp32, XNNPACK int8
    for steps, extra in forms:
        with torch.no_grad():
            out = cd.to_deploy(model, (64, 96), steps=list(steps), extra_steps=list(extra))(x)
        assert max_abs(out, ref) <= 1e-5 * max(1.0, ref.abs().max().item()), (steps, extra)


def test_erfc_gelu_matches_the_exact_gelu():
    """The polynomial is the erf GELU (not tanh's approximation, 4.7e-4 off) to within fp32 rounding."""
    from cloformer_deploy.models.deploy_modules import ErfcGELU

    x = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    err = (ErfcGELU().double()(x) - torch.nn.functional.gelu(x)).abs()
    assert err.max().item() <= 2.5e-7
    tanh = (torch.nn.functional.gelu(x, approximate="tanh") - torch.nn.functional.gelu(x)).abs().max().item()
    assert tanh > 100 * err.max().item()  # the tolerance above would catch the tanh form


@pytest.mark.parametrize("name", ["cloformer_xxs", "fat_b0"])
def test_fp16_xnnpack_steps_keep_the_function_and_reach_their_targets(name):
    from cloformer_deploy.models.deploy import FP16_XNNPACK_STEPS

    model = _model(name)
    x = torch.randn(2, 3, 64, 96)
    d = cd.to_deploy(model, (64, 96), extra_steps=FP16_XNNPACK_STEPS)
    with torch.no_grad():
        ref, out = model(x), d(x)
    assert max_abs(out, ref) <= 1e-5 * max(1.0, ref.abs().max().item())
    kinds = {type(m).__name__ for m in d.modules()}
    assert {"GELU", "SiLU"}.isdisjoint(kinds) and {"ErfcGELU", "SigmoidSiLU"} <= kinds
    norms = [m for m in d.modules() if isinstance(m, ChannelNorm)]
    assert norms and all(m.eps_tensor is not None and m.eps_tensor.item() == pytest.approx(m.eps) for m in norms)
    # no Python float left in the graph for ExecuTorch to lift into an fp32 constant (and a cast)
    half = copy.deepcopy(d).half()
    with torch.no_grad():
        graph = torch.export.export(half, (x[:1].half(),)).graph
    scalar_args = [
        n.format_node() for n in graph.nodes if n.op == "call_function" and any(isinstance(a, float) for a in n.args)
    ]
    assert scalar_args == []


def _means_of_self_products(module: torch.nn.Module, example: torch.Tensor) -> int:
    """Means whose input is a value multiplied by itself, in the exported graph of ``module``."""
    with torch.no_grad():
        graph = torch.export.export(module, (example,)).graph
    return sum(
        1
        for n in graph.nodes
        if n.op == "call_function"
        and "mean" in str(n.target)
        and getattr(n.args[0], "target", None) == torch.ops.aten.mul.Tensor
        and n.args[0].args[0] is n.args[0].args[1]
    )


@pytest.mark.parametrize("name", ["cloformer_xxs", "fat_b0"])
def test_variance_from_two_differences_is_bit_exact_and_leaves_no_mean_of_a_square(name):
    """XNNPACK (executorch 1.5.1) turns mean(v * v) into a mean of squares, which its fp16 fallback does not list,
    and runs it and every node after it in fp32: the fp16 form computes the variance's factors by two subtractions."""
    from cloformer_deploy.models.deploy import FP16_XNNPACK_STEPS

    assert "variance_from_two_differences" in FP16_XNNPACK_STEPS
    model = _model(name)
    x = torch.randn(1, 3, 64, 96)
    without = [s for s in FP16_XNNPACK_STEPS if s != "variance_from_two_differences"]
    plain = cd.to_deploy(model, (64, 96), extra_steps=without)
    two = cd.to_deploy(model, (64, 96), extra_steps=FP16_XNNPACK_STEPS)
    for dtype in (torch.float32, torch.float16):
        with torch.no_grad():
            assert torch.equal(copy.deepcopy(plain).to(dtype)(x.to(dtype)), copy.deepcopy(two).to(dtype)(x.to(dtype)))
    norms = sum(isinstance(m, ChannelNorm) for m in two.modules())
    assert _means_of_self_products(plain, x) >= norms > 0  # what the test looks for is there without the step
    assert _means_of_self_products(two, x) == 0


def test_scale_norm_inputs_is_exact_and_fits_fp16():
    """Stem 2000x louder (the norm after it makes that the same function): its squared deviations pass fp16's
    65504; a power-of-two input scale brings them under the limit without changing fp32 output by one bit."""
    from cloformer_deploy.models.deploy import NORM_DEVIATION_LIMIT, norm_constants_as_buffers, scale_norm_inputs

    model = _model("cloformer_xxs")
    with torch.no_grad():
        model.patch_embed.conv5.weight.mul_(2000)
        model.patch_embed.conv5.bias.mul_(2000)
    x = torch.randn(4, 3, 64, 96)
    d = cd.to_deploy(model, (64, 96))
    norm_constants_as_buffers(d, (64, 96))
    with torch.no_grad():
        before = d(x)
    shifts = scale_norm_inputs(d, x)
    assert shifts and all(s > 0 for s in shifts.values())
    peaks = []
    hooks = [
        m.register_forward_hook(
            lambda m, a, o: peaks.append(
                (
                    (a[0] * m.input_scale if m.input_scale is not None else a[0])
                    - (a[0] * m.input_scale if m.input_scale is not None else a[0]).mean((1, 2, 3), keepdim=True)
                )
                .abs()
                .max()
            )
        )
        for m in d.modules()
        if isinstance(m, ChannelNorm)
    ]
    with torch.no_grad():
        after = d(x)
    for h in hooks:
        h.remove()
    assert torch.equal(after, before)
    assert max(peaks).item() <= NORM_DEVIATION_LIMIT
    with pytest.raises(ValueError, match="norm_constants_as_buffers first"):
        scale_norm_inputs(cd.to_deploy(model, (64, 96)), x)


def test_scaled_norms_stay_finite_in_fp16_where_unscaled_ones_overflow():
    """In fp16 arithmetic (PyTorch's, as a phone CPU's) the loud stem's squared deviations overflow without
    the scaling: the norm's variance is inf and it breaks the output; with it the fp16 model stays close."""
    from cloformer_deploy.models.deploy import norm_constants_as_buffers, scale_norm_inputs

    model = _model("cloformer_xxs")
    with torch.no_grad():
        model.patch_embed.conv5.weight.mul_(2000)
        model.patch_embed.conv5.bias.mul_(2000)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
    d = cd.to_deploy(model, (64, 96))
    norm_constants_as_buffers(d, (64, 96))
    unscaled = copy.deepcopy(d).half()
    scale_norm_inputs(d, x)

    def cosine(m):
        with torch.no_grad():
            out = m.half()(x.half()).float()
        return torch.nn.functional.cosine_similarity(out, ref).nan_to_num().min().item()

    assert cosine(d) >= 0.999
    assert cosine(unscaled) < 0.99  # 0.972 measured (torch 2.14.1)


def test_steps_ask_the_modules():
    """A step knows no block: any module answering ``deploy_<step>`` takes part, in place or by a replacement."""
    from cloformer_deploy.models.deploy import fold_residuals

    class Answers(torch.nn.Module):
        def __init__(self, replace: bool):
            super().__init__()
            self.replace, self.inner, self.asked = replace, torch.nn.Sequential(), 0

        def deploy_fold_residuals(self):
            self.asked += 1
            return torch.nn.Identity() if self.replace else None

    inner = Answers(replace=True)
    outer = Answers(replace=False)
    outer.inner.append(inner)
    model = torch.nn.Sequential(outer)
    fold_residuals(model, (64, 64))
    assert outer.asked == inner.asked == 1
    assert type(outer.inner[0]) is torch.nn.Identity  # replaced where it sat; children of in-place answers asked


def test_pool_as_depthwise_conv_keeps_the_function_and_leaves_no_average_pool():
    model = _model("cloformer_xxs")
    x = torch.randn(2, 3, 64, 96)
    d = cd.to_deploy(model, (64, 96), extra_steps=["pool_as_depthwise_conv"])
    with torch.no_grad():
        ref, out = model(x), d(x)
    assert max_abs(out, ref) <= 1e-5 * max(1.0, ref.abs().max().item())
    assert not [m for m in d.modules() if isinstance(m, torch.nn.AvgPool2d)]
