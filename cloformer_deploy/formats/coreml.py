"""Core ML: an ML Program (.mlpackage) converted through torch.export, with the ImageNet normalisation inside.

On macOS the package runs with ``MLModel.predict``; elsewhere coremltools can read
but not execute it, so the runner executes the saved program with our interpreter
(:mod:`.mil_interpreter`).
"""

from __future__ import annotations

import platform
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..images import ImageBatch
from ..inputs import choice
from ..options import option
from .base import Backend, BenchRuntime, ExportJob, ExposedBlocks, ModelSpec, Runner, register

if TYPE_CHECKING:
    import torch

TARGETS = ("iOS16", "iOS17", "iOS18")
IMAGE_INPUT, TENSOR_INPUT = "image", "input"


def keep_norm_statistics_fp32(op) -> bool:
    """fp16 op selector: False (stay fp32) for the ops that compute norm statistics.

    A channel norm squares deviations and averages them over C*H*W values; in fp16 a
    deviation of 256 already squares to inf (fp16 max 65504). The means, the square,
    the variance, its epsilon and the reciprocal root stay fp32; the rest runs fp16.
    """
    kind = op.op_type
    if kind in ("reduce_mean", "rsqrt"):
        return False
    ins = [v for v in op.inputs.values() if hasattr(v, "op") and v.op is not None]
    from_mean = any(v.op.op_type == "reduce_mean" for v in ins)
    if kind == "mul" and op.inputs.get("x") is op.inputs.get("y"):
        return False
    if kind in ("sub", "add", "reshape") and from_mean:
        return False
    return True


class CoreMLRunner(Runner):
    """``MLModel.predict`` on macOS (method "coreml"); the package's program interpreted elsewhere ("emulated").

    The figures have the same names either way. The interpreter evaluates the arithmetic of
    the package as written, not Apple hardware: the Neural Engine and GPU accumulate
    differently, and latency needs a Mac or an iPhone.
    """

    def __init__(
        self,
        path: Path,
        spec: ModelSpec,
        compute_units: str = "ALL",
        emulate: bool | None = None,
        block_outputs: tuple[str, ...] = (),
    ):
        import time

        import coremltools as ct

        self.path, self.spec = path, spec
        self.on_mac = platform.system() == "Darwin" if emulate is None else not emulate
        self.compute_units = compute_units
        start = time.perf_counter()
        # on a Mac this compiles the package (.mlpackage -> .mlmodelc) and loads it for the compute unit:
        # the load time of the row is both, as an app's first launch pays them
        self.model = ct.models.MLModel(
            str(path), skip_model_load=not self.on_mac, compute_units=getattr(ct.ComputeUnit, compute_units)
        )
        self.compile_and_load_ms = (time.perf_counter() - start) * 1e3
        self.mlspec = self.model.get_spec()
        self.placement = None
        if self.on_mac:
            from .coreml_placement import compute_plan_placement

            self.placement = compute_plan_placement(self.model, compute_units)
        self.method = "coreml" if self.on_mac else "emulated"
        self.interpreter = None
        self.block_outputs = tuple(block_outputs)
        if (
            not self.on_mac or self.block_outputs
        ):  # a file's block boundaries are read in the interpreter, also on a Mac
            from .mil_interpreter import MILInterpreter

            self.interpreter = MILInterpreter(path, extra_outputs=self.block_outputs)
        self.fp16: dict = {"first_nonfinite_op": None, "nonfinite_ops": 0, "largest_fp16_departures": []}

    def describe(self) -> dict:
        d = {"method": self.method}
        if self.on_mac:
            d["compute_units"] = self.compute_units
            d["compile_and_load_ms"] = round(self.compile_and_load_ms, 1)
            d["placement"] = self.placement
        else:
            d["note"] = (
                "reference evaluation of the package's arithmetic on this machine, not Apple hardware "
                "(the Neural Engine and GPU accumulate differently); Core ML latency needs a Mac or iPhone"
            )
            if self.interpreter.is_fp16:
                d["fp16"] = self.fp16
        return d

    def check_structure(self) -> list[str]:
        problems = []
        desc = self.mlspec.description
        if self.mlspec.WhichOneof("Type") != "mlProgram":
            problems.append("not an ML Program")
        h, w = self.spec.input_size
        inp = desc.input[0]
        kind = inp.type.WhichOneof("Type")
        if kind == "imageType":
            it = inp.type.imageType
            if (it.height, it.width) != (h, w):
                problems.append(f"image input is {it.height}x{it.width}, expected {h}x{w}")
        elif kind == "multiArrayType":
            if list(inp.type.multiArrayType.shape) != [self.spec.batch, 3, h, w]:
                problems.append(f"tensor input shape {list(inp.type.multiArrayType.shape)}")
        else:
            problems.append(f"unexpected input type {kind}")
        if self.spec.labels and desc.predictedFeatureName:  # a classifier: its labels must be the model's
            labels = self._labels()
            if labels != list(self.spec.labels):
                problems.append(f"classifier labels ({len(labels)}) differ from the model's {len(self.spec.labels)}")
        meta = desc.metadata.userDefined
        for key in ("model", "input_size", "mean", "std", "weights_sha256"):
            if key not in meta:
                problems.append(f"metadata {key!r} missing")
        weights = self.path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
        if not weights.is_file() or weights.stat().st_size == 0:
            problems.append("weights file missing or empty")
        return problems

    def _labels(self) -> list[str]:
        """The class labels of the program's ``classify`` op (where ClassifierConfig puts them)."""
        for op in _main_ops_of_spec(self.mlspec):
            if op.type == "classify":
                values = op.inputs["classes"].arguments[0].value.immediateValue.list.values
                return [v.immediateValue.tensor.strings.values[0] for v in values]
        return []

    def run(self, batch: ImageBatch) -> np.ndarray:
        return self.infer(self.prepare(batch))

    def run_outputs(self, batch: ImageBatch) -> list[np.ndarray]:
        """The logits and each of ``block_outputs``, by the project's interpreter (on a Mac too: Core ML shows no
        intermediate value of a compiled model)."""
        values = [[] for _ in range(1 + len(self.block_outputs))]
        for x in self._feeds(batch):
            outputs, _ = self.interpreter.run({self.mlspec.description.input[0].name: x})
            key = self.mlspec.description.predictedProbabilitiesName or self.interpreter.output_names[0]
            values[0].append(outputs[key].float().reshape(x.shape[0], -1).numpy())
            for i, name in enumerate(self.block_outputs):
                values[i + 1].append(outputs[name].float().numpy())
        return [np.concatenate(v).astype(np.float32) for v in values]

    def _feeds(self, batch: ImageBatch) -> list[np.ndarray]:
        if self.mlspec.description.input[0].type.WhichOneof("Type") == "imageType":
            return [batch.images[i : i + 1].transpose(0, 3, 1, 2).astype(np.float32) for i in range(len(batch))]
        return [batch.tensor]

    def prepare(self, batch: ImageBatch):
        """On a Mac, the feeds ``MLModel.predict`` takes (PIL images for an image input), made once."""
        if not self.on_mac:
            return batch
        from PIL import Image

        inp = self.mlspec.description.input[0]
        if inp.type.WhichOneof("Type") == "imageType":
            return [{inp.name: Image.fromarray(batch.images[i])} for i in range(len(batch))]
        return [{inp.name: batch.tensor}]

    def infer(self, prepared) -> np.ndarray:
        if not self.on_mac:
            return self._emulate(prepared)
        return np.concatenate([self._logits(self.model.predict(feed)) for feed in prepared]).astype(np.float32)

    def _emulate(self, batch: ImageBatch) -> np.ndarray:
        desc = self.mlspec.description
        inp = desc.input[0]
        rows = []
        for x in self._feeds(batch):
            outputs, report = self.interpreter.run({inp.name: x}, trace=self.interpreter.is_fp16)
            if report is not None:
                self._merge(report.as_dict())
            key = desc.predictedProbabilitiesName or self.interpreter.output_names[0]
            rows.append(outputs[key].float().reshape(x.shape[0], -1).numpy())
        return np.concatenate(rows).astype(np.float32)

    def _merge(self, r: dict) -> None:
        f = self.fp16
        f["first_nonfinite_op"] = f["first_nonfinite_op"] or r["first_nonfinite_op"]
        f["nonfinite_ops"] = max(f["nonfinite_ops"], r["nonfinite_ops"])
        worst = {d["op"]: d for d in f["largest_fp16_departures"]}
        for d in r["largest_fp16_departures"]:
            if d["op"] not in worst or d["rel_error"] > worst[d["op"]]["rel_error"]:
                worst[d["op"]] = d
        f["largest_fp16_departures"] = sorted(worst.values(), key=lambda d: -d["rel_error"])[:5]

    def _logits(self, out: dict) -> np.ndarray:
        probs = self.mlspec.description.predictedProbabilitiesName
        if probs and probs in out:
            scores = out[probs]
            return np.asarray([[scores[label] for label in self.spec.labels]], dtype=np.float32)
        return np.asarray(next(iter(out.values())), dtype=np.float32).reshape(-1, self.spec.num_classes)


@register
class CoreMLBackend(Backend):
    name = "coreml"
    suffix = ".mlpackage"
    runtime = "Core ML (macOS/iOS)"
    bench_runtimes = (BenchRuntime("coreml", "Core ML", "Core ML", position=40),)
    device_packages = ("coremltools", "pillow")  # the runner hands MLModel.predict PIL images
    summary = "a .mlpackage folder for Core ML (iOS 16+, macOS 13+)"
    # what its export records in a manifest entry, as JSON Schema (assembled into the published schema)
    manifest_facts = {
        "input": {
            "enum": ["image", "tensor"],
            "description": "Core ML: `image`: the input (named `image`) is an RGB image of input_size, pixels "
            "0-255, normalised inside the model; `tensor`: the input (named `input`) is the "
            "normalised float32 array batch x 3 x H x W, as preprocessing describes.",
        },
        "minimum_deployment_target": {
            "enum": ["iOS16", "iOS17", "iOS18"],
            "description": "Core ML: oldest iOS the package runs on (iOS16: also macOS 13).",
        },
        "classifier": {
            "type": "boolean",
            "description": "Core ML: true (batch 1) when the model is a classifier: it outputs the top "
            "label and a dictionary of scores by label (logits: apply softmax for "
            "probabilities); false: one float32 output `logits`, batch x num_classes.",
        },
        "ops": {
            "type": "object",
            "additionalProperties": {"type": "integer", "minimum": 0},
            "description": "Core ML: operations of the ML Program per type.",
            "propertyNames": {"description": "operator name"},
        },
        "fp32_ops_in_fp16_program": {
            "type": "integer",
            "minimum": 0,
            "description": "Core ML: compute ops kept float32 in an fp16 program (the norms' statistics).",
        },
        "compression": {
            "type": "object",
            "additionalProperties": True,
            "description": "Core ML int8 and w4: how the weights were compressed.",
            "properties": {
                "weights": {"type": "string", "description": "The weights' encoding."},
                "activations": {"type": "string", "description": "The arithmetic's precision (fp16)."},
            },
        },
        "norm_statistics": {
            "type": "object",
            "additionalProperties": True,
            "description": "Core ML, not fp32: the largest values the channel norms' statistics reach "
            "on the validation images (float32 reference), against float16's largest "
            "value: why those ops stay float32.",
            "properties": {
                "max_squared_deviation": {"type": "number", "description": "Largest (x - mean)^2 a norm squares."},
                "max_variance": {"type": "number", "description": "Largest variance a norm computes."},
                "max_abs_input": {"type": "number", "description": "Largest absolute value entering a norm."},
                "fp16_max": {"type": "number", "description": "Largest finite float16: 65504."},
            },
        },
    }
    manifest_required = ("input", "minimum_deployment_target", "classifier", "ops", "fp32_ops_in_fp16_program")
    runner_methods = ("coreml", "emulated")
    calibration_recorded = ()  # its int8 is weights only
    label = "Core ML"
    position = 20
    keeps_float_layers = False  # its int8 is 8-bit weights, chosen per op by coremltools
    input_note = "image input: RGB pixels 0-255; normalisation is inside the model"
    options = {
        "coreml_input": option(
            "image",
            "Core ML input: image (RGB, normalisation inside; default) or tensor (normalised float)",
            check=lambda flag, v: choice(flag, v, ("image", "tensor")),
        ),
        "coreml_target": option(
            "iOS16",
            "minimum deployment target: iOS16 (default), iOS17, iOS18",
            check=lambda flag, v: choice(flag, v, TARGETS),
        ),
    }
    default_precision = "fp16"
    # int8: 8-bit linear (symmetric, per-channel) weights; w4: 4-bit palettised weights (k-means LUT).
    # Both compress weights only: activations and arithmetic stay fp16.
    precisions = ("fp16", "fp32", "int8", "w4")
    # Core ML runs on Apple's systems only; elsewhere the package interpreter reads it on the local target
    platforms = ("darwin-arm64", "darwin-x86_64")

    def versions(self) -> dict[str, str]:
        import coremltools

        return {"coremltools": coremltools.__version__}

    def export(self, job: ExportJob, path: Path, log: Callable[[str], None]) -> dict:
        import coremltools as ct
        import torch

        from .coreml_input import PixelNormalize

        s = job.spec
        h, w = s.input_size
        input_kind = job.options.get("coreml_input", "image")
        target = job.options.get("coreml_target", "iOS16")
        if input_kind == "image":
            module = PixelNormalize(job.module, s.mean, s.std).eval()
            example = torch.full((s.batch, 3, h, w), 128.0)
            inputs = [ct.ImageType(name=IMAGE_INPUT, shape=(s.batch, 3, h, w), color_layout=ct.colorlayout.RGB)]
        else:
            module, example = job.module, job.example
            inputs = [ct.TensorType(name=TENSOR_INPUT, shape=(s.batch, 3, h, w), dtype=np.float32)]
        # options["norm_statistics_fp32"]=False converts naively (everything fp16), to show what it guards against
        selector = keep_norm_statistics_fp32 if job.options.get("norm_statistics_fp32", True) else (lambda op: True)
        precision = (
            ct.precision.FLOAT32 if job.precision == "fp32" else ct.transform.FP16ComputePrecision(op_selector=selector)
        )
        classify = bool(s.labels) and s.num_classes > 0 and s.batch == 1
        kwargs = {}
        if classify:
            kwargs["classifier_config"] = ct.ClassifierConfig(list(s.labels))
        else:
            kwargs["outputs"] = [ct.TensorType(name="logits", dtype=np.float32)]
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            log("torch.export")
            exported = torch.export.export(module, (example,)).run_decompositions({})
            log(f"converting to an ML Program ({job.precision})")
            mlmodel = ct.convert(
                exported,
                inputs=inputs,
                convert_to="mlprogram",
                compute_precision=precision,
                minimum_deployment_target=getattr(ct.target, target),
                **kwargs,
            )
        compression = None
        if job.precision in ("int8", "w4"):
            log(f"compressing weights ({job.precision})")
            mlmodel, compression = compress_weights(mlmodel, job.precision)
        mlmodel.author = "cloformer-deploy"
        mlmodel.license = "Weights: see the checkpoint's license. CloFormer/FAT architecture by Fan et al."
        mlmodel.version = s.weights_sha256[:12] if s.weights_sha256 else "random-init"
        mlmodel.short_description = (
            f"{s.name} image classifier ({s.num_classes} classes, {h}x{w} RGB); "
            "scores are logits: apply softmax for probabilities"
        )
        meta = {
            "model": s.name,
            "input_size": f"{h}x{w}",
            "mean": ",".join(map(str, s.mean)),
            "std": ",".join(map(str, s.std)),
            "weights_sha256": s.weights_sha256 or "random-init",
            "precision": job.precision,
            "num_classes": str(s.num_classes),
            "input": input_kind,
        }
        mlmodel.user_defined_metadata.update(meta)
        mlmodel.save(str(path))
        ops = _count_ops(mlmodel)
        extra = {}
        if compression:
            extra["compression"] = compression
        if job.precision != "fp32" and job.images is not None:
            extra["norm_statistics"] = norm_statistics_range(job.module, job.images)
        return {
            **extra,
            "input": input_kind,
            "minimum_deployment_target": target,
            "classifier": classify,
            "ops": ops,
            "fp32_ops_in_fp16_program": _fp32_compute_ops(mlmodel) if job.precision != "fp32" else 0,
        }

    uses_threads = False  # Core ML chooses its own threads (and devices)

    def row_variants(self, platform: str) -> list[dict]:
        from .coreml_placement import COMPUTE_UNITS

        # on Apple systems one row per compute unit; elsewhere the interpreter, which has none
        return [{"compute_units": u} for u in COMPUTE_UNITS] if platform in self.platforms else [{}]

    def weight_storage(self, path: Path) -> dict[str, int]:
        from .mil_interpreter import constant_storage

        return constant_storage(path)

    def expose_blocks(self, path, job, paths, folder, log) -> ExposedBlocks:
        """The same package, its boundaries' variables read by the project's interpreter as it runs. The converter
        names each variable after the torch.export node that made it (a cast to fp16 adds ``_cast_fp16``), so the
        module is exported once more as the export step did, and a block's boundary is the last node made inside
        the block that a node outside it reads."""
        import torch

        from .coreml_input import PixelNormalize
        from .mil_interpreter import MILInterpreter

        wrapped = job.options.get("coreml_input", "image") == "image"
        h, w = job.spec.input_size
        module = PixelNormalize(job.module, job.spec.mean, job.spec.std).eval() if wrapped else job.module
        example = torch.full((job.spec.batch, 3, h, w), 128.0) if wrapped else job.example
        log("finding the block boundaries (torch.export once more)")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            graph = torch.export.export(module, (example,)).run_decompositions({}).graph
        prefix = "module." if wrapped else ""

        def scopes(node) -> set[str]:
            return {v[0] for v in (node.meta.get("nn_module_stack") or {}).values()}

        variables = {n for op in MILInterpreter(path).compute_ops for n, _ in op.outputs}
        names: list[str] = []
        outputs: dict[str, int] = {paths[-1]: 0}
        for block in paths[:-1]:
            scope = prefix + block
            leaving = [
                n.name
                for n in graph.nodes
                if n.op == "call_function" and scope in scopes(n) and any(scope not in scopes(u) for u in n.users)
            ]
            found = (
                next((v for v in (f"{leaving[-1]}_cast_fp16", leaving[-1]) if v in variables), None)
                if leaving
                else None
            )
            if found is None:
                continue
            if found not in names:
                names.append(found)
            outputs[block] = 1 + names.index(found)
        return ExposedBlocks(
            Path(path),
            outputs,
            probe=False,
            how="the shipped package, its boundaries' variables read by the project's interpreter as it runs",
            open_info={"block_outputs": names},
        )

    def open(self, path: Path, spec: ModelSpec, info: dict, threads: int | None = None) -> Runner:
        from .coreml_placement import COMPUTE_UNITS

        units = info.get("compute_units") or "ALL"
        units = choice("compute units", units, COMPUTE_UNITS)
        # Core ML chooses its own threads
        return CoreMLRunner(path, spec, compute_units=units, block_outputs=tuple(info.get("block_outputs") or ()))


def compress_weights(mlmodel, precision: str):
    import coremltools.optimize.coreml as cto

    if precision == "int8":
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=512
        )
        out = cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
        return out, {"weights": "int8 linear symmetric per-channel", "activations": "fp16"}
    op = cto.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_tensor", weight_threshold=512)
    out = cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=op))
    return out, {"weights": "4-bit palettised (k-means LUT per tensor)", "activations": "fp16"}


def norm_statistics_range(module: torch.nn.Module, images: np.ndarray) -> dict:
    """How close the channel norms' statistics come to fp16's range on real images (fp32 reference).

    ``max_squared_deviation`` is the largest (x - mean)^2 any norm squares; above 65504
    it would be inf in fp16, which is why those ops are kept fp32.
    """
    import torch

    from ..models.deploy_modules import ChannelNorm

    peak = {"max_squared_deviation": 0.0, "max_variance": 0.0, "max_abs_input": 0.0}

    def hook(mod, args):
        x = args[0].detach().double()
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        sq = (x - mean) ** 2
        peak["max_squared_deviation"] = max(peak["max_squared_deviation"], float(sq.max()))
        peak["max_variance"] = max(peak["max_variance"], float(sq.mean(dim=(1, 2, 3)).max()))
        peak["max_abs_input"] = max(peak["max_abs_input"], float(x.abs().max()))

    handles = [m.register_forward_pre_hook(hook) for m in module.modules() if isinstance(m, ChannelNorm)]
    try:
        with torch.no_grad():
            module(torch.from_numpy(images))
    finally:
        for h in handles:
            h.remove()
    return {**{k: float(f"{v:.4g}") for k, v in peak.items()}, "fp16_max": 65504.0}


def _main_ops(mlmodel):
    return _main_ops_of_spec(mlmodel.get_spec())


def _main_ops_of_spec(spec):
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    return block.operations


def _count_ops(mlmodel) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in _main_ops(mlmodel):
        if op.type != "const":
            counts[op.type] = counts.get(op.type, 0) + 1
    return dict(sorted(counts.items()))


def _fp32_compute_ops(mlmodel) -> int:
    """Ops of an fp16 program that compute in fp32 (the norm statistics kept there on purpose)."""
    from coremltools.proto import MIL_pb2

    n = 0
    for op in _main_ops(mlmodel):
        if op.type in ("const", "cast"):
            continue
        outs = [o.type.tensorType.dataType for o in op.outputs if o.type.HasField("tensorType")]
        if outs and all(t == MIL_pb2.FLOAT32 for t in outs):
            n += 1
    return n
