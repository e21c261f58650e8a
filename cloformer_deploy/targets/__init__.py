"""Targets: where a worker runs artifacts. ``local`` (this machine), ``arm64`` (emulated ARM64) and
``ssh://[user@]host[:port]`` (a real device).

Importing this package imports no runtime; a target is checked (:meth:`Target.check`) before any work.
"""

from __future__ import annotations

from pathlib import Path

from ..options import flag_of
from .base import Target, TargetError, WorkerError, WorkerProcess, WorkerRunner
from .options import DEVICE_FIELDS

TARGETS = {
    "local": "this machine (latency and drift)",
    "arm64": "ARM64 emulated by QEMU: the phone's kernels and arithmetic (drift only, no latency)",
    "ssh://[user@]host[:port]": "a real device over SSH: a board, a phone (Termux), a Mac (latency and drift)",
}
DEVICE_OPTIONS = {name: flag_of(name) for name in DEVICE_FIELDS}  # an ssh:// device's options, by their flags


def get_target(
    name: str = "local", cpu: str | None = None, cache: str | Path | None = None, device: dict | None = None
) -> Target:
    """The target called ``name``, checked ready; TargetError (one line naming the fix) otherwise.

    ``device``: the options of an ``ssh://`` target (keys of DEVICE_OPTIONS); None values are unset.
    """
    key = str(name).strip()
    device = {k: v for k, v in (device or {}).items() if v is not None}
    unknown = [k for k in device if k not in DEVICE_OPTIONS]
    if unknown:
        raise TargetError(f"unknown device option {unknown[0]!r}; choose from {', '.join(DEVICE_OPTIONS)}")
    if key.lower().startswith("ssh://"):
        if cpu is not None or cache is not None:
            raise TargetError("--cpu and --target-cache belong to --target arm64; drop them for an ssh:// device")
        from .ssh import SshTarget

        target = SshTarget(key, **device)
        target.check()
        return target
    if device:
        flag = DEVICE_OPTIONS[next(iter(device))]
        raise TargetError(f"{flag} applies to an ssh:// device; drop it or pass --target ssh://[user@]host[:port]")
    key = key.lower()
    if key not in ("local", "arm64"):
        raise TargetError(f"--target {name!r} is not a target; choose local, arm64 or ssh://[user@]host[:port]")
    if key == "local":
        if cpu is not None:
            raise TargetError("--cpu chooses the emulated CPU of --target arm64; drop it or add --target arm64")
        from .local import LocalTarget

        return LocalTarget()
    from .arm64 import DEFAULT_CPU, EmulatedArm64Target

    target = EmulatedArm64Target(cpu or DEFAULT_CPU, cache)
    target.check()
    return target


__all__ = [
    "DEVICE_OPTIONS",
    "TARGETS",
    "Target",
    "TargetError",
    "WorkerError",
    "WorkerProcess",
    "WorkerRunner",
    "get_target",
]
