"""The options that choose where artifacts also run: export, validate and bench share them."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import Options, option

DEVICE_FIELDS = ("remote_python", "cores", "ssh_key", "ssh_config", "remote_dir")


@dataclass
class TargetOptions(Options):
    fields_last = True  # in help, after the command's own options
    target: str = option(
        "local",
        "local (default); arm64: also on emulated ARM64 (the phone's XNNPACK and ONNX "
        "Runtime kernels under QEMU; numerics only, no latency; set it up once with "
        "cloformer-device setup arm64); ssh://[user@]host[:port]: on a real device "
        "(a board, a phone with Termux, a Mac); or adb://[SERIAL]: an Android phone over adb "
        "(see cloformer-device check)",
    )
    cpu: str | None = option(
        None, "ARM64 CPU profile for --target arm64 (default cortex-a76; see cloformer-device list)"
    )
    target_cache: str | None = option(
        None, "folder of the native runners and ARM64 CPU views (default: as cloformer-device setup)"
    )
    remote_python: str | None = option(
        None,
        "ssh:// device: its Python command, prefix included (default python3; "
        "a phone: 'proot-distro login debian -- python3')",
    )
    cores: str | None = option(
        None,
        "ssh:// or adb:// device: pin its runners to these cores, e.g. 4-7 (the big cluster; cloformer-device "
        "check lists them)",
    )
    ssh_key: str | None = option(None, "ssh:// device: private key (default: ssh's own choice)")
    ssh_config: str | None = option(None, "ssh:// device: an ssh client config file (ssh -F)")
    remote_dir: str | None = option(
        None,
        "ssh:// or adb:// device: work folder on it (default ~/.cache/cloformer-deploy/device; adb: "
        "/data/local/tmp/cloformer-deploy)",
    )

    def device(self) -> dict:
        """The ssh:// device's options that were set."""
        return {k: getattr(self, k) for k in DEVICE_FIELDS if getattr(self, k) is not None}

    def open_target(self):
        """The chosen target, checked ready (TargetError, one line naming the fix, otherwise)."""
        from . import get_target

        return get_target(self.target, self.cpu, self.target_cache, self.device())


@dataclass
class SetupOptions(TargetOptions):
    """``cloformer-device setup``: build the native runners a target runs, once (a device's: copied to it too)."""

    target: str = option(
        None,
        "local, gpu (local and a software Vulkan device for GPU rows), arm64, ssh://[user@]host[:port] or adb://[SERIAL]",
        positional=True,
    )
    cache: str | None = option(
        None, "folder for the runners (default: $CLOFORMER_DEPLOY_CACHE or ~/.cache/cloformer-deploy)"
    )
    force: bool = option(False, "rebuild runners that are already built")


@dataclass
class ListOptions(Options):
    """``cloformer-device list``: the targets, whether they are ready, the ARM64 CPU profiles."""

    cache: str | None = option(None, "folder of the runners (as for setup)")


@dataclass
class CheckOptions(TargetOptions):
    """``cloformer-device check``: what a device has and lacks; installs nothing."""

    target: str = option(None, "ssh://[user@]host[:port] or adb://[SERIAL]", positional=True)
