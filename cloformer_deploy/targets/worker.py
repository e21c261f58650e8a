"""The worker: one process on a target that opens artifacts with the backends' own runners and runs them on command.

It speaks JSON lines on stdin/stdout, so that it can run wherever a Python with the runtimes
does: a local subprocess, a device over SSH (a Mac; a board with --runner python). Arrays
travel inside the messages (base64), so the worker never needs the caller's filesystem for its
inputs or outputs. Commands:

- ``open``: open an artifact (``format``, ``path``, ``spec``, ``info``, ``threads``) -> load time,
  the runner's description and structural problems; or the eager PyTorch model (``format: "eager"``).
- ``run``: logits of one batch (``names``, ``images``, ``tensor``) -> logits and the time it took; with ``all``,
  also ``outputs``: every output of the program, the logits first (a file showing its block boundaries).
  A batch sent with a ``key`` is kept; later runs of it send the ``key`` alone (a phone over Wi-Fi
  receives each validation image once per worker, not once per artifact).
- ``time``: ``n`` timed runs of the last batch, prepared once -> times in ms.
- ``about``: the platform, CPU (clusters by core kind) and the runtime versions installed on the target.
- ``thermal``: the thermal zones' temperatures, where the kernel exposes them.
- ``rss``: this process's peak resident memory. ``quit``.

The native runners (``cloformer_deploy/native/runner.h``) speak the same messages for ``open``, ``run``,
``time``, ``rss``, ``thermal`` and ``about`` (theirs without Python's fields), so a target starts either one
and the host drives both the same way; the tests run the protocol against both.

It imports only numpy and this package's light modules (the formats' registry) at start; each
runtime is imported when an artifact needs it, so a target without (say) onnxruntime still runs
ExecuTorch. It exits when its input closes, even in the middle of a step: a caller that is gone
(an SSH connection dropped, a timeout) leaves nothing running on the device.
"""

from __future__ import annotations

import base64
import gc
import glob
import json
import os
import platform
import queue
import resource
import sys
import threading
import time

import numpy as np

from cloformer_deploy.formats import BACKENDS
from cloformer_deploy.formats.base import ModelSpec, Runner
from cloformer_deploy.versions import installed_versions


def pack(array: np.ndarray) -> dict:
    a = np.ascontiguousarray(array)
    return {"dtype": str(a.dtype), "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii")}


def pack_json(array: np.ndarray) -> bytes:
    """:func:`pack`'s message as JSON text, made without a JSON encoder's pass over the base64 (a 224x224 batch is
    800 kB of it, which json.dumps would scan and copy again)."""
    a = np.ascontiguousarray(array)
    head = json.dumps({"dtype": str(a.dtype), "shape": list(a.shape)})[:-1].encode()
    return head + b', "data": "' + base64.b64encode(a.tobytes()) + b'"}'


def unpack(message: dict) -> np.ndarray:
    raw = base64.b64decode(message["data"])
    return np.frombuffer(raw, dtype=np.dtype(message["dtype"])).reshape(message["shape"]).copy()


def peak_rss_mb() -> float:
    """This process's own peak resident memory.

    Linux's ru_maxrss carries the parent's high-water mark across fork and exec, so it
    would charge the harness's memory to every runtime; VmHWM is this address space's.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform == "darwin" else kb / 1024


def device_packages(platform: str | None = None) -> tuple[str, ...]:
    """The distributions a worker imports: numpy, and the device packages of every format (only of those that run
    natively on ``platform``, when given), each once, in the registry's order."""
    backends = [b for b in BACKENDS.values() if platform is None or platform in b.platforms]
    return tuple(dict.fromkeys(["numpy", *(p for b in backends for p in b.device_packages)]))


PACKAGES = device_packages()  # what a target's Python may have that the worker uses

# MIDR part numbers of Arm's own cores (implementer 0x41), as the kernel reports them in /proc/cpuinfo
ARM_PARTS = {
    0xD03: "Cortex-A53",
    0xD04: "Cortex-A35",
    0xD05: "Cortex-A55",
    0xD07: "Cortex-A57",
    0xD08: "Cortex-A72",
    0xD09: "Cortex-A73",
    0xD0A: "Cortex-A75",
    0xD0B: "Cortex-A76",
    0xD0C: "Neoverse-N1",
    0xD0D: "Cortex-A77",
    0xD40: "Neoverse-V1",
    0xD41: "Cortex-A78",
    0xD44: "Cortex-X1",
    0xD46: "Cortex-A510",
    0xD47: "Cortex-A710",
    0xD48: "Cortex-X2",
    0xD49: "Neoverse-N2",
    0xD4B: "Cortex-A78C",
    0xD4D: "Cortex-A715",
    0xD4E: "Cortex-X3",
    0xD4F: "Neoverse-V2",
    0xD80: "Cortex-A520",
    0xD81: "Cortex-A720",
    0xD82: "Cortex-X4",
    0xD85: "Cortex-X925",
    0xD87: "Cortex-A725",
}


def cpu_clusters(cpuinfo: str) -> list[dict]:
    """The cores of /proc/cpuinfo grouped by kind: [{"core": "Cortex-A76", "midr_part": "0xd0b", "cpus": [4, 5, 6, 7]}].

    On a phone's big.LITTLE CPU this is what ``--cores`` chooses from. x86 reports one kind (its model name).
    """
    kinds: dict = {}
    for block in cpuinfo.strip().split("\n\n"):
        fields = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        if "processor" not in fields or not fields["processor"].isdigit():
            continue
        if "CPU part" in fields:
            implementer, part = int(fields.get("CPU implementer", "0"), 16), int(fields["CPU part"], 16)
            name = (
                ARM_PARTS.get(part, f"part 0x{part:03x}")
                if implementer == 0x41
                else f"implementer 0x{implementer:02x} part 0x{part:03x}"
            )
            key = (name, f"0x{part:03x}")
        else:
            key = (fields.get("model name", "unknown"), None)
        kinds.setdefault(key, []).append(int(fields["processor"]))
    return [{"core": name, "midr_part": part, "cpus": cpus} for (name, part), cpus in kinds.items()]


def _max_khz(cpu: int) -> int | None:
    try:
        with open(f"/sys/devices/system/cpu/cpu{cpu}/cpufreq/cpuinfo_max_freq") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


CPU_FIELDS = ("model name", "CPU implementer", "CPU part", "CPU variant", "Features", "flags", "Hardware")


def cpu_fields(cpuinfo: str) -> dict:
    """The fields of /proc/cpuinfo that name the CPU (their first occurrence)."""
    cpu: dict = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in CPU_FIELDS:
            cpu.setdefault(key.strip(), value.strip())
    return cpu


def about() -> dict:
    """What the target is: machine, Python, CPU as the kernel (or the emulator) reports it, runtime versions."""
    cpu, clusters = {}, []
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        cpu = cpu_fields(text)
        clusters = cpu_clusters(text)
        for c in clusters:
            c["max_mhz"] = max((_max_khz(i) or 0 for i in c["cpus"]), default=0) // 1000 or None
    except OSError:
        pass
    if sys.platform == "darwin":  # Apple silicon: no /proc; the chip's name is a sysctl
        import subprocess

        try:
            brand = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            cpu["model name"] = brand or None
        except (OSError, subprocess.SubprocessError):
            pass
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine().lower()}",
        "cores": os.cpu_count(),
        "cpu": cpu,
        "clusters": clusters,
        "affinity": affinity,
        "can_pin": hasattr(os, "sched_setaffinity"),
        "versions": installed_versions(PACKAGES),
    }


def thermal(root: str = "/sys/class/thermal") -> dict:
    """Temperature per thermal zone in degrees C (Linux and Android expose them in /sys; macOS does not)."""
    zones = {}
    for zone in sorted(glob.glob(f"{root}/thermal_zone*"), key=lambda z: int(z.rsplit("zone", 1)[1])):
        try:
            with open(f"{zone}/type") as f:
                kind = f.read().strip()
            with open(f"{zone}/temp") as f:
                zones[f"{os.path.basename(zone)} {kind}"] = int(f.read().strip()) / 1000
        except (OSError, ValueError):
            continue  # a zone that cannot be read (asleep, or guarded) is left out
    return zones


class EagerRunner(Runner):
    """The PyTorch model itself (authors' or deploy form), for the benchmark's eager rows; not an artifact."""

    method = "torch"

    def __init__(self, cfg: dict, threads: int | None):
        import torch

        from cloformer_deploy.models import apply_state_dict, to_deploy
        from cloformer_deploy.models.cloformer import CloFormer, CloFormerConfig
        from cloformer_deploy.models.fat import FAT, FATConfig

        if threads:
            torch.set_num_threads(threads)
        # built from the architecture itself, not a registry name: any variant config works
        arch = CloFormer if cfg["family"] == "cloformer" else FAT
        conf = (CloFormerConfig if cfg["family"] == "cloformer" else FATConfig)(**cfg["architecture"])
        model = arch(conf, num_classes=cfg["num_classes"]).eval()
        apply_state_dict(model, torch.load(cfg["weights"], weights_only=True), cfg["model"])
        if cfg["form"] == "deploy":
            model = to_deploy(model, tuple(cfg["input_size"]))
        self.model, self.torch = model, torch

    def prepare(self, batch):
        return self.torch.from_numpy(batch.tensor)

    def infer(self, prepared) -> np.ndarray:
        with self.torch.no_grad():
            return self.model(prepared).numpy()

    def run(self, batch) -> np.ndarray:
        return self.infer(self.prepare(batch))


def _open(cmd: dict):
    from pathlib import Path

    threads = cmd.get("threads")
    if cmd["format"] == "eager":
        return EagerRunner(cmd["eager"], threads)
    spec = ModelSpec.from_dict(cmd["spec"])
    return BACKENDS[cmd["format"]].open(Path(cmd["path"]), spec, cmd.get("info") or {}, threads=threads)


def _error(e: BaseException) -> dict:
    text = str(e).splitlines()[0] if str(e) else ""
    return {"error": f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__}


def pin(cores: str) -> None:
    """Run on the given CPUs only (as taskset does), before any runtime starts its threads: they inherit it."""
    os.sched_setaffinity(0, parse_cores(cores))


def parse_cores(text: str) -> set[int]:
    """'4-7' or '0,2,4-5' -> {4, 5, 6, 7} / {0, 2, 4, 5}; ValueError for anything else."""
    cores: set[int] = set()
    for part in str(text).split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{text!r} is not a core list such as 4-7 or 0,2,4-5")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"{part.strip()!r} runs backwards; write {last}-{first}")
        cores.update(range(first, last + 1))
    return cores


KEPT_BATCHES = 32  # keyed batches a worker keeps (0.75 MB each at 224x224); older ones are sent again
IDLE_EXIT_S = 3600.0  # a worker with no command for this long ends itself: a link dropped without a close


def _read_commands(commands: queue.Queue, idle: threading.Event) -> None:
    """Commands from stdin into the queue; when stdin closes, the caller is gone: end the process.

    A step in progress is not waited for beyond a moment: its answer has no reader (a dropped
    SSH connection, a caller that timed out), and on a device nothing must keep running. The
    descriptor is read directly: a thread blocked inside sys.stdin's buffer would hold its lock,
    and Python aborts at exit when it cannot take it.
    """
    pending = b""
    while True:
        chunk = os.read(0, 1 << 20)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                commands.put(line.decode())
    commands.put(None)
    idle.wait(5)
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--cores"]:
        pin(args[1])
    # the protocol owns the real stdout; anything a library prints goes to stderr
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def reply(obj):
        print(json.dumps(obj), file=proto, flush=True)

    from cloformer_deploy.images import ImageBatch

    commands: queue.Queue = queue.Queue()
    idle = threading.Event()
    threading.Thread(target=_read_commands, args=(commands, idle), daemon=True).start()
    runner = prepared = None
    batches: dict = {}  # batches sent with a key, kept for later runs by key
    while True:
        idle.set()
        try:
            line = commands.get(timeout=IDLE_EXIT_S)
        except queue.Empty:
            break
        idle.clear()
        if line is None:
            break
        cmd = json.loads(line)
        op = cmd["cmd"]
        if op == "quit":
            break
        try:
            if op == "open":
                t = time.perf_counter()
                runner, prepared = _open(cmd), None
                reply(
                    {
                        "load_ms": (time.perf_counter() - t) * 1e3,
                        "describe": runner.describe(),
                        "problems": runner.check_structure(),
                    }
                )
            elif op == "run":
                if "tensor" in cmd:
                    batch = ImageBatch(cmd["names"], unpack(cmd["images"]), unpack(cmd["tensor"]))
                    if cmd.get("key"):
                        batches[cmd["key"]] = batch
                        while len(batches) > KEPT_BATCHES:  # oldest first, as the caller counts them
                            del batches[next(iter(batches))]
                else:
                    batch = batches[cmd["key"]]
                if cmd.get("all"):  # every output: a file that shows its block boundaries
                    t = time.perf_counter()
                    outs = runner.run_outputs(batch)
                    ms = (time.perf_counter() - t) * 1e3
                    reply(
                        {"ms": ms, "logits": pack(outs[0]), "outputs": [pack(np.asarray(o, np.float32)) for o in outs]}
                    )
                    continue
                prepared = runner.prepare(batch)
                t = time.perf_counter()
                out = runner.infer(prepared)
                reply({"ms": (time.perf_counter() - t) * 1e3, "logits": pack(np.asarray(out, np.float32))})
            elif op == "time":
                times = []
                # as timeit does: Python's collector would otherwise run inside some timed calls (seen at
                # 4-6% of ExecuTorch samples in perf), a cost of this harness, not of the runtime
                gc.disable()
                try:
                    for _ in range(cmd["n"]):
                        s = time.perf_counter()
                        runner.infer(prepared)
                        times.append((time.perf_counter() - s) * 1e3)
                finally:
                    gc.enable()
                reply({"times_ms": times})
            elif op == "about":
                reply(about())
            elif op == "thermal":
                reply({"zones": thermal()})
            elif op == "rss":
                reply({"peak_rss_mb": peak_rss_mb()})
            else:
                reply({"error": f"unknown command {op!r}"})
        except Exception as e:  # report, do not crash: the caller turns it into an error row or a failed check
            reply(_error(e))
    idle.set()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
