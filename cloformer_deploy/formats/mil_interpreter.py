"""Execute a saved Core ML ML Program on any OS, op by op: the arithmetic of the package as written.

coremltools reads a package on Linux but ``MLModel.predict`` runs only on macOS. This
interpreter reads the saved ``.mlpackage`` (its MIL program and its weight blob) and
evaluates every operation with torch kernels.

fp16 semantics: an op whose output the program types as fp16 computes in fp32 and
rounds its result to fp16, so overflow to inf and precision loss show as they would.
With ``trace=True`` a shadow fp32 evaluation runs in lockstep and the report names the
ops where inf/NaN first appear and where the fp16 result departs most from fp32.

It is a reference evaluation of the program's arithmetic, not a model of Apple
hardware: the Neural Engine and GPU accumulate differently, and it says nothing about
latency.

Speed: a program is thousands of small ops, so the work per op outside the kernels
matters. The program is compiled once into a list of steps (inputs resolved, constants
converted to their compute dtype, variables freed after their last reader), ops on
constants only (weight decompression) are evaluated once at load, and ``run`` uses one
intra-op thread: tiny ops gain nothing from threads and lose much on a busy machine.
"""

from __future__ import annotations

import heapq
import math
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


class UnsupportedOpError(NotImplementedError):
    pass


_DTYPES = {
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}


# ---- reading the package: the MIL program straight from its protobuf, weights from the blob file --------
# coremltools' own loader rebuilds a PyMIL program with type and value inference (~10x the time), and
# names the inline values it turns into consts (a classifier's labels) from a process-wide counter:
# "const_10" then overwrites the package's own const_10 on the 11th load in a process. Packages written
# by coremltools state every optional input; the kernels' fallbacks are MIL's defaults for those that don't.

# MIL proto DataType names -> the dtype names of MIL (and of _DTYPES)
_MIL_DTYPE_NAMES = {
    "FLOAT16": "fp16",
    "FLOAT32": "fp32",
    "FLOAT64": "fp64",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT16": "int16",
    "UINT16": "uint16",
    "INT32": "int32",
    "UINT32": "uint32",
    "INT64": "int64",
    "UINT64": "uint64",
    "BOOL": "bool",
    "STRING": "string",
}
_NUMPY_DTYPES = {
    "fp16": np.float16,
    "fp32": np.float32,
    "fp64": np.float64,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
    "int32": np.int32,
    "uint32": np.uint32,
    "int64": np.int64,
    "uint64": np.uint64,
    "bool": np.bool_,
}
_BLOB_SENTINEL = 0xDEADBEEF
_BLOB_RECORD = struct.Struct("<IIQQ")  # sentinel, blob dtype, size in bytes, offset of the data


@dataclass(frozen=True)
class InlineValue:
    """A value written into an op's argument (classify's class names) rather than bound to a variable."""

    value: Any


@dataclass
class Operation:
    """One operation of the program as the package states it."""

    name: str
    op_type: str
    inputs: dict[str, tuple]  # argument -> its bindings: variable names (str) or InlineValues
    outputs: list[tuple[str, str | None]]  # (variable, dtype name; None for non-tensors)


def _tensor_type(value_type) -> tuple[str | None, tuple[int, ...]]:
    """(dtype name, shape) of a MIL ValueType; (None, ()) for lists, dictionaries and states."""
    if value_type.WhichOneof("type") != "tensorType":
        return None, ()
    from coremltools.proto import MIL_pb2

    tensor_type = value_type.tensorType
    proto_name = MIL_pb2.DataType.Name(tensor_type.dataType)
    shape = tuple(d.constant.size for d in tensor_type.dimensions)
    return _MIL_DTYPE_NAMES.get(proto_name, proto_name.lower()), shape


class _BlobFiles:
    """The package's weight files, each read once; constants are views into them."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.buffers: dict[str, bytearray] = {}

    def read(self, blob_value, np_dtype, shape: tuple[int, ...]) -> np.ndarray:
        name = blob_value.fileName.split("/")[-1]
        if name not in self.buffers:
            path = self.folder / name
            buffer = bytearray(path.stat().st_size)  # writable, so torch.from_numpy shares it without a warning
            with open(path, "rb") as f:
                f.readinto(buffer)
            self.buffers[name] = buffer
        buffer = self.buffers[name]
        sentinel, _, size, offset = _BLOB_RECORD.unpack_from(buffer, blob_value.offset)
        count = math.prod(shape)
        if sentinel != _BLOB_SENTINEL or size != count * np.dtype(np_dtype).itemsize or offset + size > len(buffer):
            raise ValueError(f"weight file {name}: no valid record at offset {blob_value.offset}")
        return np.frombuffer(buffer, np_dtype, count, offset).reshape(shape)


def _decode_value(value, blobs: _BlobFiles) -> Any:
    """A MIL Value as a torch tensor (numbers), a str, an array of str, or a list (of decoded values)."""
    if value.type.WhichOneof("type") == "listType":
        return [_decode_value(v, blobs) for v in value.immediateValue.list.values]
    dtype, shape = _tensor_type(value.type)
    if dtype is None:
        raise UnsupportedOpError(f"constant of type {value.type.WhichOneof('type')}")
    if dtype == "string":
        strings = list(value.immediateValue.tensor.strings.values)
        return strings[0] if not shape else np.array(strings).reshape(shape)
    if dtype not in _NUMPY_DTYPES:
        raise UnsupportedOpError(f"constant of type {dtype}")
    np_dtype = _NUMPY_DTYPES[dtype]
    if value.WhichOneof("value") == "blobFileValue":
        return torch.from_numpy(blobs.read(value.blobFileValue, np_dtype, shape))
    tensor = value.immediateValue.tensor
    kind = tensor.WhichOneof("value")
    if kind == "bytes":  # fp16 and 8/16-bit integers are stored as raw bytes
        array = np.frombuffer(tensor.bytes.values, np_dtype).copy()
    elif kind is None:
        array = np.zeros(0, np_dtype)
    else:
        array = np.array(list(getattr(tensor, kind).values), np_dtype)
    return torch.from_numpy(array.reshape(shape))


def _read_operation(op_spec, blobs: _BlobFiles) -> Operation:
    inputs: dict[str, tuple] = {}
    for key, argument in op_spec.inputs.items():
        inputs[key] = tuple(
            b.name if b.WhichOneof("binding") == "name" else InlineValue(_decode_value(b.value, blobs))
            for b in argument.arguments
        )
    for key, value in op_spec.attributes.items():  # iOS16 constexpr ops carry their data as attributes
        if key != "name":
            inputs[key] = (InlineValue(_decode_value(value, blobs)),)
    outputs = [(o.name, _tensor_type(o.type)[0]) for o in op_spec.outputs]
    name_attribute = op_spec.attributes.get("name")
    name = name_attribute.immediateValue.tensor.strings.values[0] if name_attribute else outputs[0][0]
    return Operation(name, op_spec.type, inputs, outputs)


def constant_storage(package: str | Path) -> dict[str, int]:
    """Bytes of a package's constants by MIL storage type: the weight file's records (their stated sizes, so that
    4-bit palettes count as stored) and the values written into the program."""
    import coremltools as ct

    from .base import storage_totals

    spec = ct.utils.load_spec(str(package))
    _, block = _main_function(spec)
    folder = Path(package) / "Data" / "com.apple.CoreML" / "weights"
    files: dict[str, bytes] = {}
    pairs = []

    def count(value) -> None:
        if value.type.WhichOneof("type") == "listType":
            return
        dtype, shape = _tensor_type(value.type)
        if dtype is None or dtype == "string":
            return
        if value.WhichOneof("value") == "blobFileValue":
            name = value.blobFileValue.fileName.split("/")[-1]
            if name not in files:
                files[name] = (folder / name).read_bytes()
            _, _, size, _ = _BLOB_RECORD.unpack_from(files[name], value.blobFileValue.offset)
            pairs.append((dtype, size))
        elif dtype in _NUMPY_DTYPES:
            pairs.append((dtype, math.prod(shape) * np.dtype(_NUMPY_DTYPES[dtype]).itemsize))

    for op in block.operations:
        for key, value in op.attributes.items():
            if key != "name":
                count(value)
        for argument in op.inputs.values():
            for binding in argument.arguments:
                if binding.WhichOneof("binding") == "value":
                    count(binding.value)
    return storage_totals(pairs)


def _main_function(spec):
    function = spec.mlProgram.functions["main"]
    return function, function.block_specializations[function.opset]


@contextmanager
def _intra_op_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` for the block, then restored (None: leave it)."""
    previous = torch.get_num_threads()
    if count is None or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
    "conv": k_conv,
    "avg_pool": k_avg_pool,
    "reduce_mean": k_reduce_mean,
    "slice_by_index": k_slice_by_index,
    "gelu": k_gelu,
    "concat": k_concat,
    "split": k_split,
    "matmul": k_matmul,
    "linear": k_linear,
    "batch_norm": k_batch_norm,
    "cast": k_cast,
    "classify": k_classify,
    "reshape": lambda a: (a["x"].reshape(_ints(a["shape"])),),
    "transpose": lambda a: (a["x"].permute(_ints(a["perm"])),),
    "squeeze": lambda a: (a["x"].squeeze(tuple(_ints(a["axes"]))) if a.get("axes") is not None else a["x"].squeeze(),),
    "expand_dims": lambda a: (a["x"].reshape(_expand_shape(a["x"], _ints(a["axes"]))),),
    "softmax": lambda a: (torch.softmax(_f(a["x"]), dim=int(_scalar(a.get("axis"), -1))),),
    "add": _binary(torch.add),
    "sub": _binary(torch.sub),
    "mul": _binary(torch.mul),
    "real_div": _binary(torch.div),
    "maximum": _binary(torch.maximum),
    "minimum": _binary(torch.minimum),
    "pow": _binary(torch.pow),
    "relu": _unary(torch.relu),
    "sigmoid": _unary(torch.sigmoid),
    "tanh": _unary(torch.tanh),
    "silu": _unary(F.silu),
    "sqrt": _unary(torch.sqrt),
    "square": _unary(torch.square),
    "exp": _unary(torch.exp),
    "abs": _unary(torch.abs),
    "rsqrt": lambda a: (torch.rsqrt(_f(a["x"]) + float(_scalar(a.get("epsilon"), 1e-12))),),
    "identity": lambda a: (a["x"],),
    "constexpr_affine_dequantize": k_constexpr_affine_dequantize,
    "constexpr_lut_to_dense": k_constexpr_lut_to_dense,
}

# arguments that MIL types as a tuple of variables: a list for the kernel even when it holds one
LIST_ARGUMENTS = {"concat": {"values"}}


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
        return {
            "first_nonfinite_op": self.first_nonfinite,
            "nonfinite_ops": self.nonfinite_ops,
            "largest_fp16_departures": [
                {"op": d.name, "type": d.op_type, "rel_error": float(f"{d.rel_error:.3g}")} for d in self.worst
            ],
        }


# ---- compiled execution ---------------------------------------------------------------------------------


def _cast(value, dtype: torch.dtype | None):
    if dtype is not None and isinstance(value, torch.Tensor) and value.dtype != dtype:
        return value.to(dtype)
    return value


def _to_shadow(value, dtype: torch.dtype | None):
    """A value as the fp32 shadow holds it: its shadow dtype, and no fp16 even where the program gives no type."""
    if dtype is None and isinstance(value, torch.Tensor) and value.dtype == torch.float16:
        return value.float()
    return _cast(value, dtype)


def _compute_form(value):
    """A constant as the kernels take it: fp16 as an exact fp32 copy (every kernel computes floats in fp32
    and every result is cast to its program dtype, so this changes no result and saves a conversion per run)."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.float16:
        return value.float()
    return value


def _departure(fp16: torch.Tensor, fp32: torch.Tensor) -> float | None:
    """max |fp16 - fp32| / max |fp32|, or None where the fp16 result holds inf or NaN."""
    if fp32.numel() == 0:
        return 0.0
    # aminmax: one pass, no abs temporary. inf or NaN in fp16 makes the difference non-finite, so the
    # isfinite pass (slow on fp16) runs only then
    low, high = torch.aminmax(fp16.float().sub_(fp32))
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)) and not bool(torch.isfinite(fp16).all()):
        return None
    difference = max(-low, high)
    low, high = torch.aminmax(fp32)
    return difference / max(max(-float(low), float(high)), 1e-6)


@dataclass(frozen=True)
class _Output:
    name: str
    dtype: torch.dtype | None  # the program's dtype: the main run casts to it
    shadow_dtype: torch.dtype | None  # the same with fp16 as fp32
    compared: bool  # an fp16 output: compared with the shadow when tracing


@dataclass(frozen=True)
class _Step:
    """A compute op, compiled: what it reads, its kernel, where its outputs go and what it frees."""

    index: int  # position among the program's compute ops
    op: Operation
    kernel: Callable[[dict], tuple]
    args: dict  # constant arguments, in compute form
    shadow_args: dict  # the same for the shadow run (differ only after an fp16 op folded at load)
    var_args: tuple[tuple[str, str], ...]  # (argument, variable)
    list_args: tuple[tuple[str, tuple], ...]  # (argument, items: (variable or None, constant, shadow constant))
    outputs: tuple[_Output, ...]
    frees: tuple[str, ...]  # variables this step reads last
    shadow_from_main: bool  # the shadow's inputs are the main run's, so is the kernel's result


class MILInterpreter:
    """Loads a saved ``.mlpackage`` and evaluates its ``main`` function.

    ``num_threads``: torch's intra-op threads during :meth:`run`, restored afterwards (the setting is
    process-wide); None leaves the caller's. One thread: most ops are too small to split, and a second
    thread that the OS has given to another process stalls every op (seconds per image on a busy machine).
    """

    def __init__(self, package: str | Path, num_threads: int | None = 1, extra_outputs: tuple[str, ...] = ()):
        import coremltools as ct

        self.package = Path(package)
        self.num_threads = num_threads
        spec = ct.utils.load_spec(str(self.package))
        if spec.WhichOneof("Type") != "mlProgram":
            raise ValueError(f"{self.package.name} is not an ML Program")
        self.spec = spec
        function, block = _main_function(spec)
        blobs = _BlobFiles(self.package / "Data" / "com.apple.CoreML" / "weights")
        self.input_dtypes = {i.name: _tensor_type(i.type)[0] for i in function.inputs}
        self.input_names = list(self.input_dtypes)
        self.output_names = list(block.outputs)
        self.extra_outputs = list(extra_outputs)  # variables kept and returned too (a file's block boundaries)
        self.consts: dict[str, Any] = {}  # the program's constants, as stored
        self.compute_ops: list[Operation] = []
        for op_spec in block.operations:
            if op_spec.type == "const":
                self.consts[op_spec.outputs[0].name] = _decode_value(op_spec.attributes["val"], blobs)
            else:
                self.compute_ops.append(_read_operation(op_spec, blobs))
        missing = [v for v in self.extra_outputs if v not in {n for op in self.compute_ops for n, _ in op.outputs}]
        if missing:
            raise ValueError(f"the program has no variable {missing[0]!r}")
        self.output_names += [v for v in self.extra_outputs if v not in self.output_names]
        unknown = sorted({op.op_type for op in self.compute_ops} - KERNELS.keys())
        if unknown:
            raise UnsupportedOpError(f"the Core ML interpreter has no kernel for: {', '.join(unknown)}")
        self.dtypes = {name: dtype for op in self.compute_ops for name, dtype in op.outputs}
        self.is_fp16 = "fp16" in self.dtypes.values()
        with _intra_op_threads(num_threads), torch.no_grad():
            self._compile()

    # ---- compilation ------------------------------------------------------------------------------------

    def _compile(self) -> None:
        """Resolve every op's arguments once; evaluate ops on constants only (weight decompression) once."""
        constants = {name: _compute_form(v) for name, v in self.consts.items()}
        shadow_constants = dict(constants)
        # variables whose shadow value is the main run's value: fp32 inputs, then ops on such values only
        same_in_shadow = {name for name, dtype in self.input_dtypes.items() if dtype != "fp16"} | set(constants)
        defined = set(self.input_dtypes)
        self._folded_drifts: list[tuple[int, OpDrift]] = []
        self._folded_nonfinite: list[tuple[int, str]] = []
        self._constant_outputs: dict[str, Any] = {}
        steps: list[_Step] = []
        for index, op in enumerate(self.compute_ops):
            args, shadow_args, var_args, list_args, reads = self._bind(op, constants, shadow_constants, defined)
            outputs = tuple(
                _Output(name, _DTYPES.get(dtype), _DTYPES.get("fp32" if dtype == "fp16" else dtype), dtype == "fp16")
                for name, dtype in op.outputs
            )
            shadow_from_main = all(name in same_in_shadow for name in reads)
            same_in_shadow.update(o.name for o in outputs if shadow_from_main and not o.compared)
            step = _Step(
                index, op, KERNELS[op.op_type], args, shadow_args, var_args, list_args, outputs, (), shadow_from_main
            )
            if not var_args and not list_args:
                self._fold(step, constants, shadow_constants)
            else:
                steps.append(step)
                defined.update(o.name for o in outputs)
        # free intermediates after their last reader: activations of every op at once would not fit
        last_reader: dict[str, int] = {}
        for position, step in enumerate(steps):
            for _, var in step.var_args:
                last_reader[var] = position
            for _, items in step.list_args:
                for var, _, _ in items:
                    if var is not None:
                        last_reader[var] = position
        frees: dict[int, list[str]] = {}
        for var, position in last_reader.items():
            if var not in self.output_names:
                frees.setdefault(position, []).append(var)
        self._steps = [replace(step, frees=tuple(frees.get(position, ()))) for position, step in enumerate(steps)]

    @staticmethod
    def _bind(op: Operation, constants: dict, shadow_constants: dict, defined: set):
        """An op's arguments: constants (main and shadow forms), variables, lists mixing the two, and
        the names it reads."""
        args, shadow_args, var_args, list_args, reads = {}, {}, [], [], []
        for key, bindings in op.inputs.items():
            items = []  # (variable or None, constant, shadow constant)
            for binding in bindings:
                if isinstance(binding, InlineValue):
                    value = _compute_form(binding.value)
                    items.append((None, value, value))
                elif binding in constants:
                    items.append((None, constants[binding], shadow_constants[binding]))
                    reads.append(binding)
                elif binding in defined:
                    items.append((binding, None, None))
                    reads.append(binding)
                else:
                    raise ValueError(f"op {op.op_type} {op.name!r} reads {binding!r}, which nothing defines")
            if key in LIST_ARGUMENTS.get(op.op_type, ()) or len(items) != 1:
                if any(var is not None for var, _, _ in items):
                    list_args.append((key, tuple(items)))
                else:
                    args[key] = [value for _, value, _ in items]
                    shadow_args[key] = [value for _, _, value in items]
            elif items[0][0] is not None:
                var_args.append((key, items[0][0]))
            else:
                args[key], shadow_args[key] = items[0][1], items[0][2]
        return args, shadow_args, tuple(var_args), tuple(list_args), reads

    def _fold(self, step: _Step, constants: dict, shadow_constants: dict) -> None:
        """Evaluate an op on constants only, once: its outputs become constants (and its drift is fixed)."""
        op = step.op
        try:
            results = step.kernel(dict(step.args))
        except UnsupportedOpError:
            raise
        except Exception as e:
            raise RuntimeError(f"op {op.op_type} {op.name!r} failed: {e}") from e
        shadow_results = results if step.shadow_from_main or not self.is_fp16 else step.kernel(dict(step.shadow_args))
        for out, result, shadow_result in zip(step.outputs, results, shadow_results):
            value = _cast(result, out.dtype)
            constants[out.name] = _compute_form(value)
            shadow_constants[out.name] = _to_shadow(shadow_result, out.shadow_dtype)
            if out.name in self.output_names:
                self._constant_outputs[out.name] = value
            if self.is_fp16 and out.compared and isinstance(value, torch.Tensor):
                self._record(step, value, shadow_constants[out.name], self._folded_drifts, self._folded_nonfinite)

    @staticmethod
    def _record(step: _Step, fp16, fp32, drifts: list, nonfinite: list) -> None:
        if not fp16.is_floating_point():
            return
        departure = _departure(fp16, fp32)
        if departure is None:
            nonfinite.append((step.index, f"{step.op.op_type} {step.op.name}"))
        else:
            drifts.append((step.index, OpDrift(step.op.name, step.op.op_type, departure)))

    # ---- execution --------------------------------------------------------------------------------------

    def run(self, inputs: dict[str, np.ndarray], trace: bool = False, top: int = 5):
        """Outputs by name; with ``trace`` also an :class:`Fp16Report` from a lockstep fp32 shadow run."""
        with _intra_op_threads(self.num_threads), torch.no_grad():
            return self._run(inputs, trace and self.is_fp16, top)

    def _run(self, inputs: dict[str, np.ndarray], traced: bool, top: int):
        env: dict = {}
        shadow: dict | None = {} if traced else None
        for name, dtype_name in self.input_dtypes.items():
            if name not in inputs:
                raise ValueError(f"missing input {name!r}")
            t = torch.as_tensor(np.asarray(inputs[name]))
            want = _DTYPES.get(dtype_name, torch.float32)
            env[name] = t.to(want)
            if shadow is not None:
                shadow[name] = t.to(torch.float32 if want == torch.float16 else want)
        drifts: list[tuple[int, OpDrift]] = []
        nonfinite: list[tuple[int, str]] = []
        for step in self._steps:
            args = step.args.copy()
            for key, var in step.var_args:
                args[key] = env[var]
            for key, items in step.list_args:
                args[key] = [env[var] if var is not None else value for var, value, _ in items]
            try:
                results = step.kernel(args)
            except UnsupportedOpError:
                raise
            except Exception as e:
                raise RuntimeError(f"op {step.op.op_type} {step.op.name!r} failed: {e}") from e
            for out, result in zip(step.outputs, results):
                env[out.name] = _cast(result, out.dtype)
            if shadow is not None:
                if not step.shadow_from_main:
                    args = step.shadow_args.copy()
                    for key, var in step.var_args:
                        args[key] = shadow[var]
                    for key, items in step.list_args:
                        args[key] = [shadow[var] if var is not None else value for var, _, value in items]
                    results = step.kernel(args)
                for out, result in zip(step.outputs, results):
                    shadow[out.name] = _to_shadow(result, out.shadow_dtype)
                    if out.compared and isinstance(env[out.name], torch.Tensor):
                        self._record(step, env[out.name], shadow[out.name], drifts, nonfinite)
                for var in step.frees:
                    del shadow[var]
            for var in step.frees:
                del env[var]
        outputs = {name: env[name] if name in env else self._constant_outputs[name] for name in self.output_names}
        if shadow is None:
            return outputs, None
        nonfinite += self._folded_nonfinite
        in_op_order = [drift for _, drift in heapq.merge(self._folded_drifts, drifts, key=lambda entry: entry[0])]
        report = Fp16Report(
            first_nonfinite=min(nonfinite)[1] if nonfinite else None,
            nonfinite_ops=len(nonfinite),
            worst=sorted(in_op_order, key=lambda d: -d.rel_error)[:top],
        )
        return outputs, report
