"""Targets: where artifacts run. ``local`` (this machine), ``arm64`` (emulated ARM64),
``ssh://[user@]host[:port]`` and ``adb://[SERIAL]`` (real devices).

Importing this package imports no runtime; a target is checked (:meth:`Target.check`) before any work.
"""

from __future__ import annotations

from pathlib import Path

from ..options import flag_of
from .base import Target, TargetError, WorkerError, WorkerProcess, WorkerRunner
from .options import DEVICE_FIELDS

TARGETS = {
    "local": "this machine (latency, memory and drift; native runners once set up)",
    "arm64": "ARM64 emulated by QEMU: the phone's kernels and arithmetic (drift only, no latency)",
    "ssh://[user@]host[:port]": "a real device over SSH: a board, a phone (Termux), a Mac (latency and drift)",
    "adb://[SERIAL]": "an Android phone over adb, the runners in adb shell (latency and drift)",
}
DEVICE_OPTIONS = {name: flag_of(name) for name in DEVICE_FIELDS}  # a device's options, by their flags
SSH_ONLY = ("remote_python", "ssh_key", "ssh_config")


def get_target(
    name: str = "local",
    cpu: str | None = None,
    cache: str | Path | None = None,
    device: dict | None = None,
    for_setup: bool = False,
) -> Target:
    """The target called ``name``, checked ready; TargetError (one line naming the fix) otherwise.

    ``cache``: where the native runners (and the ARM64 CPU views) were built (default: as setup builds them).
    ``device``: the options of an ``ssh://`` or ``adb://`` target (keys of DEVICE_OPTIONS); None values are unset.
    ``for_setup``: a device only reached and probed, not required to have its runners yet.
    """
    key = str(name).strip()
    device = {k: v for k, v in (device or {}).items() if v is not None}
    unknown = [k for k in device if k not in DEVICE_OPTIONS]
    if unknown:
        raise TargetError(f"unknown device option {unknown[0]!r}; choose from {', '.join(DEVICE_OPTIONS)}")
    lower = key.lower()
    if lower.startswith(("ssh://", "adb://")):
        if cpu is not None:
            raise TargetError("--cpu belongs to --target arm64; drop it for a device")
        if lower.startswith("ssh://"):
            from .ssh import SshTarget

            target = SshTarget(key, cache=cache, **device)
        else:
            ssh_only = [k for k in device if k in SSH_ONLY]
            if ssh_only:
                raise TargetError(f"{DEVICE_OPTIONS[ssh_only[0]]} applies to an ssh:// device; drop it for adb://")
            from .adb import AdbTarget

            target = AdbTarget(key, cache=cache, **device)
        target.reach() if for_setup else target.check()
        return target
    if device:
        flag = DEVICE_OPTIONS[next(iter(device))]
        raise TargetError(f"{flag} applies to an ssh:// or adb:// device; drop it or pass --target with one")
    if lower not in ("local", "arm64"):
        raise TargetError(
            f"--target {name!r} is not a target; choose local, arm64, ssh://[user@]host[:port] or adb://[SERIAL]"
        )
    if lower == "local":
        if cpu is not None:
            raise TargetError("--cpu chooses the emulated CPU of --target arm64; drop it or add --target arm64")
        from .local import LocalTarget

        return LocalTarget(cache)
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
