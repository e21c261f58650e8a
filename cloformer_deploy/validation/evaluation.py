"""Accuracy at the scale of a real validation set, as a stream of shards.

Shards of images flow through PyTorch fp32 (the reference, once per weights and data) and through each artifact's
runner on its target; each shard is reduced on the spot to a small file of per-image figures, kept in a
:class:`ShardStore` under a key of what produced it (the weights, the data, the preprocessing, the artifact's
hash, the target). Memory therefore does not grow with the set, a run that is stopped continues where it stopped,
and the final figures, read back from the shard files in the set's order, are the same whichever worker or node
ran a shard. A scheduler (:mod:`.workers`: local processes or a Ray cluster) only decides where shards run; the
work of one shard is :func:`run_task`, the same everywhere.

It names no format and no target: the jobs carry their names, and runners come from the targets' interface.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import replace_atomically
from ..images import CROP_PCT, ImageBatch, load_rgb, normalise
from .labelled import Shard

REFERENCE_BATCH = 1  # images per PyTorch call, as export validates: one image's memory, and figures that do not depend on the shard size
TOP_K = 5


def digest(*parts) -> str:
    """A key of plain data (JSON-able parts), stable across processes and machines."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Preprocessing:
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = CROP_PCT

    def as_dict(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "resize": "bicubic, shorter side to size / crop_pct, centre crop",
        }


@dataclass(frozen=True)
class Job:
    """One pass over the set: the reference (``kind == "reference"``) or one artifact on one target.

    ``files``: name -> path of what the pass reads besides the images (the checkpoint, the artifact); a scheduler
    whose workers do not share this machine's disk ships them. ``build``: for the reference, a picklable function
    of those files that returns the PyTorch module. ``target``: for an artifact, how a worker opens its target
    (``get_target``'s arguments).
    """

    kind: str
    key: str
    label: str  # "PyTorch fp32", "onnx fp16 on local"
    preprocessing: Preprocessing
    files: dict = field(default_factory=dict)
    build: Callable | None = None
    format: str | None = None
    precision: str | None = None
    spec: dict | None = None
    info: dict | None = None
    target: dict | None = None
    slug: str = "reference"
    about: dict = field(default_factory=dict)  # facts for reports: the target's name, the artifact's hash

    @property
    def folder(self) -> str:
        return f"{self.slug}-{self.key[:16]}"


# ---- the work of one shard, in whatever process runs it ------------------------------------------------------

_OPEN: dict[str, object] = {}  # this process's opened job (one at a time): its key -> the opened pass


def node_name() -> str:
    """Who ran a shard: this machine and process (a Ray worker says its node instead)."""
    return os.environ.get("CLOFORMER_EVAL_NODE") or f"{socket.gethostname()} process {os.getpid()}"


def decode(shard: Shard, prep: Preprocessing):
    """The shard's images as uint8 NHWC, the mask of those read, and why the others could not be."""
    from PIL import Image

    arrays, ok, errors = [], np.zeros(len(shard), bool), []
    for i in range(len(shard)):
        try:
            with shard.open(i) as f:
                arrays.append(load_rgb(f, prep.input_size, prep.crop_pct))
            ok[i] = True
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            # PIL names the file object it read ("<_io.BytesIO object at 0x...>"): the same file, said the same way
            reason = re.sub(r"\s*<[^>]*>", "", str(e).splitlines()[0])[:160] if str(e) else type(e).__name__
            errors.append((shard.names[i], reason))
    h, w = prep.input_size
    images = np.stack(arrays) if arrays else np.zeros((0, h, w, 3), np.uint8)
    return images, ok, errors


def top_k(logits: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Indices of the k largest logits per image, largest first (ties: the lower index, as argmax)."""
    k = min(k, logits.shape[1])
    order = np.argsort(-logits, axis=1, kind="stable")
    return order[:, :k].astype(np.int32)


class _Reference:
    def __init__(self, job: Job, files: dict):
        import torch

        torch.set_num_threads(1)  # one thread per worker: as fast in total, and the same numbers in every run
        self.torch = torch
        self.module = job.build(files).eval()
        self.prep = job.preprocessing

    def process(self, shard: Shard, reference) -> dict:
        images, ok, errors = decode(shard, self.prep)
        tensor = normalise(images, self.prep.mean, self.prep.std)
        outs = []
        with self.torch.inference_mode():
            for i in range(0, len(tensor), REFERENCE_BATCH):
                outs.append(self.module(self.torch.from_numpy(tensor[i : i + REFERENCE_BATCH])).float().numpy())
        logits = np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
        return {
            "ok": ok,
            "logits": logits.astype(np.float32),
            "top5": top_k(logits) if len(logits) else np.zeros((0, TOP_K), np.int32),
            "unreadable": np.array([f"{n}\t{r}" for n, r in errors], dtype=str),
        }

    def close(self) -> None:
        pass


class _Artifact:
    def __init__(self, job: Job, files: dict):
        from ..formats.base import ModelSpec
        from ..targets import get_target

        t = job.target
        self.target = get_target(t["name"], t.get("cpu"), t.get("cache"), t.get("device"))
        self.spec = ModelSpec.from_dict(job.spec)
        self.prep = job.preprocessing
        try:
            self.runner = self.target.runner(job.format, files["artifact"], self.spec, job.info, threads=1, native=True)
        except BaseException:
            self.target.close()  # what the target started (an emulator, a device's worker) ends here
            raise
        # how it runs (native or Python, the runtime and its version), not what a run found (Core ML's fp16 report)
        about = self.runner.describe()
        self.description = {k: v for k, v in about.items() if not isinstance(v, dict) and k != "note"}
        self.description["target"] = self.target.name

    def process(self, shard: Shard, reference: dict) -> dict:
        readable = np.flatnonzero(reference["ok"])
        batch, sizes = self.spec.batch, []

        def batches():
            # made one by one, as the runner takes them: decoding the next overlaps the runner's work on this one
            for start in range(0, len(readable), batch):
                part = [int(i) for i in readable[start : start + batch]]
                arrays = []
                for i in part:
                    try:
                        with shard.open(i) as f:
                            arrays.append(load_rgb(f, self.prep.input_size, self.prep.crop_pct))
                    except (OSError, ValueError) as e:
                        raise RuntimeError(f"{shard.names[i]} changed since the reference pass read it ({e})") from None
                sizes.append(len(part))
                # a static-batch artifact gets the last image again; its outputs are dropped
                arrays += [arrays[-1]] * (batch - len(part))
                part += [part[-1]] * (batch - len(part))
                images = np.stack(arrays)
                yield ImageBatch(
                    [shard.names[i] for i in part], images, normalise(images, self.prep.mean, self.prep.std)
                )

        ahead = getattr(self.runner, "run_ahead", None)
        outs = ahead(batches()) if ahead is not None else (self.runner.run(b) for b in batches())
        outs = [np.asarray(o, np.float32) for o in outs]
        out = np.concatenate([o[:n] for o, n in zip(outs, sizes)]) if outs else np.zeros((0, 0), np.float32)
        ref = reference["logits"]
        return {"top5": top_k(out) if len(out) else np.zeros((0, TOP_K), np.int32), **drift(out, ref)}

    def close(self) -> None:
        self.target.close()


def drift(out: np.ndarray, ref: np.ndarray) -> dict:
    """Per-image logit drift: max and mean absolute difference, cosine, and whether every output is finite."""
    if len(out) == 0:
        z = np.zeros(0)
        return {"max_abs": z, "mean_abs": z, "cosine": z, "finite": np.zeros(0, bool)}
    o, r = out.astype(np.float64), ref.astype(np.float64)
    if o.shape != r.shape:
        raise RuntimeError(f"the artifact gave outputs of shape {o.shape}, PyTorch {r.shape}")
    finite = np.isfinite(o).all(axis=1)
    diff = np.abs(o - r)
    den = np.linalg.norm(o, axis=1) * np.linalg.norm(r, axis=1)
    cos = np.where(den > 0, (o * r).sum(1) / np.maximum(den, 1e-30), 1.0)
    return {
        "max_abs": np.where(finite, diff.max(1), np.inf),
        "mean_abs": np.where(finite, diff.mean(1), np.inf),
        "cosine": np.where(finite, cos, np.nan),
        "finite": finite,
    }


def _opened(job: Job, files: dict):
    if job.key not in _OPEN:
        close_opened()
        _OPEN[job.key] = (_Reference if job.kind == "reference" else _Artifact)(job, files)
    return _OPEN[job.key]


def close_opened() -> None:
    """Close this process's opened pass (its runner, its target's processes)."""
    for opened in _OPEN.values():
        opened.close()
    _OPEN.clear()


def run_task(job: Job, shard: Shard, reference, files: dict | None = None) -> bytes:
    """One shard of one pass: its result file's bytes. ``reference``: the reference pass's result for this shard
    (bytes, or the path of its file), for an artifact's pass. ``files``: where the job's files are here (default:
    where the job says)."""
    t0 = time.perf_counter()
    try:
        opened = _opened(job, files or {k: Path(v) for k, v in job.files.items()})
        ref = None
        if reference is not None:
            ref = read_result(reference if isinstance(reference, bytes) else Path(reference).read_bytes())
        result = opened.process(shard, ref)
    except BaseException:
        close_opened()  # a runner in an unknown state (an answer unread) is not used again
        raise
    result["node"] = np.array(node_name())
    result["seconds"] = np.array(time.perf_counter() - t0)
    if job.kind != "reference":
        result["runner"] = np.array(json.dumps(opened.description, sort_keys=True))
    buf = io.BytesIO()
    np.savez(buf, **result)
    return buf.getvalue()


def read_result(data: bytes) -> dict:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ---- the driver's side -----------------------------------------------------------------------------------------


class ShardStore:
    """Finished shards on disk: ``<root>/<job folder>/<shard index>-<shard key>.npz``, each written whole or not at
    all (written beside, then renamed), so that a run killed at any moment leaves only finished shards."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, job: Job, shard: Shard) -> Path:
        return self.root / job.folder / f"{shard.index:06d}-{shard.key[:16]}.npz"

    def done(self, job: Job, shard: Shard) -> bool:
        return self.path(job, shard).is_file()

    def write(self, job: Job, shard: Shard, data: bytes) -> None:
        path = self.path(job, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        about = path.parent / "job.json"
        if not about.exists():
            text = json.dumps(describe_job(job), indent=1) + "\n"
            replace_atomically(about, lambda tmp: tmp.write_text(text))
        replace_atomically(path, lambda tmp: tmp.write_bytes(data))

    def read(self, job: Job, shard: Shard) -> dict:
        return read_result(self.path(job, shard).read_bytes())


def describe_job(job: Job) -> dict:
    return {
        "kind": job.kind,
        "key": job.key,
        "label": job.label,
        "format": job.format,
        "precision": job.precision,
        "target": (job.target or {}).get("name"),
        "files": {k: str(v) for k, v in job.files.items()},
        **job.about,
    }


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def run_job(
    job: Job,
    shards: list[Shard],
    scheduler,
    store: ShardStore,
    progress,
    reference: Job | None = None,
) -> dict:
    """Every shard of ``job`` not yet in the store, run by ``scheduler``; how many images this run did and how fast."""
    todo = [s for s in shards if not store.done(job, s)]
    total = sum(len(s) for s in shards)
    done = total - sum(len(s) for s in todo)
    if not todo:
        return {"images_run": 0, "images_resumed": total, "seconds": 0.0}
    resumed = done
    refs = (lambda s: store.path(reference, s)) if reference is not None else (lambda s: None)
    t0 = time.perf_counter()
    with progress.stage(job.label) as stage:
        if resumed:
            stage.update(f"{resumed}/{total} images already done, continuing")
        for shard, data in scheduler.map(job, todo, refs):
            store.write(job, shard, data)
            done += len(shard)
            elapsed = time.perf_counter() - t0
            rate = (done - resumed) / elapsed if elapsed > 0 else 0.0
            left = (total - done) / rate if rate > 0 else 0.0
            stage.update(f"{done}/{total} images, {rate:.1f} images/s, {_clock(left)} left")
    seconds = time.perf_counter() - t0
    return {"images_run": done - resumed, "images_resumed": resumed, "seconds": seconds}
