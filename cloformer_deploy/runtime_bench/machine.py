"""The machine a benchmark ran on, with its measured fp32 matmul throughput per thread count."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

# fp32 GEMM throughput of the two BLAS libraries the runtimes use: PyTorch's (MKL, which takes a
# slow path on some AMD CPUs) and ONNX Runtime's MLAS (which XNNPACK-class kernels resemble); the higher
# is the machine's peak for the efficiency column
_MATMUL_PROBE = r"""
import json, sys, time
import numpy as np, torch
threads, n = int(sys.argv[1]), 1024
torch.set_num_threads(threads)

def best(fn, reps=4, rounds=7):
    for _ in range(3):
        fn()
    t_best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        t_best = min(t_best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / t_best / 1e9

a, b = torch.randn(n, n), torch.randn(n, n)
out = {"torch": best(lambda: a @ b)}
try:
    import onnx, onnxruntime as ort
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    o = ort.SessionOptions(); o.intra_op_num_threads = threads
    s = ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
    feed = {"a": a.numpy(), "b": b.numpy()}
    out["onnxruntime"] = best(lambda: s.run(None, feed))
except Exception:
    pass
print(json.dumps(out))
"""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_probe(threads: int) -> dict[str, float]:
    """Best-of-7 fp32 1024x1024 GEMM throughput per library at this thread count, in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", _MATMUL_PROBE, str(threads)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    return {k: round(v, 1) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def machine_info(thread_counts: list[int]) -> dict:
    probes = {str(t): matmul_probe(t) for t in thread_counts}
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "matmul_gflops": {t: max(p.values()) for t, p in probes.items()},
        "matmul_gflops_by_library": probes,
    }
