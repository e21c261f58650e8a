"""The worker: one process on a target that opens artifacts with the backends' own runners and runs them on command.

It speaks JSON lines on stdin/stdout, so that it can run wherever a Python with the runtimes
does: a local subprocess, an emulated ARM64 Python under QEMU, later a device over SSH. Arrays
travel inside the messages (base64), so the worker never needs the caller's filesystem for its
inputs or outputs. Commands:

- ``open``: open an artifact (``format``, ``path``, ``spec``, ``info``, ``threads``) -> load time,
  the runner's description and structural problems; or the eager PyTorch model (``format: "eager"``).
- ``run``: logits of one batch (``names``, ``images``, ``tensor``) -> logits and the time it took.
- ``time``: ``n`` timed runs of the last batch, prepared once -> times in ms.
- ``about``: the platform and the runtime versions installed on the target.
- ``rss``: this process's peak resident memory. ``quit``.

It imports only numpy and this package's light modules at start; each runtime is imported when
an artifact needs it, so a target without (say) onnxruntime still runs ExecuTorch.
"""
from __future__ import annotations

import base64
import gc
import json
import os
import platform
import resource
import sys
import time

import numpy as np


def pack(array: np.ndarray) -> dict:
    a = np.ascontiguousarray(array)
    return {"dtype": str(a.dtype), "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii")}


def unpack(message: dict) -> np.ndarray:
    raw = base64.b64decode(message["data"])
    return np.frombuffer(raw, dtype=np.dtype(message["dtype"])).reshape(message["shape"]).copy()


def peak_rss_mb() -> float:
    """This process's own peak resident memory.

    Linux's ru_maxrss carries the parent's high-water mark across fork and exec, so it
    would charge the harness's memory to every runtime; VmHWM is this address space's.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform == "darwin" else kb / 1024


def about() -> dict:
    """What the target is: machine, Python, CPU as the kernel (or the emulator) reports it, runtime versions."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("numpy", "torch", "executorch", "onnxruntime", "coremltools"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    cpu = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "CPU implementer", "CPU part", "CPU variant", "Features", "flags"):
                    cpu.setdefault(key, value.strip())
    except OSError:
        pass
    return {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
            "cores": os.cpu_count(), "cpu": cpu, "versions": versions}


class EagerRunner:
    """The PyTorch model itself (authors' or deploy form), for the benchmark's eager rows; not an artifact."""

    method = "torch"

    def __init__(self, cfg: dict, threads: int | None):
        import torch

        from cloformer_deploy.models import apply_state_dict, to_deploy
        from cloformer_deploy.models.cloformer import CloFormer, CloFormerConfig
        from cloformer_deploy.models.fat import FAT, FATConfig

        if threads:
            torch.set_num_threads(threads)
        # built from the architecture itself, not a registry name: any variant config works
        arch = CloFormer if cfg["family"] == "cloformer" else FAT
        conf = (CloFormerConfig if cfg["family"] == "cloformer" else FATConfig)(**cfg["architecture"])
        model = arch(conf, num_classes=cfg["num_classes"]).eval()
        apply_state_dict(model, torch.load(cfg["weights"], weights_only=True), cfg["model"])
        if cfg["form"] == "deploy":
            model = to_deploy(model, tuple(cfg["input_size"]))
        self.model, self.torch = model, torch

    def prepare(self, batch):
        return self.torch.from_numpy(batch.tensor)

    def infer(self, prepared) -> np.ndarray:
        with self.torch.no_grad():
            return self.model(prepared).numpy()

    def check_structure(self) -> list[str]:
        return []

    def describe(self) -> dict:
        return {"method": self.method}


def _open(cmd: dict):
    from pathlib import Path

    threads = cmd.get("threads")
    if cmd["format"] == "eager":
        return EagerRunner(cmd["eager"], threads)
    from cloformer_deploy.export import BACKENDS
    from cloformer_deploy.export.base import ModelSpec

    s = cmd["spec"]
    spec = ModelSpec(s["name"], s["num_classes"], tuple(s["input_size"]), s["batch"], tuple(s["mean"]),
                     tuple(s["std"]), s.get("labels"), s.get("params", 0), None, None)
    return BACKENDS[cmd["format"]].open(Path(cmd["path"]), spec, cmd.get("info") or {}, threads=threads)


def _error(e: BaseException) -> dict:
    text = str(e).splitlines()[0] if str(e) else ""
    return {"error": f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__}


def main() -> None:
    # the protocol owns the real stdout; anything a library prints goes to stderr
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def reply(obj):
        print(json.dumps(obj), file=proto, flush=True)

    from cloformer_deploy.export.images import ImageBatch

    runner = prepared = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["cmd"]
        if op == "quit":
            break
        try:
            if op == "open":
                t = time.perf_counter()
                runner, prepared = _open(cmd), None
                reply({"load_ms": (time.perf_counter() - t) * 1e3, "describe": runner.describe(),
                       "problems": runner.check_structure()})
            elif op == "run":
                batch = ImageBatch(cmd["names"], unpack(cmd["images"]), unpack(cmd["tensor"]))
                prepared = runner.prepare(batch)
                t = time.perf_counter()
                out = runner.infer(prepared)
                reply({"ms": (time.perf_counter() - t) * 1e3, "logits": pack(np.asarray(out, np.float32))})
            elif op == "time":
                times = []
                # as timeit does: Python's collector would otherwise run inside some timed calls (seen at
                # 4-6% of ExecuTorch samples in perf), a cost of this harness, not of the runtime
                gc.disable()
                try:
                    for _ in range(cmd["n"]):
                        s = time.perf_counter()
                        runner.infer(prepared)
                        times.append((time.perf_counter() - s) * 1e3)
                finally:
                    gc.enable()
                reply({"times_ms": times})
            elif op == "about":
                reply(about())
            elif op == "rss":
                reply({"peak_rss_mb": peak_rss_mb()})
            else:
                reply({"error": f"unknown command {op!r}"})
        except Exception as e:  # report, do not crash: the caller turns it into an error row or a failed check
            reply(_error(e))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
