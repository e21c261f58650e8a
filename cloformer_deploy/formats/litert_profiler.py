"""LiteRT's own per-operator profiler, through LiteRT's C API in the wheel's ``libLiteRt.so`` (ctypes).

LiteRT's Python API (``Interpreter``, ``CompiledModel``) has no profiler. The C API in the same wheel has
one, but no package ships its headers, so the few functions used here are declared with ctypes, following
LiteRT's public headers (``litert/c/litert_*.h``) for the pinned ai-edge-litert. A compiled model made with
the runtime option ``enable_profiling`` records, per run:

- one event per XNNPACK operator (``DELEGATE_PROFILED_OPERATOR_INVOKE_EVENT``), tagged with XNNPACK's
  operator name and numbered within its partition;
- one event per node LiteRT runs itself, outside XNNPACK (``OPERATOR_INVOKE_EVENT``), tagged with the
  builtin operator's name and numbered by its node index.

Events come in execution order, so a partition ends where a node outside XNNPACK runs or XNNPACK's
numbering starts again. The compiled model runs the same XNNPACK as the interpreter that validates and
times the ``.tflite`` (its CPU accelerator), with the same partitions; tests check both.
"""

from __future__ import annotations

import ctypes
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..quiet import quiet_libraries
from .profiling import WARMUP_RUNS, OpTime, batches, check_counts, medians

_OK = 0
_CPU = 1  # kLiteRtHwAcceleratorCpu
_RUNTIME_OPTIONS = b"runtime_options_string"  # LrtGetRuntimeOptionsIdentifier(): a TOML payload
_CPU_OPTIONS = b"xnnpack"  # LrtGetCpuOptionsIdentifier(): a TOML payload
_OPERATOR = 1 << 1  # OPERATOR_INVOKE_EVENT: a node LiteRT runs with its own kernel
_DELEGATE_OPERATOR = 1 << 3  # DELEGATE_PROFILED_OPERATOR_INVOKE_EVENT: an operator inside XNNPACK
_ALIGNMENT = 64  # LiteRT's host-memory buffers are 64-byte aligned
_TENSOR_TYPE_BYTES = 72  # LiteRtRankedTensorType: element type, then LiteRtLayout (rank bits, 8 dims, 8 strides)

_Handle = ctypes.c_void_p
# LiteRtStatus values a call here can return (the library exports no function that names them)
_STATUS = {
    1: "invalid argument",
    2: "memory allocation failure",
    3: "runtime failure",
    4: "missing input tensor",
    5: "unsupported",
    6: "not found",
    9: "unknown error",
    500: "file I/O error",
    501: "invalid flatbuffer",
    504: "compilation failed",
}


class _Any(ctypes.Structure):  # LiteRtAny holding an integer
    _fields_ = [("type", ctypes.c_int), ("value", ctypes.c_int64)]


class _EnvOption(ctypes.Structure):  # LiteRtEnvOption
    _fields_ = [("tag", ctypes.c_int), ("value", _Any)]


_ANY_INT = 2  # kLiteRtAnyTypeInt
_AUTO_REGISTER = 24  # kLiteRtEnvOptionTagAutoRegisterAccelerators: which accelerators to look for
_MIN_LOG_SEVERITY = 25  # kLiteRtEnvOptionTagMinLoggerSeverity
_WARNING = 2  # kLiteRtLogSeverityWarning


class _MemoryUsage(ctypes.Structure):
    _fields_ = [("total", ctypes.c_size_t), ("in_use", ctypes.c_size_t), ("private", ctypes.c_size_t)]


class _Event(ctypes.Structure):  # ProfiledEventData
    _fields_ = [
        ("tag", ctypes.c_char_p),
        ("event_type", ctypes.c_int),
        ("start_us", ctypes.c_uint64),
        ("elapsed_us", ctypes.c_uint64),
        ("begin_memory", _MemoryUsage),
        ("end_memory", _MemoryUsage),
        ("metadata1", ctypes.c_uint64),
        ("metadata2", ctypes.c_uint64),
        ("source", ctypes.c_int),
    ]


def _library() -> ctypes.CDLL:
    import ai_edge_litert

    path = os.path.join(os.path.dirname(ai_edge_litert.__file__), "libLiteRt.so")
    if not os.path.exists(path):
        raise RuntimeError(f"ai-edge-litert ships no libLiteRt.so at {path}: LiteRT's profiler needs its C API")
    lib = ctypes.CDLL(path)
    for name in ("LiteRtCreateCompiledModel", "LiteRtCompiledModelGetProfiler", "LiteRtGetProfilerEvents"):
        if not hasattr(lib, name):
            raise RuntimeError(f"{path} has no {name}: this ai-edge-litert is not the one the project pins")
    return lib


class ProfiledModel:
    """A ``.tflite`` compiled by LiteRT's C API for the CPU (XNNPACK), with ``threads`` threads and profiling on.

    ``run`` runs one NHWC float32 batch; ``events`` runs it with the profiler recording and returns the
    run's events as (kind of event, tag, number, µs).
    """

    def __init__(self, path: Path | str, threads: int):
        self._lib = _library()
        self._owned: list[tuple[str, _Handle]] = []  # (destroy function, handle), destroyed in reverse
        try:
            self._open(str(path), threads)
        except BaseException:
            self.close()
            raise

    def _call(self, function: str, *args) -> None:
        status = getattr(self._lib, function)(*args)
        if status != _OK:
            raise RuntimeError(f"LiteRT's {function} failed: {_STATUS.get(status, 'status')} ({status})")

    def _new(self, create: str, destroy: str | None, *args) -> _Handle:
        handle = _Handle()
        self._call(create, *args, ctypes.byref(handle))
        if destroy:
            self._owned.append((destroy, handle))
        return handle

    def _open(self, path: str, threads: int) -> None:
        # the CPU only (no search for GPU and NPU libraries) and no informational log lines
        env_options = (_EnvOption * 2)(
            _EnvOption(_AUTO_REGISTER, _Any(_ANY_INT, _CPU)), _EnvOption(_MIN_LOG_SEVERITY, _Any(_ANY_INT, _WARNING))
        )
        env = self._new("LiteRtCreateEnvironment", "LiteRtDestroyEnvironment", ctypes.c_int(2), env_options)
        model = self._new("LiteRtCreateModelFromFile", "LiteRtDestroyModel", env, path.encode())
        options = self._new("LiteRtCreateOptions", "LiteRtDestroyOptions")
        self._call("LiteRtSetOptionsHardwareAccelerators", options, ctypes.c_int(_CPU))
        libc = ctypes.CDLL(None)
        libc.strdup.restype, libc.strdup.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
        free = ctypes.cast(libc.free, ctypes.c_void_p)
        for identifier, toml in (
            (_RUNTIME_OPTIONS, "enable_profiling = true\n"),
            (_CPU_OPTIONS, f"num_threads = {threads}\n"),
        ):
            # the options own the payload from here and free it with libc's free
            payload = ctypes.c_void_p(libc.strdup(toml.encode()))
            opaque = self._new("LiteRtCreateOpaqueOptions", None, identifier, payload, free)
            self._call("LiteRtAddOpaqueOptions", options, opaque)
        self._compiled = self._new("LiteRtCreateCompiledModel", "LiteRtDestroyCompiledModel", env, model, options)
        signature = self._new("LiteRtGetModelSignature", None, model, ctypes.c_size_t(0))
        self.input, input_type = self._host_tensor(signature, "LiteRtGetSignatureInputTensorByIndex")
        self.output, output_type = self._host_tensor(signature, "LiteRtGetSignatureOutputTensorByIndex")
        self._inputs = (_Handle * 1)(self._buffer(input_type, self.input))
        self._outputs = (_Handle * 1)(self._buffer(output_type, self.output))
        self._profiler = self._new("LiteRtCompiledModelGetProfiler", None, self._compiled)

    def _host_tensor(self, signature: _Handle, getter: str) -> tuple[np.ndarray, ctypes.Array]:
        """A 64-byte aligned float32 array of the signature's first input or output, and its tensor type."""
        tensor = self._new(getter, None, signature, ctypes.c_size_t(0))
        tensor_type = (ctypes.c_uint8 * _TENSOR_TYPE_BYTES)()
        self._call("LiteRtGetRankedTensorType", tensor, tensor_type)
        element, rank = int.from_bytes(bytes(tensor_type[0:4]), "little"), tensor_type[4] & 0x7F
        if element != 1:  # kLiteRtElementTypeFloat32
            raise RuntimeError(f"the model's tensor has LiteRT element type {element}, not float32")
        shape = tuple(np.frombuffer(bytes(tensor_type[8 : 8 + 4 * rank]), dtype=np.int32).tolist())
        count = int(np.prod(shape))
        raw = np.zeros(count + _ALIGNMENT // 4, dtype=np.float32)
        start = (-raw.ctypes.data % _ALIGNMENT) // 4
        return raw[start : start + count].reshape(shape), tensor_type

    def _buffer(self, tensor_type: ctypes.Array, array: np.ndarray) -> _Handle:
        return self._new(
            "LiteRtCreateTensorBufferFromHostMemory",
            "LiteRtDestroyTensorBuffer",
            tensor_type,
            ctypes.c_void_p(array.ctypes.data),
            ctypes.c_size_t(array.nbytes),
            None,
        )

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.input[...] = batch
        self._call(
            "LiteRtRunCompiledModel",
            self._compiled,
            ctypes.c_size_t(0),
            ctypes.c_size_t(1),
            self._inputs,
            ctypes.c_size_t(1),
            self._outputs,
        )
        return self.output.copy()

    def events(self, batch: np.ndarray) -> list[tuple[int, str, int, int]]:
        self._call("LiteRtResetProfiler", self._profiler)
        self._call("LiteRtStartProfiler", self._profiler)
        try:
            self.run(batch)
        finally:
            self._call("LiteRtStopProfiler", self._profiler)
        count = ctypes.c_int()
        self._call("LiteRtGetNumProfilerEvents", self._profiler, ctypes.byref(count))
        events = (_Event * max(count.value, 1))()
        if count.value:
            self._call("LiteRtGetProfilerEvents", self._profiler, count, events)
        return [
            (e.event_type, (e.tag or b"?").decode(errors="replace"), int(e.metadata1), int(e.elapsed_us))
            for e in events[: count.value]
        ]

    def close(self) -> None:
        while self._owned:
            destroy, handle = self._owned.pop()
            getattr(self._lib, destroy)(handle)

    def __enter__(self) -> ProfiledModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_ops(events: list[tuple[int, str, int, int]]) -> dict[tuple[str, str], float]:
    """One run's events as {(operator instance, kind): ms}, named like ExecuTorch's rows.

    An XNNPACK operator is "<XNNPACK name> #<n> in partition <k>"; a node outside XNNPACK is
    "<builtin> (node <index>)", of kind "<builtin> (not delegated)". Other events (the whole invoke,
    buffer registration, telemetry) are not operators and are left out.
    """
    times: dict[tuple[str, str], float] = defaultdict(float)
    partition, previous = 0, None  # previous: the number of the XNNPACK operator just before, if any
    for kind, tag, number, micros in events:
        if kind == _DELEGATE_OPERATOR:
            if previous is None or number <= previous:
                partition += 1
            times[(f"{tag} #{number} in partition {partition}", tag)] += micros / 1000
            previous = number
        elif kind == _OPERATOR:
            times[(f"{tag} (node {number})", f"{tag} (not delegated)")] += micros / 1000
            previous = None
    return times


def profile_litert(path: str | Path, images: np.ndarray, threads: int, runs: int) -> list[OpTime]:
    """Per-operator times of a .tflite in LiteRT (XNNPACK) with ``threads`` threads, ``runs`` profiled runs.

    ``images`` are NCHW, as for every format; they are fed in the model's NHWC layout.
    """
    check_counts(threads, runs)
    with quiet_libraries(), ProfiledModel(path, threads) as model:
        nhwc = [np.ascontiguousarray(b.transpose(0, 2, 3, 1)) for b in batches(images, model.input.shape[0])]
        for i in range(WARMUP_RUNS):
            model.run(nhwc[i % len(nhwc)])
        samples = [run_ops(model.events(nhwc[i % len(nhwc)])) for i in range(runs)]
    if not any(samples):
        raise ValueError("LiteRT's profiler recorded no operator")
    return medians(samples, [])
