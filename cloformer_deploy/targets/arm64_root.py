"""``cloformer-device setup arm64``: build, once, the Debian arm64 root the emulated ARM64 target runs in.

What it fetches (the only network use of this project, and only when asked): Debian bookworm's
arm64 Python 3.11 with its libraries (about 80 MB, by mmdebstrap from deb.debian.org), and from
PyPI the aarch64 wheels of the runtimes at the versions this host runs: torch (PyPI's aarch64
torch is a CUDA build: its NVIDIA libraries, about 2.5 GB, must be present for ``import torch``,
which ExecuTorch's Python runtime needs; no GPU is used), executorch, onnxruntime, numpy.

Downloads are kept under ``<cache>/downloads`` until the root is ready, so an interrupted setup
resumes; the root is built in ``<cache>/arm64.partial`` and renamed to ``<cache>/arm64`` only when
a smoke test under emulation has passed, so nothing half-built is ever mistaken for ready.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from ..progress import Progress
from .arm64 import (
    CPU_PROFILES,
    DEFAULT_CPU,
    ROOT_DIR,
    RUNTIMES,
    check_ready,
    default_cache,
    emulated_python,
    host_versions,
    qemu_binary,
    qemu_label,
    ready_state,
    write_cpu_view,
)
from .base import RUNTIME_IMPORTS, TargetError, end_process_group, last_line, same_version

SUITE = "bookworm"  # Python 3.11, the minor version of the host's pins, and glibc 2.36
DEBIAN_PACKAGES = ("python3.11", "libstdc++6", "libgomp1")
WHEEL_PLATFORMS = ["manylinux2014_aarch64"] + [f"manylinux_2_{v}_aarch64" for v in range(17, 37)]  # glibc <= 2.36
SMOKE = (
    "import json, platform, numpy, onnxruntime, torch\n"
    "from executorch.runtime import Runtime\n"
    "from importlib.metadata import version\n"
    "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(),\n"
    f"  'versions': {{n: version(n) for n in {RUNTIMES!r}}},\n"
    "  'xnnpack': 'XnnpackBackend' in Runtime.get().backend_registry.registered_backend_names}))\n"
)
STEP_TIMEOUT = 3600  # seconds for one setup step (a download of gigabytes on a slow line)


def missing_tools(need_debian: bool) -> list[str]:
    tools = [] if qemu_binary() else ["qemu-aarch64-static"]
    if need_debian and shutil.which("mmdebstrap") is None:
        tools.append("mmdebstrap")
    return tools


def _run(argv: list[str], stage, what: str, timeout: float = STEP_TIMEOUT, env=None) -> None:
    """Run a setup step, its output shown as the stage's progress; it is killed on timeout or Ctrl-C."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    watchdog = threading.Timer(timeout, end_process_group, [proc])  # a step that hangs without output ends too
    watchdog.start()
    tail: list[str] = []
    try:
        for line in proc.stdout:
            line = line.strip()
            if line and not line.startswith("WARNING: Location"):
                tail = (tail + [line])[-5:]
                if line.startswith(
                    ("Downloading", "Saved", "File was already", "Collecting", "Processing", "Installing", "I: ")
                ):
                    stage.update(line[:110])
        code = proc.wait()
    except BaseException:
        end_process_group(proc)
        raise
    finally:
        watchdog.cancel()
    if code == -signal.SIGKILL:
        raise TargetError(
            f"setup arm64: {what} gave no result within {timeout:.0f}s and was stopped; run setup again (it resumes)"
        )
    if code != 0:
        raise TargetError(f"setup arm64: {what} failed (exit code {code}): {tail[-1] if tail else 'no output'}")


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]


def _platform_args() -> list[str]:
    out = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
    for p in WHEEL_PLATFORMS:
        out += ["--platform", p]
    return out


def _size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def _extract(tar_path: Path, dest: Path) -> None:
    """The Debian tarball into ``dest``; device nodes are skipped (a user cannot make them, and nothing needs them)."""

    def keep(member: tarfile.TarInfo, path: str):
        return None if member.isdev() else member

    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter=keep)


def setup_arm64(
    cache: str | Path | None = None,
    *,
    force: bool = False,
    keep_downloads: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Build the ARM64 root in ``cache`` (see the module's docstring); return its ready record.

    An existing ready root for the host's versions is kept unless ``force``. Raises TargetError
    (one line naming the fix) for a missing host tool, before anything is fetched or written.
    """
    progress = progress or Progress(quiet=True)
    cache = Path(cache) if cache is not None else default_cache()
    versions = host_versions()
    state = ready_state(cache)
    if state is not None and not force:
        try:
            check_ready(cache)
            progress.log(f"the ARM64 root in {cache / ROOT_DIR} is ready (pass --force to rebuild it)")
            return state
        except TargetError:
            pass  # other versions: rebuilt below
    downloads = cache / "downloads"
    debian_tar = downloads / f"debian-{SUITE}-arm64.tar"
    missing = missing_tools(need_debian=not debian_tar.exists())
    if missing:
        raise TargetError(
            f"setup arm64 needs {' and '.join(missing)}; install them with: apt-get install qemu-user-static mmdebstrap"
        )
    if cache.exists() and not cache.is_dir():
        raise TargetError(f"--cache {str(cache)!r} is a file; pass a folder")
    t0 = time.perf_counter()
    partial, final = cache / f"{ROOT_DIR}.partial", cache / ROOT_DIR
    wheels = downloads / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)  # an interrupted build: started again from the kept downloads
    requirements = [f"{n}=={v}" for n, v in versions.items()]
    bare = [f"{n}=={versions[n]}" for n in RUNTIMES if n in RUNTIME_IMPORTS]  # without their own requirements
    others = [r for r in requirements if r not in bare]
    progress.log(
        f"fetching: Debian {SUITE} arm64 Python 3.11 (about 80 MB, deb.debian.org); aarch64 wheels from "
        f"PyPI: {', '.join(requirements)} and torch's NVIDIA libraries (about 3 GB in all)"
    )
    if not debian_tar.exists():
        with progress.stage(f"Debian {SUITE} arm64 base (mmdebstrap)") as st:
            tmp = debian_tar.with_suffix(".tar.partial")
            _run(
                [
                    "mmdebstrap",
                    "--arch=arm64",
                    "--variant=extract",
                    "--format=tar",
                    f"--include={','.join(DEBIAN_PACKAGES)}",
                    SUITE,
                    str(tmp),
                ],
                st,
                "mmdebstrap",
            )
            tmp.rename(debian_tar)
    with progress.stage("aarch64 wheels from PyPI (kept in the cache until the root is ready)") as st:
        if bare:
            _run(
                _pip("download", "--no-deps", *_platform_args(), "-d", str(wheels), *bare),
                st,
                f"pip download {' '.join(bare)}",
            )
        _run(_pip("download", *_platform_args(), "-d", str(wheels), *others), st, "pip download")
    with progress.stage("unpack the Debian root"):
        _extract(debian_tar, partial / "root")
    site = partial / "root" / "opt" / "site"
    with progress.stage("install the wheels into the root (offline, from the kept downloads)") as st:
        if bare:
            _run(
                _pip(
                    "install",
                    "--no-index",
                    "--find-links",
                    str(wheels),
                    *_platform_args(),
                    "--no-deps",
                    "--target",
                    str(site),
                    *bare,
                ),
                st,
                f"pip install {' '.join(bare)}",
            )
        _run(
            _pip(
                "install",
                "--no-index",
                "--find-links",
                str(wheels),
                *_platform_args(),
                "--upgrade",
                "--target",
                str(site),
                *others,
            ),
            st,
            "pip install",
        )
    for profile in CPU_PROFILES.values():
        write_cpu_view(partial / "root", partial / "cpus" / profile.name, profile)
    with progress.stage(f"smoke test under emulation ({DEFAULT_CPU}): import torch, executorch, onnxruntime"):
        smoke, seconds = _smoke(partial, versions)
    record = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "suite": SUITE,
        "debian_packages": list(DEBIAN_PACKAGES),
        "versions": smoke["versions"],
        "python": smoke["python"],
        "emulator": qemu_label(qemu_binary()),
        "import_seconds": round(seconds, 1),
        "bytes": _size(partial),
        "setup_seconds": round(time.perf_counter() - t0, 1),
        "cpus": sorted(CPU_PROFILES),
    }
    (partial / "ready.json").write_text(json.dumps(record, indent=2) + "\n")
    old = cache / f"{ROOT_DIR}.old"
    if final.exists():
        final.rename(old)
    partial.rename(final)  # the moment the root becomes ready: one rename
    shutil.rmtree(old, ignore_errors=True)
    if not keep_downloads:
        shutil.rmtree(downloads, ignore_errors=True)
    return record


def _smoke(partial: Path, versions: dict) -> tuple[dict, float]:
    argv, env = emulated_python(partial / "cpus" / DEFAULT_CPU, DEFAULT_CPU, "/opt/site")
    t = time.perf_counter()
    try:
        proc = subprocess.run([*argv, "-c", SMOKE], capture_output=True, text=True, env=env, timeout=900)
    except subprocess.TimeoutExpired:
        raise TargetError("setup arm64: the smoke test under emulation gave no answer in 900 s") from None
    seconds = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = last_line(proc.stderr, 200) or "no output"
        raise TargetError(f"setup arm64: the emulated Python could not import the runtimes: {why}")
    smoke = json.loads(lines[-1])
    want = {n: versions[n] for n in RUNTIMES}
    got = smoke["versions"]
    if (
        any(not same_version(got.get(n), want[n]) for n in RUNTIMES)
        or smoke["machine"] != "aarch64"
        or not smoke["xnnpack"]
    ):
        raise TargetError(
            f"setup arm64: the root runs {got} on {smoke['machine']} (XNNPACK "
            f"{'present' if smoke['xnnpack'] else 'absent'}), not {want}"
        )
    return smoke, seconds
