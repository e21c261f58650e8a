"""Where artifacts run: the target interface, the worker process a target starts, and a runner over it.

A target knows how to start a worker (:mod:`cloformer_deploy.targets.worker`) where the artifact
will run, how to hand it files, and what its figures mean (a real latency or not). Validation
and the benchmark speak only to this interface: which format or runtime an artifact has is the
worker's business (it opens artifacts with the backends' own runners).
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..formats import BACKENDS
from ..formats.base import Backend, ModelSpec, Runner
from ..images import ImageBatch
from ..inputs import InputError
from ..quiet import is_native_noise
from .worker import KEPT_BATCHES, pack, pack_json, unpack

STDERR_TAIL = 4000  # bytes of a worker's stderr kept to explain its death
# packages whose own requirements serve exporting (executorch: pandas, hydra, coremltools, ...): a device gets
# them without their requirements, plus what their runtime imports
RUNTIME_IMPORTS = {p: i for b in BACKENDS.values() for p, i in b.device_runtime_imports.items()}


class TargetError(InputError):
    """A target that cannot be used as asked (not set up, a host tool missing, a bad CPU choice)."""


class WorkerError(RuntimeError):
    """A worker that answered with an error, gave no answer in time, or died."""


def end_process_group(proc: subprocess.Popen) -> None:
    """Kill a process started with ``start_new_session`` and all it started (QEMU, an ssh ProxyCommand); reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # gone already (macOS says EPERM for a group of zombies)
        pass
    proc.wait()


def run_in_group(
    argv: list[str], timeout: float, stdin=None, cwd: str | None = None, env: dict | None = None
) -> tuple[int, str, str] | None:
    """Run a program in a process group of its own: (exit code, stdout, stderr), or None when it gave no result
    within ``timeout`` seconds. ``stdin``: bytes, or an open file streamed to it. On a timeout or an interrupt the
    whole group ends (an ssh ProxyCommand, a child the program started): nothing is left running."""
    streamed = hasattr(stdin, "fileno")
    proc = subprocess.Popen(
        argv,
        stdin=stdin if streamed else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(None if streamed else (stdin or b""), timeout=timeout)
    except subprocess.TimeoutExpired:
        end_process_group(proc)
        return None
    except BaseException:
        end_process_group(proc)
        raise
    end_process_group(proc)  # anything it left behind ends with it
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def last_line(output: str, limit: int = 300) -> str:
    """The last line of a program's output that says something: not blank, not a native library's chatter.

    A worker's stderr ends with the line that explains its death; ExecuTorch's cpuinfo lines may follow it.
    """
    lines = [ln.strip() for ln in output.splitlines() if ln.strip() and not is_native_noise(ln.strip())]
    return lines[-1][:limit] if lines else ""


# host side only: importing the worker on a device imports this module, and that Python may lack packaging
def public_version(text: str) -> str:
    """A version without its local label, as pip pins it: torch 2.14.1+cu130 -> 2.14.1; unparseable: as it is."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(text).public
    except InvalidVersion:
        return text


def same_version(a: str | None, b: str | None) -> bool:
    """Both present and equal but for a local label: torch 2.14.1+cpu (PyTorch's CPU index) is torch 2.14.1."""
    from packaging.version import InvalidVersion, Version

    if not a or not b:
        return False
    try:
        return Version(Version(a).public) == Version(Version(b).public)
    except InvalidVersion:
        return a == b


class WorkerProcess:
    """A worker started by a target: JSON lines over its stdin/stdout, a timeout on every answer.

    It runs in its own process group, so that closing it (or a timeout) ends everything it
    started (QEMU, or an SSH client) and leaves nothing running.
    """

    def __init__(self, argv: list[str], env: dict | None, timeout: float, cleanup: list[Path] | None = None):
        self.timeout = timeout
        self.cleanup = list(cleanup or [])
        self.stderr = tempfile.TemporaryFile()
        self.sent: dict[str, None] = {}  # keys of the batches the worker holds, oldest first (as it keeps them)
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env, start_new_session=True
        )
        self._pending = b""  # read from the worker's stdout, not yet a whole line
        self.noise: list[str] = []  # lines that were not answers (a login banner a device's shell printed)

    def ask(self, cmd: dict, timeout: float | None = None) -> dict:
        """Send one command and wait for its answer; WorkerError for an error answer, a timeout or a death."""
        self.send(json.dumps(cmd).encode())
        return self.receive(cmd["cmd"], timeout)

    def send(self, line: bytes) -> None:
        """Write one command (a JSON line without its newline); its answer is :meth:`receive`'s."""
        try:
            self.proc.stdin.write(line + b"\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):  # ValueError: a worker already closed (a timeout before)
            raise WorkerError(self._died()) from None

    def receive(self, what: str, timeout: float | None = None) -> dict:
        """The answer to the command ``what`` sent last; WorkerError for an error answer, a timeout or a death."""
        limit = timeout or self.timeout
        deadline = time.monotonic() + limit
        while True:
            line = self._line(deadline)
            if line is None:
                self.close()
                raise WorkerError(f"no answer to {what!r} within {limit:.0f}s; the worker was stopped")
            if not line:
                raise WorkerError(self._died())
            if line.lstrip().startswith(b"{"):
                break
            self.noise.append(line.decode(errors="replace").strip()[:200])
        try:
            answer = json.loads(line)
        except ValueError:
            raise WorkerError(f"the worker answered {line[:80]!r}, not a message") from None
        if "error" in answer:
            raise WorkerError(answer["error"])
        return answer

    def _line(self, deadline: float) -> bytes | None:
        """The next line of the worker's stdout; b"" at its end, None when the deadline passes first."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b""
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line + b"\n"

    def run_batch(self, names, images: np.ndarray, tensor: np.ndarray, every_output: bool = False) -> dict:
        """Logits of one batch; its arrays travel once per worker, later runs name it by a key of its content.
        ``every_output``: the answer's ``outputs`` also holds every output of the program, the logits first."""
        key = hashlib.sha1(np.ascontiguousarray(tensor).tobytes()).hexdigest()
        more = {"all": True} if every_output else {}
        if key in self.sent:
            return self.ask({"cmd": "run", "key": key, **more})
        answer = self.ask(
            {"cmd": "run", "key": key, "names": list(names), "images": pack(images), "tensor": pack(tensor), **more}
        )
        self.sent[key] = None
        while len(self.sent) > KEPT_BATCHES:  # the worker forgets the oldest the same way
            del self.sent[next(iter(self.sent))]
        return answer

    def _died(self) -> str:
        code = self.proc.wait(timeout=30)
        self.stderr.seek(0, os.SEEK_END)
        self.stderr.seek(max(0, self.stderr.tell() - STDERR_TAIL))
        tail = last_line(self.stderr.read().decode(errors="replace"), 200)
        why = f": {tail}" if tail else ""
        return f"the worker exited with code {code}{why}"

    def close(self) -> None:
        """Ask the worker to quit; then end its whole process group, whatever state it is in."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"cmd": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        end_process_group(self.proc)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self.stderr.close()
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)
        self.cleanup = []


class WorkerRunner(Runner):
    """An artifact opened by a worker on a target, used as any runner is (validation runs it unchanged)."""

    def __init__(
        self,
        worker: WorkerProcess,
        target: Target,
        fmt: str,
        path: Path,
        spec: ModelSpec,
        info: dict,
        threads: int | None = None,
        options: dict | None = None,
    ):
        self.worker, self.target = worker, target
        opened = worker.ask(
            {
                "cmd": "open",
                "format": fmt,
                "path": target.ship(path),
                "spec": spec.to_dict(),
                "info": info,
                "threads": threads,
                **(options or {}),  # how the runner runs it (a GPU row's accelerator)
            }
        )
        self.load_ms = opened["load_ms"]
        self.description = opened["describe"]  # a native runner's says so: {"runner": "native", ...}
        self.problems = opened["problems"]
        self.method = self.description.get("method", fmt)
        self.run_ms: list[float] = []  # per batch, inside the worker: on an emulated target the emulator's cost

    def run(self, batch: ImageBatch) -> np.ndarray:
        answer = self.worker.run_batch(batch.names, batch.images, batch.tensor)
        self.run_ms.append(answer["ms"])
        return unpack(answer["logits"])

    def run_outputs(self, batch: ImageBatch) -> list[np.ndarray]:
        answer = self.worker.run_batch(batch.names, batch.images, batch.tensor, every_output=True)
        self.run_ms.append(answer["ms"])
        if "outputs" not in answer:  # a runner of an older release
            raise WorkerError(f"the runner on {self.target.name} returns its first output only; set it up again")
        return [unpack(o) for o in answer["outputs"]]

    def run_ahead(self, batches) -> Iterator[np.ndarray]:
        """Logits of each batch of ``batches`` (an iterable, made lazily) in turn, each sent once and not kept: the
        next batch is made and encoded while the worker runs the one before, so that a stream of images costs
        about the worker's time alone. A native runner is sent the tensor only (it never reads the images)."""
        native = self.description.get("runner") == "native"

        def message(batch: ImageBatch) -> bytes:
            head = b'{"cmd": "run", "names": ' + json.dumps(list(batch.names)).encode()
            images = b"" if native else b', "images": ' + pack_json(batch.images)
            return head + images + b', "tensor": ' + pack_json(batch.tensor) + b"}"

        pending = False
        for batch in batches:
            line = message(batch)  # made while the worker runs the previous batch
            if pending:
                yield self._answer()
            self.worker.send(line)
            pending = True
        if pending:
            yield self._answer()

    def _answer(self) -> np.ndarray:
        answer = self.worker.receive("run")
        self.run_ms.append(answer["ms"])
        return unpack(answer["logits"])

    def check_structure(self) -> list[str]:
        return list(self.problems)

    def describe(self) -> dict:
        return {**self.description, "target": self.target.name}


class Target(ABC):
    name: str  # as reports and manifests name it: "local", "arm64-cortex-a76"
    kind: str  # "local", "arm64" (emulated)
    platform: str  # "linux-x86_64", "linux-aarch64", ... as Backend.platforms names them
    measures_latency: bool = True  # False: its timings are not a latency (emulation), so none is reported
    has_python: bool = True  # False: only the native runners run there (no Python worker)
    step_timeout: float = 900.0  # seconds for one worker step: load, one batch, one round of timed runs
    cores: str | None = None  # the CPUs its processes are pinned to ("4-7"), where the target takes a choice

    def check(self) -> None:  # noqa: B027 (a target with nothing to check is ready)
        """Raise TargetError (one line naming the fix) when the target cannot run now; called before any work."""

    def can_run(self, backend: Backend) -> bool:
        return self.platform in backend.platforms

    def cannot_run(self, backend: Backend) -> str:
        """Why :meth:`can_run` is False for ``backend``: what a report says instead of its figures."""
        return f"{backend.runtime} does not run on {self.platform}"

    def missing(self, backend: Backend, native: bool | None = None) -> str | None:
        """Why a format's runtime is absent here, with the command that installs it; None if it is present.

        ``native``: of its native runner (True), of its Python runtime (False), or of what the target would use."""
        return None

    def native_bundle(self, backend: Backend):
        """The built native runner of ``backend`` for this target (a :class:`~.native.Bundle`), or None."""
        return None

    def runs_in_python(self, backend: Backend) -> bool:
        """Whether this target's Python worker can run ``backend``'s artifacts (a device's Python may lack its
        runtime: then its rows say which package to install)."""
        return self.has_python

    def runs_natively(self, fmt: str) -> bool:
        backend = BACKENDS.get(fmt)
        return backend is not None and self.native_bundle(backend) is not None

    def native_args(self) -> list[str]:
        """Arguments of a native runner: its cores, and how many batches it keeps (as the host counts them)."""
        return [*(["--cores", self.cores] if self.cores else []), "--keep", str(KEPT_BATCHES)]

    def ship(self, path: str | Path) -> str:
        """The path under which the worker reads a file of this machine (sent once; here: the same path)."""
        return str(path)

    @abstractmethod
    def worker_command(self) -> tuple[list[str], dict | None, list[Path]]:
        """(argv, environment, folders to remove when the worker closes) of a Python worker on this target."""

    def native_command(self, fmt: str, gpu: bool = False) -> tuple[list[str], dict | None, list[Path]]:
        """The same for the native runner of ``fmt`` (only where :meth:`native_bundle` has one); ``gpu``: for a
        GPU row (only where :meth:`gpu_missing` is None)."""
        bundle = self.native_bundle(BACKENDS[fmt])
        return bundle.words(None, *self.native_args()), None, []

    # its GPU computes on the CPU (a software Vulkan device): GPU rows there are drift, never a latency
    gpu_software: bool = False

    def gpu_missing(self) -> str | None:
        """Why this target's runners cannot reach a GPU, with what to do instead; None where they can (a device's
        driver is known only when a runner opens it: a failure then is that row's error)."""
        return f"{self.name} has no GPU the runners can reach"

    def start(
        self, timeout: float | None = None, fmt: str | None = None, native: bool = False, gpu: bool = False
    ) -> WorkerProcess:
        """A worker process: the native runner of ``fmt`` when ``native`` (set up for the GPU when ``gpu``), else
        the Python worker."""
        argv, env, cleanup = self.native_command(fmt, gpu) if native else self.worker_command()
        return WorkerProcess(argv, env, timeout or self.step_timeout, cleanup)

    def runner(
        self,
        fmt: str,
        path: str | Path,
        spec: ModelSpec,
        info: dict,
        threads: int | None = None,
        native: bool = True,
    ) -> Runner:
        """The artifact opened for validation on this target: by its native runner where the target has one (a
        process per artifact: it starts in milliseconds), else in the target's one Python validation worker.
        ``native=False``: the Python worker even where a native runner is built.

        Artifacts are validated one after another in the same Python worker: starting one can take a
        minute (a Python importing torch on a board). A worker that died is replaced.
        """
        if native and self.runs_natively(fmt):
            previous = getattr(self, "_native_worker", None)
            if previous is not None:  # artifacts are validated one after another
                previous.close()
            worker = self._native_worker = self.start(fmt=fmt, native=True)
            return WorkerRunner(worker, self, fmt, Path(path), spec, info, threads)
        worker = getattr(self, "_validation_worker", None)
        if worker is None or worker.proc.poll() is not None:
            if worker is not None:
                worker.close()
            worker = self._validation_worker = self.start()
        return WorkerRunner(worker, self, fmt, Path(path), spec, info, threads)

    def gpu_problem(self, backend: Backend) -> str | None:
        """Why a GPU row of ``backend`` cannot run here (no GPU reachable, no native runner), with the fix; None
        when it can."""
        problem = self.gpu_missing() or self.missing(backend, True)
        if problem is None and self.native_bundle(backend) is None:  # this machine (a device's missing() says)
            problem = (
                f"the GPU rows run in the native {backend.label} runner; build it with: cloformer-device setup gpu"
            )
        return problem

    def gpu_runner(self, fmt: str, path: str | Path, spec: ModelSpec, info: dict, options: dict) -> Runner:
        """The artifact opened on this target's GPU by its native runner, with the GPU runtime's ``options``
        (WorkerError when the runner cannot reach a GPU there: that row's error)."""
        previous = getattr(self, "_native_worker", None)
        if previous is not None:
            previous.close()
        worker = self._native_worker = self.start(fmt=fmt, native=True, gpu=True)
        return WorkerRunner(worker, self, fmt, Path(path), spec, info, None, options)

    def close(self) -> None:
        """End the workers validation started; nothing of this target is left running."""
        worker = getattr(self, "_validation_worker", None)
        if worker is not None:
            worker.close()
            self._validation_worker = None
        worker = getattr(self, "_native_worker", None)
        if worker is not None:
            worker.close()
            self._native_worker = None

    def describe(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "platform": self.platform,
            "measures_latency": self.measures_latency,
        }
