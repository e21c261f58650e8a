"""Execute a saved Core ML ML Program on any OS, op by op: the arithmetic of the package as written.

coremltools reads a package on Linux but ``MLModel.predict`` runs only on macOS. This
interpreter loads the saved ``.mlpackage`` (its spec and its weight blob, through
coremltools' MIL proto loader) and evaluates every operation with torch kernels.

fp16 semantics: an op whose output the program types as fp16 computes in fp32 and
rounds its result to fp16, so overflow to inf and precision loss show as they would.
With ``trace=True`` a shadow fp32 evaluation runs in lockstep and the report names the
ops where inf/NaN first appear and where the fp16 result departs most from fp32.

It is a reference evaluation of the program's arithmetic, not a model of Apple
hardware: the Neural Engine and GPU accumulate differently, and it says nothing about
latency.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F


class UnsupportedOpError(NotImplementedError):
    pass


_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64, "int8": torch.int8,
           "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
           "bool": torch.bool}


def _dtype_name(var) -> str | None:
    from coremltools.converters.mil.mil import types

    try:  # list-typed vars (classify's class names) have no dtype
        dt = var.dtype
        return types.builtin_to_string(dt) if dt is not None else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _value(val) -> Any:
    """A const's value as a torch tensor (numbers and arrays) or as is (strings, lists of strings)."""
    if isinstance(val, np.ndarray):
        if val.dtype.kind in "USO":
            return val
        return torch.from_numpy(np.ascontiguousarray(val))
    if isinstance(val, (np.generic, float, int, bool)) and not isinstance(val, (str, np.str_)):
        return torch.tensor(np.asarray(val))
    return val


# ---- kernels: each takes the op's resolved inputs (a dict) and returns a tuple of outputs -----------

def _f(x: torch.Tensor) -> torch.Tensor:
    """Compute dtype: floats in fp32 (accumulation in fp32), ints as they are."""
    return x.float() if x.is_floating_point() else x


def _ints(v) -> list[int]:
    return [int(i) for i in (v.tolist() if isinstance(v, torch.Tensor) else v)]


def _scalar(v, default=None):
    if v is None:
        return default
    return v.item() if isinstance(v, torch.Tensor) else v


def _pads_2d(x, kernel, strides, dilations, pad_type, pad):
    """(left, right, top, bottom) for F.pad from MIL's pad_type/pad."""
    pad_type = str(pad_type or "valid")
    if pad_type == "custom":
        t, b, l, r = _ints(pad)
        return l, r, t, b
    if pad_type in ("same", "same_lower"):
        out = []
        for i, dim in enumerate(x.shape[2:]):
            eff = (kernel[i] - 1) * dilations[i] + 1
            total = max((math.ceil(dim / strides[i]) - 1) * strides[i] + eff - dim, 0)
            lo = total // 2 if pad_type == "same" else total - total // 2
            out.append((lo, total - lo))
        (t, b), (l, r) = out
        return l, r, t, b
    return 0, 0, 0, 0


def k_conv(a):
    x, w = _f(a["x"]), _f(a["weight"])
    strides = _ints(a.get("strides", [1, 1]))
    dil = _ints(a.get("dilations", [1, 1]))
    l, r, t, b = _pads_2d(x, list(w.shape[2:]), strides, dil, a.get("pad_type"), a.get("pad"))
    if l or r or t or b:
        x = F.pad(x, (l, r, t, b))
    bias = _f(a["bias"]) if a.get("bias") is not None else None
    return (F.conv2d(x, w, bias, strides, 0, dil, int(_scalar(a.get("groups"), 1))),)


def k_avg_pool(a):
    x = _f(a["x"])
    k, s = _ints(a["kernel_sizes"]), _ints(a["strides"])
    l, r, t, b = _pads_2d(x, k, s, [1, 1], a.get("pad_type"), a.get("pad"))
    exclude = bool(_scalar(a.get("exclude_padding_from_average"), False))
    if l == r and t == b:
        return (F.avg_pool2d(x, k, s, (t, l), bool(_scalar(a.get("ceil_mode"), False)), not exclude),)
    x = F.pad(x, (l, r, t, b))
    return (F.avg_pool2d(x, k, s, 0, bool(_scalar(a.get("ceil_mode"), False))),)


def k_reduce_mean(a):
    x = _f(a["x"])
    axes = a.get("axes")
    keep = bool(_scalar(a.get("keep_dims"), False))
    if axes is None:
        return (x.mean().reshape([1] * x.ndim) if keep else x.mean(),)
    return (x.mean(dim=_ints(axes), keepdim=keep),)


def k_slice_by_index(a):
    x = a["x"]
    n = x.ndim
    begin, end = _ints(a["begin"]), _ints(a["end"])
    stride = _ints(a["stride"]) if a.get("stride") is not None else [1] * n
    bmask = [bool(v) for v in a["begin_mask"].tolist()] if a.get("begin_mask") is not None else [False] * n
    emask = [bool(v) for v in a["end_mask"].tolist()] if a.get("end_mask") is not None else [False] * n
    smask = [bool(v) for v in a["squeeze_mask"].tolist()] if a.get("squeeze_mask") is not None else [False] * n
    index = []
    for i in range(n):
        if smask[i]:
            index.append(begin[i])
            continue
        index.append(slice(None if bmask[i] else begin[i], None if emask[i] else end[i], stride[i]))
    return (x[tuple(index)],)


def k_gelu(a):
    x = _f(a["x"])
    mode = str(a.get("mode") or "EXACT")
    if mode == "TANH_APPROXIMATION":
        return (F.gelu(x, approximate="tanh"),)
    if mode == "SIGMOID_APPROXIMATION":
        return (x * torch.sigmoid(1.702 * x),)
    return (F.gelu(x),)


def k_concat(a):
    values = [v for v in a["values"]]
    axis = int(_scalar(a["axis"]))
    if bool(_scalar(a.get("interleave"), False)):
        raise UnsupportedOpError("concat with interleave=True")
    dtype = torch.float32 if any(v.is_floating_point() for v in values) else values[0].dtype
    return (torch.cat([v.to(dtype) for v in values], dim=axis),)


def k_split(a):
    x, axis = a["x"], int(_scalar(a["axis"]))
    if a.get("split_sizes") is not None:
        return tuple(torch.split(x, _ints(a["split_sizes"]), dim=axis))
    return tuple(torch.chunk(x, int(_scalar(a["num_splits"])), dim=axis))


def k_matmul(a):
    x, y = _f(a["x"]), _f(a["y"])
    if bool(_scalar(a.get("transpose_x"), False)):
        x = x.transpose(-1, -2)
    if bool(_scalar(a.get("transpose_y"), False)):
        y = y.transpose(-1, -2)
    return (torch.matmul(x, y),)


def k_linear(a):
    bias = _f(a["bias"]) if a.get("bias") is not None else None
    return (F.linear(_f(a["x"]), _f(a["weight"]), bias),)


def k_batch_norm(a):
    x = _f(a["x"])
    shape = [1, -1] + [1] * (x.ndim - 2)
    mean, var = _f(a["mean"]).reshape(shape), _f(a["variance"]).reshape(shape)
    eps = float(_scalar(a.get("epsilon"), 1e-5))
    y = (x - mean) / torch.sqrt(var + eps)
    if a.get("gamma") is not None:
        y = y * _f(a["gamma"]).reshape(shape)
    if a.get("beta") is not None:
        y = y + _f(a["beta"]).reshape(shape)
    return (y,)


def k_cast(a):
    name = str(a["dtype"])
    if name not in _DTYPES:
        raise UnsupportedOpError(f"cast to {name}")
    return (a["x"].to(_DTYPES[name]),)


def k_classify(a):
    scores = _f(a["probabilities"]).reshape(-1)
    classes = a["classes"]
    labels = [str(c) for c in (classes.tolist() if hasattr(classes, "tolist") else classes)]
    return (labels[int(scores.argmax())], scores)


def k_constexpr_affine_dequantize(a):
    q, zp, scale, axis = a["quantized_data"], a["zero_point"], a["scale"], int(_scalar(a["axis"]))
    shape = [1] * q.ndim
    if zp.ndim:
        shape[axis] = -1
    q = q.float() - zp.float().reshape(shape if zp.numel() > 1 else [1] * q.ndim)
    return (q * scale.float().reshape(shape if scale.numel() > 1 else [1] * q.ndim),)


def k_constexpr_lut_to_dense(a):
    lut, indices, shape = a["lut"], a["indices"], _ints(a["shape"])
    n_bits = int(math.log2(lut.shape[-1]))
    flat = np.unpackbits(indices.numpy().astype(np.uint8), bitorder="little")
    n = int(np.prod(shape))
    idx = flat[: n * n_bits].reshape(n, n_bits)
    idx = (idx * (1 << np.arange(n_bits))).sum(1)
    return (lut.reshape(-1)[torch.from_numpy(idx)].reshape(shape),)


def _unary(fn):
    return lambda a: (fn(_f(a["x"])),)


def _binary(fn):
    return lambda a: (fn(_f(a["x"]), _f(a["y"])),)


KERNELS: dict[str, Callable[[dict], tuple]] = {
    "conv": k_conv, "avg_pool": k_avg_pool, "reduce_mean": k_reduce_mean, "slice_by_index": k_slice_by_index,
    "gelu": k_gelu, "concat": k_concat, "split": k_split, "matmul": k_matmul, "linear": k_linear,
    "batch_norm": k_batch_norm, "cast": k_cast, "classify": k_classify,
    "reshape": lambda a: (a["x"].reshape(_ints(a["shape"])),),
    "transpose": lambda a: (a["x"].permute(_ints(a["perm"])),),
    "squeeze": lambda a: (a["x"].squeeze(tuple(_ints(a["axes"]))) if a.get("axes") is not None else a["x"].squeeze(),),
    "expand_dims": lambda a: (a["x"].reshape(_expand_shape(a["x"], _ints(a["axes"]))),),
    "softmax": lambda a: (torch.softmax(_f(a["x"]), dim=int(_scalar(a.get("axis"), -1))),),
    "add": _binary(torch.add), "sub": _binary(torch.sub), "mul": _binary(torch.mul),
    "real_div": _binary(torch.div), "maximum": _binary(torch.maximum), "minimum": _binary(torch.minimum),
    "pow": _binary(torch.pow),
    "relu": _unary(torch.relu), "sigmoid": _unary(torch.sigmoid), "tanh": _unary(torch.tanh),
    "silu": _unary(F.silu), "sqrt": _unary(torch.sqrt), "square": _unary(torch.square), "exp": _unary(torch.exp),
    "abs": _unary(torch.abs),
    "rsqrt": lambda a: (torch.rsqrt(_f(a["x"]) + float(_scalar(a.get("epsilon"), 1e-12))),),
    "identity": lambda a: (a["x"],),
    "constexpr_affine_dequantize": k_constexpr_affine_dequantize,
    "constexpr_lut_to_dense": k_constexpr_lut_to_dense,
}


def _expand_shape(x, axes):
    shape = list(x.shape)
    for ax in sorted(a if a >= 0 else a + x.ndim + len(axes) for a in axes):
        shape.insert(ax, 1)
    return shape


@dataclass
class OpDrift:
    name: str
    op_type: str
    rel_error: float  # max |fp16 - fp32| / max |fp32| of the op's output


@dataclass
class Fp16Report:
    first_nonfinite: str | None = None  # "op_type name" where inf/NaN first appeared in the fp16 run
    nonfinite_ops: int = 0
    worst: list[OpDrift] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"first_nonfinite_op": self.first_nonfinite, "nonfinite_ops": self.nonfinite_ops,
                "largest_fp16_departures": [{"op": d.name, "type": d.op_type, "rel_error": float(f"{d.rel_error:.3g}")}
                                            for d in self.worst]}


class MILInterpreter:
    """Loads a saved ``.mlpackage`` and evaluates its ``main`` function."""

    def __init__(self, package: str | Path):
        import coremltools as ct
        from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

        self.package = Path(package)
        spec = ct.models.MLModel(str(self.package), skip_model_load=True).get_spec()
        if spec.WhichOneof("Type") != "mlProgram":
            raise ValueError(f"{self.package.name} is not an ML Program")
        weights = self.package / "Data" / "com.apple.CoreML" / "weights"
        self.spec = spec
        self.program = load_milproto(spec, spec.specificationVersion, str(weights))
        self.function = self.program.functions["main"]
        self.ops = list(self.function.operations)
        unknown = sorted({op.op_type for op in self.ops if op.op_type != "const"} - KERNELS.keys())
        if unknown:
            raise UnsupportedOpError(f"the Core ML interpreter has no kernel for: {', '.join(unknown)}")
        self.input_names = list(self.function.inputs)
        self.output_names = [v.name for v in self.function.outputs]
        self.dtypes = {o.name: _dtype_name(o) for op in self.ops for o in op.outputs}
        self.consts = {op.outputs[0].name: _value(op.outputs[0].val) for op in self.ops if op.op_type == "const"}
        self.compute_ops = [op for op in self.ops if op.op_type != "const"]
        self.is_fp16 = any(self.dtypes[o.name] == "fp16" for op in self.compute_ops for o in op.outputs)
        # free intermediates after their last reader: activations of every op at once would not fit
        self.last_use: dict[str, int] = {}
        for i, op in enumerate(self.compute_ops):
            for v in self._input_vars(op):
                self.last_use[v.name] = i

    @staticmethod
    def _input_vars(op):
        for v in op.inputs.values():
            if isinstance(v, (list, tuple)):
                yield from v
            else:
                yield v

    def _resolve(self, op, env: dict, shadow32: bool) -> dict:
        args = {}
        for k, v in op.inputs.items():
            if isinstance(v, (list, tuple)):
                args[k] = [self._lookup(x.name, env, shadow32) for x in v]
            else:
                args[k] = self._lookup(v.name, env, shadow32)
        return args

    def _lookup(self, name: str, env: dict, shadow32: bool):
        val = env[name] if name in env else self.consts[name]
        if shadow32 and isinstance(val, torch.Tensor) and val.dtype == torch.float16:
            return val.float()
        return val

    def _store(self, op, outs, env: dict, shadow32: bool) -> None:
        for var, val in zip(op.outputs, outs):
            if isinstance(val, torch.Tensor):
                want = self.dtypes.get(var.name)
                if want == "fp16" and shadow32:
                    want = "fp32"
                if want in _DTYPES and val.dtype != _DTYPES[want]:
                    val = val.to(_DTYPES[want])
            env[var.name] = val

    def run(self, inputs: dict[str, np.ndarray], trace: bool = False, top: int = 5):
        """Outputs by name; with ``trace`` also an :class:`Fp16Report` from a lockstep fp32 shadow run."""
        env: dict = {}
        shadow: dict | None = {} if trace and self.is_fp16 else None
        for name, var in self.function.inputs.items():
            if name not in inputs:
                raise ValueError(f"missing input {name!r}")
            t = torch.as_tensor(np.asarray(inputs[name]))
            want = _DTYPES.get(_dtype_name(var), torch.float32)
            env[name] = t.to(want)
            if shadow is not None:
                shadow[name] = t.to(torch.float32 if want == torch.float16 else want)
        report = Fp16Report() if shadow is not None else None
        drifts: list[OpDrift] = []
        with torch.no_grad():
            for i, op in enumerate(self.compute_ops):
                try:
                    outs = KERNELS[op.op_type](self._resolve(op, env, False))
                except UnsupportedOpError:
                    raise
                except Exception as e:
                    raise RuntimeError(f"op {op.op_type} {op.name!r} failed: {e}") from e
                self._store(op, outs, env, False)
                if shadow is not None:
                    self._store(op, KERNELS[op.op_type](self._resolve(op, shadow, True)), shadow, True)
                    self._compare(op, env, shadow, report, drifts)
                for v in self._input_vars(op):
                    if self.last_use.get(v.name) == i and v.name not in self.output_names:
                        env.pop(v.name, None)
                        if shadow is not None:
                            shadow.pop(v.name, None)
        outputs = {name: env[name] for name in self.output_names}
        if report is not None:
            report.worst = sorted(drifts, key=lambda d: -d.rel_error)[:top]
        return outputs, report

    def _compare(self, op, env, shadow, report: Fp16Report, drifts: list[OpDrift]) -> None:
        for var in op.outputs:
            a, b = env.get(var.name), shadow.get(var.name)
            if not isinstance(a, torch.Tensor) or not a.is_floating_point() or self.dtypes.get(var.name) != "fp16":
                continue
            a = a.float()
            if not torch.isfinite(a).all():
                report.nonfinite_ops += 1
                if report.first_nonfinite is None:
                    report.first_nonfinite = f"{op.op_type} {op.name}"
                continue
            scale = float(b.abs().max()) if b.numel() else 0.0
            err = float((a - b).abs().max()) / max(scale, 1e-6) if b.numel() else 0.0
            drifts.append(OpDrift(op.name, op.op_type, err))
