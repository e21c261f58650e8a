"""ExecuTorch: torch.export of the deploy form, lowered to XNNPACK, run by the ExecuTorch Python runtime."""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..inputs import choice
from .base import Backend, ExportJob, ModelSpec, Runner, register
from ..images import ImageBatch

if TYPE_CHECKING:
    import torch

# graph nodes that are bookkeeping, not kernels
_NOT_KERNELS = {"getitem", "executorch_call_delegate"}


_SCALAR_TYPES = {5: np.float16, 6: np.float32}  # c10::ScalarType codes of the inputs a program may take


def input_dtype(method) -> type:
    """The numpy dtype a loaded ``forward`` takes: an fp16 program takes fp16 images (no cast outside XNNPACK)."""
    return _SCALAR_TYPES.get(method.metadata.input_tensor_meta(0).dtype(), np.float32)


class ExecuTorchRunner(Runner):
    method = "executorch"

    def __init__(self, path: Path, threads: int | None = None):
        from executorch.runtime import Runtime

        if threads:
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(threads)  # XNNPACK's pool is the process's
        self.program = Runtime.get().load_program(str(path))
        self.forward = self.program.load_method("forward")
        self.dtype = input_dtype(self.forward)

    def prepare(self, batch: ImageBatch):
        import torch

        # an fp16 program takes fp16 images: converted here, once, not inside a timed run
        return torch.from_numpy(batch.tensor.astype(self.dtype, copy=False))

    def infer(self, prepared) -> np.ndarray:
        return self.forward.execute([prepared])[0].float().numpy()

    def run(self, batch: ImageBatch) -> np.ndarray:
        return self.infer(self.prepare(batch))

    def constant(self, name: str):
        return self.program.load_method(name).execute([])


def quantize_pt2e_xnnpack(job: ExportJob, log: Callable[[str], None] = lambda text: None) -> torch.nn.Module:
    """Static int8: per-channel symmetric weights, per-tensor activations calibrated on real images."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if job.calibration is None:
        raise ValueError("int8 needs calibration images")
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    if job.keep_float:
        keep = set(job.keep_float)

        def quantize_node(node) -> bool:  # nodes traced from a kept layer stay float
            stack = node.meta.get("nn_module_stack") or {}
            return not any(path.split("L['self'].")[-1] in keep for path, _ in stack.values())

        quantizer.set_filter_function(quantize_node)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        graph = torch.export.export(job.module, (job.example,)).module()
        prepared = prepare_pt2e(graph, quantizer)
        b = job.example.shape[0]
        starts = range(0, len(job.calibration) - b + 1, b)
        log(f"calibrating int8 activations on {len(starts) * b} images")
        for n, i in enumerate(starts, 1):
            prepared(torch.from_numpy(job.calibration[i:i + b]))
            if n == len(starts) // 2:
                log(f"calibrated {n * b}/{len(starts) * b} images")
        return convert_pt2e(prepared)


def _to_fp16(job: ExportJob, log: Callable[[str], None]):
    """The module and example in fp16, channel-norm inputs scaled on the calibration images to fit fp16."""
    import copy

    import torch
    from ..models.deploy import scale_norm_inputs

    if job.calibration is None:
        raise ValueError("fp16 needs calibration images to scale the channel norms' inputs")
    module = copy.deepcopy(job.module)
    shifts = scale_norm_inputs(module, torch.from_numpy(job.calibration))
    log(f"channel norms scaled into fp16's range: {len(shifts)}")
    return module.half(), job.example.half(), {"scaled_norms": shifts}


def delegation_report(edge_program) -> dict:
    """Partitions and the kernels left outside any delegate, from the lowered graph."""
    outside: Counter = Counter()
    partitions = 0
    for node in edge_program.graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name == "executorch_call_delegate":
            partitions += 1
        elif name not in _NOT_KERNELS:
            outside[name] += 1
    return {"partitions": partitions, "non_delegated_kernels": sum(outside.values()),
            "non_delegated_ops": dict(sorted(outside.items()))}


@register
class ExecuTorchBackend(Backend):
    name = "executorch"
    suffix = ".pte"
    runtime = "ExecuTorch (XNNPACK)"
    # fp16 runs the whole network in fp16 inside one XNNPACK partition, inputs and outputs included (a cast
    # would fall outside the delegate): the deploy form takes FP16_XNNPACK_STEPS and scaled norm inputs
    precisions = ("fp32", "fp16", "int8")
    calibrated_precisions = ("fp16", "int8")

    def check_options(self, options: dict) -> dict:
        options["et_backend"] = choice("--backend", options.get("et_backend", "xnnpack"), ("xnnpack", "portable"))
        return options

    def deploy_steps(self, precision: str, options: dict):
        from ..models.deploy import DEFAULT_STEPS, FP16_XNNPACK_STEPS, QUANTIZATION_FRIENDLY

        if options.get("et_backend", "xnnpack") != "xnnpack":
            return (list(DEFAULT_STEPS), FP16_XNNPACK_STEPS) if precision == "fp16" else None
        # XNNPACK's depthwise kernels stop at 25 taps: wider ones are cut into pieces that fit
        # int8 keeps the unmerged form with split_local_qkv: needed on executorch 1.4.1 (channel slices between
        # quantised ops did not compile); on 1.5.1 the merged form is one partition too, at the same speed and drift
        if precision == "int8":
            steps, extra = QUANTIZATION_FRIENDLY
            return steps, [*extra, "split_wide_depthwise"]
        if precision == "fp16":
            return list(DEFAULT_STEPS), ["split_wide_depthwise", *FP16_XNNPACK_STEPS]
        return list(DEFAULT_STEPS), ["split_wide_depthwise"]

    def versions(self) -> dict[str, str]:
        from importlib.metadata import version

        return {"executorch": version("executorch")}

    def export(self, job: ExportJob, path: Path, log: Callable[[str], None]) -> dict:
        import torch
        from executorch.exir import to_edge_transform_and_lower

        backend = job.options.get("et_backend", "xnnpack")
        module, example = job.module, job.example
        fp16: dict = {}
        if job.precision == "int8":
            module = quantize_pt2e_xnnpack(job, log)
        elif job.precision == "fp16":
            module, example, fp16 = _to_fp16(job, log)
        s = job.spec
        constants = {
            "input_size": list(s.input_size), "batch": s.batch, "num_classes": s.num_classes,
            "mean": [float(v) for v in s.mean], "std": [float(v) for v in s.std],
        }
        partitioner = []
        if backend == "xnnpack":
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

            partitioner = [XnnpackPartitioner()]
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            log("torch.export")
            exported = torch.export.export(module, (example,))
            log(f"lowering to {backend}")
            edge = to_edge_transform_and_lower(exported, partitioner=partitioner, constant_methods=constants)
            log("writing the program")
        report = delegation_report(edge.exported_program())
        program = edge.to_executorch()
        path.write_bytes(program.buffer)
        return {"backend": backend, **report, "constant_methods": sorted(constants),
                "input_dtype": "float16" if job.precision == "fp16" else "float32", **fp16}

    def open(self, path: Path, spec: ModelSpec, info: dict, threads: int | None = None) -> Runner:
        return ExecuTorchRunner(path, threads)
