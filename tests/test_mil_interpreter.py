"""The Core ML interpreter: each op kind against an independent torch computation, fp32 and fp16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from cloformer_deploy.formats.mil_interpreter import MILInterpreter, UnsupportedOpError, _intra_op_threads  # noqa: E402

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
    "conv": (
        lambda x, c: mb.conv(x=x, weight=c(W3), bias=c(B6), pad_type="custom", pad=[1, 1, 1, 1]),
        lambda x: F.conv2d(x, torch.tensor(W3), torch.tensor(B6), padding=1),
        None,
    ),
    "conv_depthwise_strided_same": (
        lambda x, c: mb.conv(x=x, weight=c(WD), strides=[2, 2], pad_type="same", groups=4),
        # MIL "same": the odd pixel of padding goes after (TensorFlow's convention)
        lambda x: F.conv2d(F.pad(x, (1, 2, 1, 2)), torch.tensor(WD), None, 2, groups=4),
        None,
    ),
    "avg_pool": (
        lambda x, c: mb.avg_pool(
            x=x, kernel_sizes=[4, 4], strides=[4, 4], pad_type="valid", exclude_padding_from_average=True
        ),
        lambda x: F.avg_pool2d(x, 4, 4),
        None,
    ),
    "reduce_mean": (
        lambda x, c: mb.reduce_mean(x=x, axes=[2, 3], keep_dims=True),
        lambda x: x.mean((2, 3), keepdim=True),
        None,
    ),
    "reshape": (lambda x, c: mb.reshape(x=x, shape=[1, 2, 2, 64]), lambda x: x.reshape(1, 2, 2, 64), None),
    "transpose": (lambda x, c: mb.transpose(x=x, perm=[0, 2, 3, 1]), lambda x: x.permute(0, 2, 3, 1), None),
    "squeeze": (
        lambda x, c: mb.squeeze(x=mb.reduce_mean(x=x, axes=[3], keep_dims=True), axes=[3]),
        lambda x: x.mean(3),
        None,
    ),
    "expand_dims": (lambda x, c: mb.expand_dims(x=x, axes=[1]), lambda x: x.unsqueeze(1), None),
    "slice_by_index": (
        lambda x, c: mb.slice_by_index(x=x, begin=[0, 1, 0, 2], end=[1, 3, 8, 8], end_mask=[True, False, True, True]),
        lambda x: x[:, 1:3, :, 2:],
        None,
    ),
    "split": (lambda x, c: mb.split(x=x, split_sizes=[1, 3], axis=1)[1], lambda x: x[:, 1:], None),
    "concat": (
        lambda x, c: mb.concat(values=[x, mb.mul(x=x, y=c(np.float32(2.0)))], axis=1),
        lambda x: torch.cat([x, 2 * x], 1),
        None,
    ),
    "add": (lambda x, c: mb.add(x=x, y=c(Y)), lambda x: x + torch.tensor(Y), None),
    "sub": (lambda x, c: mb.sub(x=x, y=c(Y)), lambda x: x - torch.tensor(Y), None),
    "mul_broadcast": (
        lambda x, c: mb.mul(x=x, y=c(CH.reshape(1, 4, 1, 1))),
        lambda x: x * torch.tensor(CH).reshape(1, 4, 1, 1),
        None,
    ),
    "real_div": (
        lambda x, c: mb.real_div(x=x, y=c(CH.reshape(1, 4, 1, 1))),
        lambda x: x / torch.tensor(CH).reshape(1, 4, 1, 1),
        None,
    ),
    "square": (lambda x, c: mb.square(x=x), lambda x: x * x, None),
    "sqrt": (lambda x, c: mb.sqrt(x=mb.mul(x=x, y=x)), lambda x: x.abs(), None),
    "rsqrt": (
        lambda x, c: mb.rsqrt(x=mb.add(x=mb.mul(x=x, y=x), y=c(np.float32(1.0))), epsilon=c(1e-5)),
        lambda x: 1 / torch.sqrt(x * x + 1 + 1e-5),
        None,
    ),
    "batch_norm": (
        lambda x, c: mb.batch_norm(x=x, mean=c(CH - 1), variance=c(CH), gamma=c(CH * 2), beta=c(CH), epsilon=c(1e-5)),
        lambda x: F.batch_norm(
            x, torch.tensor(CH - 1), torch.tensor(CH), torch.tensor(CH * 2), torch.tensor(CH), False, 0.0, 1e-5
        ),
        None,
    ),
    "matmul": (
        lambda x, c: mb.matmul(x=x, y=c(Y), transpose_y=True),
        lambda x: x @ torch.tensor(Y).transpose(-1, -2),
        None,
    ),
    "linear": (
        lambda x, c: mb.linear(x=x, weight=c(LW), bias=c(LB)),
        lambda x: F.linear(x, torch.tensor(LW), torch.tensor(LB)),
        (3, 8),
    ),
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

    @mb.program(
        input_specs=[mb.TensorSpec(shape=shape, dtype=types.fp16 if dtype == "fp16" else types.fp32)],
        opset_version=ct.target.iOS16,
    )
    def prog(x):
        return builder(x, const)

    # an empty pass pipeline keeps each op as written, so the op under test is the op executed
    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS16,
        compute_precision=ct.precision.FLOAT32,
        pass_pipeline=ct.PassPipeline.EMPTY,
    )
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

    model = ct.convert(
        prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16, pass_pipeline=ct.PassPipeline.EMPTY
    )
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

    model = ct.convert(
        prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16, pass_pipeline=ct.PassPipeline.EMPTY
    )
    model.save(str(tmp_path / "e.mlpackage"))
    with pytest.raises(UnsupportedOpError, match="no kernel for: erf"):
        MILInterpreter(tmp_path / "e.mlpackage")


# ---- the compiled step list against a plain op-by-op evaluation --------------------------------------------


def _network(x, c, np_dtype):
    """Constants-only ops (folded at load), list arguments mixing variables and constants, split outputs,
    an fp32 island in an fp16 program (cast, mean, cast back) and a square that can overflow fp16."""
    w = mb.add(x=c(W3), y=c(W3 * 0.5), name="weight_on_constants")
    y = mb.conv(x=x, weight=w, bias=c(B6), pad_type="custom", pad=[1, 1, 1, 1], name="conv")
    a, b = mb.split(x=y, split_sizes=[2, 4], axis=1, name="split")
    z = mb.concat(values=[b, c(np.ones((1, 2, 8, 8))), a], axis=1, name="concat")
    wide = mb.cast(x=z, dtype="fp32", name="to_fp32") if np_dtype == np.float16 else z
    mean = mb.reduce_mean(x=mb.mul(x=wide, y=wide, name="square"), axes=[1, 2, 3], keep_dims=True, name="mean")
    mean = mb.cast(x=mean, dtype="fp16", name="to_fp16") if np_dtype == np.float16 else mean
    big = mb.mul(x=z, y=c(10.0), name="scale_up")
    return mb.add(x=mb.mul(x=big, y=big, name="square_big"), y=mean, name="out")


def _reference_run(interp, x: np.ndarray, trace: bool):
    """The plain evaluation the compiled one must equal: op by op, every argument looked up by name and
    converted where it is read, every op run twice when tracing."""
    from cloformer_deploy.formats import mil_interpreter as mi

    env, shadow = {}, ({} if trace and interp.is_fp16 else None)
    name = interp.input_names[0]
    want = mi._DTYPES[interp.input_dtypes[name]]
    env[name] = torch.as_tensor(x).to(want)
    if shadow is not None:
        shadow[name] = torch.as_tensor(x).to(torch.float32)

    def args(op, values, to_fp32):
        def look(binding):
            v = (
                binding.value
                if isinstance(binding, mi.InlineValue)
                else values.get(binding, interp.consts.get(binding))
            )
            return v.float() if to_fp32 and isinstance(v, torch.Tensor) and v.dtype == torch.float16 else v

        return {
            k: [look(b) for b in bs] if k in mi.LIST_ARGUMENTS.get(op.op_type, ()) else look(bs[0])
            for k, bs in op.inputs.items()
        }

    nonfinite, drifts = [], []
    with torch.no_grad(), _intra_op_threads(1):  # reductions split across threads round differently
        for op in interp.compute_ops:
            for (out, dtype), value in zip(op.outputs, mi.KERNELS[op.op_type](args(op, env, False))):
                env[out] = value.to(mi._DTYPES[dtype])
            if shadow is None:
                continue
            for (out, dtype), value in zip(op.outputs, mi.KERNELS[op.op_type](args(op, shadow, True))):
                shadow[out] = value.to(torch.float32 if dtype == "fp16" else mi._DTYPES[dtype])
                if dtype != "fp16":
                    continue
                a, b = env[out].float(), shadow[out]
                if not torch.isfinite(a).all():
                    nonfinite.append(f"{op.op_type} {op.name}")
                    continue
                drifts.append((op.name, float((a - b).abs().max()) / max(float(b.abs().max()), 1e-6)))
    outputs = {n: env[n] for n in interp.output_names}
    worst = sorted(drifts, key=lambda d: -d[1])[:5]
    if shadow is None:
        return outputs, None
    return outputs, ((nonfinite[:1] or [None])[0], len(nonfinite), worst)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_compiled_run_equals_a_plain_op_by_op_run(dtype, tmp_path):
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    interp = _save(lambda x, c: _network(x, c, np_dtype), (1, 4, 8, 8), dtype, tmp_path / "n.mlpackage")
    # the op on constants only runs once, at load (white box: it must not be a step of every run)
    assert "weight_on_constants" not in {step.op.name for step in interp._steps}
    for scale in (1.0, 30.0):  # 30: the fp16 square overflows to inf
        x = (RNG.standard_normal((1, 4, 8, 8)) * scale).astype(np_dtype)
        for trace in (False, True):
            out, report = interp.run({"x": x}, trace=trace)
            ref_out, ref_report = _reference_run(interp, x, trace)
            assert out.keys() == ref_out.keys()
            for k in out:
                assert out[k].dtype == ref_out[k].dtype and torch.equal(out[k], ref_out[k]), k  # bit for bit
            if ref_report is None:
                assert report is None
                continue
            first, count, worst = ref_report
            assert (report.first_nonfinite, report.nonfinite_ops) == (first, count)
            assert [(d.name, d.rel_error) for d in report.worst] == worst
            assert (count > 0) == (scale > 1) and worst


def test_run_uses_one_thread_and_restores_the_callers(tmp_path, monkeypatch):
    from cloformer_deploy.formats import mil_interpreter as mi

    seen = []

    def relu(a):
        seen.append(torch.get_num_threads())
        if a["x"].sum() > 1e6:
            raise ValueError("boom")
        return (torch.relu(a["x"]),)

    monkeypatch.setitem(mi.KERNELS, "relu", relu)
    interp = _save(lambda x, c: mb.relu(x=x), (1, 4, 8, 8), "fp32", tmp_path / "r.mlpackage")
    caller = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        interp.run({"x": np.zeros((1, 4, 8, 8), np.float32)})
        assert seen[-1] == 1 and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"):
            interp.run({"x": np.full((1, 4, 8, 8), 1e6, np.float32)})
        assert torch.get_num_threads() == 2  # restored after a failure too
        interp.num_threads = None  # the caller's setting
        interp.run({"x": np.zeros((1, 4, 8, 8), np.float32)})
        assert seen[-1] == 2
    finally:
        torch.set_num_threads(caller)


def test_constants_read_from_the_package_equal_coremltools_loader(tmp_path):
    """The program is read straight from its protobuf and weight file: each constant as coremltools reads it."""
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    def build(x, c):
        big = mb.const(val=RNG.standard_normal((1, 4, 8, 8)).astype(np.float16), name="blob_fp16")  # weight file
        y = mb.add(x=mb.cast(x=x, dtype="fp16"), y=big)
        y = mb.reshape(x=y, shape=np.array([1, 4, 64], np.int32))
        y = mb.slice_by_index(x=y, begin=[0, 1, 0], end=[1, 3, 64], end_mask=[True, False, True])
        return mb.softmax(x=mb.cast(x=y, dtype="fp32"), axis=-1)

    interp = _save(build, (1, 4, 8, 8), "fp32", tmp_path / "k.mlpackage")
    spec = interp.spec
    program = load_milproto(
        spec, spec.specificationVersion, str(tmp_path / "k.mlpackage" / "Data" / "com.apple.CoreML" / "weights")
    )
    theirs = {
        op.outputs[0].name: op.outputs[0].val for op in program.functions["main"].operations if op.op_type == "const"
    }
    assert theirs.keys() == interp.consts.keys() and len(theirs) > 5
    for name, value in theirs.items():
        ours = interp.consts[name]
        if isinstance(ours, torch.Tensor):
            expected = np.asarray(value)
            assert ours.numpy().dtype == expected.dtype and ours.shape == expected.shape, name
            assert np.array_equal(ours.numpy(), expected), name
        else:
            assert ours == value, name
    assert interp.consts["blob_fp16"].dtype == torch.float16
