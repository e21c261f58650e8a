"""An evaluation's report for people: ``accuracy.md``, ``accuracy.png`` and ``flipped.csv`` (every flipped image)."""

from __future__ import annotations

import csv
from pathlib import Path

from ..files import replace_atomically
from .accuracy import FLIPPED_SHOWN


def _class(labels: list[str] | None, index: int) -> str:
    return f"{index} {labels[index]}" if labels and 0 <= index < len(labels) else str(index)


def write_flipped(path: Path, rows: list[dict], flipped: dict[int, list[dict]], labels: list[str] | None) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["artifact", "image", "label", "reference_top1", "artifact_top1", "change"])
            for i, row in enumerate(rows):
                for fl in flipped.get(i, []):
                    w.writerow(
                        [
                            row["label"],
                            fl["image"],
                            _class(labels, fl["label"]),
                            _class(labels, fl["reference_top1"]),
                            _class(labels, fl["artifact_top1"]),
                            fl["change"],
                        ]
                    )

    replace_atomically(path, write)


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2%}"


def _pts(x) -> str:
    return "-" if x is None else f"{x * 100:+.2f}"


def _ci(ci) -> str:
    return "-" if ci is None else f"{ci[0] * 100:+.2f} to {ci[1] * 100:+.2f}"


def write_markdown(path: Path, doc: dict, labels: list[str] | None) -> None:
    ref, data = doc["reference"], doc["data"]
    m = doc["model"]
    lines = [
        f"# Accuracy of {m['name']} at {m['input_size'][0]}x{m['input_size'][1]}: every artifact against PyTorch fp32",
        "",
        f"Bundle `{doc['bundle']}`; validation set `{data['folder']}`: {data['images']} images "
        f"({ref['images']} readable, {len(doc['unreadable'])} unreadable), labels from "
        f"{ {'folders': 'class subfolders', 'synsets': 'ImageNet synset subfolders', 'csv': 'a CSV', 'none': 'nowhere (unlabelled: drift and agreement only)'}[data['labels_from']] }. "
        f"Target: {doc['target']['name']}. Run by {doc['scheduler']['workers']} worker(s)"
        + (
            f" on {len(doc['scheduler']['nodes'])} Ray node(s)"
            if doc["scheduler"]["kind"] == "ray"
            else " on this machine"
        )
        + f", in shards of {doc['shard_size']}.",
        "",
    ]
    if doc["random_weights"]:
        lines += [
            "**Random weights**: the model was not trained, so its accuracy is near chance and its logits nearly flat; "
            "the figures show the machinery, not a deployment's accuracy.",
            "",
        ]
    if ref["top1"] is not None:
        lines += [f"PyTorch fp32 (the reference): top-1 {_pct(ref['top1'])}, top-5 {_pct(ref['top5'])}.", ""]
    lines += [
        "The top-1 change is the artifact's top-1 minus PyTorch's on the same images, in percentage points; its 95% "
        "interval is paired (Tango's score interval over the images whose correctness flipped), so an interval "
        "that holds 0 means the artifact's accuracy is not shown to differ from PyTorch's on this set.",
        "",
        "| artifact | verdict | top-1 | top-5 | top-1 change (pts) | 95% CI (pts) | flipped (lost / gained) "
        "| agreement | cosine min | max abs | images |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in doc["rows"]:
        if "error" in row:
            lines.append(f"| {row['label']} | FAIL: {row['error']} | | | | | | | | | |")
            continue
        fl = row["flipped"]
        flips = "-" if fl is None else f"{fl['count']} ({fl['lost']} / {fl['gained']})"
        d = row["drift"]
        lines.append(
            f"| {row['label']}{' (an earlier run)' if row.get('earlier') else ''} | "
            f"{'PASS' if row['passed'] else 'FAIL: ' + '; '.join(row['problems'])} | "
            f"{_pct(row['top1'])} | {_pct(row['top5'])} | {_pts(row['top1_delta'])} | {_ci(row['top1_delta_ci95'])} | "
            f"{flips} | {_pct(row['agreement'])} | {d['cosine_min']:.6f} | {d['max_abs']:.2e} | {row['images']} |"
        )
    for s in doc["skipped"]:
        lines.append(f"| {s['format']} {s['precision']} | not run: {s['reason']} | | | | | | | | | |")
    lines += ["", "## Who ran the shards", ""]
    for row in doc["rows"]:
        if "nodes" in row:
            who = ", ".join(f"{n['node']} ({n['shards']} shards, {n['images']} images)" for n in row["nodes"])
            runner = "; ".join(
                f"{r.get('runner', 'python')} {r.get('method', '')}".strip() for r in row.get("runner", [])
            )
            lines.append(f"- {row['label']}: {who}; runner: {runner}")
    for row in doc["rows"]:
        fl = row.get("flipped")
        if not fl or not fl["count"]:
            continue
        lines += [
            "",
            f"## Flipped by {row['label']}: {fl['count']} images"
            + (f" (the first {FLIPPED_SHOWN}; all in flipped.csv)" if fl["count"] > FLIPPED_SHOWN else ""),
            "",
            "| image | label | PyTorch top-1 | artifact top-1 | change |",
            "| --- | --- | --- | --- | --- |",
        ]
        for f in fl["first"]:
            lines.append(
                f"| {f['image']} | {_class(labels, f['label'])} | {_class(labels, f['reference_top1'])} | "
                f"{_class(labels, f['artifact_top1'])} | {f['change']} |"
            )
    if doc["unreadable"]:
        lines += ["", f"## Unreadable images: {len(doc['unreadable'])} (left out of every figure)", ""]
        lines += [f"- {u['image']}: {u['reason']}" for u in doc["unreadable"][:FLIPPED_SHOWN]]
        if len(doc["unreadable"]) > FLIPPED_SHOWN:
            lines.append(f"- ... and {len(doc['unreadable']) - FLIPPED_SHOWN} more (accuracy.json lists them all)")
    text = "\n".join(lines) + "\n"
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def write_plot(path: Path, doc: dict) -> None:
    """Each artifact's top-1 change with its 95% interval (agreement with PyTorch, for an unlabelled set)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if "error" not in r]
    labelled = doc["reference"]["top1"] is not None
    fig, ax = plt.subplots(figsize=(8.0, 1.2 + 0.55 * max(1, len(rows))))
    for y, r in enumerate(rows):
        if labelled:
            x, (lo, hi) = r["top1_delta"] * 100, (v * 100 for v in r["top1_delta_ci95"])
        else:
            x, (lo, hi) = r["agreement"] * 100, (v * 100 for v in r["agreement_ci95"])
        colour = "tab:blue" if r["passed"] else "tab:red"
        ax.errorbar([x], [y], xerr=[[x - lo], [hi - x]], fmt="o", color=colour, capsize=4, markersize=5)
    ticks = [
        r["label"] + (f"\nagreement {r['agreement']:.2%}, {r['flipped']['count']} flipped" if labelled else "")
        for r in rows
    ]
    ax.set_yticks(range(len(rows)), ticks, fontsize=9)
    ax.invert_yaxis()
    if labelled:
        ax.axvline(0.0, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xlabel("top-1 change against PyTorch fp32 (percentage points, 95% paired CI)")
    else:
        ax.set_xlabel("top-1 agreement with PyTorch fp32 (%, 95% Wilson CI; the set has no labels)")
    m = doc["model"]
    title = f"{m['name']} {m['input_size'][0]}x{m['input_size'][1]} on {doc['reference']['images']} images"
    if doc["random_weights"]:
        title += " (random weights)"
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    if not rows:
        ax.text(0.5, 0.5, "no artifact ran", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
