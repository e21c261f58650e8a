"""The emulated ARM64 target: the phone's arithmetic (XNNPACK's NEON/fp16/dot-product kernels) on any Linux x86 host.

The aarch64 bundles of the native runners (built once by ``cloformer-device setup arm64``: the same programs a
phone runs, against the same wheels' libraries as this host) run under QEMU's user-mode emulator. The CPU
profile chooses what QEMU emulates (the instruction set, hence which kernels XNNPACK may pick) and the MIDR the
view's /proc and /sys report (cpuinfo reads it, and XNNPACK picks core-specific kernels by it). Figures are
numerics only: an emulated run takes seconds per image and says nothing of a phone's speed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..formats.base import Backend
from .base import Target, TargetError
from .native import Bundle, check_bundle, default_cache, native_backends, setup_hint


@dataclass(frozen=True)
class CpuProfile:
    name: str
    qemu_cpu: str  # QEMU_CPU: the instruction set emulated
    midr: int  # MIDR_EL1 the view reports: implementer, variant, part, revision
    features: str  # the Features line of /proc/cpuinfo (the kernel's hwcap names)
    about: str
    fp16: bool  # fp16 arithmetic (ARMv8.2 FEAT_FP16); without it XNNPACK (executorch 1.5.1) runs fp16 programs
    # in fp32 with fp32 copies of their weights (docs/targets.md); executorch 1.4.1 refused them
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
CORES = 1  # the view reports one core: emulated runs use one thread, and XNNPACK sees one core kind


def qemu_binary() -> str | None:
    return shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")


@lru_cache(maxsize=4)
def qemu_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(g) for g in m.groups() if g is not None) if m else (0,)


def qemu_label(binary: str) -> str:
    return f"qemu-user {'.'.join(map(str, qemu_version(binary)))}"


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


def write_cpu_view(view: Path, profile: CpuProfile, cores: int = CORES) -> None:
    """``view``: a /proc/cpuinfo and /sys CPU tree of this profile, for QEMU's -L prefix.

    QEMU looks every absolute path up in the view first, so the emulated runtimes (cpuinfo, which XNNPACK and ONNX
    Runtime read, picking kernels by the core) see this CPU while the host's /proc and /sys stay out of sight; every
    other path falls through to the host's. Without it ONNX Runtime's start-up crashes on the host's x86 cpuinfo.
    """
    view.mkdir(parents=True)
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


def write_cpu_views(cache: Path) -> Path:
    """Every profile's view under ``<cache>/arm64/cpus`` (made again each time: they are a few files)."""
    views = cache / ROOT_DIR / "cpus"
    shutil.rmtree(views, ignore_errors=True)
    for profile in CPU_PROFILES.values():
        write_cpu_view(views / profile.name, profile)
    return views


ROOT_DIR = "arm64"
PLATFORM = "linux-aarch64"


def emulated(view: Path, cpu: str) -> tuple[list[str], dict]:
    """(argv prefix, environment) that run an aarch64 program under QEMU with a CPU profile's view.

    The environment is built, not inherited: nothing of the host's settings reaches the emulated program.
    """
    env = {"QEMU_CPU": CPU_PROFILES[cpu].qemu_cpu, "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"}
    return [qemu_binary(), "-L", str(view)], env


# Debian's Python of the bundles' release (bookworm: 3.11, this project's Python) and the C++ library LiteRT's
# wheel links; everything they depend on comes with them
PYTHON_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6")
PYTHON_SUITE = "bookworm"
PYTHON_VERSION = "3.11"
PYTHON = f"usr/bin/python{PYTHON_VERSION}"


def python_formats() -> list[Backend]:
    """Formats with no native runner that run on ARM64 Linux in a Python worker (none today: LiteRT, the last,
    has one); the emulated Python is set up for them."""
    from ..formats import BACKENDS

    return [b for b in BACKENDS.values() if b.native_runner is None and PLATFORM in b.platforms]


def python_distributions() -> dict[str, str]:
    """The wheels the emulated Python worker imports, at this host's versions: numpy and those formats' runtimes."""
    from .native import host_version

    names = ["numpy", *(p for b in python_formats() for p in b.device_packages)]
    return {n: host_version(n) for n in dict.fromkeys(names)}


def python_home(cache: Path) -> Path:
    return cache / ROOT_DIR / "python"


def python_record(cache: Path) -> dict | None:
    """What the emulated Python holds (its build.json) if it is complete and has this host's wheel versions."""
    import json

    try:
        record = json.loads((python_home(cache) / "build.json").read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("wheels") == python_distributions() and "debian_python" in record else None


def build_python(cache: Path, progress, force: bool = False) -> dict:
    """An aarch64 Python for the formats without a native runner: Debian's python3.11 and its libraries (files
    only, about 15 MB fetched) and PyPI's aarch64 wheels of the host's numpy and runtimes (no requirements, no
    torch), in ``<cache>/arm64/python``; built in a ``.partial`` folder and renamed when complete."""
    import json
    import zipfile

    from .native import debian_root, platform_wheel

    home = python_home(cache)
    record = python_record(cache)
    if record is not None and not force:
        return record
    wheels = python_distributions()
    partial = home.with_name(home.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    downloads = cache / "downloads"
    with progress.stage(f"aarch64 Python for {', '.join(b.label for b in python_formats())}") as stage:
        debian = debian_root(list(PYTHON_PACKAGES), PYTHON_SUITE, "arm64", downloads, partial / "root", stage)
        for name, version in wheels.items():
            wheel = platform_wheel(
                name, version, PLATFORM, downloads / PLATFORM / "wheels", stage, python_version=PYTHON_VERSION
            )
            with zipfile.ZipFile(wheel) as whl:
                whl.extractall(partial / "site")
        for path in (partial / "site").rglob("*.so*"):  # zip files keep no modes: the loader maps these
            path.chmod(0o755)
    record = {"debian_python": debian.get("python3.11-minimal"), "debian": debian, "wheels": wheels}
    (partial / "build.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    shutil.rmtree(home, ignore_errors=True)
    partial.rename(home)
    return record


def python_view(cache: Path, cpu: str) -> Path:
    """A CPU profile's view with the emulated Python's /lib and /usr in it: QEMU's -L prefix for the Python
    worker (its loader and libraries are found by absolute path, as on a device)."""
    view = python_home(cache) / "cpus" / cpu
    if not view.is_dir():
        partial = view.with_name(f"{cpu}.partial.{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for top in ("lib", "usr"):
            (partial / top).symlink_to(Path("..", "..", "root", top))
        for top in ("proc", "sys"):  # the profile's view that setup writes for the runners: one CPU for both
            (partial / top).symlink_to(Path("..", "..", "..", "cpus", cpu, top))
        try:
            partial.rename(view)
        except OSError:  # another worker made it first
            shutil.rmtree(partial, ignore_errors=True)
    return view


def python_code(cache: Path) -> Path:
    """This package's code for the emulated worker (the archive an ssh device gets), unpacked once per version."""
    import gzip
    import io
    import tarfile

    from .ssh import code_archive

    data, digest = code_archive()
    folder = python_home(cache) / "code" / digest
    if not (folder / "run.py").exists():
        partial = folder.with_name(digest + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
            tar.extractall(partial, filter="data")
        partial.rename(folder)
    return folder


class EmulatedArm64Target(Target):
    """ARM64 Linux under QEMU user-mode emulation, with one CPU profile; numerics only, no latency.

    What runs there is the aarch64 bundles of the native runners (:mod:`.native`), as on a phone, and, for a
    format without one (none today), Debian's aarch64 Python with the format's runtime wheel: no torch.
    """

    kind = "arm64"
    platform = PLATFORM
    measures_latency = False
    has_python = False
    step_timeout = 1800.0  # an emulated image of CloFormer-XXS in fp16 takes up to 20 s
    validation_threads = 1

    def __init__(self, cpu: str = DEFAULT_CPU, cache: str | Path | None = None):
        self.cpu = cpu
        self.cache = Path(cache) if cache is not None else default_cache()
        self.name = f"arm64-{cpu}"
        self.bundles: dict = {}
        self.python: dict | None = None  # the emulated Python's record, once checked

    @property
    def view(self) -> Path:
        return self.cache / ROOT_DIR / "cpus" / self.cpu

    def check(self) -> None:
        qemu = qemu_binary()
        if qemu is None:
            raise TargetError(
                "--target arm64 needs QEMU's user-mode emulator; install it with: apt-get install qemu-user-static"
            )
        check_cpu(self.cpu, qemu)
        hint = setup_hint("arm64", self.cache, default_cache())
        if not (self.view / "proc" / "cpuinfo").exists():
            raise TargetError(f"--target arm64 is not set up in {self.cache}; set it up once with: {hint}")
        self.bundles = {
            b.name: check_bundle(self.cache, PLATFORM, b, "arm64", default_cache()) for b in native_backends()
        }
        self.python = python_record(self.cache)
        self.has_python = self.python is not None

    def can_run(self, backend: Backend) -> bool:
        return PLATFORM in backend.platforms and (backend.native_runner is not None or backend in python_formats())

    def runs_in_python(self, backend: Backend) -> bool:
        # the emulated Python holds only the runtimes of the formats without a native runner
        return self.python is not None and backend in python_formats()

    def missing(self, backend: Backend, native: bool | None = None) -> str | None:
        if backend.native_runner is None and self.python is None:
            hint = setup_hint("arm64", self.cache, default_cache())
            return f"{backend.label} runs under --target arm64 in an emulated aarch64 Python; set it up with: {hint}"
        if native is False and not self.runs_in_python(backend):
            return f"{backend.label} runs under --target arm64 in its native runner only, not in Python"
        return None

    def native_bundle(self, backend: Backend) -> Bundle | None:
        return self.bundles.get(backend.name)

    def gpu_missing(self) -> str | None:
        return (
            "the emulated ARM64 target has no GPU: GPU rows run on this machine's software Vulkan device "
            "(--target local, after cloformer-device setup gpu) or on an ssh:// device with a Vulkan driver"
        )

    def native_command(self, fmt: str, gpu: bool = False):
        prefix, env = emulated(self.view, self.cpu)
        return [*prefix, *self.bundles[fmt].words(None, *self.native_args())], env, []

    def python_command(self, *args: str) -> tuple[list[str], dict]:
        """(argv, environment) of the emulated Python with ``args``, under this target's CPU profile."""
        if self.python is None:
            hint = setup_hint("arm64", self.cache, default_cache())
            labels = " and ".join(b.label for b in python_formats())
            raise TargetError(f"--target arm64 has no emulated Python for {labels} yet; set it up with: {hint}")
        prefix, env = emulated(python_view(self.cache, self.cpu), self.cpu)
        home = python_home(self.cache)
        # -S -s: no site folder of the host's can reach the emulated Python (QEMU falls through to the host's files)
        env = {**env, "PYTHONPATH": str(home / "site"), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1"}
        return [*prefix, str(home / "root" / PYTHON), "-S", "-s", *args], env

    def worker_command(self):
        argv, env = self.python_command(str(python_code(self.cache) / "run.py"), "worker")
        return argv, env, []

    def runner(self, fmt, path, spec, info, threads=None, native=True):
        return super().runner(fmt, path, spec, info, threads or self.validation_threads, native)

    def describe(self) -> dict:
        profile = CPU_PROFILES[self.cpu]
        qemu = qemu_binary()
        return {
            **super().describe(),
            "emulator": qemu_label(qemu) if qemu else None,
            "qemu_cpu": profile.qemu_cpu,
            "midr": f"0x{profile.midr:08x}",
            "cpu": profile.about,
            "runners": {k: b.record["version"] for k, b in self.bundles.items()},
            **({"debian_python": self.python["debian_python"], "wheels": self.python["wheels"]} if self.python else {}),
        }
