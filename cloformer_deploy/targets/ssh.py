"""A real device over SSH: a Raspberry Pi, an ARM board, a phone (Termux), a Mac.

The host's ``ssh`` client does the transport (keys, config, agents and jump hosts as the user has
them). A Linux device needs only a shell: the native runners' bundles and the artifacts are copied
there once each (:mod:`.shell`). A Mac (Core ML) runs the Python worker with its own Python and
runtimes: the first contact with that Python copies this package's Python files (about 0.3 MB) into
``<work>/code/<hash>/``. Either speaks the same JSON lines as everywhere (:mod:`.worker`).

Every remote step has a timeout; a step that times out ends the local ``ssh`` and with it the
remote side (the worker exits when its input closes; a transfer that stops short keeps nothing).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import platform
import re
import shlex
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..formats.base import Backend
from ..versions import installed_versions
from .base import RUNTIME_IMPORTS, TargetError, WorkerError, last_line, public_version, same_version
from .native import TRIPLES
from .shell import CommandFailed, ShellDevice, clusters_text, shell_words
from .worker import PACKAGES, device_packages

MIN_PYTHON = (3, 10)
# packages a Linux device takes from another index: PyPI's ARM64 Linux torch is a CUDA build with 3 GB of NVIDIA
# libraries, and a board needs the CPU build
PIP_INDEX = {"torch": "https://download.pytorch.org/whl/cpu"}
PROBE_MARK = "cloformer-deploy-probe:"
_ADDRESS = re.compile(
    r"^ssh://(?:(?P<user>[A-Za-z0-9._-]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)"
    r"(?::(?P<port>\d{1,5}))?/?$"
)


@dataclass(frozen=True)
class SshAddress:
    host: str
    user: str | None = None
    port: int | None = None

    @property
    def destination(self) -> str:
        host = self.host.strip("[]")
        return f"{self.user}@{host}" if self.user else host

    def __str__(self) -> str:
        return f"ssh://{self.user + '@' if self.user else ''}{self.host}{':' + str(self.port) if self.port else ''}"


def parse_address(text: str) -> SshAddress:
    m = _ADDRESS.match(str(text).strip())
    if not m or (m["port"] and not 0 < int(m["port"]) < 65536):
        raise TargetError(
            f"--target {text!r} is not an SSH address; write ssh://[user@]host[:port], "
            "e.g. ssh://pi@raspberrypi.local or ssh://localhost:8022"
        )
    return SshAddress(m["host"], m["user"], int(m["port"]) if m["port"] else None)


def code_archive() -> tuple[bytes, str]:
    """This package's Python files and data as a gzip tar (made the same every time), and its hash."""
    package = Path(__file__).resolve().parents[1]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))

        files = sorted(
            p
            for p in package.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".txt", ".json")
        )
        for path in files:
            add(f"{package.name}/{path.relative_to(package).as_posix()}", path.read_bytes())
        add("run.py", RUN_PY.encode())
    data = buffer.getvalue()
    # the hash is of the tar (no times in it), the gzip stamped with time 0: equal files, equal bytes
    return gzip.compress(data, mtime=0), hashlib.sha256(data).hexdigest()[:16]


RUN_PY = """import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here))
from cloformer_deploy.targets.device import main

main(sys.argv[1:], here.parents[1])
"""

# Sent on the device Python's stdin (python3 -): unpack the code once, then say what the device is.
PROBE = r"""
import base64, io, json, os, platform, shutil, sys, tarfile
out = {"python": platform.python_version(), "platform": sys.platform + "-" + platform.machine().lower()}
def say(extra):
    out.update(extra)
    print(__MARK__ + json.dumps(out))
    sys.stdout.flush()
    sys.exit(0)
if sys.version_info < __MIN_PYTHON__:
    say({"too_old": True})
work = os.path.abspath(os.path.expanduser(__WORK__))
code = os.path.join(work, "code", __CODE_HASH__)
out.update(work=work, code=code)
try:
    if not os.path.isdir(code):
        os.makedirs(os.path.dirname(code), exist_ok=True)
        partial = code + ".partial-%d" % os.getpid()
        with tarfile.open(fileobj=io.BytesIO(base64.b64decode(__CODE__))) as tar:
            tar.extractall(partial, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        os.replace(partial, code)
    out["free_bytes"] = shutil.disk_usage(work).free
except OSError as e:
    shutil.rmtree(code + ".partial-%d" % os.getpid(), ignore_errors=True)
    if not os.path.isdir(code):  # (another first contact may have put it in place meanwhile)
        say({"write_error": "%s: %s" % (work, e.strerror or e)})
    out["free_bytes"] = shutil.disk_usage(work).free
sys.path.insert(0, code)
from cloformer_deploy.versions import installed_versions
out["versions"] = installed_versions(__PACKAGES__)
if out["versions"]["numpy"] is None:  # the worker (and about) imports numpy
    say({})
from cloformer_deploy.targets.worker import about
say({"about": about()})
"""


def _are_missing(packages: list[str]) -> str:
    return f"{' and '.join(packages)} {'are' if len(packages) > 1 else 'is'}"


def connection_fix(message: str) -> str:
    """What to do about an ssh client error, from its own words."""
    low = message.lower()
    if "permission denied" in low:
        return "the device refused the key: copy it there with ssh-copy-id, or pass --ssh-key"
    if "host key verification failed" in low or "remote host identification has changed" in low:
        return "the device's host key is not known (or changed): connect once with plain ssh to check and accept it"
    if "could not resolve" in low or "name or service not known" in low:
        return "the host name does not resolve: check it, or use the device's IP address"
    if "connection refused" in low:
        return "nothing listens there: start the device's SSH server (Termux: sshd, port 8022) or fix the port"
    if "timed out" in low or "no route" in low or "unreachable" in low:
        return "the device does not answer: check it is on and on this network"
    return "check that plain ssh to it works"


class SshTarget(ShellDevice):
    """A device reached with the host's ``ssh``: a board, a phone (Termux), a Mac.

    On Linux (x86_64, aarch64) it runs the native runners and needs only a shell; elsewhere (a Mac: Core ML) the
    Python worker runs with the device's own Python and runtimes, whose code is copied there on first contact.
    """

    kind = "ssh"
    connect_timeout = 20  # seconds for ssh to connect; a host that does not answer fails in this time
    probe_timeout = 180.0  # a first probe under proot on a phone: starting the userland and Python

    def __init__(
        self,
        address: str | SshAddress,
        remote_python: str = "python3",
        cores: str | None = None,
        ssh_key: str | Path | None = None,
        ssh_config: str | Path | None = None,
        remote_dir: str | None = None,
        cache: str | Path | None = None,
    ):
        super().__init__(cache, cores, remote_dir)
        self.address = parse_address(address) if isinstance(address, str) else address
        self.name = str(self.address)
        try:
            self.remote_python = shlex.split(remote_python or "python3")
        except ValueError as e:
            raise TargetError(f"--remote-python {remote_python!r}: {e}; quote it as a shell would") from None
        if not self.remote_python:
            raise TargetError("--remote-python is empty; give the device's Python, e.g. python3")
        self.ssh_key, self.ssh_config = ssh_key, ssh_config
        self.versions: dict = {}
        self.code = None
        self.probe_info: dict = {}
        self.has_python = False
        self.python_tried = False  # its Python was asked for (a format with no native runner)

    # ---- transport
    def ssh_argv(self) -> list[str]:
        argv = [
            "ssh",
            "-T",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={self.connect_timeout}",
            "-o",
            "ServerAliveInterval=10",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "LogLevel=ERROR",
        ]
        if self.ssh_config:
            argv += ["-F", str(self.ssh_config)]
        if self.ssh_key:
            argv += ["-i", str(self.ssh_key), "-o", "IdentitiesOnly=yes"]
        if self.address.port:
            argv += ["-p", str(self.address.port)]
        return [*argv, "--", self.address.destination]

    def shell_argv(self, command: str) -> list[str]:
        return [*self.ssh_argv(), command]

    def transport_error(self, code: int, err: str) -> str | None:
        if code != 255:
            return None
        line = last_line(err).rstrip(".")
        return f"cannot reach {self.name}: {line or 'ssh failed'}; {connection_fix(line)}"

    def push(self, local: Path, remote: str, what: str) -> None:
        size = local.stat().st_size
        with open(local, "rb") as f:
            # a copy cut short (a full disk, a dropped link) leaves nothing behind
            self.sh(f"cat > {remote} || {{ rm -f {remote}; exit 3; }}", f"copying {what}", 120 + size / 1e6, stdin=f)

    def remote_command(self, words: list[str]) -> str:
        return shell_words([*self.remote_python, *words])

    def call(self, words: list[str], what: str, timeout: float, stdin=None) -> str:
        """Run the device's Python with ``words``; its stdout (see :meth:`sh`)."""
        try:
            return self.sh(self.remote_command(words), what, timeout, stdin)
        except CommandFailed as e:
            if e.code in (126, 127):
                raise TargetError(
                    f"{self.name}: the device has no {shlex.join(self.remote_python)!r} "
                    f"({e.detail or 'command not found'}); install Python 3.10 or newer there, "
                    "or pass --remote-python with its command"
                ) from None
            raise

    # ---- the Target interface
    def reach(self) -> None:
        """Connect and probe the device: what setup needs before the runners for its CPU exist."""
        if shutil.which("ssh") is None:
            raise TargetError(
                "--target ssh:// uses this machine's OpenSSH client, which is not installed; install it "
                "with: apt-get install openssh-client (macOS has it)"
            )
        self.probe()
        if self.cores is not None:
            self.check_cores()

    def check(self) -> None:
        """Probe the device; TargetError (one line naming the fix) if nothing can run there."""
        self.reach()
        if self.platform in TRIPLES:
            self.find_bundles(required=True)
        else:  # a Mac: the Python worker, with the device's own runtimes
            self.check_python()

    def can_run(self, backend: Backend) -> bool:
        # a format with no native runner runs in the device's Python, if it has one: asked once, when first needed
        wanted = backend.native_runner is None and self.platform in backend.platforms
        if wanted and not self.has_python and not self.python_tried:
            self.python_tried = True
            try:
                self.check_python()
            except TargetError:
                pass
        return super().can_run(backend)

    def check_python(self) -> None:
        """Make the Python worker available (for a format with no native runner there, or --runner python)."""
        info = self.probe_python()
        if info.get("too_old"):
            raise TargetError(
                f"{self.name}: its Python is {info['python']}; the worker needs "
                f"{'.'.join(map(str, MIN_PYTHON))} or newer (--remote-python chooses another)"
            )
        if info.get("write_error"):
            raise TargetError(
                f"{self.name}: cannot write the work folder: {info['write_error']}; free space "
                "there or pass --remote-dir"
            )
        if not self.versions.get("numpy"):
            raise TargetError(
                f"{self.name}: its Python has no numpy, which the worker needs; install it with: "
                f"{install_command(self, ['numpy'])}"
            )
        self.has_python = True

    def probe_python(self) -> dict:
        """Copy the code once, and read what the device's Python has (runtimes, versions)."""
        data, code_hash = code_archive()
        script = (
            PROBE.replace("__MARK__", repr(PROBE_MARK))
            .replace("__MIN_PYTHON__", repr(MIN_PYTHON))
            .replace("__WORK__", repr(self.remote_dir))
            .replace("__CODE_HASH__", repr(code_hash))
            .replace("__PACKAGES__", repr(PACKAGES))
            .replace("__CODE__", repr(base64.b64encode(data).decode()))
        )
        try:
            out = self.call(["-"], "the first contact with its Python", self.probe_timeout, stdin=script.encode())
        except WorkerError as e:
            raise TargetError(str(e)) from None
        lines = [ln for ln in out.splitlines() if ln.startswith(PROBE_MARK)]
        if not lines:
            raise TargetError(
                f"{self.name}: {shlex.join(self.remote_python)!r} did not run the probe (it printed "
                f"{last_line(out)!r}); pass --remote-python with the device's Python 3 command"
            )
        info = self.probe_info = json.loads(lines[-1][len(PROBE_MARK) :])
        self.versions = info.get("versions") or {}
        if info.get("about"):
            self.about = {**self.about, **info["about"]}
        self.code = info.get("code")
        return info

    def lacking(self, backend: Backend) -> list[str]:
        """The packages a format's Python runner imports that the device's Python does not have."""
        return [p for p in backend.device_packages if not self.versions.get(p)]

    def missing(self, backend: Backend, native: bool | None = None) -> str | None:
        if native is None:
            native = backend.name in self.bundles or not self.has_python
        if native:
            return super().missing(backend, True)
        needed = self.lacking(backend)
        if not needed:
            return None
        return f"{_are_missing(needed)} not installed on {self.name}; install with: {install_command(self, needed)}"

    def worker_command(self):
        if not self.has_python:
            raise TargetError(f"{self.name}: no Python worker was set up there")
        words = [f"{self.code}/run.py", "worker", *(["--cores", self.cores] if self.cores else [])]
        return self.shell_argv(self.remote_command(words)), None, []

    def describe(self) -> dict:
        out = {**super().describe(), "label": device_label(self.about, self.versions)}
        if self.has_python:
            out["remote_python"] = shlex.join(self.remote_python)
            out["python"] = self.about.get("python")
            out["versions"] = {k: v for k, v in self.versions.items() if v}
        return out


def device_label(about: dict, versions: dict) -> str:
    """One line that names the device in reports: machine, CPU, Python and runtime versions read on it."""
    cpu = (about.get("cpu") or {}).get("model name") if about.get("system") == "Darwin" else clusters_text(about)
    runtimes = ", ".join(f"{k} {v}" for k, v in versions.items() if v and k not in ("numpy", "pillow"))
    python = f", Python {about['python']}" if about.get("python") else ""
    return f"{about.get('machine')} {about.get('system')}, {cpu}{python}" + (f", {runtimes}" if runtimes else "")


def install_command(target: SshTarget, packages: list[str]) -> str:
    """The pip command that installs ``packages`` at the host's versions with the device's Python.

    On Linux a package of :data:`PIP_INDEX` comes from its own index and one of RUNTIME_IMPORTS comes
    without its requirements (its runtime's imports beside it), each in a pip call of its own.
    """
    extras = [i for p in packages for i in RUNTIME_IMPORTS.get(p, ())]
    host = installed_versions([*packages, *extras])

    def pinned(name: str) -> str:  # without a local label: torch==2.14.1 takes the CPU index's 2.14.1+cpu
        return f"{name}=={public_version(host[name])}" if host[name] else name

    pip = shell_words([*target.remote_python, "-m", "pip", "install"])
    linux = target.platform.startswith("linux")
    indexed = [p for p in packages if linux and p in PIP_INDEX]
    bare = [p for p in packages if linux and p in RUNTIME_IMPORTS and p not in indexed]
    plain = [p for p in packages if p not in indexed and p not in bare]
    commands = [f"{pip} {' '.join(pinned(p) for p in plain)}"] if plain else []
    commands += [f"{pip} {pinned(p)} --index-url {PIP_INDEX[p]}" for p in indexed]
    commands += [f"{pip} --no-deps {' '.join(pinned(n) for n in (p, *RUNTIME_IMPORTS[p]))}" for p in bare]
    return " && ".join(commands)


def device_needs(target: SshTarget) -> dict:
    """What a probed device has against this machine's runtimes: a row per package, and the install command.

    Rows: {"package", "device", "host", "status"} with status ok, missing, differs, or "not used here"
    (Core ML's tools off macOS). ``command`` installs what is missing or differs, at the host's versions.
    """
    from ..formats import BACKENDS

    rows, fix = [], []
    probe = target.probe_info
    rows.append(
        {
            "package": "python",
            "device": probe.get("python"),
            "host": platform.python_version(),
            "status": "too old (needs 3.10+)" if probe.get("too_old") else "ok",
        }
    )
    wanted = device_packages(target.platform)
    for package, host in installed_versions(PACKAGES).items():
        have = target.versions.get(package)
        if package not in wanted:
            status = f"not used on {target.platform}"
        elif not have:
            status = "missing"
            fix.append(package)
        elif host and not same_version(have, host):
            status = f"differs from this machine ({host})"
            fix.append(package)
        else:
            status = "ok"
        rows.append({"package": package, "device": have, "host": host, "status": status})
    formats = {}
    for b in BACKENDS.values():
        if target.platform not in b.platforms:
            formats[b.name] = f"does not run on {target.platform}"
        else:
            lacking = target.lacking(b)
            formats[b.name] = f"error rows until {_are_missing(lacking)} installed" if lacking else "runs"
    return {
        "rows": rows,
        "formats": formats,
        "command": install_command(target, fix) if fix else None,
        "ok": not fix and not probe.get("too_old"),
    }
