"""``cloformer-device setup TARGET``: build, once, what a target runs: the native runners for its CPU.

- ``local``: this machine's runners, built against the installed wheels (no download but ONNX Runtime's C API
  header: Debian's ``libonnxruntime-dev``, about 0.1 MB).
- ``arm64``: the aarch64 runners, built by Debian's cross compiler against PyPI's aarch64 wheels of the host's
  versions (executorch, onnxruntime, ai-edge-litert: about 60 MB, kept in ``<cache>/downloads``), plus the CPU
  views QEMU shows them. A format without a native runner would get Debian's aarch64 Python with its runtime's
  wheel; every format has one now, and the emulated Python an older release set up for LiteRT is removed, as is
  an even older Python root (torch included).
- ``gpu``: this machine's runners, and a software Vulkan device for the GPU rows (Mesa 25's lavapipe from Debian
  bookworm-backports, about 60 MB fetched, 210 MB unpacked; :mod:`.gpu`).
- ``ssh://…`` and ``adb://…``: the runners for the device's CPU, built as above and copied to it.

These are the project's only downloads, and only when asked. A bundle is built in a ``.partial`` folder and
renamed when complete, so nothing half-built is ever mistaken for ready; it is rebuilt only when its sources,
its wheel's version or the compiler change (or with ``force``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..progress import Progress
from .arm64 import (
    DEFAULT_CPU,
    PLATFORM,
    ROOT_DIR,
    build_python,
    emulated,
    python_formats,
    python_home,
    qemu_binary,
    qemu_label,
    write_cpu_views,
)
from .base import TargetError, WorkerError, last_line, run_in_group
from .native import TRIPLES, build_bundle, default_cache, host_platform, native_backends, smoke


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _check_version(about: dict, backend, version: str, name: str, where: str) -> None:
    """The runner, started once, must report the wheel version it was built against."""
    said = about["versions"].get(backend.native_runner.package)
    if said != version:
        raise TargetError(
            f"setup {name}: the {backend.label} runner {where} reports {backend.native_runner.package} {said}, "
            f"not {version}"
        )


def _setup_python(cache: Path, force: bool, progress: Progress) -> dict:
    """The emulated aarch64 Python for the formats without a native runner, started once: it must import their
    runtimes, and its worker must report this host's versions of them."""
    from .arm64 import EmulatedArm64Target

    python = build_python(cache, progress, force=force)
    target = EmulatedArm64Target(DEFAULT_CPU, cache)
    target.python = python
    with progress.stage(f"smoke test of the aarch64 Python under {qemu_label(qemu_binary())}"):
        # the runtimes imported, not only their metadata read: a wheel that cannot load fails here
        imports = ", ".join(name.replace("-", "_") for name in python["wheels"])
        argv, env = target.python_command("-c", f"import {imports}")
        done = run_in_group(argv, 300, env=env)
        if done is None or done[0] != 0:
            reason = "no answer in 300 s" if done is None else last_line(done[1] + done[2]) or f"exit {done[0]}"
            raise TargetError(f"setup arm64: the emulated Python cannot import {imports}: {reason}")
        worker = target.start(timeout=300)
        try:
            about = worker.ask({"cmd": "about"})
        except WorkerError as e:
            raise TargetError(f"setup arm64: the emulated Python does not start: {e}") from None
        finally:
            worker.close()
    for name, version in python["wheels"].items():
        if about["versions"].get(name) != version:
            raise TargetError(
                f"setup arm64: the emulated Python has {name} {about['versions'].get(name)}, not {version}"
            )
    return {"python": about["python"], "wheels": python["wheels"]}


def setup_target(
    target: str,
    cache: str | Path | None = None,
    *,
    force: bool = False,
    device: dict | None = None,
    progress: Progress | None = None,
) -> dict:
    """Build the native runners ``target`` runs (see the module's docstring); return what was built.

    TargetError (one line naming the fix) for a missing compiler or host tool, before anything is fetched.
    """
    progress = progress or Progress(quiet=True)
    cache = Path(cache) if cache is not None else default_cache()
    if cache.exists() and not cache.is_dir():
        raise TargetError(f"--cache {str(cache)!r} is a file; pass a folder")
    name = str(target).strip()
    lower = name.lower()
    remote = None
    if lower in ("local", "gpu"):  # gpu: this machine's runners and a software Vulkan device for its GPU rows
        plat = host_platform()
    elif lower == "arm64":
        plat = PLATFORM
        if qemu_binary() is None:
            raise TargetError(
                "setup arm64 needs QEMU's user-mode emulator; install it with: apt-get install qemu-user-static"
            )
    elif lower.startswith(("ssh://", "adb://")):
        from . import get_target

        remote = get_target(name, cache=cache, device=device, for_setup=True)
        plat = remote.platform
    else:
        raise TargetError(f"setup {name!r}: choose local, gpu, arm64, ssh://[user@]host[:port] or adb://[SERIAL]")
    if plat not in TRIPLES:
        raise TargetError(f"setup {name}: no native runners are built for {plat} (only {', '.join(TRIPLES)})")
    from .native import compiler, compiler_fix

    if compiler(plat) is None:  # before anything is fetched
        raise TargetError(
            f"setup {name}: building the runners for {plat} needs a C++ compiler; install it with: {compiler_fix(plat)}"
        )
    t0 = time.perf_counter()
    record: dict = {"target": name, "platform": plat, "cache": str(cache)}
    if lower == "arm64":
        old = cache / ROOT_DIR / "root"
        if old.exists():  # the Python root of an older release: torch and all, no longer used
            freed = _size(cache / ROOT_DIR)
            with progress.stage(f"remove the old ARM64 Python root ({freed / 1e9:.1f} GB)"):
                shutil.rmtree(cache / ROOT_DIR)
            record["removed_bytes"] = freed
        home = python_home(cache)
        if home.exists() and not python_formats():  # an older release's Python for LiteRT, now a native runner
            freed = _size(home)
            with progress.stage(f"remove the emulated Python no format needs now ({freed / 1e6:.0f} MB)"):
                shutil.rmtree(home)
            record["removed_bytes"] = record.get("removed_bytes", 0) + freed
        write_cpu_views(cache)
    bundles = {}
    for backend in native_backends():
        if plat not in backend.platforms:
            continue
        bundle = build_bundle(backend, plat, cache, force=force, progress=progress)
        if remote is not None:
            about = None  # run on the device itself once copied (below)
        elif plat == host_platform():
            about = smoke(bundle)
        else:
            prefix, env = emulated(cache / ROOT_DIR / "cpus" / DEFAULT_CPU, DEFAULT_CPU)
            with progress.stage(f"smoke test of the {backend.label} runner under {qemu_label(qemu_binary())}"):
                about = smoke(bundle, prefix, env)
        if about is not None:
            _check_version(about, backend, bundle.record["version"], name, "here")
        bundles[backend.name] = bundle.record
    if remote is not None:
        for backend in native_backends():
            if backend.name in bundles:
                with progress.stage(f"copy the {backend.label} runner to {remote.name}"):
                    remote.install_bundle(backend)
                with progress.stage(f"smoke test of the {backend.label} runner on {remote.name}"):
                    worker = remote.start(timeout=120, fmt=backend.name, native=True)
                    try:
                        about = worker.ask({"cmd": "about"})
                    except WorkerError as e:
                        raise TargetError(
                            f"setup {name}: the {backend.label} runner does not start there: {e}"
                        ) from None
                    finally:
                        worker.close()
                _check_version(about, backend, bundles[backend.name]["version"], name, f"on {remote.name}")
        remote.close()
    record["bundles"] = bundles
    if lower == "arm64" and python_formats():
        record["python"] = _setup_python(cache, force, progress)
    if lower == "gpu":
        from .gpu import setup_gpu

        record["gpu"] = setup_gpu(cache, progress, force=force)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    if lower == "arm64":
        record["bytes"] = _size(cache / ROOT_DIR) + sum(_size(Path(cache / "native" / plat / f)) for f in bundles)
    return record
