"""A bundle evaluated on a validation set (``cloformer-validate BUNDLE --data DIR``): every artifact, on a target,
against PyTorch fp32, streamed shard by shard (:mod:`cloformer_deploy.validation.evaluation`).

This module turns a bundle into the passes of an evaluation (the reference, one per artifact) and writes what
they found: ``accuracy.json`` (published schema), ``accuracy.md``, ``accuracy.png`` and ``flipped.csv``, beside
the finished shards in ``shards/``.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..files import replace_atomically
from ..formats import BACKENDS
from ..images import CROP_PCT
from ..inputs import writable_folder
from ..progress import Progress
from ..quiet import quiet_libraries
from ..validation import bounds_for
from ..validation.accuracy import artifact_figures, evaluate_set
from ..validation.accuracy_report import write_flipped, write_markdown, write_plot
from ..validation.evaluation import Job, Preprocessing, ShardStore, digest
from ..validation.labelled import read_set
from ..validation.workers import LocalWorkers, default_workers
from ..versions import installed_versions
from . import schema
from .model import reference_module
from .opened import open_bundle
from .options import ExportInputError, ValidateOptions, evaluation_checked

ACCURACY_SCHEMA_VERSION = 1


@dataclass
class Evaluation:
    """What an evaluation wrote: the document of ``accuracy.json`` and the folder it is in."""

    document: dict
    folder: Path

    @property
    def passed(self) -> bool:
        """This run's verdict: every artifact it evaluated within its bounds (rows of earlier runs aside)."""
        return all(r["passed"] for r in self.document["rows"] if not r.get("earlier"))

    @property
    def rows(self) -> list[dict]:
        return self.document["rows"]


def _versions(cluster: bool) -> dict:
    """The versions that made the figures, read without importing the runtimes."""
    import platform

    from .. import __version__
    from ..files import git_commit
    from ..versions import installed_versions

    names = ["torch", "numpy", "pillow", *dict.fromkeys(p for b in BACKENDS.values() for p in b.device_packages)]
    return {
        "cloformer_deploy": __version__,
        "python": platform.python_version(),
        **installed_versions([*names, *(["ray"] if cluster else [])]),
        "git_commit": git_commit(),
    }


def _lock(out: Path):
    """An exclusive lock on ``out`` for this evaluation (released when the returned file closes, or the process
    ends): two runs writing the same shards and reports would mix them."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ExportInputError(
            f"another evaluation is writing into {out}; wait for it, or pass another --out"
        ) from None
    return handle


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def row_line(row: dict) -> str:
    """One line per finished artifact, for the terminal."""
    head = f"{row['label']}: "
    if "error" in row:
        return head + f"FAIL, {row['error']}"
    d = row["drift"]
    text = head + ("PASS" if row["passed"] else "FAIL")
    if row["top1"] is not None:
        lo, hi = row["top1_delta_ci95"]
        text += (
            f", top-1 {row['top1']:.2%} ({row['top1_delta'] * 100:+.2f} pts, 95% CI {lo * 100:+.2f} to "
            f"{hi * 100:+.2f}), {row['flipped']['count']} flipped"
        )
    text += f", agreement {row['agreement']:.2%}, cosine min {d['cosine_min']:.6f}, max abs {d['max_abs']:.2e}"
    text += f" on {row['images']} images"
    run = row.get("run") or {}
    if run.get("images_run") and run.get("seconds"):
        text += f", {run['images_run'] / run['seconds']:.1f} images/s"
    if row["problems"]:
        text += " -- " + "; ".join(row["problems"])
    return text


def earlier_rows(store: ShardStore, data, reference: Job, shas: dict, current: set, opts) -> tuple[list, list]:
    """The rows of this bundle's artifacts that earlier runs into the same folder finished on other targets (every
    shard of the same set, weights and preprocessing is in the store): one report for every target evaluated."""
    rows, flips = [], []
    if not store.root.is_dir():
        return rows, flips
    shards = data.shards(opts.shard_size)
    for about in sorted(store.root.glob("*/job.json")):
        try:
            job_info = json.loads(about.read_text())
        except (OSError, ValueError):
            continue  # not a finished description: nothing to report from it
        entry = shas.get(job_info.get("sha256"))
        if (
            job_info.get("kind") != "artifact"
            or job_info.get("reference") != reference.key
            or job_info["key"] in current
            or entry is None
        ):
            continue
        job = Job(
            kind="artifact",
            key=job_info["key"],
            label=job_info["label"],
            preprocessing=reference.preprocessing,
            files={"artifact": Path(job_info["files"]["artifact"])},
            format=entry["format"],
            precision=entry["precision"],
            slug=about.parent.name[: -len(job_info["key"][:16]) - 1],
            about={k: job_info[k] for k in ("target", "reference", "sha256")},
        )
        if not all(store.done(job, s) for s in shards):
            continue  # a run stopped part-way: the same command on that target finishes it
        row, flipped = artifact_figures(
            data, shards, job, reference, store, bounds_for(entry["precision"], opts.min_top1_agreement)
        )
        base = {k: job_info[k] for k in ("label", "format", "precision", "target")}
        rows.append({**base, "file": entry["path"], **row, "run": None, "earlier": True})
        flips.append(flipped)
    return rows, flips


def evaluate_bundle(
    options: ValidateOptions | None = None, /, *, progress: Progress | None = None, **kwargs
) -> Evaluation:
    """Evaluate every artifact of a bundle on the validation set ``data`` (see :class:`ValidateOptions`).

    Bad input (a folder with no image, a labels file naming missing files or unknown classes, an unreachable
    cluster, ``workers=0``) raises an InputError before any work. A stopped run continues where it stopped.
    """
    with quiet_libraries():
        if isinstance(options, (str, Path)):
            options, kwargs = None, {"bundle": str(options), **kwargs}
        opts = ValidateOptions.of(options, **kwargs).checked()
        if opts.bundle is None:
            raise ExportInputError("no bundle given; pass the folder written by cloformer-export")
        if opts.data is None:
            raise ExportInputError("no validation set given; pass data= (--data) with a folder of images")
        evaluation_checked(opts)
        progress = progress or Progress(quiet=True)
        on = opts.open_target()
        on.close()  # checked ready here; every worker opens its own
        opened = open_bundle(opts.bundle, opts.weights)
        spec = opened.spec
        data = read_set(opts.data, spec.labels, opts.labels)
        out = Path(opts.out) if opts.out is not None else Path("runtime_bench") / opened.folder.name
        writable_folder("--out", out)
        m = opened.manifest["model"]
        crop = opened.manifest.get("preprocessing", {}).get("crop_pct", CROP_PCT)
        prep = Preprocessing(tuple(spec.input_size), tuple(spec.mean), tuple(spec.std), float(crop))
        weights = {"weights": Path(opts.weights)} if opts.weights is not None else {}
        reference = Job(
            kind="reference",
            key=digest("reference", m["name"], m["num_classes"], opened.prepared.state_sha256, prep.as_dict()),
            label="PyTorch fp32 (reference)",
            preprocessing=prep,
            files=weights,
            build=functools.partial(
                reference_module, opened.prepared.variant, m["num_classes"], opened.prepared.state_sha256
            ),
        )
        where = {"name": opts.target, "cpu": opts.cpu, "cache": opts.target_cache, "device": opts.device()}
        jobs, skipped = [], []
        for entry in opened.manifest["artifacts"]:
            fmt, precision = entry["format"], entry["precision"]
            backend = BACKENDS[fmt]
            reason = on.cannot_run(backend) if not on.can_run(backend) else on.missing(backend)
            if reason:
                skipped.append({"file": entry["path"], "format": fmt, "precision": precision, "reason": reason})
                continue
            # what runs it is part of what made a shard: the native runner or the Python runtime, and its version
            runner = "native" if on.runs_natively(fmt) else "python"
            runtime = installed_versions(backend.device_packages[:1])
            job = Job(
                kind="artifact",
                key=digest("artifact", reference.key, entry["sha256"], on.name, runner, runtime),
                label=f"{fmt} {precision} on {on.name}",
                preprocessing=prep,
                files={"artifact": opened.folder / entry["path"]},
                format=fmt,
                precision=precision,
                spec=spec.to_dict(),
                info=entry,
                target=where,
                slug=_slug(f"{fmt}-{precision}-{on.name}"),
                about={"target": on.name, "reference": reference.key, "sha256": entry["sha256"]},
            )
            jobs.append((job, bounds_for(precision, opts.min_top1_agreement)))
        if opts.cluster is not None:
            from ..validation.ray_cluster import RayCluster

            scheduler = RayCluster(opts.cluster, opts.workers, where)
        else:
            scheduler = LocalWorkers(opts.workers or default_workers())
        progress.log(
            f"evaluating {len(jobs)} artifact(s) of {opened.folder.name} on {on.name}: {len(data)} images "
            f"({data.how if data.labelled else 'unlabelled'}), shards of {opts.shard_size}, "
            + (f"Ray cluster of {len(scheduler.nodes)} node(s), " if opts.cluster else "")
            + f"{scheduler.describe()['workers']} worker(s)"
        )
        store = ShardStore(out / "shards")
        try:
            lock = _lock(out)
        except BaseException:
            scheduler.close()
            raise
        try:
            ref, rows, flipped = evaluate_set(
                data,
                reference,
                jobs,
                scheduler,
                store,
                progress,
                opts.shard_size,
                on_row=lambda row: progress.log(row_line(row)),
            )
        finally:
            scheduler.close()
            lock.close()
        shas = {e["sha256"]: e for e in opened.manifest["artifacts"]}
        earlier, earlier_flips = earlier_rows(store, data, reference, shas, {j.key for j, _ in jobs}, opts)
        for row, flips in zip(earlier, earlier_flips):
            flipped[len(rows)] = flips
            rows.append(row)
        unreadable = ref.pop("unreadable")
        document = {
            "schema_version": ACCURACY_SCHEMA_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "bundle": str(opened.folder),
            "model": {k: m[k] for k in ("name", "num_classes", "input_size", "batch")},
            "weights": m.get("weights") if not m.get("random_init") else None,
            "random_weights": bool(m.get("random_init")),
            "data": data.describe(),
            "preprocessing": prep.as_dict(),
            "shard_size": opts.shard_size,
            "scheduler": scheduler.describe(),
            "target": on.describe(),
            "reference": ref,
            "unreadable": unreadable,
            "rows": rows,
            "skipped": skipped,
            "versions": _versions(opts.cluster is not None),
        }
        out.mkdir(parents=True, exist_ok=True)
        schema.check("accuracy", json.loads(json.dumps(document)))
        write_flipped(out / "flipped.csv", rows, flipped, spec.labels)
        write_markdown(out / "accuracy.md", document, spec.labels)
        write_plot(out / "accuracy.png", document)
        text = json.dumps(document, indent=1) + "\n"
        replace_atomically(out / "accuracy.json", lambda tmp: tmp.write_text(text))
        return Evaluation(document, out)
