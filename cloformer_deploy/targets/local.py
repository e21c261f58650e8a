"""The local target: this machine, as before targets existed (the benchmark's worker is a subprocess here)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from ..formats.base import BACKENDS, Backend, ModelSpec, Runner
from .base import Target
from .native import TRIPLES, Bundle, default_cache, host_platform, ready_bundle


class LocalTarget(Target):
    name = kind = "local"

    def __init__(self, cache: str | Path | None = None):
        self.platform = host_platform()
        self.cache = Path(cache) if cache is not None else default_cache()
        self._bundles: dict = {}

    def native_bundle(self, backend: Backend) -> Bundle | None:
        """This machine's build of the format's native runner (``cloformer-device setup local``), if there is one."""
        if backend.native_runner is None or self.platform not in TRIPLES:
            return None
        if backend.name not in self._bundles:
            self._bundles[backend.name] = ready_bundle(self.cache, self.platform, backend)
        return self._bundles[backend.name]

    gpu_software = True  # the only Vulkan device set up here is Mesa's lavapipe (targets/gpu.py)

    def gpu_missing(self) -> str | None:
        from .gpu import gpu_record, missing_hint

        return None if gpu_record(self.cache, self.platform) is not None else missing_hint(self.cache)

    def native_command(self, fmt: str, gpu: bool = False):
        if not gpu:
            return super().native_command(fmt)
        from .gpu import gpu_runner_environment

        folders, env = gpu_runner_environment(self.cache, self.platform)
        bundle = self.native_bundle(BACKENDS[fmt])
        # the loader's other ways to choose drivers would take precedence over lavapipe's manifest
        inherited = {k: v for k, v in os.environ.items() if k not in ("VK_DRIVER_FILES", "VK_ADD_DRIVER_FILES")}
        return bundle.words(None, *self.native_args(), libraries=tuple(folders)), {**inherited, **env}, []

    def can_run(self, backend: Backend) -> bool:
        return True  # Core ML included: off Apple systems its runner is the package interpreter

    def worker_command(self):
        return [sys.executable, "-m", "cloformer_deploy.targets.worker"], None, []

    def runner(
        self,
        fmt: str,
        path: str | Path,
        spec: ModelSpec,
        info: dict,
        threads: int | None = None,
        native: bool = False,
    ) -> Runner:
        # validation here stays on the Python runtimes, in this process: exporting needs no compiler, the runtime
        # is already imported here, and a worker would only add its start-up. ``native``: the built native runner
        # where there is one (an evaluation's workers run as an app would)
        if native and self.runs_natively(fmt):
            return super().runner(fmt, path, spec, info, threads)
        return BACKENDS[fmt].open(Path(path), spec, info, threads)

    def describe(self) -> dict:
        return {**super().describe(), "machine": platform.machine(), "processor": platform.processor() or None}
