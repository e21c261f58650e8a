"""Where shards run: this process, N local processes, or a Ray cluster (:mod:`.ray_cluster`, imported only then).

A scheduler has one method, ``map(job, shards, reference_of)``: it runs :func:`.evaluation.run_task` on every
shard and yields ``(shard, result bytes)`` as they finish, in any order, holding only a few shards in flight, so
that the driver's memory stays flat. Closing it ends every process it started.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Iterator

from ..quiet import quiet_libraries, stderr_unfiltered
from .evaluation import Job, close_opened, run_task
from .labelled import Shard

# one thread per worker process: the workers are the parallelism (and a shard's numbers must not depend on it)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def quiet_worker() -> None:
    """A worker process's settings: one thread, and the libraries' chatter off for its whole life (its stderr is the
    terminal's, and the user sees only the driver's progress)."""
    for name in THREAD_VARIABLES:
        os.environ[name] = "1"
    quiet_libraries().__enter__()


def _init_worker() -> None:
    quiet_worker()
    from multiprocessing.util import Finalize

    Finalize(None, close_opened, exitpriority=10)  # the runner this process opened ends with it
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """End this worker when the driver is gone (killed, say): a pool's workers hold its queue open themselves,
    so they would otherwise wait for work forever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    close_opened()
    os._exit(1)


def _pool_task(args) -> tuple[Shard, bytes]:
    job, shard, reference = args
    return shard, run_task(job, shard, reference)


class LocalWorkers:
    """``workers`` processes on this machine (1: this very process, nothing started)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None

    def describe(self) -> dict:
        return {"kind": "local", "workers": self.workers}

    def map(self, job: Job, shards: list[Shard], reference_of) -> Iterator[tuple[Shard, bytes]]:
        if self.workers == 1:
            for shard in shards:
                yield shard, run_task(job, shard, reference_of(shard))
            return
        if self.pool is None:
            from multiprocessing import resource_tracker

            with stderr_unfiltered():  # the tracker lives as long as this process: not on the filter's pipe
                resource_tracker.ensure_running()
            self.pool = multiprocessing.get_context("spawn").Pool(self.workers, initializer=_init_worker)
        # the tasks are small (paths, not images), so the pool may queue them all; results come back one by one
        tasks = ((job, shard, reference_of(shard)) for shard in shards)
        try:
            yield from self.pool.imap_unordered(_pool_task, tasks)
        except BaseException:
            self.close()  # the pass's other shards would run on for nothing; the next pass starts a new pool
            raise

    def close(self) -> None:
        close_opened()
        if self.pool is not None:
            self.pool.terminate()  # ends the processes at once: the work they did is in the store already
            self.pool.join()
            self.pool = None
