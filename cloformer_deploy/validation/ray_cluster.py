"""Shards on a Ray cluster: actors pinned to every node run :func:`.evaluation.run_task`, the driver keeps the store.

The nodes need the project installed (``pip install -e ".[cluster]"``), not this machine's disk: a shard travels
with its images' bytes, a job with its files (the checkpoint, the artifact) once per node, and results come back
to the driver, which alone writes the shard store. Each node opens the target itself (its own emulator for
``--target arm64``) and builds its own native runners for ``local`` when it has a compiler and none are built.
Ray is imported here only, so that the project runs without it.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import tarfile
import tempfile
from pathlib import Path

from ..files import sha256_path
from ..inputs import InputError
from .evaluation import Job, close_opened, run_task
from .labelled import Shard
from .workers import quiet_worker

INSTALL = 'pip install -e ".[cluster]"'
GCS_PORT = 6379  # `ray start --head`'s default


def split_address(address: str) -> tuple[str, int]:
    text = address.strip()
    rest = text[len("ray://") :] if text.startswith("ray://") else text
    host, _, port = rest.rpartition(":")
    if not host:
        host, port = rest, str(GCS_PORT)
    if not host or not port.isdigit():
        raise InputError(
            f"--cluster {address!r} is not an address; pass host:port of the cluster's head (ray start --head)"
        )
    return host.strip("[]"), int(port)


def check_address(flag: str, address) -> str:
    """``address`` when Ray is installed here and something answers there (InputError, one line, otherwise)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise InputError(f"{flag} needs Ray, an optional extra; install it with {INSTALL}")
    host, port = split_address(str(address))
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise InputError(
            f"{flag} {address!r}: no Ray cluster answers at {host}:{port} ({why}); start one with "
            f"'ray start --head' there, or pass the address it printed"
        ) from None
    return str(address).strip()


def _pack_files(job: Job) -> dict:
    """The job's files as bytes (a folder, such as a .mlpackage, as a tar), each named by its content's hash."""
    out = {}
    for name, path in job.files.items():
        path = Path(path)
        if path.is_dir():
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                tar.add(path, arcname=path.name)
            out[name] = (sha256_path(path), path.name, True, buf.getvalue())
        else:
            out[name] = (sha256_path(path), path.name, False, path.read_bytes())
    return out


def _unpack_files(files: dict) -> dict:
    """Where a node keeps the files it was sent (written once per content, renamed into place whole)."""
    root = Path(tempfile.gettempdir()) / "cloformer-deploy-cluster"
    local = {}
    for name, (sha, filename, is_dir, data) in files.items():
        home = root / sha[:32]
        path = home / filename
        if not path.exists():
            root.mkdir(parents=True, exist_ok=True)
            part = Path(tempfile.mkdtemp(prefix=".part-", dir=root))
            if is_dir:
                with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                    tar.extractall(part, filter="data")
            else:
                (part / filename).write_bytes(data)
            try:
                os.replace(part, home)
            except OSError:  # another actor on this node was first
                import shutil

                shutil.rmtree(part, ignore_errors=True)
        local[name] = path
    return local


class ShardActor:
    """One worker slot on a node (a Ray actor): runs shards of whatever job it is sent, one job open at a time."""

    def __init__(self, node: str, target: dict | None):
        os.environ["CLOFORMER_EVAL_NODE"] = node
        quiet_worker()
        self.ready = _build_runners(target)

    def run(self, job: Job, shard: Shard, reference: bytes | None, files: dict) -> bytes:
        return run_task(job, shard, reference, _unpack_files(files))

    def close(self) -> None:
        close_opened()


def _build_runners(target: dict | None) -> bool:
    """This node's native runners for ``local``, built once (under a lock) where a compiler exists."""
    if not target or str(target.get("name", "local")).lower() != "local":
        return False
    import fcntl
    import shutil

    from ..formats import BACKENDS
    from ..targets.local import LocalTarget

    local = LocalTarget(target.get("cache"))
    if all(local.native_bundle(b) is not None for b in BACKENDS.values() if b.native_runner is not None):
        return True
    if shutil.which("g++") is None:
        return False
    from ..targets.setup import setup_target

    lock = Path(tempfile.gettempdir()) / "cloformer-deploy-cluster.setup.lock"
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        setup_target("local", target.get("cache"))
    return True


class RayCluster:
    """The nodes of the Ray cluster at ``address``, ``per_node`` worker slots each (default: the node's CPUs)."""

    def __init__(self, address: str, per_node: int | None, target: dict | None):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.ray = ray
        # Ray's core says on every start that it cannot reach the internet to learn its address: not ours to show
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:  # another Ray's cluster, a refused connection
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise InputError(
                f"--cluster {address!r}: Ray could not join it ({why}); run the same Ray there ({INSTALL})"
            ) from None
        actor = ray.remote(num_cpus=1)(ShardActor)
        self.actors, self.nodes = [], []
        for node in sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: n["NodeID"]):
            cpus = int(node.get("Resources", {}).get("CPU", 0))
            if cpus < 1:
                continue
            name = f"{node.get('NodeManagerAddress')} (ray node {node['NodeID'][:8]})"
            self.nodes.append(name)
            strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            for _ in range(min(per_node or cpus, cpus)):
                self.actors.append(actor.options(scheduling_strategy=strategy).remote(name, target))
        if not self.actors:
            self.close()
            raise InputError(f"--cluster {address!r} has no node with a CPU to run shards; add one with 'ray start'")
        self._files: dict[str, object] = {}
        self.workers = len(self.actors)

    def describe(self) -> dict:
        return {"kind": "ray", "workers": self.workers, "nodes": list(self.nodes)}

    def map(self, job: Job, shards: list[Shard], reference_of):
        ray = self.ray
        if job.key not in self._files:
            self._files = {job.key: ray.put(_pack_files(job))}  # one job's files held at a time
        files = self._files[job.key]
        queue = iter(shards)
        inflight: dict = {}

        def submit(actor) -> None:
            shard = next(queue, None)
            if shard is None:
                return
            where = reference_of(shard)
            reference = Path(where).read_bytes() if where is not None else None
            inflight[actor.run.remote(job, shard.with_bytes(), reference, files)] = (actor, shard)

        for _ in range(2):  # a second shard per slot travels while the first runs
            for actor in self.actors:
                submit(actor)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            actor, shard = inflight.pop(ready[0])
            try:
                data = ray.get(ready[0])
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None) or e
                raise RuntimeError(f"a shard failed on the cluster: {str(cause).splitlines()[-1][:300]}") from None
            submit(actor)
            yield shard, data

    def close(self) -> None:
        for a in getattr(self, "actors", []):
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 (an actor whose node is gone is already ended)
                pass
        self.actors = []
        self.ray.shutdown()
