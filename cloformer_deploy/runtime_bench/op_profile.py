"""Where one inference's time goes: per-operator times from the runtimes' own profilers, as Markdown tables.

ExecuTorch: the program runs with ETDump enabled and the Inspector reads the dump. XNNPACK reports
the operators of each partition under its own names ("Convolution (NHWC, F32) IGEMM #2", numbered per
partition), timed by XNNPACK itself as the intervals between consecutive operators' ends (a clock
read per operator, no other cost inside them); a kernel left outside any partition reports as
"native_call_<kernel>", whose dispatch ("OPERATOR_CALL" around it) is not counted.

ONNX Runtime: its profiler's "<node>_kernel_time" events, after its graph optimisations (fused nodes,
NCHWc layout reorders). That span also holds the profiler's own bookkeeping (it formats every input
and output shape as text): 3-5 µs per node on the development machine, as much as a small Add or
Reshape takes, 8-11% of CloFormer-XXS's kernel time at 1 thread. That cost is measured on a chain
of trivial nodes in a session opened the same way and taken off every node, so that kinds with
many cheap nodes are not overstated.

Only operators are listed. Time around them (entering an XNNPACK partition, ONNX Runtime's executor,
the profilers' event recording) is in no row, and XNNPACK and ONNX Runtime count whole microseconds
(rounded down) per operator, so an operator under 1 µs shows as 0: the sum of the rows is a little
below the end-to-end latency.
"""
from __future__ import annotations

import bisect
import io
import json
import os
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..quiet import NATIVE_NOISE, quiet_libraries

WARMUP_RUNS = 2  # executions run first and left out (lazy initialisation, arena growth, cold caches)
CALIBRATION_NODES = 64  # trivial nodes whose profiled time is ONNX Runtime's profiler cost per node

# ExecuTorch's threadpool says so on every reset; quiet.NATIVE_NOISE knows only cpuinfo's lines
_THREADPOOL_NOISE = re.compile(r"^\[threadpool\.cpp:\d+\] Resetting threadpool to \d+ threads\.?\s*$")
_XNNPACK_NUMBER = re.compile(r" #\d+$")  # XNNPACK numbers the operators of a type within one partition
_ET_FRAMEWORK = {"Method::init", "Program::load_method", "Method::execute", "DELEGATE_CALL", "OPERATOR_CALL"}


@dataclass
class OpTime:
    name: str  # one operator instance of the graph that runs
    kind: str  # its operator type: XNNPACK's ("Convolution (NHWC, F32) IGEMM"), ONNX Runtime's ("Conv")
    median_ms: float  # median over the profiled runs of this instance's time in one run
    calls: int = 1  # times it runs in one inference


def profile_executorch(path: str, images: np.ndarray, threads: int, runs: int) -> list[OpTime]:
    """Per-operator times of a .pte run by the ExecuTorch runtime with ``threads`` threads, ``runs`` runs.

    The thread count is ExecuTorch's process-wide threadpool: it is set for the profile and set back
    after, so nothing else in this process should run ExecuTorch meanwhile.
    """
    _check(threads, runs)
    with quiet_libraries(), tempfile.TemporaryDirectory(prefix="cloformer-etdump-") as tmp:
        etdump = os.path.join(tmp, "profile.etdp")
        with _native_noise_dropped():
            import torch
            from executorch.extension.pybindings import portable_lib

            before = portable_lib._threadpool_get_thread_count()
            if before != threads:
                portable_lib._unsafe_reset_threadpool(threads)
            try:
                module = portable_lib._load_for_executorch(str(path), enable_etdump=True)
                meta = module.method_meta("forward").input_tensor_meta(0)
                dtype = {5: np.float16}.get(meta.dtype(), np.float32)  # an fp16 program takes fp16 images
                inputs = [torch.from_numpy(b.astype(dtype)) for b in _batches(images, meta.sizes()[0])]
                for i in range(WARMUP_RUNS + runs):
                    module.forward([inputs[i % len(inputs)]])
                module.write_etdump_result_to_file(etdump)
                del module
            finally:
                if before != threads:
                    portable_lib._unsafe_reset_threadpool(before)
        from executorch.devtools import Inspector

        blocks = Inspector(etdump_path=etdump).event_blocks
    return _executorch_ops(blocks, WARMUP_RUNS)


def profile_onnxruntime(path: str, images: np.ndarray, threads: int, runs: int) -> list[OpTime]:
    """Per-node times of an .onnx run by ONNX Runtime's CPU provider with ``threads`` threads, ``runs`` runs.

    Each node's time is net of the profiler's own cost per node (see the module's docstring).
    """
    _check(threads, runs)
    with quiet_libraries(), tempfile.TemporaryDirectory(prefix="cloformer-ortprof-") as tmp:
        events = _ort_profile(str(path), threads, os.path.join(tmp, "model"), WARMUP_RUNS + runs,
                              lambda s: _batches(images, _input_batch(s, len(images))))
        calibration = _ort_profile(_trivial_chain(CALIBRATION_NODES), threads, os.path.join(tmp, "calibration"),
                                   WARMUP_RUNS + 5, lambda s: [np.zeros((1, 1, 1, 1), np.float32)])
    per_node = statistics.median(e["dur"] for e in _kernel_events(calibration, WARMUP_RUNS)) / 1e3
    return _onnxruntime_ops(events, WARMUP_RUNS, per_node)


def op_tables(ops: list[OpTime], top: int = 15) -> str:
    """Markdown: time per operator kind, the ``top`` slowest operator instances, and what the times add up to."""
    total = sum(o.median_ms for o in ops)

    def share(ms: float) -> str:
        return f"{ms / total:.1%}" if total > 0 else "-"

    kinds: dict[str, list[OpTime]] = defaultdict(list)
    for o in ops:
        kinds[o.kind].append(o)
    by_kind = sorted(kinds.items(), key=lambda kv: (-sum(o.median_ms for o in kv[1]), kv[0]))
    lines = ["| op kind | ms per run | share | instances |", "|---|---:|---:|---:|"]
    for kind, members in by_kind:
        ms = sum(o.median_ms for o in members)
        lines.append(f"| {_cell(kind)} | {ms:.3f} | {share(ms)} | {len(members)} |")
    slowest = sorted(ops, key=lambda o: (-o.median_ms, o.name))[:top]
    lines += ["", f"Slowest {len(slowest)} of {len(ops)} ops:", "",
              "| op | kind | ms per run | share | calls per run |", "|---|---|---:|---:|---:|"]
    lines += [f"| {_cell(o.name)} | {_cell(o.kind)} | {o.median_ms:.3f} | {share(o.median_ms)} | {o.calls} |"
              for o in slowest]
    lines += ["", f"The op times add up to {total:.3f} ms per run (each op's median over the profiled runs). "
                  f"Time the runtime spends between and around ops is in no row, so the end-to-end latency "
                  f"is somewhat higher."]
    return "\n".join(lines) + "\n"


def _executorch_ops(blocks, warmup: int) -> list[OpTime]:
    """OpTimes from an ExecuTorch Inspector's event blocks (one "Execute" block per distinct run pattern).

    Within a block every event has one time per run (``perf_data.raw``, in ms), in run order; runs
    are put in time order by the start of their Method::execute and the first ``warmup`` dropped.
    """
    runs = []  # per execution: (start, [(event, ms)])
    for block in blocks:
        if block.name != "Execute":
            continue
        timed = [e for e in block.events if e.perf_data is not None]
        execute = next((e for e in timed if e.name == "Method::execute"), None)
        if execute is None:
            continue
        for r, start in enumerate(execute.start_time):
            runs.append((start, [(e, e.perf_data.raw[r]) for e in timed if len(e.perf_data.raw) > r]))
    runs.sort(key=lambda run: run[0])
    runs = [events for _, events in runs[warmup:]]
    if not runs:
        raise ValueError("the ETDump holds no execution after the warm-up")
    # the instruction that calls a delegate or a kernel; the Inspector has no public accessor for it
    partitions = sorted({e._instruction_id for run in runs for e, _ in run if e.name == "DELEGATE_CALL"})
    partition = {iid: k for k, iid in enumerate(partitions, 1)}
    samples = []
    for run in runs:
        times: dict[tuple[str, str], float] = defaultdict(float)
        for e, ms in run:
            if e.is_delegated_op:  # named by its delegate debug identifier: XNNPACK's "<type> #<n>"
                times[(f"{e.name} in partition {partition.get(e._instruction_id, '?')}",
                       _XNNPACK_NUMBER.sub("", e.name))] += ms
            elif e.name not in _ET_FRAMEWORK:  # a kernel outside any delegate: native_call_<kernel>
                kernel = e.name.removeprefix("native_call_")
                times[(f"{kernel} (instruction {e._instruction_id})", f"{kernel} (not delegated)")] += ms
        samples.append(times)
    return _medians(samples, [])


def _ort_profile(model: str | bytes, threads: int, prefix: str, runs: int, batches) -> list[dict]:
    """ONNX Runtime's profile events of ``runs`` runs of ``model``, opened as the benchmark's worker does."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    opts.enable_profiling = True
    opts.profile_file_prefix = prefix
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    try:
        name = session.get_inputs()[0].name
        inputs = batches(session)
        for i in range(runs):
            session.run(None, {name: inputs[i % len(inputs)]})
        return json.loads(Path(session.end_profiling()).read_text())
    finally:
        del session  # the profiler holds its file open until the session goes


def _input_batch(session, available: int) -> int:
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) else available  # a symbolic batch takes all the images at once


def _trivial_chain(n: int) -> bytes:
    """An ONNX model of ``n`` Adds of one-element tensors: its node times are the profiler's cost alone."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Add", ["x" if i == 0 else f"t{i - 1}", "c"], [f"t{i}"], name=f"add{i}")
             for i in range(n)]
    shape = [1, 1, 1, 1]  # rank 4 like the image models' tensors: the profiler formats every shape as text
    graph = helper.make_graph(nodes, "profiler_cost", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(f"t{n - 1}", TensorProto.FLOAT, shape)],
                              [numpy_helper.from_array(np.zeros(shape, np.float32), "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


def _kernel_events(events: list[dict], warmup: int) -> list[dict]:
    """The node events of the runs after the first ``warmup``, each with the index of its run."""
    model_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e["ts"])[warmup:]
    if not model_runs:
        raise ValueError("the ONNX Runtime profile holds no run after the warm-up")
    starts = [e["ts"] for e in model_runs]
    out = []
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        r = bisect.bisect_right(starts, e["ts"]) - 1
        if r >= 0 and e["ts"] <= starts[r] + model_runs[r]["dur"]:  # else: a warm-up run's node
            out.append({**e, "run": r})
    return out


def _onnxruntime_ops(events: list[dict], warmup: int, per_node_ms: float) -> list[OpTime]:
    """OpTimes from ONNX Runtime's profile (Chrome trace events, µs), ``per_node_ms`` off every node."""
    nodes = _kernel_events(events, warmup)
    n_runs = max((e["run"] for e in nodes), default=-1) + 1
    samples = [defaultdict(float) for _ in range(n_runs)]
    counts = [defaultdict(int) for _ in range(n_runs)]
    for e in nodes:
        key = (e["name"].removesuffix("_kernel_time"), e.get("args", {}).get("op_name", "?"))
        samples[e["run"]][key] += max(e["dur"] / 1e3 - per_node_ms, 0.0)
        counts[e["run"]][key] += 1
    return _medians(samples, counts)


def _medians(samples: list[dict], counts: list[dict]) -> list[OpTime]:
    """One OpTime per (name, kind) seen in any run, in order of first appearance; a run without it counts 0."""
    keys = list(dict.fromkeys(k for run in samples for k in run))
    out = []
    for key in keys:
        calls = max((c.get(key, 0) for c in counts), default=1) or 1
        out.append(OpTime(key[0], key[1], statistics.median(run.get(key, 0.0) for run in samples), calls))
    return out


def _batches(images: np.ndarray, batch: int) -> list[np.ndarray]:
    """The images as consecutive batches of the artifact's fixed batch size, each C-contiguous float32."""
    if images.ndim != 4 or len(images) < batch:
        raise ValueError(f"images must be (N, C, H, W) with N >= {batch} (the artifact's batch); got {images.shape}")
    return [np.ascontiguousarray(images[i:i + batch], dtype=np.float32)
            for i in range(0, len(images) - batch + 1, batch)]


def _check(threads: int, runs: int) -> None:
    if threads < 1 or runs < 1:
        raise ValueError(f"threads and runs must be at least 1 (got {threads}, {runs})")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


@contextmanager
def _native_noise_dropped():
    """Hold ExecuTorch's log lines while its native code runs; then pass on all but its noise.

    ExecuTorch logs every threadpool reset (and cpuinfo's probing, once) through std::cerr, which
    its Python bindings send to ``sys.stderr`` during a call and which is file descriptor 2 outside
    one: both are held. A real error still shows, after the call that logged it.
    """
    held_text, previous = io.StringIO(), sys.stderr
    try:
        fd = sys.__stderr__.fileno()
    except (AttributeError, ValueError, OSError):  # no real stderr (embedded interpreter)
        fd = None
    with tempfile.TemporaryFile() as held_fd:  # unlinked at once: nothing stays on disk
        if fd is not None:
            sys.__stderr__.flush()
            saved = os.dup(fd)
            os.dup2(held_fd.fileno(), fd)
        sys.stderr = held_text
        try:
            yield
        finally:
            sys.stderr = previous
            if fd is not None:
                sys.__stderr__.flush()
                os.dup2(saved, fd)
                os.close(saved)
                held_fd.seek(0)
                for line in held_fd.read().decode(errors="replace").splitlines(keepends=True):
                    if not _noise(line):
                        os.write(fd, line.encode())
            kept = [line for line in held_text.getvalue().splitlines(keepends=True) if not _noise(line)]
            if kept:
                previous.write("".join(kept))
                previous.flush()


def _noise(line: str) -> bool:
    return bool(NATIVE_NOISE.match(line) or _THREADPOOL_NOISE.match(line))


# runtime -> its profiler: the benchmark looks a runtime up here instead of naming one
PROFILERS = {"onnxruntime": profile_onnxruntime, "executorch-xnnpack": profile_executorch}
