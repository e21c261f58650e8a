"""Static-shape modules of the deploy form.

Every size used by a reshape is a Python int computed at construction from the
input size; ``forward`` never reads ``x.shape``. The batch dimension is written
as ``-1`` so the same module serves any static batch an exporter traces with.
Methods named ``deploy_<step>`` are the modules' answers to the rewrite steps
(:mod:`cloformer_deploy.models.deploy`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .folds import cat_convs, cat_depthwise, fold_affine_into_conv1x1, scale_conv_rows


class ChannelNorm(nn.Module):
    """GroupNorm(1, C) spelled out: normalise over (C, H, W), then an optional per-channel affine.

    Written with mean/sub/mul/rsqrt so that every compiler sees plain arithmetic.
    After ``fold_norm_affine`` most instances carry no affine at all.
    """

    def __init__(
        self, num_channels: int, eps: float, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ):
        super().__init__()
        self.num_channels = num_channels
        self.eps = float(eps)
        if weight is not None:
            self.weight = nn.Parameter(weight.detach().reshape(1, num_channels, 1, 1).clone())
            self.bias = nn.Parameter(bias.detach().reshape(1, num_channels, 1, 1).clone())
        else:
            self.weight = self.bias = None
        # set for fp16 XNNPACK by norm_constants_as_buffers / scale_norm_inputs (None: plain Python floats)
        self.register_buffer("eps_tensor", None, persistent=False)
        self.register_buffer("input_scale", None, persistent=False)

    @classmethod
    def from_group_norm(cls, gn: nn.GroupNorm) -> ChannelNorm:
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

    def move_affine_into(self, reader: nn.Module) -> None:
        """Hand gamma/beta to the module reading this norm's output, if it can take them exactly.

        ``reader.fold_input_affine(gamma, beta)`` folds them into its weights and says whether it did.
        """
        if self.affine and reader.fold_input_affine(self.weight.detach().flatten(), self.bias.detach().flatten()):
            self.weight = self.bias = None

    single_reduce = False  # set by the single_reduce_norm step
    two_differences = False  # set by the variance_from_two_differences step

    def deploy_single_reduce_norm(self) -> None:
        self.single_reduce = True

    def deploy_variance_from_two_differences(self) -> None:
        self.two_differences = True

    def deploy_norm_constants_as_buffers(self) -> None:
        constant_buffer(self, "eps_tensor", self.eps)

    def _mean_chw(self, t: torch.Tensor) -> torch.Tensor:
        if self.single_reduce:
            return t.mean(dim=(1, 2, 3), keepdim=True)
        # mean over (C, H, W) as two spatial means: mobile delegates (XNNPACK) only
        # reduce the two innermost dims of a 4-D tensor; the groups are equal-sized, so it is exact
        t = t.mean(dim=(2, 3), keepdim=True).reshape(-1, 1, self.num_channels, 1)
        return t.mean(dim=(2, 3), keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:  # a power of two: exact, and the norm is scale-free (eps rescaled)
            x = x * self.input_scale
        mean = self._mean_chw(x)
        xc = x - mean
        # the same products either way; XNNPACK turns mean(xc * xc) into a mean of squares, which its fp16 fallback
        # does not list: it runs that node and every node after it in fp32
        var = self._mean_chw(xc * (x - mean) if self.two_differences else xc * xc)
        y = xc * torch.rsqrt(var + (self.eps if self.eps_tensor is None else self.eps_tensor))
        if self.weight is not None:
            y = y * self.weight + self.bias
        return y

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"


def constant_buffer(module: nn.Module, name: str, value: float) -> None:
    # a tensor, not a Python float: ExecuTorch lifts float scalars to float32 tensors and casts them to the
    # graph's dtype, and XNNPACK takes no dtype casts, so every scalar of an fp16 graph would split it
    module.register_buffer(name, torch.full((1, 1, 1, 1), value), persistent=False)


class SigmoidSiLU(nn.Module):
    """SiLU written as x * sigmoid(x), its definition.

    ExecuTorch decomposes an fp16 ``silu`` into fp32 arithmetic between two casts, which XNNPACK
    does not take; sigmoid and mul it runs in fp16.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


# Abramowitz & Stegun 7.1.26: erfc(z) = t (a1 + t (a2 + ... + t a5)) exp(-z^2), t = 1 / (1 + p z), z >= 0,
# |error| <= 1.5e-7
_ERFC_P = 0.3275911
_ERFC_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


class ErfcGELU(nn.Module):
    """GELU, x * Phi(x), with Phi from a rational erfc of error <= 1.5e-7 (the exact-erf GELU, not tanh's).

    XNNPACK has no fp16 GELU (executorch's partitioner refuses it). With a = |x| and
    E = erfc(a / sqrt 2): x * Phi(x) = (x + a - a * E) / 2 for either sign of x, so only
    abs, exp, div, mul and add are needed, all of which XNNPACK runs in fp16. Within 2.5e-7 of
    ``F.gelu`` in float64 terms: below fp32's own rounding for |x| > 2.
    """

    def __init__(self):
        super().__init__()
        constant_buffer(self, "one", 1.0)
        constant_buffer(self, "one_half", 0.5)
        constant_buffer(self, "p", _ERFC_P / 2**0.5)
        constant_buffer(self, "minus_one_half", -0.5)
        for i, a in enumerate(_ERFC_A, 1):
            constant_buffer(self, f"a{i}", a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.abs(x)
        t = torch.div(self.one, self.one + self.p * a)
        poly = self.a5
        for coefficient in (self.a4, self.a3, self.a2, self.a1):
            poly = poly * t + coefficient
        erfc = poly * t * torch.exp(a * a * self.minus_one_half)
        return (x + a - a * erfc) * self.one_half


def average_as_depthwise(channels: int, window: int) -> nn.Conv2d:
    """Average pooling over ``window`` x ``window`` tiles (stride ``window``, no padding) as the depthwise convolution
    with every weight 1 / window^2 that computes it."""
    conv = nn.Conv2d(channels, channels, window, window, groups=channels, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0 / window**2)
    return conv.requires_grad_(False)


def _channel_slices(t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Consecutive channel ranges as slices (``torch.split`` lowers to an op XNNPACK does not take)."""
    if len(sizes) == 1:  # a full-range slice would export as an alias op outside the delegate
        return [t]
    out, start = [], 0
    for n in sizes:
        out.append(t[:, start : start + n])
        start += n
    return out


def pooled_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    channels: int,
    dim_head: int,
    h: int,
    w: int,
    n_kv: int,
    scale: float | None,
    keys_first: bool = False,
) -> torch.Tensor:
    """Multi-head attention of every position over pooled keys and values, as 3-D batched matmuls.

    ``q``: (B, C, h, w); ``kv``: (B, 2C, h', w'), k channels first, C = heads * dim_head.
    Heads fold into the batch; k is used as stored, (d, n); the output comes out as
    (d, hw) and reshapes straight back to (B, C, h, w). Only q and the attention map
    are transposed; no 5-D tensor, expand or squeeze appears.

    ``keys_first``: the scores as (n, hw) = k^T q and the softmax over axis 1, so that the only
    transpose (of k) is a matmul's left operand. LiteRT's converter turns a batch-1 matmul whose
    right operand is a transpose into a FULLY_CONNECTED with computed weights, which its XNNPACK
    delegate refuses; this form has none.
    """
    hw = h * w
    k, v = _channel_slices(kv, [channels, channels])
    k = k.reshape(-1, dim_head, n_kv)  # (B*m, d, n)
    v = v.reshape(-1, dim_head, n_kv)  # (B*m, d, n)
    if keys_first:
        q_d = q.reshape(-1, dim_head, hw)  # (B*m, d, hw)
        if scale is not None:
            q_d = scale * q_d
        attn_t = torch.softmax(torch.bmm(k.transpose(1, 2), q_d), dim=1)  # (B*m, n, hw)
        return torch.bmm(v, attn_t).reshape(-1, channels, h, w)
    q_t = q.reshape(-1, dim_head, hw).transpose(1, 2)  # (B*m, hw, d)
    if scale is not None:
        q_t = scale * q_t
    attn = torch.softmax(torch.bmm(q_t, k), dim=-1)  # (B*m, hw, n)
    return torch.bmm(v, attn.transpose(1, 2)).reshape(-1, channels, h, w)


class StaticCloAttention(nn.Module):
    """CloFormer's attention for one fixed spatial size.

    Starts as the authors' arithmetic; rewrite steps then fold the attention scale
    (``local_scale``/``global_scale`` become None) and merge the input projections
    (``in_proj``) and depthwise mixers (``mixer``).
    """

    def __init__(self, attn: nn.Module, h: int, w: int):  # the authors' EfficientAttention
        super().__init__()
        self.h, self.w = h, w
        self.dim = attn.dim
        self.dim_head = attn.dim_head
        self.window_size = attn.window_size
        heads = [g for g in attn.group_split[:-1] if g]
        self.local_channels = [attn.dim_head * g for g in heads]
        self.global_heads = attn.global_heads
        self.global_channels = attn.global_heads * attn.dim_head
        self.qkvs, self.convs, self.act_blocks = attn.qkvs, attn.convs, attn.act_blocks
        self.local_scale: float | None = attn.scale
        self.global_scale: float | None = attn.scale
        if self.global_heads:
            self.global_q, self.global_kv = attn.global_q, attn.global_kv
            ws = self.window_size
            # count_include_pad=False: the same average (there is no padding), and the form XNNPACK takes
            self.pool = nn.AvgPool2d(ws, ws, count_include_pad=False) if ws > 1 else nn.Identity()
            self.n_kv = (h // ws) * (w // ws)
        self.proj = attn.proj
        # set by merge_parallel_convs
        self.in_proj: nn.Conv2d | None = None
        self.in_proj_split: list[int] = []
        self.mixer: nn.Conv2d | None = None
        self.kv_in_proj = False  # window 1: the kv projection shares the input and is merged too
        self.keys_first = False  # set by keys_first_attention

    def deploy_keys_first_attention(self) -> None:
        self.keys_first = True

    def deploy_pool_as_depthwise_conv(self) -> None:
        if self.global_heads and isinstance(self.pool, nn.AvgPool2d):
            self.pool = average_as_depthwise(self.dim, self.window_size)

    def deploy_fold_attention_scale(self) -> None:
        """The local scale into the context-aware weights' last conv, the global one into the global q."""
        if self.local_scale is not None:
            for ab in self.act_blocks:
                scale_conv_rows(ab.act_block[-1], slice(None), self.local_scale)
            self.local_scale = None
        if self.global_heads and self.global_scale is not None:
            if self.in_proj is not None:
                raise RuntimeError("fold_attention_scale must run before merge_parallel_convs")
            scale_conv_rows(self.global_q, slice(None), self.global_scale)
            self.global_scale = None

    def fold_input_affine(self, gamma: torch.Tensor, beta: torch.Tensor) -> bool:
        """A per-channel affine of the input into every projection reading it; exact, as average pooling (the
        global kv's input) commutes with it."""
        if self.in_proj is not None:
            return False
        self.qkvs = nn.ModuleList(fold_affine_into_conv1x1(c, gamma, beta) for c in self.qkvs)
        if self.global_heads:
            self.global_q = fold_affine_into_conv1x1(self.global_q, gamma, beta)
            self.global_kv = fold_affine_into_conv1x1(self.global_kv, gamma, beta)
        return True

    def deploy_merge_parallel_convs(self) -> None:
        """The projections reading the input as one convolution, the local depthwise mixers as one."""
        if self.in_proj is not None:
            return
        convs, split = [], []
        if len(self.qkvs):
            convs += list(self.qkvs)
            split.append(sum(c.out_channels for c in self.qkvs))
            self.mixer = cat_depthwise(list(self.convs))
        if self.global_heads:
            convs.append(self.global_q)
            split.append(self.global_q.out_channels)
            if isinstance(self.pool, nn.Identity):  # window 1: kv reads the same input
                convs.append(self.global_kv)
                split.append(self.global_kv.out_channels)
                self.kv_in_proj = True
                del self.global_kv
        self.in_proj = cat_convs(convs)
        self.in_proj_split = split
        del self.qkvs, self.convs
        if self.global_heads:
            del self.global_q

    def _local(self, qkv: torch.Tensor, c: int, act_block: nn.Module) -> torch.Tensor:
        q, k, v = _channel_slices(qkv, [c, c, c])
        a = act_block(q * k)
        if self.local_scale is not None:
            a = a * self.local_scale
        return torch.tanh(a) * v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_proj is None:
            qkvs = [mix(proj(x)) for proj, mix in zip(self.qkvs, self.convs)]
            gq = self.global_q(x) if self.global_heads else None
            gkv = self.global_kv(self.pool(x)) if self.global_heads else None
        else:
            parts = _channel_slices(self.in_proj(x), self.in_proj_split)
            gkv = parts.pop() if self.kv_in_proj else (self.global_kv(self.pool(x)) if self.global_heads else None)
            gq = parts.pop() if self.global_heads else None
            qkvs = _channel_slices(self.mixer(parts[0]), [3 * c for c in self.local_channels]) if parts else []
        out = [self._local(qkv, c, ab) for qkv, c, ab in zip(qkvs, self.local_channels, self.act_blocks)]
        if self.global_heads:
            out.append(
                pooled_attention(
                    gq,
                    gkv,
                    self.global_channels,
                    self.dim_head,
                    self.h,
                    self.w,
                    self.n_kv,
                    self.global_scale,
                    self.keys_first,
                )
            )
        return self.proj(torch.cat(out, dim=1) if len(out) > 1 else out[0])


class StaticFASA(nn.Module):
    """FAT's fully adaptive self-attention for one fixed spatial size."""

    def __init__(self, attn: nn.Module, h: int, w: int):  # the authors' FASA
        super().__init__()
        self.h, self.w = h, w
        self.dim = attn.q.in_channels
        self.dim_head = attn.dim_head
        self.window_size = attn.window_size
        self.n_kv = (h // attn.window_size) * (w // attn.window_size)
        self.q, self.kv, self.pool = attn.q, attn.kv, attn.pool
        self.local_mixer, self.mixer = attn.local_mixer, attn.mixer
        self.scale: float | None = attn.scale
        self.in_proj: nn.Conv2d | None = None  # q and kv merged (window 1 only)
        self.local_act = nn.SiLU()  # a module, so that a rewrite step can replace it
        self.keys_first = False  # set by keys_first_attention

    def deploy_keys_first_attention(self) -> None:
        self.keys_first = True

    def deploy_fold_attention_scale(self) -> None:
        # q also feeds the local mixer, so the scale goes to the k half of the kv projection
        if self.scale is None:
            return
        if self.in_proj is not None:
            raise RuntimeError("fold_attention_scale must run before merge_parallel_convs")
        scale_conv_rows(self.kv, slice(0, self.dim), self.scale)
        self.scale = None

    def fold_input_affine(self, gamma: torch.Tensor, beta: torch.Tensor) -> bool:
        # exact only without the refined downsampling: its depthwise convs' zero padding carries no beta
        if self.in_proj is not None or not isinstance(self.pool, nn.Identity):
            return False
        self.q = fold_affine_into_conv1x1(self.q, gamma, beta)
        self.kv = fold_affine_into_conv1x1(self.kv, gamma, beta)
        return True

    def deploy_merge_parallel_convs(self) -> None:
        if self.in_proj is None and isinstance(self.pool, nn.Identity):  # window 1: q and kv read the same input
            self.in_proj = cat_convs([self.q, self.kv])
            del self.q, self.kv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_proj is None:
            q_local, kv = self.q(x), self.kv(self.pool(x))
        else:
            q_local, kv = _channel_slices(self.in_proj(x), [self.dim, 2 * self.dim])
        global_feat = pooled_attention(
            q_local, kv, self.dim, self.dim_head, self.h, self.w, self.n_kv, self.scale, self.keys_first
        )
        local_feat = self.local_act(self.local_mixer(q_local))
        local_feat = local_feat * torch.sigmoid(global_feat)
        return self.mixer(local_feat * global_feat)


RING_CORE = 5  # the centre piece: 25 taps, the most XNNPACK's depthwise kernels take


def ring_taps(kernel: int) -> list[tuple[tuple[int, int], tuple[int, int], list[tuple[int, int]]]]:
    """A square odd ``kernel`` cut into pieces of at most 25 taps that keep their output grid.

    Each piece is (kernel size, dilation, taps as (row, col) offsets from the centre): the centred
    ``RING_CORE`` x ``RING_CORE`` block, then for every distance d beyond it the two rows at +-d (one kernel
    of height 2 with dilation 2d) and the two columns at +-d between them (width 2, dilation 2d).
    Every piece is symmetric about the centre, so padding = dilation * (size - 1) / 2 keeps the
    output grid of the whole kernel for any stride. Up to 11x11 every piece fits 25 taps.
    """
    if kernel > 11 or kernel % 2 == 0:
        raise ValueError(f"ring pieces cover odd kernels up to 11x11, not {kernel}x{kernel}")
    r = RING_CORE // 2
    pieces = [((RING_CORE, RING_CORE), (1, 1), [(i, j) for i in range(-r, r + 1) for j in range(-r, r + 1)])]
    for d in range(r + 1, kernel // 2 + 1):
        pieces.append(((2, 2 * d + 1), (2 * d, 1), [(i, j) for i in (-d, d) for j in range(-d, d + 1)]))
        pieces.append(((2 * d - 1, 2), (1, 2 * d), [(i, j) for i in range(-d + 1, d) for j in (-d, d)]))
    return pieces


class RingDepthwise(nn.Module):
    """A wide depthwise convolution as the sum of narrow ones (see :func:`ring_taps`).

    XNNPACK (executorch 1.4.1 and 1.5.1) has depthwise kernels up to 25 taps; a wider depthwise convolution
    falls back to a grouped GEMM with one channel per group, measured 5x slower than these pieces
    summed (CloFormer-XXS's 7x7 mixer at 14x14: 0.50 -> 0.09 ms).
    """

    @staticmethod
    def splits(conv: nn.Conv2d) -> bool:
        """Whether ``conv`` is a 'same'-padded odd square depthwise convolution that ring pieces cover."""
        k = conv.kernel_size[0]
        return (
            conv.kernel_size == (k, k)
            and k % 2 == 1
            and k <= 11
            and conv.groups == conv.in_channels == conv.out_channels
            and conv.padding == (k // 2, k // 2)
            and conv.dilation == (1, 1)
        )

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        k = conv.kernel_size[0]
        c = conv.in_channels
        if not self.splits(conv):
            raise ValueError(
                f"ring pieces cover a 'same'-padded odd square depthwise convolution up to 11x11, not {conv}"
            )
        weight = conv.weight.detach()
        self.pieces = nn.ModuleList()
        for n, (size, dilation, taps) in enumerate(ring_taps(k)):
            padding = tuple(dl * (s - 1) // 2 for s, dl in zip(size, dilation))
            piece = nn.Conv2d(
                c,
                c,
                size,
                conv.stride,
                padding,
                dilation,
                groups=c,
                bias=n == 0 and conv.bias is not None,
                dtype=weight.dtype,
            )
            w = torch.zeros_like(piece.weight)
            for i, j in taps:
                # tap offset -> index inside the piece: offsets are spaced by the dilation, centred
                pi = (i + dilation[0] * (size[0] - 1) // 2) // dilation[0]
                pj = (j + dilation[1] * (size[1] - 1) // 2) // dilation[1]
                w[:, 0, pi, pj] = weight[:, 0, i + k // 2, j + k // 2]
            piece.weight.data.copy_(w)
            if piece.bias is not None:
                piece.bias.data.copy_(conv.bias.detach())
            self.pieces.append(piece)

    def forward(self, x):
        y = self.pieces[0](x)
        for piece in self.pieces[1:]:
            y = y + piece(x)
        return y
