"""One runtime in its own process: load an artifact, time it on command, report outputs and peak memory.

The harness talks to it over stdin/stdout, one JSON object per line, so that several
runtimes can stay loaded while being timed in turns (interleaved), each with its own
thread pool and memory accounting.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time

import numpy as np


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


def _load(cfg: dict):
    runtime, threads = cfg["runtime"], int(cfg["threads"])
    x = np.load(cfg["images"])
    if runtime == "torch":
        import torch

        torch.set_num_threads(threads)
        from cloformer_deploy.models import apply_state_dict, to_deploy
        from cloformer_deploy.models.cloformer import CloFormer, CloFormerConfig
        from cloformer_deploy.models.fat import FAT, FATConfig

        # built from the architecture itself, not a registry name: any variant config works
        arch = CloFormer if cfg["family"] == "cloformer" else FAT
        conf = (CloFormerConfig if cfg["family"] == "cloformer" else FATConfig)(**cfg["architecture"])
        model = arch(conf, num_classes=cfg["num_classes"]).eval()
        apply_state_dict(model, torch.load(cfg["weights"], weights_only=True), cfg["model"])
        if cfg["form"] == "deploy":
            model = to_deploy(model, tuple(cfg["input_size"]))

        def run(batch):
            with torch.no_grad():
                return model(torch.from_numpy(batch)).numpy()
        return run, x
    if runtime == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(cfg["path"], opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return (lambda batch: session.run(None, {name: batch})[0]), x
    if runtime.startswith("executorch"):
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        from cloformer_deploy.export.executorch import input_dtype

        portable_lib._unsafe_reset_threadpool(threads)
        method = Runtime.get().load_program(cfg["path"]).load_method("forward")
        x = x.astype(input_dtype(method))  # an fp16 program takes fp16 images: converted once, not per run

        def run(batch):
            return method.execute([torch.from_numpy(batch)])[0].float().numpy()
        return run, x
    if runtime == "coreml":
        from cloformer_deploy.export.base import ModelSpec
        from cloformer_deploy.export.coreml import CoreMLRunner
        from cloformer_deploy.export.images import ImageBatch

        spec = ModelSpec(cfg["model"], cfg["num_classes"], tuple(cfg["input_size"]), 1, (0, 0, 0), (1, 1, 1),
                         cfg.get("labels"), 0, None, None)
        runner = CoreMLRunner(cfg["path"], spec)
        pixels = np.load(cfg["pixels"])

        def run(batch_index):
            i = batch_index
            return runner.run(ImageBatch(["x"], pixels[i:i + 1], x[i:i + 1]))
        return run, None
    raise ValueError(f"unknown runtime {runtime}")


def main() -> None:
    # the protocol owns the real stdout; anything a library prints goes to stderr
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def reply(obj):
        print(json.dumps(obj), file=proto, flush=True)

    cfg = json.loads(sys.stdin.readline())
    t = time.perf_counter()
    try:
        run, x = _load(cfg)
        n_images = len(np.load(cfg["images"], mmap_mode="r"))
        first = 0 if x is None else x[:1]
        run(first)  # the first run initialises lazily in several runtimes: part of loading
        loaded = {"load_ms": (time.perf_counter() - t) * 1e3}
    except Exception as e:  # report, do not crash: the harness turns it into an error row
        reply({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]})
        return
    reply(loaded)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "time":
            times = []
            # as timeit does: Python's collector would otherwise run inside some timed calls (seen at
            # 4-6% of ExecuTorch samples in perf), a cost of this harness, not of the runtime
            gc.disable()
            try:
                for _ in range(cmd["n"]):
                    s = time.perf_counter()
                    run(first)
                    times.append((time.perf_counter() - s) * 1e3)
            finally:
                gc.enable()
            reply({"times_ms": times})
        elif cmd["cmd"] == "outputs":
            if x is None:
                outs = [run(i) for i in range(n_images)]
            else:
                outs = [run(x[i:i + 1]) for i in range(len(x))]
            np.save(cmd["path"], np.concatenate(outs).astype(np.float32))
            reply({"ok": True})
        elif cmd["cmd"] == "rss":
            reply({"peak_rss_mb": peak_rss_mb()})
        elif cmd["cmd"] == "quit":
            break


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
