"""The emulated ARM64 target: the phone's arithmetic (XNNPACK's NEON/fp16/dot-product kernels) on any Linux x86 host.

A Debian arm64 root with the host's pinned runtimes (built once by :mod:`.arm64_root`) runs under
QEMU's user-mode emulator. The CPU profile chooses what QEMU emulates (the instruction set, hence
which kernels XNNPACK may pick) and the MIDR the root's /proc and /sys report (PyTorch's cpuinfo
reads it, and XNNPACK picks core-specific kernels by it). Figures are numerics only: an emulated
run takes seconds per image and says nothing of a phone's speed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..versions import installed_versions
from .base import RUNTIME_IMPORTS, Target, TargetError, public_version, same_version
from .worker import device_packages


@dataclass(frozen=True)
class CpuProfile:
    name: str
    qemu_cpu: str  # QEMU_CPU: the instruction set emulated
    midr: int  # MIDR_EL1 the root reports: implementer, variant, part, revision
    features: str  # the Features line of /proc/cpuinfo (the kernel's hwcap names)
    about: str
    fp16: bool  # fp16 arithmetic (ARMv8.2 FEAT_FP16); without it XNNPACK (executorch 1.5.1) runs fp16 programs
    # with other kernels (measured: other outputs than on a Cortex-A76); executorch 1.4.1 refused them
    known_bad_before: tuple[int, ...] | None = None  # QEMU versions below this compute wrong results
    known_bad_why: str = ""


_ARMV80 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"
_ARMV82 = _ARMV80 + " atomics fphp asimdhp asimdrdm lrcpc dcpop asimddp ssbs"

CPU_PROFILES: dict[str, CpuProfile] = {
    p.name: p
    for p in (
        CpuProfile(
            "cortex-a76",
            "cortex-a76",
            0x414FD0B1,
            _ARMV82,
            "Armv8.2-A with fp16 arithmetic and int8 dot product: the big core of most phones in use",
            True,
        ),
        CpuProfile(
            "armv9-i8mm",
            "max,sme=off",
            0x412FD480,
            _ARMV82 + " sve sve2 i8mm bf16 svei8mm svebf16",
            "Armv9-A with int8 matrix multiply (i8mm), SVE2 and bf16, presented as a Cortex-X2 "
            "(phones from 2022); QEMU's max CPU without SME",
            True,
        ),
        CpuProfile(
            "cortex-a72",
            "cortex-a72",
            0x410FD083,
            _ARMV80,
            "Armv8.0-A without fp16 arithmetic or dot product (phones of 2016-2018, Raspberry Pi 4): "
            "XNNPACK runs fp16 programs with other kernels",
            False,
        ),
        CpuProfile(
            "max",
            "max",
            0x412FD480,
            _ARMV82 + " sve sve2 i8mm bf16 sme",
            "everything QEMU emulates, SME included",
            True,
            known_bad_before=(10,),
            known_bad_why="computes XNNPACK's int8 kernels wrongly under SME (0 of 4 top-1 measured on "
            "QEMU 7.2; QEMU 10 is bit-exact)",
        ),
    )
}
DEFAULT_CPU = "cortex-a76"
CORES = 1  # the root reports one core: emulated runs use one thread, and XNNPACK sees one core kind


def default_cache() -> Path:
    """Where built roots live: $CLOFORMER_DEPLOY_CACHE, else the user's cache folder."""
    if os.environ.get("CLOFORMER_DEPLOY_CACHE"):
        return Path(os.environ["CLOFORMER_DEPLOY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cloformer-deploy"


def qemu_binary() -> str | None:
    return shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")


@lru_cache(maxsize=4)
def qemu_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(g) for g in m.groups() if g is not None) if m else (0,)


def qemu_label(binary: str) -> str:
    return f"qemu-user {'.'.join(map(str, qemu_version(binary)))}"


def emulated_python(view: Path, cpu: str, pythonpath: str) -> tuple[list[str], dict]:
    """(argv, environment) that start the root's Python 3.11 under QEMU with a CPU profile's view.

    The environment is built, not inherited: nothing of the host's Python settings reaches the emulated one.
    """
    env = {
        "QEMU_CPU": CPU_PROFILES[cpu].qemu_cpu,
        "PYTHONPATH": pythonpath,
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONWARNINGS": "ignore",
        "LANG": "C.UTF-8",
        "PATH": "/usr/bin:/bin",
        "OMP_NUM_THREADS": "1",
    }
    return [qemu_binary(), "-L", str(view), str(view / "usr" / "bin" / "python3.11")], env


def check_cpu(name: str, qemu: str | None) -> CpuProfile:
    """The CPU profile called ``name``; TargetError for an unknown one or one known to compute wrongly here."""
    if name not in CPU_PROFILES:
        raise TargetError(
            f"--cpu {name!r} is not a profile; choose from {', '.join(CPU_PROFILES)} "
            "(cloformer-device list describes them)"
        )
    profile = CPU_PROFILES[name]
    if qemu and profile.known_bad_before and qemu_version(qemu) < profile.known_bad_before:
        have = ".".join(map(str, qemu_version(qemu)))
        need = ".".join(map(str, profile.known_bad_before))
        raise TargetError(
            f"--cpu {name}: QEMU {have} {profile.known_bad_why}; use --cpu armv9-i8mm, or QEMU {need} or newer"
        )
    return profile


def cpuinfo_text(profile: CpuProfile, cores: int = CORES) -> str:
    m = profile.midr
    block = (
        "processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: {f}\nCPU implementer\t: 0x{imp:02x}\n"
        "CPU architecture: 8\nCPU variant\t: 0x{var:x}\nCPU part\t: 0x{part:03x}\nCPU revision\t: {rev}\n\n"
    )
    return "".join(
        block.format(i=i, f=profile.features, imp=m >> 24, var=(m >> 20) & 0xF, part=(m >> 4) & 0xFFF, rev=m & 0xF)
        for i in range(cores)
    )


def write_cpu_view(root: Path, view: Path, profile: CpuProfile, cores: int = CORES) -> None:
    """``view``: the root's top-level folders (links) plus a /proc/cpuinfo and /sys CPU tree of this profile.

    QEMU's -L prefix looks every absolute path up in the view first, so the emulated PyTorch and
    XNNPACK read this CPU's identity while the host's /proc and /sys stay out of sight.
    """
    view.mkdir(parents=True)
    for entry in root.iterdir():
        (view / entry.name).symlink_to(os.path.relpath(entry, view))
    (view / "proc").mkdir()
    (view / "proc" / "cpuinfo").write_text(cpuinfo_text(profile, cores))
    cpu = view / "sys" / "devices" / "system" / "cpu"
    cpu.mkdir(parents=True)
    for name in ("possible", "present", "online"):
        (cpu / name).write_text(f"0-{cores - 1}\n" if cores > 1 else "0\n")
    for i in range(cores):
        ident = cpu / f"cpu{i}" / "regs" / "identification"
        ident.mkdir(parents=True)
        (ident / "midr_el1").write_text(f"0x{profile.midr:016x}\n")
        (ident / "revidr_el1").write_text("0x0000000000000000\n")


ROOT_DIR = "arm64"
PLATFORM = "linux-aarch64"
# the device packages of the formats that run there, at the host's versions: what runs on ARM64 is what was
# validated here
RUNTIMES = device_packages(PLATFORM)


def host_versions() -> dict[str, str]:
    """The versions the ARM64 root installs (RUNTIMES and their runtimes' imports): this host's, without a local
    label (2.14.1+cu130 -> 2.14.1)."""
    names = [*RUNTIMES, *(i for p in RUNTIMES for i in RUNTIME_IMPORTS.get(p, ()))]
    found = installed_versions(names)
    absent = [n for n in names if found[n] is None]
    if absent:
        raise TargetError(
            f"{absent[0]} is not installed on this host, so the ARM64 root cannot match it; "
            "install the project as the README says"
        )
    return {n: public_version(v) for n, v in found.items()}


def ready_state(cache: Path) -> dict | None:
    try:
        return json.loads((cache / ROOT_DIR / "ready.json").read_text())
    except (OSError, ValueError):
        return None


def check_ready(cache: Path) -> dict:
    """The ready root's record; TargetError naming the setup command when it is absent or for other versions."""
    state = ready_state(cache)
    if state is None:
        raise TargetError(
            f"--target arm64: no ARM64 root in {cache}; build it once with: cloformer-device setup "
            f"arm64{'' if cache == default_cache() else f' --cache {cache}'} (downloads about 3 GB)"
        )
    want = host_versions()
    have = {n: state["versions"].get(n) for n in RUNTIMES}
    differs = [n for n in RUNTIMES if not same_version(have[n], want[n])]
    if differs:
        diff = ", ".join(f"{n} {have[n]} (host {want[n]})" for n in differs)
        raise TargetError(
            f"--target arm64: the ARM64 root in {cache} has {diff}; rebuild it with: "
            "cloformer-device setup arm64 --force"
        )
    return state


class EmulatedArm64Target(Target):
    """ARM64 Linux under QEMU user-mode emulation, with one CPU profile; numerics only, no latency."""

    kind = "arm64"
    platform = PLATFORM
    measures_latency = False
    step_timeout = 1800.0  # an emulated image of CloFormer-XXS in fp16 takes up to 20 s, starting Python 20-45 s
    validation_threads = 1

    def __init__(self, cpu: str = DEFAULT_CPU, cache: str | Path | None = None):
        self.cpu = cpu
        self.cache = Path(cache) if cache is not None else default_cache()
        self.name = f"arm64-{cpu}"

    @property
    def home(self) -> Path:
        return self.cache / ROOT_DIR

    def check(self) -> None:
        qemu = qemu_binary()
        if qemu is None:
            raise TargetError(
                "--target arm64 needs QEMU's user-mode emulator; install it with: apt-get install qemu-user-static"
            )
        check_cpu(self.cpu, qemu)
        check_ready(self.cache)

    def worker_command(self):
        view = self.home / "cpus" / self.cpu
        package = Path(__file__).resolve().parents[1]
        # this package, seen by the emulated Python through a link: it is pure Python, so the host's copy runs
        link_dir = Path(tempfile.mkdtemp(prefix="cloformer-arm64-"))
        (link_dir / package.name).symlink_to(package)
        argv, env = emulated_python(view, self.cpu, f"/opt/site:{link_dir}")
        return [*argv, "-m", "cloformer_deploy.targets.worker"], {**env, "HOME": str(link_dir)}, [link_dir]

    def runner(self, fmt, path, spec, info, threads=None):
        return super().runner(fmt, path, spec, info, threads or self.validation_threads)

    def describe(self) -> dict:
        profile = CPU_PROFILES[self.cpu]
        qemu = qemu_binary()
        return {
            **super().describe(),
            "emulator": qemu_label(qemu) if qemu else None,
            "qemu_cpu": profile.qemu_cpu,
            "midr": f"0x{profile.midr:08x}",
            "cpu": profile.about,
        }
