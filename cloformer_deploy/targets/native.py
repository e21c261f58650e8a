"""The native runners: each format's C++ runner (``cloformer_deploy/native/``), built against the libraries of the
pinned wheel this host runs and bundled with a glibc loader, so that a device needs nothing but a POSIX shell.

A bundle is a folder: ``bin/<format>-runner``, ``lib/`` (the wheel's libraries under their sonames, glibc,
libstdc++ and the loader of the compiler that built it) and ``build.json``. It starts as
``lib/<loader> --library-path lib bin/<format>-runner``: the device's own libraries are never used.

For this machine's CPU the libraries are the installed wheel's; for another (aarch64 on an x86 host) they come
from that CPU's wheel of the same version, fetched from PyPI by ``cloformer-device setup``, which also fetches
headers a wheel lacks (ONNX Runtime's C API) from Debian. Nothing is fetched at any other time.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..formats import BACKENDS
from ..formats.base import Backend, NativeRunner
from ..progress import Progress
from ..versions import installed_versions
from .base import TargetError, last_line, public_version, run_in_group

SOURCES = Path(__file__).resolve().parents[1] / "native"
NATIVE_DIR = "native"
TRIPLES = {"linux-x86_64": "x86_64-linux-gnu", "linux-aarch64": "aarch64-linux-gnu"}
CROSS_PACKAGES = {"linux-x86_64": "g++-x86-64-linux-gnu", "linux-aarch64": "g++-aarch64-linux-gnu"}
WHEEL_TAGS = {  # the wheels a bundle's glibc (Debian bookworm's 2.36) can load
    "linux-aarch64": ["manylinux2014_aarch64"] + [f"manylinux_2_{v}_aarch64" for v in range(17, 37)],
    "linux-x86_64": ["manylinux2014_x86_64"] + [f"manylinux_2_{v}_x86_64" for v in range(17, 37)],
}
COMPILE_TIMEOUT = 600.0
FETCH_TIMEOUT = 1800.0
DEBIAN_MIRROR = "http://deb.debian.org/debian"


def default_cache() -> Path:
    """Where built runners live: $CLOFORMER_DEPLOY_CACHE, else the user's cache folder."""
    if os.environ.get("CLOFORMER_DEPLOY_CACHE"):
        return Path(os.environ["CLOFORMER_DEPLOY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cloformer-deploy"


def host_platform() -> str:
    return f"{sys.platform}-{platform.machine().lower()}"


def native_backends() -> list[Backend]:
    """The formats that have a native runner, in the registry's order."""
    return [b for b in BACKENDS.values() if b.native_runner is not None]


def compiler(plat: str) -> str | None:
    """The C++ compiler that builds for ``plat``: the host's g++ for this machine, Debian's cross compiler else."""
    if plat == host_platform():
        return shutil.which("g++")
    return shutil.which(f"{TRIPLES[plat]}-g++")


def compiler_fix(plat: str) -> str:
    if plat == host_platform():
        return "apt-get install g++"
    return f"apt-get install {CROSS_PACKAGES[plat]}"


def host_version(package: str) -> str:
    found = installed_versions([package])[package]
    if not found:
        raise TargetError(f"{package} is not installed on this host; install the project as the README says")
    return public_version(found)


@dataclass(frozen=True)
class Bundle:
    """A built runner for one format on one platform."""

    folder: Path
    record: dict

    @property
    def format(self) -> str:
        return self.record["format"]

    @property
    def key(self) -> str:
        return self.record["key"]

    def words(self, root: str | None = None, *args: str, libraries: tuple[str, ...] = ()) -> list[str]:
        """The command that starts the runner from the bundle at ``root`` (default: where it was built);
        ``libraries``: folders searched after the bundle's own (a GPU's driver and loader)."""
        root = str(self.folder) if root is None else root
        return [
            f"{root}/lib/{self.record['loader']}",
            "--library-path",
            ":".join([f"{root}/lib", *libraries]),
            f"{root}/bin/{self.record['runner']}",
            *args,
        ]


def bundle_folder(cache: Path, plat: str, fmt: str) -> Path:
    return cache / NATIVE_DIR / plat / fmt


def ready_bundle(cache: Path, plat: str, backend: Backend) -> Bundle | None:
    """The built bundle of ``backend``'s runner for ``plat``, if one was built for this host's version of its wheel."""
    folder = bundle_folder(cache, plat, backend.name)
    try:
        record = json.loads((folder / "build.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("version") != host_version(backend.native_runner.package):
        return None
    if record.get("sources") != sources_hash(backend.native_runner, plat):  # built from older sources
        return None
    return Bundle(folder, record)


def setup_hint(target: str, cache: Path, default: Path) -> str:
    return f"cloformer-device setup {target}" + ("" if cache == default else f" --cache {cache}")


def check_bundle(cache: Path, plat: str, backend: Backend, target: str, default: Path) -> Bundle:
    bundle = ready_bundle(cache, plat, backend)
    if bundle is None:
        raise TargetError(
            f"the native {backend.label} runner for {plat} is not built (or was built for another "
            f"{backend.native_runner.package}, or from older sources); build it with: "
            f"{setup_hint(target, cache, default)}"
        )
    return bundle


# ---------------------------------------------------------------- building
def _run(argv: list[str], what: str, timeout: float, cwd: str | None = None) -> str:
    done = run_in_group(argv, timeout, cwd=cwd)
    if done is None:
        raise TargetError(f"setup: {what} gave no result within {timeout:.0f}s and was stopped")
    code, out, err = done
    if code != 0:
        text = out + err
        errors = [ln for ln in text.splitlines() if "error" in ln.lower()]
        raise TargetError(f"setup: {what} failed: {(errors[0] if errors else last_line(text)) or code}")
    return out


def package_folder(package: str) -> Path:
    """The installed package's folder, found without importing it (importing executorch imports torch)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TargetError(f"{package} is not installed on this host; install the project as the README says")
    return Path(list(spec.submodule_search_locations)[0])


def platform_wheel(
    package: str, version: str, plat: str, wheels: Path, stage, python_version: str | None = None
) -> Path:
    """PyPI's wheel of ``package==version`` for ``plat`` and ``python_version`` (this host's by default), in
    ``wheels`` (fetched once, without its requirements)."""
    wheels.mkdir(parents=True, exist_ok=True)
    prefix = f"{package.replace('-', '_').lower()}-{version}-"

    def present() -> list[Path]:
        return [w for w in wheels.glob("*.whl") if w.name.lower().startswith(prefix)]

    if not present():
        stage.update(f"pip download {package}=={version} for {plat}")
        tags = [a for t in WHEEL_TAGS[plat] for a in ("--platform", t)]
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "--disable-pip-version-check",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                python_version or f"{sys.version_info.major}.{sys.version_info.minor}",
                "--implementation",
                "cp",
                *tags,
                "-d",
                str(wheels),
                f"{package}=={version}",
            ],
            f"pip download {package}=={version} for {plat}",
            FETCH_TIMEOUT,
        )
    found = present()
    if not found:
        raise TargetError(f"setup: PyPI has no {plat} wheel of {package}=={version}")
    return found[0]


def wheel_folder(runner: NativeRunner, plat: str, version: str, downloads: Path, stage) -> Path:
    """The runner's libraries and headers from ``plat``'s wheel of ``version`` (fetched from PyPI once, kept)."""
    out = downloads / plat / f"{runner.package}-{version}"
    if (out / ".complete").exists():
        return out
    wheels = downloads / plat / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = platform_wheel(runner.package, version, plat, wheels, stage)
    shutil.rmtree(out, ignore_errors=True)
    wanted = [f"{runner.folder}/{p}" for p in (*runner.libraries, *runner.loaded)] + [
        f"{runner.folder}/{d}/*" for d in runner.include_dirs
    ]
    with zipfile.ZipFile(found) as whl:
        for name in whl.namelist():
            if any(fnmatch.fnmatch(name, w) for w in wanted):
                whl.extract(name, out.parent / f".{out.name}")
    unpacked = out.parent / f".{out.name}" / runner.folder
    if not unpacked.is_dir():
        raise TargetError(f"setup: the {runner.package} wheel for {plat} has none of {', '.join(runner.libraries)}")
    unpacked.rename(out)
    shutil.rmtree(out.parent / f".{out.name}", ignore_errors=True)
    (out / ".complete").touch()
    found.unlink()  # what a rebuild needs is kept unpacked; the wheel's Python half is not
    return out


def debian_headers(runner: NativeRunner, downloads: Path, stage) -> Path:
    """The include folder of a Debian package (headers a wheel lacks), fetched with apt-get into a private state."""
    package, suite, inside = runner.debian_headers
    out = downloads / "debian" / f"{package}-{suite}"
    if (out / ".complete").exists():
        return out / inside
    if shutil.which("apt-get") is None:
        raise TargetError(f"setup: the {package} headers come from Debian with apt-get, which this machine lacks")
    stage.update(f"apt-get download {package} ({suite})")
    state = downloads / "debian" / f"apt-{suite}"
    opts = _apt_state(state, suite)
    debs = state / "debs"
    debs.mkdir(exist_ok=True)
    _run(["apt-get", *opts, "download", package], f"apt-get download {package}", FETCH_TIMEOUT, cwd=str(debs))
    deb = sorted(debs.glob(f"{package}_*.deb"))
    if not deb:
        raise TargetError(f"setup: apt-get download {package} left no package")
    shutil.rmtree(out, ignore_errors=True)
    _run(["dpkg-deb", "-x", str(deb[-1]), str(out)], f"unpacking {deb[-1].name}", 120)
    (out / ".complete").touch()
    shutil.rmtree(state, ignore_errors=True)  # the suite's package lists: not needed once the headers are here
    return out / inside


def _apt_state(state: Path, suite: str, arch: str | None = None, also: tuple[str, ...] = ()) -> list[str]:
    """apt-get's options for a private state in ``state`` (its own sources, lists, cache and an empty dpkg
    status, so that this machine's installed packages count for nothing), its package lists fetched; ``also``:
    further suites in the sources (backports, which need their release's packages beside them)."""
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    signed = f"[signed-by={keyring}] " if os.path.exists(keyring) else ""
    (state / "sources.list").write_text("".join(f"deb {signed}{DEBIAN_MIRROR} {s} main\n" for s in (suite, *also)))
    opts = [
        "-o",
        f"Dir::Etc::SourceList={state / 'sources.list'}",
        "-o",
        "Dir::Etc::SourceParts=/dev/null",
        "-o",
        f"Dir::State::Lists={state / 'lists'}",
        "-o",
        f"Dir::State::status={state / 'status'}",
        "-o",
        f"Dir::Cache={state / 'cache'}",
        "-o",
        "Debug::NoLocking=1",
        "-o",
        "APT::Install-Recommends=0",
        *(["-o", f"APT::Architecture={arch}", "-o", f"APT::Architectures::={arch}"] if arch else []),
        "-q",
    ]
    _run(["apt-get", *opts, "update"], f"apt-get update ({suite}{' ' + arch if arch else ''})", FETCH_TIMEOUT)
    return opts


def debian_root(
    packages: list[str], suite: str, arch: str, downloads: Path, dest: Path, stage, backports: bool = False
) -> dict[str, str]:
    """``packages`` and everything they depend on, from Debian ``suite`` for ``arch`` (``backports``: with the
    suite's backports preferred wherever they have a package), unpacked into ``dest`` (no maintainer script runs:
    the files only). Returns each package's version."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise TargetError("setup: Debian's packages come with apt-get and dpkg-deb, which this machine lacks")
    state = downloads / "debian" / f"apt-{suite}-{arch}"
    shutil.rmtree(state, ignore_errors=True)
    stage.update(f"apt-get: {', '.join(packages)} ({suite}, {arch})")
    also = (f"{suite}-backports",) if backports else ()
    opts = _apt_state(state, suite, arch, also) + (["-t", also[0]] if backports else [])
    _run(
        ["apt-get", *opts, "install", "--download-only", "-y", *packages],
        f"apt-get download {' '.join(packages)} ({arch})",
        FETCH_TIMEOUT,
    )
    debs = sorted((state / "cache" / "archives").glob("*.deb"))
    if not debs:
        raise TargetError(f"setup: apt-get left no package for {' '.join(packages)}")
    versions = {}
    dest.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        stage.update(f"unpacking {deb.name}")
        _run(["dpkg-deb", "-x", str(deb), str(dest)], f"unpacking {deb.name}", 120)
        name, version = deb.name.split("_")[:2]
        versions[name] = version.replace("%3a", ":")
    shutil.rmtree(state, ignore_errors=True)  # the lists and the packages: not needed once unpacked
    return versions


def _dynamic(path: Path) -> tuple[list[str], str | None, str | None]:
    """(NEEDED libraries, soname, interpreter) of an ELF file, as readelf reads them (any CPU)."""
    out = subprocess.run(["readelf", "-d", "-l", "-W", str(path)], capture_output=True, text=True, timeout=60).stdout
    needed, soname, interp = [], None, None
    for line in out.splitlines():
        if "(NEEDED)" in line:
            needed.append(line.split("[", 1)[1].rstrip("]"))
        elif "(SONAME)" in line:
            soname = line.split("[", 1)[1].rstrip("]")
        elif "Requesting program interpreter:" in line:
            interp = line.split(":", 1)[1].strip().rstrip("]")
    return needed, soname, interp


def _system_library(cxx: str, name: str) -> Path | None:
    """Where the compiler's own target libraries keep ``name`` (glibc, libstdc++): the ones it linked against."""
    found = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True, timeout=60).stdout.strip()
    return Path(found).resolve() if os.path.isabs(found) and os.path.exists(found) else None


def sources_hash(runner: NativeRunner, plat: str) -> str:
    """What a bundle is built from, known without a compiler: the runner's sources, its libraries and defines, and
    the glibc patch. A bundle of other sources is not ready."""
    h = hashlib.sha256()
    for name in ("runner.h", runner.source):
        h.update((SOURCES / name).read_bytes())
    patch = [b.hex() for b in CLONE3.get(plat, ())]
    h.update(json.dumps([plat, runner.libraries, runner.loaded, runner.registering, runner.defines, patch]).encode())
    return h.hexdigest()[:16]


def source_key(runner: NativeRunner, plat: str, version: str, cxx_version: str) -> str:
    """The build's key: its sources, the wheel's version and the compiler."""
    return hashlib.sha256(f"{sources_hash(runner, plat)} {version} {cxx_version}".encode()).hexdigest()[:16]


def build_bundle(
    backend: Backend, plat: str, cache: Path, *, force: bool = False, progress: Progress | None = None
) -> Bundle:
    """Build (or keep, when built from the same sources, wheel version and compiler) ``backend``'s runner for
    ``plat`` in ``cache``; TargetError (one line naming the package to install) when no compiler is there."""
    progress = progress or Progress(quiet=True)
    runner = backend.native_runner
    cxx = compiler(plat)
    if cxx is None:
        raise TargetError(
            f"building the native runners for {plat} needs a C++ compiler; install it with: {compiler_fix(plat)}"
        )
    if shutil.which("readelf") is None:
        raise TargetError("building the native runners needs readelf; install it with: apt-get install binutils")
    version = host_version(runner.package)
    cxx_version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout.split("\n")[0]
    key = source_key(runner, plat, version, cxx_version)
    final = bundle_folder(cache, plat, backend.name)
    current = ready_bundle(cache, plat, backend)
    if current is not None and current.key == key and not force:
        progress.log(f"the native {backend.label} runner for {plat} is built ({final})")
        return current
    downloads = cache / "downloads"
    t0 = time.perf_counter()
    with progress.stage(f"native {backend.label} runner for {plat}") as stage:
        if plat == host_platform():
            package = package_folder(runner.folder)
        else:
            package = wheel_folder(runner, plat, version, downloads, stage)
        includes = [package / d for d in runner.include_dirs]
        if runner.debian_headers:
            includes.append(debian_headers(runner, downloads, stage))
        libraries = sorted({Path(p) for pattern in runner.libraries for p in glob.glob(str(package / pattern))})
        if not libraries:
            raise TargetError(f"setup: the {runner.package} wheel for {plat} has none of {runner.libraries}")
        registering = {Path(p) for pattern in runner.registering for p in glob.glob(str(package / pattern))}
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "bin").mkdir(parents=True)
        (partial / "lib").mkdir()
        exe = partial / "bin" / f"{backend.name}-runner"
        link = []
        for lib in libraries:  # the self-registering ones first and kept though nothing calls them
            link += [
                "-Wl,--no-as-needed" if lib in registering else "-Wl,--as-needed",
                f"-L{lib.parent}",
                f"-l:{lib.name}",
            ]
        stage.update(f"compile {runner.source} with {Path(cxx).name}")
        tc = time.perf_counter()
        _run(
            [
                cxx,
                "-std=c++17",
                "-O2",
                *(f"-D{d}" for d in runner.defines),
                f'-DCFD_RUNTIME_VERSION="{version}"',
                *(f"-I{d}" for d in includes),
                f"-I{SOURCES}",
                str(SOURCES / runner.source),
                "-o",
                str(exe),
                *link,
                "-Wl,--as-needed",
                "-pthread",
                "-Wl,-rpath,$ORIGIN/../lib",
            ],
            f"compiling the {backend.label} runner for {plat}",
            COMPILE_TIMEOUT,
        )
        compile_s = time.perf_counter() - tc
        stage.update("collect its libraries and a glibc loader")
        loaded = sorted({Path(p) for pattern in runner.loaded for p in glob.glob(str(package / pattern))})
        if len(loaded) < len(runner.loaded):
            raise TargetError(f"setup: the {runner.package} wheel for {plat} has not all of {runner.loaded}")
        loader = _collect(exe, libraries, cxx, partial / "lib", loaded)
        clone3 = without_clone3(partial / "lib" / "libc.so.6", plat)
        if clone3 == "unknown":
            progress.warn(
                f"the {plat} glibc of this bundle starts threads with clone3 in a form not recognised: the runner "
                "will not start threads inside an Android app's sandbox (Termux); adb shell and Linux are unaffected"
            )
        tar = partial.with_name(final.name + ".tar.gz")
        record = {
            "format": backend.name,
            "platform": plat,
            "package": runner.package,
            "version": version,
            "key": key,
            "sources": sources_hash(runner, plat),
            "runner": exe.name,
            "loader": loader,
            "compiler": cxx_version,
            "clone3": clone3,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "compile_seconds": round(compile_s, 1),
            "libraries": sorted(p.name for p in (partial / "lib").iterdir()),
        }
        record["bytes"] = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file())
        (partial / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        deterministic_tar(partial, tar, gzip_it=True)
        # beside the archive only: the copy inside it cannot state the archive's own size
        record["archive_bytes"] = tar.stat().st_size
        record["build_seconds"] = round(time.perf_counter() - t0, 1)
        (partial / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        partial.rename(final)  # the moment the bundle becomes ready: one rename
        tar.replace(final.with_name(final.name + ".tar.gz"))
        shutil.rmtree(old, ignore_errors=True)
    return Bundle(final, record)


def archive(bundle: Bundle) -> Path:
    """The bundle as a gzip tar whose bytes depend only on its files (what a device receives)."""
    return bundle.folder.with_name(bundle.folder.name + ".tar.gz")


# An Android app's seccomp policy (Termux's) answers clone3 with SIGSYS, and glibc 2.34+ starts threads with clone3
# where its CPU has the wrapper; pthread_create blocks every signal around it, so the kernel's SIGSYS cannot be
# caught. The bundle's own copy of glibc is made to answer clone3 with ENOSYS at once, as a kernel without clone3
# would, and glibc then starts its threads with clone, which the policy allows.
CLONE3 = {
    # mov $435,%eax; syscall  ->  mov $-38,%rax (ENOSYS): __clone3's error path sets errno and returns -1
    "linux-x86_64": (bytes.fromhex("b8b30100000f05"), bytes.fromhex("48c7c0daffffff")),
    # movz x8,#435; svc #0  ->  movn x0,#37 (x0 = -38); nop
    "linux-aarch64": (bytes.fromhex("683680d2010000d4"), bytes.fromhex("a00480921f2003d5")),
}


def without_clone3(libc: Path, plat: str) -> str:
    """Make the bundle's glibc start threads without clone3 (see CLONE3): "patched", "absent" (this glibc has no
    clone3 wrapper: Debian bookworm's aarch64 one) or "unknown" (a wrapper in another form: left as it is)."""
    call, answer = CLONE3[plat]
    data = libc.read_bytes()
    found = data.count(call)
    if found == 1:
        libc.write_bytes(data.replace(call, answer))
        return "patched"
    if found == 0 and data.count(call[:4]) == 0:
        return "absent"
    return "unknown"


def _collect(exe: Path, libraries: list[Path], cxx: str, dest: Path, loaded: list[Path] = ()) -> str:
    """Copy into ``dest`` every library ``exe`` needs, under its soname: the wheel's, then the compiler's own
    (glibc, libstdc++, libgcc) and the loader; and the ``loaded`` ones (opened at run time) with what they need.
    Returns the loader's file name."""
    wheel = {}
    for lib in libraries:
        _, soname, _ = _dynamic(lib)
        wheel[soname or lib.name] = lib
    _, _, interp = _dynamic(exe)
    if not interp:
        raise TargetError(f"setup: {exe.name} has no program interpreter")
    for lib in loaded:
        shutil.copy2(lib, dest / lib.name)
    todo, seen = [exe, *(dest / lib.name for lib in loaded)], set()
    loader = Path(interp).name
    while todo:
        needed, _, _ = _dynamic(todo.pop())
        for name in needed:
            if name in seen:
                continue
            seen.add(name)
            source = wheel.get(name) or _system_library(cxx, name)
            if source is None:
                raise TargetError(f"setup: cannot find {name}, which the runner needs, for {exe.name}")
            shutil.copy2(source, dest / name)
            todo.append(dest / name)
    ld = _system_library(cxx, loader)
    if ld is None:
        raise TargetError(f"setup: cannot find the loader {loader}")
    shutil.copy2(ld, dest / loader)
    return loader


def deterministic_tar(folder: Path, dest: Path, top: str | None = None, gzip_it: bool = False) -> None:
    """A folder as a tar (``top``: the name of its top folder; None: its files at the top) whose bytes depend only
    on its files."""
    import gzip

    raw = dest.with_suffix(dest.suffix + ".tmp")
    with open(raw, "wb") as out:
        stream = gzip.GzipFile(fileobj=out, mode="wb", mtime=0) if gzip_it else out
        with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted([folder, *folder.rglob("*")]):
                rel = path.relative_to(folder).as_posix()
                name = (top if rel == "." else f"{top}/{rel}") if top else rel
                if name == ".":
                    continue
                info = tar.gettarinfo(str(path), name)
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                if path.is_file():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
        if gzip_it:
            stream.close()
    raw.replace(dest)


def smoke(bundle: Bundle, prefix: list[str] | None = None, env: dict | None = None) -> dict:
    """The runner's ``about`` answer (started as a device starts it, under ``prefix``: QEMU for another CPU)."""
    done = run_in_group([*(prefix or []), *bundle.words()], 300, b'{"cmd": "about"}\n', env=env)
    if done is None:
        raise TargetError(f"setup: the {bundle.format} runner gave no answer in 300 s")
    code, out, err = done
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if code != 0 or not lines:
        raise TargetError(f"setup: the {bundle.format} runner does not start: {last_line(err) or code}")
    return json.loads(lines[-1])
