"""A device reached through a shell (``ssh``, ``adb shell``): what it is, files sent to it once, runners started there.

A device needs nothing but a POSIX shell (busybox, toybox, dash): it is probed with ``uname``, ``getconf`` and
``/proc/cpuinfo``; the native runners' bundles (:mod:`.native`) and the artifacts are copied to
``<work>/native/<key>/`` and ``<work>/files/<hash>/`` once each, checked by size, and renamed into place only
when whole; a runner started there speaks the worker protocol on the shell's stdin and stdout. A subclass says
how to run a command line there and how to copy a file.

Every remote step has a timeout; one that times out ends the local client (ssh, adb) and with it the remote
side: a runner exits when its input closes.
"""

from __future__ import annotations

import re
import shlex
import tempfile
from abc import abstractmethod
from pathlib import Path

from ..files import sha256_file
from ..formats import BACKENDS
from ..formats.base import Backend
from .base import Target, TargetError, WorkerError, last_line, run_in_group
from .native import (
    TRIPLES,
    Bundle,
    archive,
    check_bundle,
    default_cache,
    deterministic_tar,
    native_backends,
    ready_bundle,
    setup_hint,
)

SAFE_WORD = re.compile(r"^[A-Za-z0-9_./,:=+%@~-]+$")  # survives any re-parsing of the command by a wrapper
MARK = "@@cloformer "
# POSIX sh: busybox (a board's initramfs, an Android toybox), dash, bash, zsh (macOS). __WORK__ is a SAFE_WORD.
PROBE_SH = r"""W=__WORK__
case "$W" in "~/"*) W="$HOME/${W#\~/}";; "~") W="$HOME";; esac
M='__MARK__'
echo "${M}system $(uname -s)"
echo "${M}machine $(uname -m)"
if ! mkdir -p "$W/files" "$W/native" 2>/dev/null || ! cd "$W"; then echo "${M}nowrite $W"; exit 0; fi
echo "${M}work $(pwd)"
echo "${M}cores $(getconf _NPROCESSORS_ONLN 2>/dev/null || grep -c ^processor /proc/cpuinfo)"
A=$(grep Cpus_allowed_list /proc/self/status 2>/dev/null | cut -f2)
echo "${M}affinity $A"
echo "${M}free $(df -k . 2>/dev/null | tail -n 1 | awk '{print $4}')"
echo "${M}python $(command -v python3 2>/dev/null)"
for f in /sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq; do
  [ -r "$f" ] && echo "${M}freq $f $(cat "$f")"
done
echo "${M}cpuinfo"
cat /proc/cpuinfo 2>/dev/null
"""


class CommandFailed(WorkerError):
    """A command on the device that exited with an error: its exit code and the last line it printed."""

    def __init__(self, message: str, code: int, detail: str):
        super().__init__(message)
        self.code, self.detail = code, detail


def shell_words(words: list[str]) -> str:
    """A command line for the device's shell: every word quoted, a leading ~/ left for it to expand."""
    return " ".join("~/" + shlex.quote(w[2:]) if w.startswith("~/") else shlex.quote(w) for w in words)


def parse_ranges(text: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6]; '' -> []."""
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            out += range(int(lo), int(hi if hi.isdigit() else lo) + 1)
    return out


def about_from_probe(out: str) -> dict:
    """What the shell probe printed, as the worker's ``about`` answer has it."""
    from .worker import cpu_clusters, cpu_fields

    fields: dict = {"freq": {}}
    lines = out.splitlines()
    cpuinfo_at = None
    for i, line in enumerate(lines):
        if not line.startswith(MARK):
            continue
        key, _, value = line[len(MARK) :].partition(" ")
        if key == "cpuinfo":
            cpuinfo_at = i + 1
            break
        if key == "freq":
            path, _, khz = value.rpartition(" ")
            m = re.search(r"cpu(\d+)/cpufreq", path)
            if m and khz.strip().isdigit():
                fields["freq"][int(m.group(1))] = int(khz)
        else:
            fields[key] = value.strip()
    cpuinfo = "\n".join(lines[cpuinfo_at:]) if cpuinfo_at is not None else ""
    system, machine = fields.get("system", ""), fields.get("machine", "")
    cpu = cpu_fields(cpuinfo)
    clusters = cpu_clusters(cpuinfo) if cpuinfo.strip() else []
    for c in clusters:
        c["max_mhz"] = max((fields["freq"].get(i, 0) for i in c["cpus"]), default=0) // 1000 or None
    cores = fields.get("cores", "")
    affinity = parse_ranges(fields.get("affinity", ""))
    return {
        "machine": machine,
        "system": system,
        "python": None,
        "platform": f"{system.lower()}-{machine.lower()}" if system else "unknown",
        "cores": int(cores) if cores.isdigit() else None,
        "cpu": cpu,
        "clusters": clusters,
        "affinity": affinity or None,
        "can_pin": system == "Linux",
        "work": fields.get("work"),
        "nowrite": fields.get("nowrite"),
        "free_bytes": int(fields["free"]) * 1024 if fields.get("free", "").isdigit() else None,
        "has_python": bool(fields.get("python")),
    }


def _ranges(cores) -> str:
    cores = sorted(cores)
    out, start = [], None
    for i, c in enumerate(cores):
        if start is None:
            start = c
        if i + 1 == len(cores) or cores[i + 1] != c + 1:
            out.append(f"{start}-{c}" if c != start else str(c))
            start = None
    return ",".join(out) or "none"


def clusters_text(about: dict) -> str:
    """'4x Cortex-A55 (cores 0-3, 1.8 GHz) + 4x Cortex-A76 (cores 4-7, 2.4 GHz)'."""
    parts = []
    for c in about.get("clusters") or []:
        ghz = f", {c['max_mhz'] / 1000:.1f} GHz" if c.get("max_mhz") else ""
        parts.append(f"{len(c['cpus'])}x {c['core']} (cores {_ranges(c['cpus'])}{ghz})")
    return " + ".join(parts) or f"{about.get('cores', '?')} cores"


class ShellDevice(Target):
    """A device whose shell the host reaches; its timings are real latencies."""

    measures_latency = True
    step_timeout = 900.0  # one runner step: loading an artifact on a slow board, or a round of timed runs
    probe_timeout = 120.0
    remote_default = "~/.cache/cloformer-deploy/device"

    def __init__(self, cache: str | Path | None = None, cores: str | None = None, remote_dir: str | None = None):
        self.cache = Path(cache) if cache is not None else default_cache()
        self.cores = cores
        self.remote_dir = remote_dir or self.remote_default
        if not SAFE_WORD.match(self.remote_dir):
            raise TargetError(f"--remote-dir {self.remote_dir!r} has spaces or shell characters; choose a plain path")
        self.platform = "unknown"
        self.about: dict = {}
        self.work: str | None = None
        self.bundles: dict[str, Bundle] = {}
        self._shipped: dict[str, str] = {}
        self._installed: set[str] = set()

    # ---- transport: what a subclass says
    @abstractmethod
    def shell_argv(self, command: str) -> list[str]:
        """The local argv that runs ``command`` (a sh command line) on the device, its stdin and stdout forwarded."""

    @abstractmethod
    def push(self, local: Path, remote: str, what: str) -> None:
        """Copy a local file to the device's path ``remote`` (a SAFE_WORD); TargetError when the link fails."""

    def transport_error(self, code: int, err: str) -> str | None:
        """The one line for a failure of the transport itself (not of the command), or None."""
        return None

    # ---- commands
    def sh(self, command: str, what: str, timeout: float, stdin=None) -> str:
        """Run a sh command line on the device; its stdout, or TargetError/WorkerError saying what failed.

        ``stdin``: bytes, or an open file streamed to it. The local client runs in its own process group,
        ended on a timeout; the remote side ends when its input closes.
        """
        done = run_in_group(self.shell_argv(command), timeout, stdin)
        if done is None:
            raise WorkerError(f"{self.name}: {what} gave no answer within {timeout:.0f}s; it was stopped")
        code, text, err = done
        broken = self.transport_error(code, err)
        if broken:
            raise TargetError(broken)
        if code != 0:
            detail = last_line(err)
            raise CommandFailed(f"{self.name}: {what} failed: {detail or f'exit code {code}'}", code, detail)
        return text

    def probe(self) -> dict:
        """What the device is (system, CPU, cores, work folder), read with its shell: no Python needed."""
        script = PROBE_SH.replace("__WORK__", self.remote_dir).replace("__MARK__", MARK)
        try:
            out = self.sh(script, "the first contact", self.probe_timeout)
        except WorkerError as e:
            raise TargetError(str(e)) from None
        if MARK + "system" not in out:
            raise TargetError(f"{self.name}: its shell did not run the probe (it printed {last_line(out)!r})")
        self.about = about_from_probe(out)
        if self.about["nowrite"]:
            raise TargetError(
                f"{self.name}: cannot write the work folder {self.about['nowrite']}; free space there or pass --remote-dir"
            )
        self.platform = self.about["platform"]
        self.work = self.about["work"]
        if not self.work or not SAFE_WORD.match(self.work):
            raise TargetError(
                f"{self.name}: the work folder {self.work!r} has spaces or shell characters; "
                "pass --remote-dir with a plain path"
            )
        return self.about

    def check_cores(self) -> None:
        from .worker import parse_cores

        try:
            wanted = parse_cores(self.cores)
        except ValueError as e:
            raise TargetError(f"--cores {e}") from None
        if not self.about.get("can_pin"):
            raise TargetError(
                f"--cores: {self.name} runs {self.about.get('system')}, where a process cannot choose its cores; "
                "drop --cores"
            )
        have = set(self.about.get("affinity") or range(self.about.get("cores") or 0))
        if not wanted <= have:
            raise TargetError(
                f"--cores {self.cores}: {self.name} offers cores {_ranges(have)}; "
                f"choose among them ({clusters_text(self.about)})"
            )

    def find_bundles(self, required: bool) -> None:
        """The native runners built here for the device's CPU; TargetError naming setup when ``required``."""
        self.bundles = {}
        if self.platform not in TRIPLES:
            return
        for backend in native_backends():
            if required:
                self.bundles[backend.name] = check_bundle(
                    self.cache, self.platform, backend, self.name, default_cache()
                )
            else:
                bundle = ready_bundle(self.cache, self.platform, backend)
                if bundle is not None:
                    self.bundles[backend.name] = bundle

    def native_bundle(self, backend: Backend) -> Bundle | None:
        return self.bundles.get(backend.name)

    def can_run(self, backend: Backend) -> bool:
        # a format with no native runner runs only in the device's Python
        return super().can_run(backend) and (backend.native_runner is not None or self.has_python)

    def cannot_run(self, backend: Backend) -> str:
        if backend.native_runner is None and super().can_run(backend):
            return f"{backend.label} has no native runner and {self.name} has no Python to run it in"
        return super().cannot_run(backend)

    def missing(self, backend: Backend, native: bool | None = None) -> str | None:
        if native is None:  # as the target would run it: natively where it has the runner
            native = backend.name in self.bundles or not self.has_python
        if not native or backend.name in self.bundles:
            return None
        if backend.native_runner is not None and self.platform in TRIPLES:
            return (
                f"the native {backend.label} runner for {self.platform} is not built; build it with: "
                f"{setup_hint(self.name, self.cache, default_cache())}"
            )
        return f"{backend.label} has no runner on {self.platform} without Python"

    # ---- files
    def remote_root(self, bundle: Bundle) -> str:
        return f"{self.work}/native/{bundle.format}-{bundle.key}"

    def install_bundle(self, backend: Backend) -> str:
        """The bundle of ``backend``'s runner on the device (copied once, unpacked, renamed into place)."""
        bundle = self.bundles.get(backend.name) or ready_bundle(self.cache, self.platform, backend)
        if bundle is None:
            raise TargetError(self.missing(backend, True))
        self.bundles[backend.name] = bundle
        root = self.remote_root(bundle)
        if root in self._installed:
            return root
        there = self.sh(f"test -f {root}/build.json && echo yes || echo no", "looking for the runner", 60).split()
        if there[-1:] != ["yes"]:
            packed = archive(bundle)
            part = f"{root}.tar.gz.part"
            self.push(packed, part, f"the {backend.label} runner ({packed.stat().st_size / 1e6:.1f} MB)")
            self.sh(
                f"rm -rf {root}.partial && mkdir -p {root}.partial && cd {root}.partial && "
                f"gzip -dc {part} | tar -xf - && rm -f {part} && cd .. && rm -rf {root} && mv {root}.partial {root}",
                f"unpacking the {backend.label} runner",
                300,
            )
        self._installed.add(root)
        return root

    def ship(self, path: str | Path) -> str:
        """Copy a file (or a folder, as a tar) to ``<work>/files/<hash>/<name>`` unless it is there already."""
        path = Path(path)
        key = str(path.resolve())
        if key not in self._shipped:
            try:
                self._shipped[key] = self._copy(path)
            except TargetError as e:  # the link dropped mid-run: this artifact fails, the run goes on
                raise WorkerError(str(e)) from None
        return self._shipped[key]

    def _copy(self, path: Path) -> str:
        with tempfile.TemporaryDirectory(prefix="cloformer-ship-") as tmp:
            suffix = path.suffix if SAFE_WORD.match(path.suffix) else ""
            name = path.name if SAFE_WORD.match(path.name) else f"artifact{suffix}"
            if path.is_dir():
                payload = Path(tmp) / "payload.tar"
                deterministic_tar(path, payload, name)
            else:
                payload = path
            sha = sha256_file(payload)
            folder = f"{self.work}/files/{sha[:20]}"
            dest = f"{folder}/{name}"
            there = self.sh(f"test -e {dest} && echo yes || echo no", f"looking for {path.name}", 60).split()
            if there[-1:] != ["yes"]:
                size = payload.stat().st_size
                part = f"{folder}/.{name}.part"
                self.sh(f"mkdir -p {folder}", "making a folder", 60)
                self.push(payload, part, f"{path.name} ({size / 1e6:.1f} MB)")
                unpack = (
                    f"mkdir -p {part}.d && tar -xf {part} -C {part}.d && mv {part}.d/{name} {dest} && rm -rf {part} {part}.d"
                    if path.is_dir()
                    else f"mv {part} {dest}"
                )
                # the size checked before the rename: a copy cut short is never taken for the artifact
                self.sh(
                    f'S=$(wc -c < {part} | tr -d " "); if [ "$S" != {size} ]; then rm -rf {part}; '
                    f'echo "arrived incomplete ($S of {size} bytes); nothing was kept" >&2; exit 3; fi; {unpack}',
                    f"storing {path.name}",
                    120,
                )
        return dest

    # ---- the Target interface
    def gpu_missing(self) -> str | None:
        # the runner's loader finds the device's own Vulkan loader and driver (its /etc/ld.so.cache): whether there
        # is one, and a GPU behind it, shows when a runner opens a model there (an error row if not)
        return None

    def native_command(self, fmt: str, gpu: bool = False):
        bundle = self.bundles[fmt]
        try:
            root = self.install_bundle(BACKENDS[fmt])
        except TargetError as e:  # the link dropped mid-run: this artifact fails, the run goes on
            raise WorkerError(str(e)) from None
        return self.shell_argv(shell_words(bundle.words(root, *self.native_args()))), None, []

    def describe(self) -> dict:
        a = self.about
        return {
            **super().describe(),
            "address": self.name,
            "cores_pinned": self.cores,
            "machine": a.get("machine"),
            "system": a.get("system"),
            "cpu": (a.get("cpu") or {}).get("model name") or clusters_text(a),
            "clusters": a.get("clusters"),
            "cores": a.get("cores"),
            "runners": {k: f"{b.record['package']} {b.record['version']}" for k, b in self.bundles.items()},
            "label": f"{a.get('machine')} {a.get('system')}, {clusters_text(a)}",
        }
