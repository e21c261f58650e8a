"""The machine a benchmark ran on, with its measured fp32 matmul throughput per thread count."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

_MATMUL_PROBE = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
n = 1024
a, b = torch.randn(n, n), torch.randn(n, n)
for _ in range(3):
    a @ b
best = float("inf")
for _ in range(7):
    t = time.perf_counter()
    for _ in range(4):
        a @ b
    best = min(best, (time.perf_counter() - t) / 4)
print(json.dumps({"gflops": 2 * n**3 / best / 1e9}))
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


def matmul_gflops(threads: int) -> float:
    """Best-of-7 fp32 1024x1024 matmul throughput at this thread count, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _MATMUL_PROBE, str(threads)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return round(json.loads(out.stdout.strip().splitlines()[-1])["gflops"], 1)


def machine_info(thread_counts: list[int]) -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "matmul_gflops": {str(t): matmul_gflops(t) for t in thread_counts}}
