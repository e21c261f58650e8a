"""Targets: where a worker runs artifacts. ``local`` (this machine) and ``arm64`` (emulated ARM64).

Importing this package imports no runtime; a target is checked (:meth:`Target.check`) before any work.
"""
from __future__ import annotations

from pathlib import Path

from .base import Target, TargetError, WorkerError, WorkerProcess, WorkerRunner

TARGETS = {"local": "this machine (latency and drift)",
           "arm64": "ARM64 emulated by QEMU: the phone's kernels and arithmetic (drift only, no latency)"}


def get_target(name: str = "local", cpu: str | None = None, cache: str | Path | None = None) -> Target:
    """The target called ``name``, checked ready; TargetError (one line naming the fix) otherwise."""
    key = str(name).strip().lower()
    if key not in TARGETS:
        raise TargetError(f"--target {name!r} is not a target; choose from {', '.join(TARGETS)}")
    if key == "local":
        if cpu is not None:
            raise TargetError("--cpu chooses the emulated CPU of --target arm64; drop it or add --target arm64")
        from .local import LocalTarget

        return LocalTarget()
    from .arm64 import DEFAULT_CPU, EmulatedArm64Target

    target = EmulatedArm64Target(cpu or DEFAULT_CPU, cache)
    target.check()
    return target


__all__ = ["TARGETS", "Target", "TargetError", "WorkerError", "WorkerProcess", "WorkerRunner", "get_target"]
