"""The local target: this machine, as before targets existed (the benchmark's worker is a subprocess here)."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

from ..formats.base import BACKENDS, Backend, ModelSpec, Runner
from .base import Target


def this_platform() -> str:
    return f"{sys.platform}-{platform.machine().lower()}"


class LocalTarget(Target):
    name = kind = "local"

    def __init__(self):
        self.platform = this_platform()

    def can_run(self, backend: Backend) -> bool:
        return True  # Core ML included: off Apple systems its runner is the package interpreter

    def worker_command(self):
        return [sys.executable, "-m", "cloformer_deploy.targets.worker"], None, []

    def runner(self, fmt: str, path: str | Path, spec: ModelSpec, info: dict, threads: int | None = None) -> Runner:
        # in this process: the runtime is already imported here, and a worker would only add its start-up
        return BACKENDS[fmt].open(Path(path), spec, info, threads)

    def describe(self) -> dict:
        return {**super().describe(), "machine": platform.machine(), "processor": platform.processor() or None}
