"""The Core ML interpreter: each op kind against an independent torch computation, fp32 and fp16."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from cloformer_deploy.export.mil_interpreter import MILInterpreter, UnsupportedOpError  # noqa: E402

RNG = np.random.default_rng(0)
W3 = RNG.standard_normal((6, 4, 3, 3)).astype(np.float32) * 0.3
WD = RNG.standard_normal((4, 1, 5, 5)).astype(np.float32) * 0.3
B6 = RNG.standard_normal(6).astype(np.float32)
LW = RNG.standard_normal((5, 8)).astype(np.float32)
LB = RNG.standard_normal(5).astype(np.float32)
CH = RNG.random(4).astype(np.float32) + 0.5
Y = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)

# name: (MIL builder on x, torch reference on x, input shape); x is (1, 4, 8, 8) unless said
CASES = {
    "conv": (lambda x, c: mb.conv(x=x, weight=c(W3), bias=c(B6), pad_type="custom", pad=[1, 1, 1, 1]),
             lambda x: F.conv2d(x, torch.tensor(W3), torch.tensor(B6), padding=1), None),
    "conv_depthwise_strided_same": (lambda x, c: mb.conv(x=x, weight=c(WD), strides=[2, 2], pad_type="same", groups=4),
                                    # MIL "same": the odd pixel of padding goes after (TensorFlow's convention)
                                    lambda x: F.conv2d(F.pad(x, (1, 2, 1, 2)), torch.tensor(WD), None, 2, groups=4),
                                    None),
    "avg_pool": (lambda x, c: mb.avg_pool(x=x, kernel_sizes=[4, 4], strides=[4, 4], pad_type="valid",
                                          exclude_padding_from_average=True),
                 lambda x: F.avg_pool2d(x, 4, 4), None),
    "reduce_mean": (lambda x, c: mb.reduce_mean(x=x, axes=[2, 3], keep_dims=True),
                    lambda x: x.mean((2, 3), keepdim=True), None),
    "reshape": (lambda x, c: mb.reshape(x=x, shape=[1, 2, 2, 64]), lambda x: x.reshape(1, 2, 2, 64), None),
    "transpose": (lambda x, c: mb.transpose(x=x, perm=[0, 2, 3, 1]), lambda x: x.permute(0, 2, 3, 1), None),
    "squeeze": (lambda x, c: mb.squeeze(x=mb.reduce_mean(x=x, axes=[3], keep_dims=True), axes=[3]),
                lambda x: x.mean(3), None),
    "expand_dims": (lambda x, c: mb.expand_dims(x=x, axes=[1]), lambda x: x.unsqueeze(1), None),
    "slice_by_index": (lambda x, c: mb.slice_by_index(x=x, begin=[0, 1, 0, 2], end=[1, 3, 8, 8],
                                                      end_mask=[True, False, True, True]),
                       lambda x: x[:, 1:3, :, 2:], None),
    "split": (lambda x, c: mb.split(x=x, split_sizes=[1, 3], axis=1)[1], lambda x: x[:, 1:], None),
    "concat": (lambda x, c: mb.concat(values=[x, mb.mul(x=x, y=c(np.float32(2.0)))], axis=1),
               lambda x: torch.cat([x, 2 * x], 1), None),
    "add": (lambda x, c: mb.add(x=x, y=c(Y)), lambda x: x + torch.tensor(Y), None),
    "sub": (lambda x, c: mb.sub(x=x, y=c(Y)), lambda x: x - torch.tensor(Y), None),
    "mul_broadcast": (lambda x, c: mb.mul(x=x, y=c(CH.reshape(1, 4, 1, 1))),
                      lambda x: x * torch.tensor(CH).reshape(1, 4, 1, 1), None),
    "real_div": (lambda x, c: mb.real_div(x=x, y=c(CH.reshape(1, 4, 1, 1))),
                 lambda x: x / torch.tensor(CH).reshape(1, 4, 1, 1), None),
    "square": (lambda x, c: mb.square(x=x), lambda x: x * x, None),
    "sqrt": (lambda x, c: mb.sqrt(x=mb.mul(x=x, y=x)), lambda x: x.abs(), None),
    "rsqrt": (lambda x, c: mb.rsqrt(x=mb.add(x=mb.mul(x=x, y=x), y=c(np.float32(1.0))), epsilon=c(1e-5)),
              lambda x: 1 / torch.sqrt(x * x + 1 + 1e-5), None),
    "batch_norm": (lambda x, c: mb.batch_norm(x=x, mean=c(CH - 1), variance=c(CH), gamma=c(CH * 2), beta=c(CH),
                                              epsilon=c(1e-5)),
                   lambda x: F.batch_norm(x, torch.tensor(CH - 1), torch.tensor(CH), torch.tensor(CH * 2),
                                          torch.tensor(CH), False, 0.0, 1e-5), None),
    "matmul": (lambda x, c: mb.matmul(x=x, y=c(Y), transpose_y=True), lambda x: x @ torch.tensor(Y).transpose(-1, -2),
               None),
    "linear": (lambda x, c: mb.linear(x=x, weight=c(LW), bias=c(LB)),
               lambda x: F.linear(x, torch.tensor(LW), torch.tensor(LB)), (3, 8)),
    "softmax": (lambda x, c: mb.softmax(x=x, axis=-1), lambda x: torch.softmax(x, -1), None),
    "silu": (lambda x, c: mb.silu(x=x), F.silu, None),
    "gelu_exact": (lambda x, c: mb.gelu(x=x, mode="EXACT"), F.gelu, None),
    "gelu_tanh": (lambda x, c: mb.gelu(x=x, mode="TANH_APPROXIMATION"), lambda x: F.gelu(x, approximate="tanh"), None),
    "tanh": (lambda x, c: mb.tanh(x=x), torch.tanh, None),
    "sigmoid": (lambda x, c: mb.sigmoid(x=x), torch.sigmoid, None),
    "relu": (lambda x, c: mb.relu(x=x), torch.relu, None),
}


def _save(builder, shape, dtype, path):
    np_dtype = np.float16 if dtype == "fp16" else np.float32

    def const(v):
        return mb.const(val=np.asarray(v).astype(np_dtype))

    @mb.program(input_specs=[mb.TensorSpec(shape=shape, dtype=types.fp16 if dtype == "fp16" else types.fp32)],
                opset_version=ct.target.iOS16)
    def prog(x):
        return builder(x, const)

    # an empty pass pipeline keeps each op as written, so the op under test is the op executed
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                       compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY)
    model.save(str(path))
    return MILInterpreter(path)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_op_matches_torch(case, dtype, tmp_path):
    builder, reference, shape = CASES[case]
    shape = shape or (1, 4, 8, 8)
    interp = _save(builder, shape, dtype, tmp_path / f"{case}.mlpackage")
    kinds = {op.op_type for op in interp.compute_ops}
    assert case.split("_")[0] in kinds or case in kinds, kinds
    x = RNG.standard_normal(shape).astype(np.float16 if dtype == "fp16" else np.float32)
    out, _ = interp.run({interp.input_names[0]: x})
    got = next(iter(out.values()))
    # the independent computation: torch's own op on the same input, in fp32 with fp32 constants
    ref = reference(torch.tensor(x).float()).double()
    if dtype == "fp32":
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), ref, atol=1e-5, rtol=1e-5)
    else:
        assert got.dtype == torch.float16  # every op's result is rounded to fp16
        # fp16 constants and result: within a few fp16 steps of the output's scale, and not exact
        tol = 6e-3 * max(1.0, float(ref.abs().max()))
        assert (got.double() - ref).abs().max() <= tol


def test_fp16_overflow_is_reported_by_op(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 8, 8), dtype=types.fp16)], opset_version=ct.target.iOS16)
    def prog(x):
        big = mb.mul(x=x, y=np.float16(300.0), name="scale_up")
        sq = mb.mul(x=big, y=big, name="square_overflows")
        return mb.reduce_mean(x=sq, axes=[1, 2, 3], keep_dims=True, name="variance")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                       pass_pipeline=ct.PassPipeline.EMPTY)
    model.save(str(tmp_path / "o.mlpackage"))
    interp = MILInterpreter(tmp_path / "o.mlpackage")
    x = np.full((1, 4, 8, 8), 2.0, np.float16)
    out, report = interp.run({"x": x}, trace=True)
    assert report.first_nonfinite == "mul square_overflows"  # 600^2 > 65504
    assert torch.isinf(next(iter(out.values()))).all()


def test_unknown_op_is_named(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))], opset_version=ct.target.iOS16)
    def prog(x):
        return mb.erf(x=x)

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                       pass_pipeline=ct.PassPipeline.EMPTY)
    model.save(str(tmp_path / "e.mlpackage"))
    with pytest.raises(UnsupportedOpError, match="no kernel for: erf"):
        MILInterpreter(tmp_path / "e.mlpackage")
