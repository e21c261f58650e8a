"""ONNX: torch.onnx export of the deploy form, simplified with onnxsim, run by ONNX Runtime."""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .base import Backend, ExportJob, ModelSpec, Runner, register
from .images import ImageBatch

DEFAULT_OPSET = 18  # the dynamo exporter's native opset
MIN_OPSET = 17


class OnnxRunner(Runner):
    method = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: ImageBatch) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch.tensor})[0].astype(np.float32)

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"method": self.method, "providers": self.session.get_providers(), "onnxruntime": ort.__version__}


def _metadata(job: ExportJob) -> dict[str, str]:
    s = job.spec
    return {
        "model": s.name, "num_classes": str(s.num_classes), "input_size": f"{s.input_size[0]}x{s.input_size[1]}",
        "batch": str(s.batch), "mean": json.dumps(list(s.mean)), "std": json.dumps(list(s.std)),
        "layout": "NCHW float32, RGB, (x/255 - mean) / std", "labels": json.dumps(s.labels or []),
        "weights_sha256": s.weights_sha256 or "random-init", "precision": job.precision,
        "versions": json.dumps({"torch": torch.__version__, **OnnxBackend().versions()}),
    }


@register
class OnnxBackend(Backend):
    name = "onnx"
    suffix = ".onnx"
    runtime = "ONNX Runtime"

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
        if opset < MIN_OPSET:
            raise ValueError(f"--opset {opset} is too old; use {MIN_OPSET} or newer")
        model = self._to_onnx(job, opset)
        info: dict = {"opset": opset, "simplified": False}
        if job.options.get("simplify", True):
            try:
                import onnxsim

                simplified, ok = onnxsim.simplify(model)
                if not ok:
                    raise RuntimeError("onnxsim could not check the simplified graph")
                model, info["simplified"] = simplified, True
            except Exception as e:  # a simplifier failure must not lose a correct graph
                info["simplify_error"] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                log(f"onnxsim failed ({info['simplify_error']}); keeping the unsimplified graph")
        if job.precision == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            # keep_io_types: the app still feeds and reads float32
            model = convert_float_to_float16(model, keep_io_types=True)
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

        kwargs = dict(input_names=["input"], output_names=["logits"], opset_version=opset)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if opset >= DEFAULT_OPSET:
                prog = torch.onnx.export(job.module, (job.example,), dynamo=True, verbose=False, **kwargs)
                return prog.model_proto
            # opset 17: the dynamo exporter's down-conversion fails on ReduceMean; the TorchScript exporter works
            buf = io.BytesIO()
            torch.onnx.export(job.module, (job.example,), buf, dynamo=False, **kwargs)
            return onnx.load_from_string(buf.getvalue())

    def open(self, path: Path, spec: ModelSpec, info: dict) -> Runner:
        return OnnxRunner(path)


def _count_ops(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
