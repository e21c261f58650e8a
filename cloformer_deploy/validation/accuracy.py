"""The figures of an evaluation, read back from the shard store in the set's order.

Per artifact and target: top-1 and top-5 with PyTorch fp32's on the same images, the top-1 change with its paired
95% interval (:mod:`.paired`), agreement with PyTorch's top-1, the logit drift, the verdict of the precision's
bounds, the images whose correctness flipped, and the workers or nodes that ran its shards. Reading shard by
shard keeps only a few numbers per image in memory.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from .evaluation import TOP_K, Job, ShardStore
from .labelled import DataError, LabelledSet, Shard
from .outputs import Bounds, check
from .paired import mcnemar_p, paired_change_ci, wilson_ci

FLIPPED_SHOWN = 50  # in the report; every one is in the flipped file


def _hits(top5: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    top1 = top5[:, 0] == labels
    top5_hit = (top5[:, : min(TOP_K, top5.shape[1])] == labels[:, None]).any(axis=1)
    return top1, top5_hit


def reference_figures(data: LabelledSet, shards: list[Shard], job: Job, store: ShardStore) -> dict:
    """PyTorch's top-1 and top-5 on the readable images, and the images that could not be read."""
    top5, labels, unreadable = [], [], []
    for shard in shards:
        r = store.read(job, shard)
        top5.append(r["top5"])
        labels.append(np.asarray(shard.labels)[r["ok"]])
        unreadable += [dict(zip(("image", "reason"), line.split("\t", 1))) for line in r["unreadable"].tolist()]
    top5 = np.concatenate(top5)
    labels = np.concatenate(labels)
    if not len(labels):
        reasons = "; ".join(f"{u['image']}: {u['reason']}" for u in unreadable[:2])
        raise DataError(f"no image of --data could be read ({reasons}); pass a folder of .jpg/.png photographs")
    out = {"images": int(len(labels)), "labelled": data.labelled, "top1": None, "top5": None}
    if data.labelled and len(labels):
        t1, t5 = _hits(top5, labels)
        out["top1"], out["top5"] = float(t1.mean()), float(t5.mean())
    return {**out, "unreadable": unreadable}


def artifact_figures(
    data: LabelledSet, shards: list[Shard], job: Job, reference: Job, store: ShardStore, bounds: Bounds
) -> tuple[dict, list[dict]]:
    """One row of the report, and every flipped image of it."""
    names, labels, ref5, art5 = [], [], [], []
    max_abs, mean_abs, cosine, finite = [], [], [], []
    nodes: Counter = Counter()
    node_images: Counter = Counter()
    runners, seconds = set(), 0.0
    for shard in shards:
        ref = store.read(reference, shard)
        r = store.read(job, shard)
        ok = ref["ok"]
        names += [n for n, keep in zip(shard.names, ok) if keep]
        labels.append(np.asarray(shard.labels)[ok])
        ref5.append(ref["top5"])
        art5.append(r["top5"])
        max_abs.append(r["max_abs"])
        mean_abs.append(r["mean_abs"])
        cosine.append(r["cosine"])
        finite.append(r["finite"])
        node = str(r["node"])
        nodes[node] += 1
        node_images[node] += int(ok.sum())
        runners.add(str(r["runner"]))
        seconds += float(r["seconds"])
    labels, ref5, art5 = np.concatenate(labels), np.concatenate(ref5), np.concatenate(art5)
    max_abs, mean_abs = np.concatenate(max_abs), np.concatenate(mean_abs)
    cosine, finite = np.concatenate(cosine), np.concatenate(finite)
    n = len(labels)
    all_finite = bool(finite.all())
    drift = {
        "max_abs": float(max_abs.max()) if all_finite and n else float("inf"),
        "mean_abs": float(mean_abs.mean()) if all_finite and n else float("inf"),
        "cosine_min": float(cosine.min()) if all_finite and n else float("nan"),
        "cosine_mean": float(cosine.mean()) if all_finite and n else float("nan"),
        "finite": all_finite,
    }
    agree = int((art5[:, 0] == ref5[:, 0]).sum())
    row = {
        "images": n,
        "agreement": agree / n if n else None,
        "agreement_ci95": list(wilson_ci(agree, n)) if n else None,
        "top1": None,
        "top5": None,
        "reference_top1": None,
        "reference_top5": None,
        "top1_delta": None,
        "top1_delta_ci95": None,
        "top5_delta": None,
        "mcnemar_p": None,
        "drift": drift,
    }
    flipped: list[dict] = []
    if data.labelled and n:
        r1, r5 = _hits(ref5, labels)
        a1, a5 = _hits(art5, labels)
        lost, gained = r1 & ~a1, a1 & ~r1
        row.update(
            top1=float(a1.mean()),
            top5=float(a5.mean()),
            reference_top1=float(r1.mean()),
            reference_top5=float(r5.mean()),
            top1_delta=float((int(gained.sum()) - int(lost.sum())) / n),
            top1_delta_ci95=list(paired_change_ci(int(gained.sum()), int(lost.sum()), n)),
            top5_delta=float(a5.mean() - r5.mean()),
            mcnemar_p=mcnemar_p(int(gained.sum()), int(lost.sum())),
        )
        for i in np.flatnonzero(lost | gained):
            flipped.append(
                {
                    "image": names[i],
                    "label": int(labels[i]),
                    "reference_top1": int(ref5[i, 0]),
                    "artifact_top1": int(art5[i, 0]),
                    "change": "lost" if lost[i] else "gained",
                }
            )
        row["flipped"] = {
            "count": len(flipped),
            "lost": int(lost.sum()),
            "gained": int(gained.sum()),
            "first": flipped[:FLIPPED_SHOWN],
        }
    else:
        row["flipped"] = None
    figures = {
        "max_abs": drift["max_abs"],
        "cosine": drift["cosine_min"],
        "top1_agreement": row["agreement"] or 0.0,
        "finite": all_finite,
    }
    problems = check(figures, bounds)
    row.update(
        bounds=bounds.as_dict(),
        passed=not problems,
        problems=problems,
        runner=[json.loads(r) for r in sorted(runners)],
        nodes=[{"node": k, "shards": nodes[k], "images": node_images[k]} for k in sorted(nodes)],
        worker_seconds=round(seconds, 3),
    )
    return row, flipped


def evaluate_set(
    data: LabelledSet,
    reference: Job,
    artifacts: list[tuple[Job, Bounds]],
    scheduler,
    store: ShardStore,
    progress,
    shard_size: int,
    on_row=None,
) -> tuple[dict, list[dict], dict[int, list[dict]]]:
    """Run the reference, then every artifact, shard by shard; return the reference's figures, one row per
    artifact (in the order given; a pass that failed is a row with its ``error``) and each row's flipped images.

    ``on_row(row)`` after each artifact: a line per finished artifact.
    """
    from .evaluation import describe_job, run_job

    shards = data.shards(shard_size)
    run = run_job(reference, shards, scheduler, store, progress)
    ref = reference_figures(data, shards, reference, store)
    ref["run"] = run
    rows, flipped = [], {}
    for job, bounds in artifacts:
        base = {k: describe_job(job)[k] for k in ("label", "format", "precision", "target")}  # the target's name
        base["file"] = Path(job.files["artifact"]).name
        try:
            run = run_job(job, shards, scheduler, store, progress, reference=reference)
            row, flips = artifact_figures(data, shards, job, reference, store, bounds)
        except Exception as e:  # noqa: BLE001 (a runner that fails is a row that says why; the others still run)
            row, flips = {"error": str(e).splitlines()[0][:400] if str(e) else type(e).__name__, "passed": False}, []
            run = None
        row = {**base, **row, "run": run}
        flipped[len(rows)] = flips
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return ref, rows, flipped
