"""Per-operator profiles, as each format's runtime reports them; what the formats' profilers share.

Only operators are listed. Time around them (entering an XNNPACK partition, ONNX Runtime's executor,
the profilers' event recording) is in no row, and XNNPACK and ONNX Runtime count whole microseconds
(rounded down) per operator, so an operator under 1 µs shows as 0: the sum of the rows is a little
below the end-to-end latency.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

WARMUP_RUNS = 2  # executions run first and left out (lazy initialisation, arena growth, cold caches)


@dataclass
class OpTime:
    name: str  # one operator instance of the graph that runs
    kind: str  # its operator type: XNNPACK's ("Convolution (NHWC, F32) IGEMM"), ONNX Runtime's ("Conv")
    median_ms: float  # median over the profiled runs of this instance's time in one run
    calls: int = 1  # times it runs in one inference


def medians(samples: list[dict], counts: list[dict]) -> list[OpTime]:
    """One OpTime per (name, kind) seen in any run, in order of first appearance; a run without it counts 0."""
    keys = list(dict.fromkeys(k for run in samples for k in run))
    out = []
    for key in keys:
        calls = max((c.get(key, 0) for c in counts), default=1) or 1
        out.append(OpTime(key[0], key[1], statistics.median(run.get(key, 0.0) for run in samples), calls))
    return out


def batches(images: np.ndarray, batch: int) -> list[np.ndarray]:
    """The images as consecutive batches of the artifact's fixed batch size, each C-contiguous float32."""
    if images.ndim != 4 or len(images) < batch:
        raise ValueError(f"images must be (N, C, H, W) with N >= {batch} (the artifact's batch); got {images.shape}")
    return [
        np.ascontiguousarray(images[i : i + batch], dtype=np.float32) for i in range(0, len(images) - batch + 1, batch)
    ]


def check_counts(threads: int, runs: int) -> None:
    if threads < 1 or runs < 1:
        raise ValueError(f"threads and runs must be at least 1 (got {threads}, {runs})")
