"""An Android device through ``adb``: the native runners run in ``adb shell`` from ``/data/local/tmp``.

That is how Android's own benchmark tools run (ExecuTorch's runners, LiteRT's ``benchmark_model``): the
shell user may execute files under ``/data/local/tmp``, and an ``adb shell`` process is not an app, so no
app sandbox applies. The transport is the host's ``adb`` (Debian's package ``adb``); files are pushed once.
A device is chosen by its serial (``adb://SERIAL``, as ``adb devices`` lists it; ``adb://`` alone when one
device is attached).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from .base import TargetError, last_line, run_in_group
from .native import TRIPLES
from .shell import ShellDevice

DEFAULT_REMOTE_DIR = "/data/local/tmp/cloformer-deploy"
ADB_TIMEOUT = 60.0
_SERIAL = re.compile(r"^[A-Za-z0-9._:\-]+$")
STATE_FIX = {
    "unauthorized": "unlock the phone and accept its 'Allow USB debugging?' prompt (then adb devices shows 'device')",
    "offline": "reconnect the cable, or restart adb with: adb kill-server",
    "no permissions": "this user may not open the USB device: add a udev rule for it (see docs/android.md) or run "
    "adb as its owner",
    "recovery": "the phone is in recovery mode: boot it normally",
    "sideload": "the phone is in sideload mode: boot it normally",
    "bootloader": "the phone is in its bootloader: boot it normally",
}


def parse_serial(text: str) -> str | None:
    rest = str(text).strip()[len("adb://") :].strip("/")
    if rest and not _SERIAL.match(rest):
        raise TargetError(
            f"--target {text!r} is not an adb address; write adb://SERIAL as adb devices lists it, or adb://"
        )
    return rest or None


def adb_binary() -> str | None:
    return shutil.which("adb")


def list_devices(adb: str) -> list[tuple[str, str]]:
    """(serial, state) of every device ``adb devices`` lists."""
    try:
        proc = subprocess.run([adb, "devices"], capture_output=True, text=True, timeout=ADB_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise TargetError(
            f"adb devices gave no answer within {ADB_TIMEOUT:.0f}s; restart adb with: adb kill-server"
        ) from None
    if proc.returncode != 0:
        raise TargetError(
            f"adb devices failed: {last_line(proc.stderr) or proc.returncode}; restart adb with: adb kill-server"
        )
    out = []
    for line in proc.stdout.splitlines():
        if "\t" in line and not line.startswith(("List of devices", "*")):
            serial, state = line.split("\t", 1)
            out.append((serial.strip(), state.strip()))
    return out


class AdbTarget(ShellDevice):
    """An Android device over adb: the native runners in ``adb shell``; real latencies; no Python."""

    kind = "adb"
    has_python = False
    remote_default = DEFAULT_REMOTE_DIR

    def __init__(
        self,
        address: str,
        cores: str | None = None,
        remote_dir: str | None = None,
        cache: str | Path | None = None,
    ):
        super().__init__(cache, cores, remote_dir)
        self.serial = parse_serial(address)
        self.name = f"adb://{self.serial}" if self.serial else "adb://"
        self.adb = adb_binary()

    def choose_device(self) -> None:
        """The device to use, checked attached and ready; TargetError (one line naming the fix) otherwise."""
        if self.adb is None:
            raise TargetError(
                "--target adb:// uses Android's adb, which is not installed; install it with: apt-get install adb"
            )
        devices = list_devices(self.adb)
        if self.serial is None:
            if not devices:
                raise TargetError(
                    "adb lists no device: connect the phone by USB with USB debugging on (docs/android.md), "
                    "then check with: adb devices"
                )
            if len(devices) > 1:
                raise TargetError(
                    f"adb lists {len(devices)} devices ({', '.join(s for s, _ in devices)}); choose one with "
                    f"--target adb://SERIAL"
                )
            self.serial = devices[0][0]
            self.name = f"adb://{self.serial}"
        states = dict(devices)
        if self.serial not in states:
            listed = ", ".join(states) or "none"
            raise TargetError(
                f"adb has no device {self.serial!r} (it lists: {listed}); check the serial with: adb devices"
            )
        state = states[self.serial]
        if state != "device":  # "no permissions (user x is not in the plugdev group); see [url]": its first words
            fix = STATE_FIX.get(state.split(" (")[0].strip(), "check it with: adb devices")
            raise TargetError(f"{self.name} is {state}: {fix}")

    # ---- transport
    def shell_argv(self, command: str) -> list[str]:
        return [self.adb, "-s", self.serial, "shell", command]

    def transport_error(self, code: int, err: str) -> str | None:
        line = last_line(err)
        low = line.lower()
        if (
            code != 0
            and low.startswith(("error:", "adb:"))
            and any(w in low for w in ("device", "unauthorized", "offline", "closed", "connect"))
        ):
            return f"{self.name}: {line}; check it with: adb devices"
        return None

    def push(self, local: Path, remote: str, what: str) -> None:
        size = local.stat().st_size
        timeout = 120 + size / 1e6
        done = run_in_group([self.adb, "-s", self.serial, "push", str(local), remote], timeout)
        if done is None:
            raise TargetError(f"{self.name}: pushing {what} gave no answer within {timeout:.0f}s; it was stopped")
        if done[0] != 0:
            raise TargetError(f"{self.name}: pushing {what} failed: {last_line(done[2] or done[1])}")

    # ---- the Target interface
    def reach(self) -> None:
        """Choose the device and probe it: what setup needs before the runners for its CPU exist."""
        self.choose_device()
        self.probe()
        if self.cores is not None:
            self.check_cores()
        if self.platform not in TRIPLES:
            raise TargetError(f"{self.name} is {self.platform}; the native runners are built for {', '.join(TRIPLES)}")

    def check(self) -> None:
        self.reach()
        self.find_bundles(required=True)

    def gpu_missing(self) -> str | None:
        return (
            f"{self.name}: LiteRT's GPU accelerator needs a glibc Vulkan loader, and Android's libvulkan.so is "
            "bionic's, which the runners' glibc cannot load; a phone's GPU runs in an app built with the Android "
            "NDK (docs/litert.md)"
        )

    def worker_command(self):
        raise TargetError(f"{self.name} runs the native runners only (no Python): .pte, .onnx and .tflite")

    def describe(self) -> dict:
        return {**super().describe(), "serial": self.serial}
