"""A GPU for the runtimes that have a GPU path (LiteRT's accelerator: WebGPU through Dawn, on Vulkan).

This machine has no GPU, but the GPU path's arithmetic (fp16 storage and fp16 math in shaders, where the CPU
computes in fp32) can be run on a software Vulkan device: Mesa's lavapipe. Dawn refuses Debian 12's Mesa 22.3
("No adapters found"); Mesa 25 from Debian's bookworm-backports works. ``cloformer-device setup gpu`` fetches it
and its libraries (files only, no maintainer script, nothing installed system-wide) into ``<cache>/gpu/<platform>``,
and only the runner processes of GPU rows are pointed at it (their library path and ``VK_ICD_FILENAMES``).

A software device computes what a GPU computes, on the CPU: its figures are drift, never a GPU's latency.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from .base import TargetError
from .native import TRIPLES, debian_root, host_platform

GPU_DIR = "gpu"
SUITE = "bookworm"  # with its backports preferred: Mesa 25's lavapipe
PACKAGES = ("mesa-vulkan-drivers", "libvulkan1")
MIN_MESA = 25  # the oldest lavapipe Dawn takes (22.3 offers no adapter to it)
DEBIAN_ARCH = {"linux-x86_64": "amd64", "linux-aarch64": "arm64"}
ICD = "usr/share/vulkan/icd.d/lvp_icd.json"  # lavapipe's manifest; its library is named without a path


def gpu_folder(cache: Path, plat: str | None = None) -> Path:
    return Path(cache) / GPU_DIR / (plat or host_platform())


def gpu_record(cache: Path, plat: str | None = None) -> dict | None:
    """The software Vulkan device set up in ``cache`` for ``plat`` (its build.json), or None."""
    try:
        record = json.loads((gpu_folder(cache, plat) / "build.json").read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("mesa_major", 0) >= MIN_MESA else None


def setup_gpu(cache: Path, progress, force: bool = False) -> dict:
    """Fetch Mesa's lavapipe (>= 25) and the Vulkan loader for this machine into ``cache`` (once)."""
    plat = host_platform()
    if plat not in DEBIAN_ARCH:
        raise TargetError(f"setup gpu: a software Vulkan device is set up on Linux x86_64 or aarch64, not {plat}")
    record = gpu_record(cache, plat)
    if record is not None and not force:
        progress.log(f"the software Vulkan device (Mesa {record['mesa']} lavapipe) is set up ({record['folder']})")
        return record
    folder = gpu_folder(cache, plat)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    t0 = time.perf_counter()
    with progress.stage(f"software Vulkan device: Mesa's lavapipe from Debian {SUITE}-backports") as stage:
        versions = debian_root(
            list(PACKAGES), SUITE, DEBIAN_ARCH[plat], cache / "downloads", partial / "root", stage, backports=True
        )
        mesa = versions.get("mesa-vulkan-drivers", "")
        found = re.match(r"(?:\d+:)?(\d+)\.", mesa)
        major = int(found.group(1)) if found else 0
        if major < MIN_MESA:
            raise TargetError(f"setup gpu: Debian {SUITE}-backports offers Mesa {mesa}; LiteRT's GPU path needs >= 25")
        stage.update("keep lavapipe only")
        _keep_lavapipe(partial / "root")
    record = {
        "platform": plat,
        "mesa": mesa,
        "mesa_major": major,
        "vulkan_loader": versions.get("libvulkan1"),
        "device": "lavapipe (Mesa's Vulkan on the CPU): a software GPU",
        "folder": str(folder),
        "seconds": round(time.perf_counter() - t0, 1),
        "bytes": sum(p.stat().st_size for p in partial.rglob("*") if p.is_file() and not p.is_symlink()),
    }
    (partial / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return record


def _keep_lavapipe(root: Path) -> None:
    """Only lavapipe's driver and manifest stay, and no documentation: the other drivers need hardware."""
    for icd in (root / "usr/share/vulkan/icd.d").glob("*.json"):
        if icd.name != Path(ICD).name:
            icd.unlink()
    for lib in root.glob("usr/lib/*/libvulkan_*.so"):
        if lib.name != "libvulkan_lvp.so":
            lib.unlink()
    for drop in ("usr/share/doc", "usr/share/man", "usr/share/lintian", "usr/share/locale"):
        shutil.rmtree(root / drop, ignore_errors=True)
    if not (root / ICD).exists():
        raise TargetError("setup gpu: Mesa's package has no lavapipe manifest (lvp_icd.json)")


def gpu_runner_environment(cache: Path, plat: str) -> tuple[list[str], dict[str, str]]:
    """(library folders after the bundle's, environment) that point a runner at the software Vulkan device.

    TargetError naming the setup step when it is not set up."""
    record = gpu_record(cache, plat)
    if record is None:
        raise TargetError(missing_hint(cache))
    root = gpu_folder(cache, plat) / "root"
    triple = TRIPLES[plat]
    folders = [str(root / "usr" / "lib" / triple), str(root / "lib" / triple)]
    env = {
        "VK_ICD_FILENAMES": str(root / ICD),
        "MESA_SHADER_CACHE_DIR": str(gpu_folder(cache, plat) / "shader-cache"),
    }
    return folders, env


def missing_hint(cache: Path) -> str:
    from .native import default_cache

    if host_platform() not in DEBIAN_ARCH:
        return (
            f"GPU rows run here on a software Vulkan device set up on Linux x86_64 or aarch64, not {host_platform()}; "
            "run them on an ssh:// Linux device with a Vulkan driver (--target)"
        )
    extra = "" if Path(cache) == default_cache() else f" --cache {cache}"
    return (
        "this machine has no Vulkan device for the GPU rows; set up a software one (Mesa's lavapipe: about 60 MB "
        f"from Debian, 210 MB unpacked) with: cloformer-device setup gpu{extra}"
    )
