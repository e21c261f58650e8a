"""ONNX: torch.onnx export of the deploy form, simplified with onnxsim, run by ONNX Runtime.

Profiles: ONNX Runtime's profiler's "<node>_kernel_time" events, after its graph optimisations (fused nodes,
NCHWc layout reorders). That span also holds the profiler's own bookkeeping (it formats every input
and output shape as text), as much as a small Add or Reshape takes. That cost is measured on a chain
of trivial nodes in a session opened the same way and taken off every node, so that kinds with
many cheap nodes are not overstated.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import statistics
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..images import ImageBatch
from ..inputs import whole_number
from ..options import option
from ..quiet import quiet_libraries
from .base import (
    STORAGE_TYPES,
    Backend,
    BenchRuntime,
    ExportJob,
    ExposedBlocks,
    ModelSpec,
    NativeRunner,
    Runner,
    register,
    storage_totals,
)
from .profiling import WARMUP_RUNS, OpTime, batches, check_counts, medians

# opset 20 has a native Gelu: ONNX Runtime runs CloFormer-XXS 16% faster than with opset 18's
# Erf decomposition (8.9 vs 10.6 ms, 1 thread, measured here); ONNX Runtime 1.17+ reads it
DEFAULT_OPSET = 20
MIN_OPSET = 17
MAX_OPSET = 23  # the newest opset ONNX Runtime 1.20 (the oldest we admit) reads
DYNAMO_MIN_OPSET = 18  # below this the dynamo exporter's down-conversion fails on ReduceMean


class OnnxRunner(Runner):
    method = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: ImageBatch) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch.tensor})[0].astype(np.float32)

    def run_outputs(self, batch: ImageBatch) -> list[np.ndarray]:
        return [np.asarray(o, np.float32) for o in self.session.run(None, {self.input_name: batch.tensor})]

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"method": self.method, "providers": self.session.get_providers(), "onnxruntime": ort.__version__}


def _metadata(job: ExportJob) -> dict[str, str]:
    import torch

    s = job.spec
    return {
        "model": s.name,
        "num_classes": str(s.num_classes),
        "input_size": f"{s.input_size[0]}x{s.input_size[1]}",
        "batch": str(s.batch),
        "mean": json.dumps(list(s.mean)),
        "std": json.dumps(list(s.std)),
        "layout": "NCHW float32, RGB, (x/255 - mean) / std",
        "labels": json.dumps(s.labels or []),
        "weights_sha256": s.weights_sha256 or "random-init",
        "precision": job.precision,
        "versions": json.dumps({"torch": torch.__version__, **OnnxBackend().versions()}),
    }


CALIBRATION_NODES = 64  # trivial nodes whose profiled time is ONNX Runtime's profiler cost per node


def profile_onnxruntime(path: str, images: np.ndarray, threads: int, runs: int) -> list[OpTime]:
    """Per-node times of an .onnx run by ONNX Runtime's CPU provider with ``threads`` threads, ``runs`` runs.

    Each node's time is net of the profiler's own cost per node (see the module's docstring).
    """
    check_counts(threads, runs)
    with quiet_libraries(), tempfile.TemporaryDirectory(prefix="cloformer-ortprof-") as tmp:
        events = _ort_profile(
            str(path),
            threads,
            os.path.join(tmp, "model"),
            WARMUP_RUNS + runs,
            lambda s: batches(images, _input_batch(s, len(images))),
        )
        calibration = _ort_profile(
            _trivial_chain(CALIBRATION_NODES),
            threads,
            os.path.join(tmp, "calibration"),
            WARMUP_RUNS + 5,
            lambda s: [np.zeros((1, 1, 1, 1), np.float32)],
        )
    per_node = statistics.median(e["dur"] for e in _kernel_events(calibration, WARMUP_RUNS)) / 1e3
    return _onnxruntime_ops(events, WARMUP_RUNS, per_node)


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

    nodes = [
        helper.make_node("Add", ["x" if i == 0 else f"t{i - 1}", "c"], [f"t{i}"], name=f"add{i}") for i in range(n)
    ]
    shape = [1, 1, 1, 1]  # rank 4 like the image models' tensors: the profiler formats every shape as text
    graph = helper.make_graph(
        nodes,
        "profiler_cost",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(f"t{n - 1}", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.zeros(shape, np.float32), "c")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


def _kernel_events(events: list[dict], warmup: int) -> list[dict]:
    """The node events of the runs after the first ``warmup``, each with the index of its run."""
    model_runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"]
    )[warmup:]
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
    return medians(samples, counts)


@register
class OnnxBackend(Backend):
    name = "onnx"
    suffix = ".onnx"
    runtime = "ONNX Runtime"
    bench_runtimes = (BenchRuntime("onnxruntime", "ORT", "ONNX Runtime", aliases=("onnx",), peers=True, position=10),)
    device_packages = ("onnxruntime",)
    native_runner = NativeRunner(
        "onnxruntime_runner.cpp",
        "onnxruntime",
        libraries=("capi/libonnxruntime.so.*",),
        # the wheel has the C API's library but not its header; Debian's package of an older release has it, and
        # the library serves every older API version
        debian_headers=("libonnxruntime-dev", "trixie", "usr/include/onnxruntime"),
    )
    summary = "a .onnx file for ONNX Runtime (Android, iOS, desktop)"
    # what its export records in a manifest entry, as JSON Schema (assembled into the published schema)
    manifest_facts = {
        "opset": {
            "type": "integer",
            "minimum": 1,
            "description": "ONNX: opset of the graph; the ONNX Runtime an app ships must support it.",
        },
        "simplified": {"type": "boolean", "description": "ONNX: true when onnxsim simplified the graph."},
        "simplify_error": {
            "type": "string",
            "description": "ONNX: why onnxsim failed (the unsimplified graph was kept).",
        },
        "fp32_nodes_in_fp16_graph": {
            "type": "integer",
            "minimum": 0,
            "description": "ONNX fp16: nodes kept float32 (the norms' statistics, which "
            "overflow fp16). Input and output stay float32.",
        },
        "quantization": {
            "type": "object",
            "additionalProperties": True,
            "description": "ONNX int8: how the graph was quantised.",
            "properties": {
                "format": {
                    "type": "string",
                    "description": "`QDQ`: QuantizeLinear/DequantizeLinear pairs around float ops.",
                },
                "weights": {
                    "type": "string",
                    "description": "How weights are quantised, e.g. int8 per-channel symmetric.",
                },
                "activations": {"type": "string", "description": "How activations are quantised and calibrated."},
                "excluded_nodes": {"type": "integer", "minimum": 0, "description": "Nodes left float (--keep-float)."},
            },
        },
        "nodes": {"type": "integer", "minimum": 0, "description": "ONNX: number of nodes in the graph."},
        "op_types": {
            "type": "object",
            "additionalProperties": {"type": "integer", "minimum": 0},
            "description": "ONNX: nodes per operator type: the kernels a reduced-operator ONNX Runtime build needs.",
            "propertyNames": {"description": "operator name"},
        },
    }
    manifest_required = ("opset", "simplified", "nodes", "op_types")
    runner_methods = ("onnxruntime",)
    profiler = "ONNX Runtime's session profiler, net of its own cost per node"
    label = "ONNX"
    position = 10
    options = {
        "opset": option(
            None,
            f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET}, native GELU; 17 uses "
            "the TorchScript exporter)",
            check=lambda flag, v: whole_number(flag, v, MIN_OPSET, MAX_OPSET),
        ),
        "no_simplify": option(False, "skip onnxsim"),
    }
    precisions = ("fp32", "fp16", "int8")

    def deploy_steps(self, precision: str, options: dict):
        from ..models.deploy import UNMERGED_STEPS

        if precision == "int8":
            return None
        # merged projections cost ONNX Runtime 0.3 ms on CloFormer-XXS at 1 thread (interleaved A/B, faster
        # unmerged in 10 of 12 rounds): the channel slices after a merged convolution force layout reorders
        # around its NCHWc kernels. The norms' mean is one ReduceMean instead of two and a Reshape.
        return list(UNMERGED_STEPS), ["single_reduce_norm"]

    def versions(self) -> dict[str, str]:
        import onnx
        import onnxruntime

        out = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
        try:
            import onnxsim

            out["onnxsim"] = onnxsim.__version__
        except ImportError:
            pass
        return out

    def export(self, job: ExportJob, path: Path, log: Callable[[str], None]) -> dict:
        import onnx

        opset = int(job.options.get("opset") or DEFAULT_OPSET)
        log(f"torch.onnx export (opset {opset})")
        model = self._to_onnx(job, opset)
        info: dict = {"opset": opset, "simplified": False}
        if not job.options.get("no_simplify", False):
            try:
                import onnxsim

                log("onnxsim")
                simplified, ok = onnxsim.simplify(model)
                if not ok:
                    raise RuntimeError("onnxsim could not check the simplified graph")
                model, info["simplified"] = simplified, True
            except Exception as e:  # a simplifier failure must not lose a correct graph
                info["simplify_error"] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                log(f"onnxsim failed ({info['simplify_error']}); keeping the unsimplified graph")
        if job.precision == "fp16":
            model, info["fp32_nodes_in_fp16_graph"] = to_fp16(model)
        elif job.precision == "int8":
            model, info["quantization"] = quantize_static_qdq(model, job, log)
        del model.metadata_props[:]
        for k, v in _metadata(job).items():
            model.metadata_props.add(key=k, value=v)
        model.producer_name = "cloformer-deploy"
        onnx.checker.check_model(model, full_check=True)
        shape_ops = [n.name for n in model.graph.node if n.op_type == "Shape"]
        if shape_ops:
            raise RuntimeError(f"the ONNX graph still computes shapes at run time ({len(shape_ops)} Shape ops)")
        onnx.save(model, str(path))
        info["nodes"] = len(model.graph.node)
        info["op_types"] = dict(sorted(_count_ops(model).items()))
        return info

    @staticmethod
    def _to_onnx(job: ExportJob, opset: int):
        import onnx
        import torch

        kwargs = dict(input_names=["input"], output_names=["logits"], opset_version=opset)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if opset >= DYNAMO_MIN_OPSET:
                prog = torch.onnx.export(job.module, (job.example,), dynamo=True, verbose=False, **kwargs)
                return prog.model_proto
            # opset 17: the dynamo exporter's down-conversion fails on ReduceMean; the TorchScript exporter works
            buf = io.BytesIO()
            torch.onnx.export(job.module, (job.example,), buf, dynamo=False, **kwargs)
            return onnx.load_from_string(buf.getvalue())

    def expose_blocks(self, path, job, paths, folder, log) -> ExposedBlocks:
        """The shipped graph with the boundaries' values added as outputs. Which value ends a block is read from
        the exporter's own scopes: the graph is exported once more (not simplified), and a block's boundary is the
        last value made inside the block's scope that a node outside it reads. The shipped graph keeps the
        exporter's value names; where the simplifier removed a value, the one the next block's node reads in its
        place stands for it."""
        import ast

        import onnx
        from onnx import helper

        opset = int(job.options.get("opset") or DEFAULT_OPSET)
        if opset < DYNAMO_MIN_OPSET:
            raise NotImplementedError(
                f"an opset-{opset} graph carries no module scopes; export it at opset 18 or later"
            )
        log("finding the block boundaries (torch.onnx export once more)")
        raw = self._to_onnx(job, opset).graph
        scopes: dict[str, set[str]] = {}
        for node in raw.node:
            said = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes")
            for out in node.output:
                scopes[out] = set(ast.literal_eval(said)) if said else set()
        readers: dict[str, list] = {}
        for node in raw.node:
            for i, name in enumerate(node.input):
                readers.setdefault(name, []).append((node, i))
        raw_outputs = {o.name for o in raw.output}
        shipped = onnx.load(str(path))
        made = {out: node for node in shipped.graph.node for out in node.output}
        types = {
            v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(shipped).graph.value_info
        }
        types.update({v.name: v.type.tensor_type.elem_type for v in shipped.graph.output})
        outputs: dict[str, int] = {paths[-1]: 0}
        added: list[str] = []
        for block in paths[:-1]:
            leaving = [
                out
                for node in raw.node
                for out in node.output
                if block in scopes.get(out, ())
                and (
                    out in raw_outputs or any(block not in scopes.get(r.output[0], ()) for r, _ in readers.get(out, ()))
                )
            ]
            if not leaving:
                continue
            value = leaving[-1]
            if value not in made:  # simplified away: the value the next block reads in its place
                value = None
                for reader, i in readers.get(leaving[-1], ()):
                    twin = made.get(reader.output[0])
                    if twin is not None and twin.op_type == reader.op_type and i < len(twin.input):
                        value = twin.input[i]
                        break
            if value is None or value not in made:
                continue
            quantized = [n for n in shipped.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == value]
            if quantized:
                # an int8 graph reads the boundary through its QuantizeLinear: show that quantised value,
                # dequantised by a node of its own, so ONNX Runtime still fuses the block's ops as it ships
                q = quantized[0]
                shown = f"{value}_block_output"
                if shown not in added:
                    shipped.graph.node.append(
                        helper.make_node("DequantizeLinear", [q.output[0], *q.input[1:]], [shown], name=shown)
                    )
                value, types[shown] = shown, onnx.TensorProto.FLOAT
            if value not in added:
                added.append(value)
                shipped.graph.output.append(
                    helper.make_tensor_value_info(value, types.get(value, onnx.TensorProto.FLOAT), None)
                )
            outputs[block] = [o.name for o in shipped.graph.output].index(value)
        folder.mkdir(parents=True, exist_ok=True)
        out_path = folder / Path(path).name
        onnx.save(shipped, str(out_path))
        return ExposedBlocks(
            out_path, outputs, probe=False, how="the shipped graph, with the boundaries' values added as outputs"
        )

    def weight_storage(self, path: Path) -> dict[str, int]:
        import numpy as np
        import onnx
        from onnx import helper

        model = onnx.load(str(path))

        def tensors(graph):
            yield from graph.initializer
            for node in graph.node:
                for a in node.attribute:
                    if a.type == onnx.AttributeProto.TENSOR:
                        yield a.t
                    elif a.type == onnx.AttributeProto.GRAPH:
                        yield from tensors(a.g)

        pairs = []
        for t in tensors(model.graph):
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
            pairs.append((STORAGE_TYPES.get(dtype.name, dtype.name), dtype.itemsize * int(np.prod(t.dims))))
        return storage_totals(pairs)

    def open(self, path: Path, spec: ModelSpec, info: dict, threads: int | None = None) -> Runner:
        return OnnxRunner(path, threads)

    def profile(self, path: Path, images: np.ndarray, threads: int, runs: int) -> list[OpTime]:
        return profile_onnxruntime(str(path), images, threads, runs)


def norm_statistics_nodes(model) -> list[str]:
    """Nodes that compute channel-norm statistics, to keep in fp32 inside an fp16 graph.

    As for Core ML: a norm squares deviations and averages them over C*H*W values, and in
    fp16 a deviation of 256 already squares to inf. The means, the deviation, its square,
    the epsilon, the root and its reciprocal stay fp32.
    """
    from_mean: set[str] = set()  # outputs computed from a ReduceMean result
    keep = []
    for n in model.graph.node:
        inputs_from_mean = any(i in from_mean for i in n.input)
        if n.op_type == "ReduceMean" or (n.op_type == "Mul" and len(n.input) == 2 and n.input[0] == n.input[1]):
            keep.append(n.name)
            if n.op_type == "ReduceMean":
                from_mean.update(n.output)
        elif n.op_type in ("Sub", "Add", "Sqrt", "Reciprocal", "Reshape") and inputs_from_mean:
            keep.append(n.name)
            if n.op_type != "Sub":  # x - mean is the deviation; what reads it is judged on its own
                from_mean.update(n.output)
    return keep


# ops left in fp32 inside an fp16 graph beyond the converter's defaults: ONNX Runtime 1.32 on ARM64 moves fp16
# pooling to its NHWC kernels and has no fp16 NHWC AveragePool for opset 19 ("Failed to find kernel for
# com.ms.internal.nhwc.AveragePool(19)"), so an fp16 AveragePool makes the file fail to load on a phone
FP32_OPS_IN_FP16 = ("AveragePool",)


def to_fp16(model):
    """fp16 weights and activations with float32 input and output, norm statistics and pooling kept fp32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    keep = norm_statistics_nodes(model)
    # keep_io_types: the app still feeds and reads float32
    converted = convert_float_to_float16(
        model, keep_io_types=True, node_block_list=keep, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS_IN_FP16]
    )
    drop_fp16_round_trips(converted.graph)
    # the converter appends the casts it inserts at the end of the node list; ONNX wants topological order
    topological_sort(converted.graph)
    return converted, len(keep)


def drop_fp16_round_trips(graph) -> None:
    """Remove fp32 -> fp16 -> fp32 cast pairs between two fp32 nodes.

    The converter casts every kept-fp32 node's output to fp16 and back before the next kept node,
    so a squared deviation would still pass through fp16 (and overflow) between the square and its
    mean. Readers of such a pair read the fp32 value directly; a cast still read by fp16 nodes stays.
    """
    from onnx import TensorProto

    producer = {o: n for n in graph.node for o in n.output}

    def cast_to(node, dtype) -> bool:
        return node.op_type == "Cast" and any(a.name == "to" and a.i == dtype for a in node.attribute)

    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}  # output of a cast back to fp32 -> the fp32 value before the round trip
    for n in list(graph.node):
        first = producer.get(n.input[0]) if n.input else None
        if (
            cast_to(n, TensorProto.FLOAT)
            and first is not None
            and cast_to(first, TensorProto.FLOAT16)
            and n.output[0] not in outputs
        ):
            rename[n.output[0]] = first.input[0]
            graph.node.remove(n)
    for n in graph.node:
        for i, name in enumerate(n.input):
            n.input[i] = rename.get(name, name)
    still_read = {i for n in graph.node for i in n.input} | outputs
    for n in [n for n in graph.node if cast_to(n, TensorProto.FLOAT16) and n.output[0] not in still_read]:
        graph.node.remove(n)


def topological_sort(graph) -> None:
    """Reorder ``graph.node`` in place so every node comes after the producers of its inputs."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise RuntimeError(f"the ONNX graph has a cycle or a dangling input at {pending[0].name!r}")
        ready_ids = {id(n) for n in ready}
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def quantize_static_qdq(model, job: ExportJob, log: Callable[[str], None] = lambda text: None):
    """Static QDQ int8 with ONNX Runtime's tools: per-channel int8 weights, uint8 activations calibrated
    (min/max) on real images. Layers named in ``job.keep_float`` stay float."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if job.calibration is None:
        raise ValueError("int8 needs calibration images")
    b = job.example.shape[0]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([job.calibration[i : i + b] for i in range(0, len(job.calibration) - b + 1, b)])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    excluded = _nodes_reading(model, [f"{name}.weight" for name in job.keep_float])
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = (str(Path(tmp) / n) for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(model, src)
        log("quantisation pre-processing")
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        log(f"calibrating int8 activations on {len(job.calibration) // b * b} images and quantising")
        quantize_static(
            pre,
            dst,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            extra_options={"WeightSymmetric": True},
        )
        quantized = onnx.load(dst)
    return quantized, {
        "format": "QDQ",
        "weights": "int8 per-channel symmetric",
        "activations": "uint8 per-tensor, min/max calibration",
        "excluded_nodes": len(excluded),
    }


def _nodes_reading(model, initializer_names: list[str]) -> list[str]:
    wanted = set(initializer_names)
    return [n.name for n in model.graph.node if wanted.intersection(n.input)]


def _count_ops(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
