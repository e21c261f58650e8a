"""LiteRT (.tflite): litert-torch's conversion of the deploy form, run by LiteRT's interpreter with XNNPACK.

The converter (litert-torch, no TensorFlow) traces the module with torch.export and writes a TFLite
flatbuffer. The artifact takes NHWC float32 images, LiteRT's idiom (an Android bitmap's pixel order),
and returns float32 logits at every precision: an int8 model quantises its input and dequantises its
logits inside the model, with ops XNNPACK runs. Its delegation is counted the way LiteRT applies it:
the model is opened with the XNNPACK delegate and every node the delegate did not take is listed.

Profiles: LiteRT's Python interpreter exposes no profiler; its C API, in the same wheel, has one, reached
through ctypes (litert_profiler.py).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..images import ImageBatch
from ..quiet import quiet_libraries
from .base import (
    Backend,
    BenchRuntime,
    ExportJob,
    ExposedBlocks,
    ModelSpec,
    NativeRunner,
    Runner,
    boundary_shapes,
    channels_last,
    register,
    storage_totals,
)

METADATA_NAME = "cloformer_deploy"  # the model's metadata entry holding what the manifest says of it
INPUT_LAYOUT = "NHWC"


def _interpreter(path: Path | str, threads: int | None = None):
    """LiteRT's interpreter on ``path`` with its default delegate (XNNPACK), tensors allocated."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads if threads else None)
    interpreter.allocate_tensors()
    return interpreter


class LiteRTRunner(Runner):
    method = "litert"

    def __init__(self, path: Path, threads: int | None = None):
        self.interpreter = _interpreter(path, threads)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def prepare(self, batch: ImageBatch):
        # NCHW -> NHWC, once, outside a timed run
        return np.ascontiguousarray(batch.tensor.transpose(0, 2, 3, 1), dtype=np.float32)

    def infer(self, prepared) -> np.ndarray:
        self.interpreter.set_tensor(self.input["index"], prepared)
        self.interpreter.invoke()
        return np.array(self.interpreter.get_tensor(self.output["index"]), dtype=np.float32)

    def run(self, batch: ImageBatch) -> np.ndarray:
        return self.infer(self.prepare(batch))

    def run_outputs(self, batch: ImageBatch) -> list[np.ndarray]:
        self.infer(self.prepare(batch))
        outs = []
        for detail in self.interpreter.get_output_details():  # integers as stored: the caller dequantises
            outs.append(np.array(self.interpreter.get_tensor(detail["index"])).astype(np.float32))
        return outs

    def check_structure(self) -> list[str]:
        problems = []
        for what, detail in (("input", self.input), ("output", self.output)):
            if detail["dtype"] != np.float32:
                problems.append(f"the {what} is {np.dtype(detail['dtype']).name}, not float32")
        shape = [int(v) for v in self.input["shape"]]
        if len(shape) != 4 or shape[3] != 3:
            problems.append(f"the input is {shape}, not NHWC with 3 channels")
        return problems

    def describe(self) -> dict:
        from importlib.metadata import version

        return {"method": self.method, "ai-edge-litert": version("ai-edge-litert")}


def delegation(interpreter) -> dict:
    """XNNPACK's partitions and the nodes it left to LiteRT's own kernels, as the opened interpreter holds them.

    Delegating appends one DELEGATE node per partition after the model's nodes; the nodes a partition replaced
    are those its outputs are computed from, back to its inputs. Every other node runs outside XNNPACK.
    """
    ops = interpreter._get_ops_details()  # the interpreter's only listing of its nodes
    delegates = [o for o in ops if o["op_name"] == "DELEGATE"]
    nodes = [o for o in ops if o["op_name"] != "DELEGATE"]
    producer = {int(t): o["index"] for o in nodes for t in o["outputs"]}
    by_index = {o["index"]: o for o in nodes}
    inside: set[int] = set()
    for d in delegates:
        boundary = {int(t) for t in d["inputs"]}
        pending = [int(t) for t in d["outputs"]]
        while pending:
            t = pending.pop()
            n = producer.get(t)
            if t in boundary or n is None or n in inside:
                continue
            inside.add(n)
            pending += [int(i) for i in by_index[n]["inputs"] if i >= 0]
    outside = Counter(o["op_name"] for o in nodes if o["index"] not in inside)
    return {
        "delegate": "XNNPACK",
        "partitions": len(delegates),
        "non_delegated_kernels": sum(outside.values()),
        "non_delegated_ops": dict(sorted(outside.items())),
        "nodes": len(nodes),
        "op_types": dict(sorted(Counter(o["op_name"] for o in nodes).items())),
    }


def _float_io(model) -> list[str]:
    """An int8 graph's int8 input and output made float32: a QUANTIZE after the input, a DEQUANTIZE before the
    output, with the tensors' own scale and zero point (what an app would otherwise do by hand). ``model`` is the
    flatbuffer's object form (ModelT), changed in place; returns what was wrapped."""
    from ai_edge_litert import schema_py_generated as schema

    graph = model.subgraphs[0]
    graph.inputs, graph.outputs = [int(i) for i in graph.inputs], [int(i) for i in graph.outputs]
    codes = {}

    def opcode(builtin: int) -> int:
        # version 2: the QUANTIZE and DEQUANTIZE of int8 tensors (what a minimal LiteRT build checks)
        if builtin not in codes:
            for i, c in enumerate(model.operatorCodes):
                if max(c.builtinCode, c.deprecatedBuiltinCode) == builtin:
                    c.version = max(c.version, 2)
                    codes[builtin] = i
                    break
            else:
                code = schema.OperatorCodeT()
                code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 2
                model.operatorCodes.append(code)
                codes[builtin] = len(model.operatorCodes) - 1
        return codes[builtin]

    def float_twin(index: int, suffix: str) -> int:
        t = copy.deepcopy(graph.tensors[index])
        t.type, t.quantization, t.buffer = schema.TensorType.FLOAT32, None, 0
        t.name = (t.name or b"") + suffix.encode()
        graph.tensors.append(t)
        return len(graph.tensors) - 1

    wrapped, ops, renamed = [], [], {}
    for k, index in enumerate(graph.inputs):
        if graph.tensors[index].type == schema.TensorType.INT8:
            new = float_twin(index, "_float")
            op = schema.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = opcode(schema.BuiltinOperator.QUANTIZE), [new], [index]
            ops.append(op)
            graph.inputs[k] = renamed[index] = new
            wrapped.append("input")
    graph.operators = ops + list(graph.operators)
    for k, index in enumerate(graph.outputs):
        if graph.tensors[index].type == schema.TensorType.INT8:
            new = float_twin(index, "_float")
            op = schema.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = opcode(schema.BuiltinOperator.DEQUANTIZE), [index], [new]
            graph.operators.append(op)
            graph.outputs[k] = renamed[index] = new
            wrapped.append("output")
    for signature in model.signatureDefs or []:  # signatures name the graph's inputs and outputs by tensor index
        for tensor_map in (signature.inputs or []) + (signature.outputs or []):
            tensor_map.tensorIndex = renamed.get(tensor_map.tensorIndex, tensor_map.tensorIndex)
    return wrapped


def _finish(flatbuffer: bytes, entries: dict[str, bytes], float_io: bool) -> tuple[bytes, list[str]]:
    """The converted model with float32 input and output (int8) and the metadata ``entries``, re-serialised."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    for buffer in model.buffers:  # weights stored after the flatbuffer (the quantiser's output) move inside it
        if buffer.offset > 1:
            buffer.data = np.frombuffer(flatbuffer, np.uint8, buffer.size, buffer.offset)
            buffer.offset = buffer.size = 0
    wrapped = _float_io(model) if float_io else []
    names = {name.encode() for name in entries}
    model.metadata = [m for m in (model.metadata or []) if m.name not in names]
    for name, value in entries.items():
        buffer = schema.BufferT()
        buffer.data = list(value)
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = name.encode(), len(model.buffers) - 1
        model.metadata.append(entry)
    builder = flatbuffers.Builder(len(flatbuffer) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), wrapped


def read_metadata(path: Path | str) -> dict:
    """The metadata entry this project writes into a .tflite ({} when absent)."""
    from ai_edge_litert import schema_py_generated as schema

    data = Path(path).read_bytes()
    model = schema.Model.GetRootAsModel(data, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == METADATA_NAME.encode():
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    return {}


@contextlib.contextmanager
def _quiet_converter():
    """The converter's own progress (a rich console), prints and logs kept off the terminal."""
    with quiet_libraries(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        from litert_torch import progress

        quiet, progress.console.quiet = progress.console.quiet, True
        try:
            yield
        finally:
            progress.console.quiet = quiet


def _quantize_int8(module, example, calibration: np.ndarray, log: Callable[[str], None]):
    """PT2E static int8 with litert-torch's own quantizer: the graph and the quantizer the converter reads."""
    import torch
    from litert_torch.quantize import pt2e_quantizer
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True)
    )
    graph = torch.export.export(module, (example,)).module()
    prepared = prepare_pt2e(graph, quantizer)
    b = example.shape[0]
    starts = range(0, len(calibration) - b + 1, b)
    log(f"calibrating int8 activations on {len(starts) * b} images")
    with torch.no_grad():
        for i in starts:
            prepared(torch.from_numpy(np.ascontiguousarray(calibration[i : i + b].transpose(0, 2, 3, 1))))
    return convert_pt2e(prepared, fold_quantize=False), quantizer


def _gpu_runtime(name: str, short: str, precision: str, position: int) -> BenchRuntime:
    """A runtime of LiteRT's GPU accelerator computing in ``precision``: named only, never part of "all"."""
    return BenchRuntime(
        name,
        short,
        f"LiteRT GPU ({precision})",
        in_all=False,
        position=position,
        accelerator="gpu",
        computes_in=precision,
        open_options={"accelerator": "gpu", "gpu_precision": precision},
    )


@register
class LiteRTBackend(Backend):
    name = "tflite"
    suffix = ".tflite"
    runtime = "LiteRT (XNNPACK)"
    label = "LiteRT"
    position = 40
    bench_runtimes = (
        BenchRuntime("litert", "LiteRT", "LiteRT", aliases=("tflite",), peers=True, position=40),
        # LiteRT's GPU accelerator on the same .tflite: its default precision computes in fp16, as on a phone's GPU
        _gpu_runtime("litert-gpu", "LiteRT-GPU", "fp16", 41),
        _gpu_runtime("litert-gpu-fp32", "LiteRT-GPU-fp32", "fp32", 42),
    )
    device_packages = ("ai-edge-litert",)
    native_runner = NativeRunner(
        "litert_runner.cpp",
        "ai-edge-litert",
        module="ai_edge_litert",
        # LiteRT's C API: the same XNNPACK as the Python interpreter, compiled in (docs/litert.md)
        libraries=("libLiteRt.so",),
        # the GPU accelerator (WebGPU on Vulkan), which libLiteRt.so opens by name when a model asks for the GPU
        loaded=("libLiteRtWebGpuAccelerator.so",),
    )
    summary = "a .tflite model for LiteRT, formerly TensorFlow Lite (Android, iOS, desktop)"
    input_note = "NHWC float32 (batch, height, width, 3): the normalised image in LiteRT's layout"
    keeps_float_layers = False
    precisions = ("fp32", "fp16", "int8")
    calibrated_precisions = ("int8",)
    runner_methods = ("litert",)
    profiler = "LiteRT's profiler, through its C API (a compiled model on the CPU: the same XNNPACK partitions)"
    manifest_facts = {
        "input_layout": {
            "enum": ["NHWC"],
            "description": "LiteRT: the input tensor's layout, (batch, height, width, 3) float32.",
        },
        "delegate": {"enum": ["XNNPACK"], "description": "LiteRT: the delegate the partitions count is for."},
        "partitions": {
            "type": "integer",
            "minimum": 0,
            "description": "LiteRT: XNNPACK partitions (1: the whole network runs in one XNNPACK subgraph).",
        },
        "non_delegated_kernels": {
            "type": "integer",
            "minimum": 0,
            "description": "LiteRT: nodes XNNPACK did not take, run by LiteRT's own kernels (0: none).",
        },
        "non_delegated_ops": {
            "type": "object",
            "additionalProperties": {"type": "integer", "minimum": 0},
            "propertyNames": {"description": "operator name"},
            "description": "LiteRT: those nodes per operator.",
        },
        "nodes": {"type": "integer", "minimum": 0, "description": "LiteRT: nodes in the graph before delegation."},
        "op_types": {
            "type": "object",
            "additionalProperties": {"type": "integer", "minimum": 0},
            "propertyNames": {"description": "operator name"},
            "description": "LiteRT: nodes per builtin operator: the kernels a selective LiteRT build needs.",
        },
        "quantization": {
            "type": "object",
            "additionalProperties": True,
            "description": "LiteRT fp16 and int8: where the reduced precision sits; input and output stay float32.",
            "properties": {
                "method": {"type": "string", "description": "The tool and recipe."},
                "weights": {"type": "string", "description": "How weights are stored."},
                "activations": {"type": "string", "description": "How activations are computed."},
                "io": {"type": "string", "description": "What the input and output are and where they convert."},
            },
        },
        "metadata": {
            "type": "string",
            "description": "LiteRT: the model's metadata entry holding the preprocessing, labels count and versions.",
        },
    }
    manifest_required = (
        "input_layout",
        "delegate",
        "partitions",
        "non_delegated_kernels",
        "non_delegated_ops",
        "nodes",
        "op_types",
    )

    def deploy_steps(self, precision: str, options: dict):
        from ..models.deploy import UNMERGED_STEPS

        # unmerged with one-step norm means and split wide depthwise kernels: LiteRT's XNNPACK falls to a slow
        # path for depthwise kernels over 25 taps, as ExecuTorch's does; keys-first attention keeps the
        # single-head attention's matmul inside XNNPACK (docs/litert.md has the measurements)
        extra = ["single_reduce_norm", "split_wide_depthwise", "keys_first_attention"]
        # int8: LiteRT's XNNPACK takes no int8 average pooling, but int8 depthwise convolutions (25 -> 15 partitions
        # on CloFormer-XXS; the int8 GELUs stay outside)
        return list(UNMERGED_STEPS), extra + (["pool_as_depthwise_conv"] if precision == "int8" else [])

    def versions(self) -> dict[str, str]:
        from importlib.metadata import version

        return {"litert-torch": version("litert-torch"), "ai-edge-litert": version("ai-edge-litert")}

    def export(self, job: ExportJob, path: Path, log: Callable[[str], None]) -> dict:
        import torch

        with _quiet_converter():
            import litert_torch

            module = litert_torch.to_channel_last_io(job.module.eval(), args=[0])
            example = job.example.permute(0, 2, 3, 1).contiguous()
            quant_config, info = None, {}
            if job.precision == "int8":
                if job.calibration is None:
                    raise ValueError("int8 needs calibration images")
                from litert_torch.quantize.quant_config import QuantConfig

                module, quantizer = _quantize_int8(module, example, job.calibration, log)
                quant_config = QuantConfig(pt2e_quantizer=quantizer)
                info["quantization"] = {
                    "method": "PT2E static, litert-torch's PT2EQuantizer",
                    "weights": "int8 per-channel symmetric",
                    "activations": "int8 per-tensor, histogram calibration on real images",
                    "io": "float32; a QUANTIZE after the input and a DEQUANTIZE before the logits, in the model",
                }
            elif job.precision == "fp16":
                from litert_torch.generative.quantize import quant_recipes

                quant_config = quant_recipes.full_fp16_recipe()
                info["quantization"] = {
                    "method": "ai-edge-quantizer float casting (litert-torch's full_fp16_recipe)",
                    "weights": "float16, dequantised to float32 when the model loads",
                    "activations": "float32 on every CPU (docs/litert.md: why not float16 on ARM)",
                    "io": "float32",
                }
            log(f"converting with litert-torch ({job.precision})")
            with torch.no_grad():
                converted = litert_torch.convert(module, (example,), quant_config=quant_config)
                flatbuffer = converted.model_content()
        s = job.spec
        metadata = {
            "model": s.name,
            "num_classes": s.num_classes,
            "input_size": list(s.input_size),
            "batch": s.batch,
            "layout": f"{INPUT_LAYOUT} float32, RGB, (x/255 - mean) / std",
            "mean": list(s.mean),
            "std": list(s.std),
            "precision": job.precision,
            "weights_sha256": s.weights_sha256 or "random-init",
        }
        entries = {METADATA_NAME: json.dumps(metadata, sort_keys=True).encode()}
        data, wrapped = _finish(flatbuffer, entries, float_io=job.precision == "int8")
        if job.precision == "int8" and sorted(wrapped) != ["input", "output"]:
            raise RuntimeError(f"the int8 model's interface was not int8 as expected (wrapped: {wrapped})")
        path.write_bytes(data)
        log("opening it in LiteRT with XNNPACK")
        try:
            with quiet_libraries():
                interpreter = _interpreter(path, 1)
            delegated = delegation(interpreter)
        except (RuntimeError, ValueError) as e:
            path.unlink(missing_ok=True)
            raise RuntimeError(f"LiteRT cannot load the converted model: {_reason(e)}") from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return {"input_layout": INPUT_LAYOUT, **delegated, **info, "metadata": METADATA_NAME}

    def expose_blocks(self, path, job, paths, folder, log) -> ExposedBlocks:
        """The shipped flatbuffer with the boundaries' tensors added to its outputs (the subgraph's and the
        signature's): the same operators and weights, run by the same delegate. The converter names each tensor
        after the modules that made it (``<module class>_<name>`` joined by ``/``); a block's boundary is the last
        tensor made inside the block that an operator outside it reads."""
        import flatbuffers
        import torch
        from ai_edge_litert import schema_py_generated as fb

        model = fb.ModelT.InitFromObj(fb.Model.GetRootAsModel(Path(path).read_bytes(), 0))
        graph = model.subgraphs[0]
        names = [(t.name or b"").decode() for t in graph.tensors]
        made_by = {}
        for i, op in enumerate(graph.operators):
            for t in op.outputs if op.outputs is not None else ():
                made_by[t] = i
        readers: dict[int, list[int]] = {}
        for i, op in enumerate(graph.operators):
            for t in op.inputs if op.inputs is not None else ():
                if t >= 0:
                    readers.setdefault(t, []).append(i)
        modules = dict(job.module.named_modules())
        shapes = boundary_shapes(job, paths)

        def scope(block: str) -> str:
            parts, segments = [], block.split(".")
            for n in range(1, len(segments) + 1):
                m = modules[".".join(segments[:n])]
                if not isinstance(m, torch.nn.ModuleList):
                    parts.append(f"{type(m).__module__}.{type(m).__qualname__}_{segments[n - 1]}")
            return "/".join(parts)

        def inside(tensor: int, where: str) -> bool:
            return any(p.endswith(where) or where + "/" in p for p in re.split(r";\d*", names[tensor]) if p)

        # values that depend on the image (a tensor the converter computes from weights alone never ends a block)
        from_input = set(graph.inputs)
        for op in graph.operators:
            if any(t in from_input for t in (op.inputs if op.inputs is not None else ())):
                from_input.update(op.outputs if op.outputs is not None else ())

        def fits(t: int, shape: tuple[int, ...]) -> bool:
            have = tuple(int(d) for d in graph.tensors[t].shape)
            kept = tuple(d for d in shape if d != 1)
            pooled = len(shape) != 4 or shape[2:] == (1, 1)  # (N, C, 1, 1) may be held as (N, C): same order
            return have in (shape, channels_last(shape)) or (pooled and tuple(d for d in have if d != 1) == kept)

        graph_outputs = list(graph.outputs)
        outputs: dict[str, int] = {paths[-1]: 0}
        for block in paths[:-1]:
            where = "/" + scope(block)
            leaving = [
                t
                for t, i in sorted(made_by.items(), key=lambda kv: kv[1])
                if inside(t, where)
                and t in from_input
                and fits(t, shapes[block])
                and (
                    t in graph_outputs
                    or any(not any(inside(o, where) for o in graph.operators[r].outputs) for r in readers.get(t, ()))
                )
            ]
            if not leaving:
                continue
            # the block's own ops (its residual additions) end it; a sub-module's value the scheduler placed later
            # (an activation read again outside) does not
            own = [t for t in leaving if any(p.endswith(where) for p in re.split(r";\d*", names[t]) if p)]
            tensor = (own or leaving)[-1]
            if tensor not in graph_outputs:
                graph_outputs.append(tensor)
                signature = model.signatureDefs[0] if model.signatureDefs else None
                if signature is not None:
                    entry = fb.TensorMapT()
                    # named so that a runtime listing the signature's outputs by name keeps their order
                    entry.name = f"output_{len(graph_outputs) - 1:03d}".encode()
                    entry.tensorIndex = tensor
                    signature.outputs.append(entry)
            outputs[block] = graph_outputs.index(tensor)
        graph.outputs = graph_outputs
        scales = {}
        for i, t in enumerate(graph_outputs):
            q = graph.tensors[t].quantization
            if i and q is not None and q.scale is not None and len(q.scale) == 1:
                scales[i] = (float(q.scale[0]), int(q.zeroPoint[0]) if q.zeroPoint is not None else 0)
        builder = flatbuffers.Builder(1 << 20)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        folder.mkdir(parents=True, exist_ok=True)
        out_path = folder / Path(path).name
        out_path.write_bytes(bytes(builder.Output()))
        return ExposedBlocks(
            out_path,
            outputs,
            probe=False,
            how="the shipped flatbuffer, with the boundaries' tensors added as outputs",
            scales=scales,
        )

    def weight_storage(self, path: Path) -> dict[str, int]:
        from ai_edge_litert import schema_py_generated as schema

        names = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
        kinds = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
        model = schema.Model.GetRootAsModel(Path(path).read_bytes(), 0)
        pairs = []
        for s in range(model.SubgraphsLength()):
            graph = model.Subgraphs(s)
            for i in range(graph.TensorsLength()):
                tensor = graph.Tensors(i)
                buffer = model.Buffers(tensor.Buffer())
                # a constant's bytes sit in its buffer, or past the flatbuffer (offset and size) in a large model
                size = buffer.DataLength() or (buffer.Size() if buffer.Offset() > 1 else 0)
                if size:
                    name = names.get(tensor.Type(), str(tensor.Type()))
                    pairs.append((kinds.get(name, name), size))
        return storage_totals(pairs)

    def open(self, path: Path, spec: ModelSpec, info: dict, threads: int | None = None) -> Runner:
        return LiteRTRunner(path, threads)

    def profile(self, path: Path, images: np.ndarray, threads: int, runs: int) -> list:
        from .litert_profiler import profile_litert

        return profile_litert(path, images, threads, runs)


def _reason(e: BaseException) -> str:
    """The line of LiteRT's error that names the failing node (it reports a whole log)."""
    text = re.sub(r"(?<=\S)(Node number \d+)", r" \1", str(e))  # LiteRT glues its lines together
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    failing = [line for line in lines if "failed to prepare" in line or "error" in line.lower()]
    return " ".join(dict.fromkeys(failing or lines[:1]))[:300] or type(e).__name__
