"""The peers of a benchmark run: one table row per model and the accuracy-latency picture (pareto.png).

Accuracy here is always the *published* ImageNet-1k top-1 (with its source); latency is this run's.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from .report_parts import SHORT_RUNTIME, Plot, fmt, md_cell, ms_axis, nice_ceil, nice_floor, note_below
from .runtimes import PEER_RUNTIMES

FAMILY_COLOURS = {"cloformer": "tab:blue", "fat": "tab:green", "timm": "tab:gray"}


def _family(name: str, source: str | None) -> str:
    if source == "timm":
        return "timm"
    return "fat" if name.startswith("fat") else "cloformer"


def summary(results: dict) -> list[dict]:
    """Per model (the benchmarked one first, then its peers in run order): params, MACs, XNNPACK partitions,
    per (runtime, threads) the median latency and GMAC/s, the published top-1 and any error."""
    c = results["config"]
    models: dict[str, dict] = {}
    for r in results["rows"]:
        subject = r.get("role", "subject") == "subject"
        if subject and not (r["form"] == "deploy" and r["precision"] == "fp32"):
            continue
        if r["runtime"] not in PEER_RUNTIMES:
            continue
        m = models.setdefault(
            r["model"],
            {
                "model": r["model"],
                "subject": subject,
                "family": _family(r["model"], r.get("source")),
                "params": r.get("params"),
                "macs": r.get("macs"),
                "partitions": None,
                "latency": {},
                "gmacs_per_s": {},
                "published": r.get("published") if not subject else _published(r["model"]),
                "errors": [],
            },
        )
        if (r.get("delegation") or {}).get("partitions") is not None:  # a delegating runtime's row
            m["partitions"] = r["delegation"]["partitions"]
        key = (r["runtime"], r["threads"])
        if (r.get("latency_ms") or {}).get("median") is not None:
            m["latency"][key] = r["latency_ms"]["median"]
            if r.get("gflops_per_s") is not None:
                m["gmacs_per_s"][key] = r["gflops_per_s"] / 2
        if r.get("error"):
            err = f"{SHORT_RUNTIME.get(r['runtime'], r['runtime'])}: {r['error']}"
            if err not in m["errors"]:
                m["errors"].append(err)
    subject = [m for m in models.values() if m["subject"]]
    return subject + [m for m in models.values() if not m["subject"] and m["model"] != c["model"]]


def _published(name: str) -> dict | None:
    from .peers import published_top1

    return published_top1().get(name)


def _top1(m: dict) -> str:
    p = m.get("published")
    if not p:
        return "-"
    size = p.get("eval_size")
    return (
        f"{p['top1']:.1f}"
        + (f" (at {size})" if size and size != 224 else "")
        + (" distilled" if p.get("distilled") else "")
    )


def markdown(results: dict) -> str:
    c = results["config"]
    models = summary(results)
    threads = c["threads"]
    runtimes = [rt for rt in PEER_RUNTIMES if any(k[0] == rt for m in models for k in m["latency"])]
    cols = ["model", "params M", "GMACs", "XNNPACK partitions"]
    cols += [f"{SHORT_RUNTIME[rt]} {t}t ms" for t in threads for rt in runtimes]
    cols += [f"{SHORT_RUNTIME[rt]} {threads[0]}t GMAC/s" for rt in runtimes]
    cols += ["published top-1 %", "source", "error"]
    lines = [
        f"# {c['model']} beside its peers at {c['input_size'][0]}x{c['input_size'][1]}",
        "",
        "Latency: median of this run, batch 1, fp32, the same interleaved rounds for every row (random weights: "
        "latency does not depend on them). Params and MACs counted the same way for every model (PyTorch's "
        "FLOP counter; timm models after `reparameterize_model`). **Top-1 is published, not measured here**: "
        "the figure its authors or timm's results file give, with the source; figures at another eval size "
        "say so.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for m in models:
        name = f"**{m['model']}**" if m["subject"] else m["model"]
        cells = [
            name,
            fmt(m["params"] and m["params"] / 1e6, ".2f"),
            fmt(m["macs"] and m["macs"] / 1e9, ".3f"),
            fmt(m["partitions"]),
        ]
        cells += [fmt(m["latency"].get((rt, t)), ".2f") for t in threads for rt in runtimes]
        cells += [fmt(m["gmacs_per_s"].get((rt, threads[0])), ".1f") for rt in runtimes]
        p = m.get("published") or {}
        cells += [_top1(m), p.get("source_kind", "-"), "; ".join(m["errors"])]
        lines.append("| " + " | ".join(md_cell(str(x)) for x in cells) + " |")
    lines += ["", *_verdicts(models, runtimes, threads[0]), "", "Sources of the published top-1:", ""]
    lines += [f"- {m['model']}: {m['published']['source']}" for m in models if m.get("published")]
    if not any(m.get("published") and m["latency"] for m in models):
        lines += ["", "No pareto.png: no model of this run has both a published top-1 and a latency."]
    return "\n".join(lines) + "\n"


def _verdicts(models: list[dict], runtimes: list[str], threads: int) -> list[str]:
    """Plain sentences: which peers beat the benchmarked model on both axes, per runtime."""
    out = []
    subject = next((m for m in models if m["subject"]), None)
    if subject is None or not subject.get("published"):
        return out
    for rt in runtimes:
        mine = subject["latency"].get((rt, threads))
        if mine is None:
            continue
        top1 = subject["published"]["top1"]
        better = [
            m["model"]
            for m in models
            if not m["subject"]
            and m.get("published")
            and (lat := m["latency"].get((rt, threads))) is not None
            and lat < mine
            and m["published"]["top1"] > top1
        ]
        what = ", ".join(better) if better else "none"
        out.append(
            f"- {SHORT_RUNTIME[rt]}, {threads} thread{'s' if threads != 1 else ''}: faster than "
            f"{subject['model']} ({mine:.2f} ms) *and* more accurate (published) than its {top1:.1f}%: {what}."
        )
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower latency, higher top-1), by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


# where a label may go, in points from its marker: beside it first, then further above and below
_LABEL_SPOTS = [
    (5, 3, "left"),
    (5, -10, "left"),
    (-5, 3, "right"),
    (-5, -10, "right"),
    (5, 11, "left"),
    (5, -18, "left"),
    (-5, 11, "right"),
    (-5, -18, "right"),
    (5, 19, "left"),
    (5, -26, "left"),
    (-5, 19, "right"),
    (-5, -26, "right"),
]


def _place_labels(fig, ax, labels: list[tuple[str, float, float, bool]]) -> None:
    """Each label at the first spot that covers no marker and no label placed before it, else at the spot
    that covers the fewest."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    # the markers are obstacles too: a label must not cover another model's point
    placed = [
        Bbox.from_extents(px - 5, py - 5, px + 5, py + 5)
        for px, py in (ax.transData.transform((x, y)) for _, x, y, _ in labels)
    ]
    for text, x, y, bold in labels:
        best = None
        for dx, dy, ha in _LABEL_SPOTS:
            far = abs(dy) > 10  # a label moved away gets a thin leader line to its marker
            t = ax.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=7,
                ha=ha,
                fontweight="bold" if bold else "normal",
                color="black" if bold else "0.2",
                arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5, "shrinkB": 4} if far else None,
            )
            box = t.get_window_extent(renderer).expanded(1.1, 1.5)
            # a label past the frame runs into the tick labels or the next panel
            outside = box.x0 < frame.x0 or box.x1 > frame.x1 or box.y0 < frame.y0 or box.y1 > frame.y1
            covered = sum(box.overlaps(other) for other in placed) + outside
            if best is None or covered < best[0]:
                if best is not None:
                    best[1].remove()
                best = (covered, t, box)
            else:
                t.remove()
            if covered == 0:
                break
        placed.append(best[2])


def plot_pareto(path: Path, results: dict) -> Plot:
    """Published top-1 against measured latency, one panel per runtime at the first thread count; the Pareto
    front drawn through the models nothing beats on both axes, whoever they are."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    c = results["config"]
    threads = c["threads"][0]
    models = summary(results)
    runtimes = [rt for rt in PEER_RUNTIMES if any(m.get("published") and (rt, threads) in m["latency"] for m in models)]
    left_out = []
    no_top1 = [m["model"] for m in models if not m.get("published")]
    if no_top1:
        left_out.append(f"Not shown (no published top-1): {', '.join(no_top1)}")
    failed = [m["model"] for m in models if m.get("published") and not any(k[1] == threads for k in m["latency"])]
    if failed:
        left_out.append(f"Not shown (no latency: see peers.md): {', '.join(failed)}")
    for rt in runtimes:  # a model timed elsewhere but not on this runtime (its export or run failed)
        absent = [
            m["model"]
            for m in models
            if m.get("published") and m["model"] not in failed and (rt, threads) not in m["latency"]
        ]
        if absent:
            left_out.append(f"Not in the {SHORT_RUNTIME[rt]} panel (no latency: see peers.md): {', '.join(absent)}")
    if not runtimes:
        return Plot(None, [], left_out)
    fig, axes = plt.subplots(1, len(runtimes), figsize=(6.2 * len(runtimes), 5.0), squeeze=False)
    drawn = []
    for ax, rt in zip(axes[0], runtimes):
        shown = [m for m in models if m.get("published") and (rt, threads) in m["latency"]]
        pts = [(m["latency"][(rt, threads)], m["published"]["top1"]) for m in shown]
        front = pareto_front(pts)
        fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
        # the staircase: everything below and to the right of it is beaten on both axes by a model on it
        sx, sy = [fx[0]], [fy[0]]
        for x, y in zip(fx[1:], fy[1:]):
            sx += [x, x]
            sy += [sy[-1], y]
        ax.plot(sx, sy, color="black", linewidth=1, linestyle="--", zorder=1)
        labels: list[tuple[str, float, float, bool]] = []
        for i, (m, (x, y)) in enumerate(zip(shown, pts)):
            colour = FAMILY_COLOURS[m["family"]]
            on_front = i in front
            ax.scatter(
                x,
                y,
                s=110 if m["subject"] else 45,
                color=colour,
                edgecolors="black" if on_front else colour,
                linewidths=1.2 if on_front else 0.5,
                zorder=3,
                marker="*" if m["subject"] else "o",
            )
            size = m["published"].get("eval_size")
            label = (
                m["model"] + ("†" if size and size != 224 else "") + ("‡" if m["published"].get("distilled") else "")
            )
            labels.append((label, x, y, m["subject"]))
            drawn.append((f"{m['model']} ({SHORT_RUNTIME[rt]})", float(x), float(y)))
        lat = [p[0] for p in pts]
        if ms_axis(ax, "x", min(lat), max(lat)):
            ax.set_xlim(nice_floor(min(lat) / 1.1), nice_ceil(max(lat) * 1.35))
        else:
            ax.set_xlim(0, max(lat) * 1.3)
        tops = [p[1] for p in pts]
        ax.set_ylim(math.floor(min(tops)) - 0.5, math.ceil(max(tops)) + 0.5)
        _place_labels(fig, ax, labels)
        ax.grid(color="0.92")
        ax.set_axisbelow(True)
        # side by side, a panel's labels get its width only: what differs goes in the title
        ax.set_xlabel(f"median latency, ms{' (log scale)' if ax.get_xscale() == 'log' else ''}", fontsize=9)
        ax.set_ylabel("published ImageNet-1k top-1, % (not measured here)", fontsize=9)
        ax.set_title(
            f"{SHORT_RUNTIME[rt]} fp32, {threads} thread{'s' if threads != 1 else ''}: upper left is better",
            fontsize=10,
        )
    handles = [
        Line2D([], [], linestyle="none", marker="o", color=FAMILY_COLOURS[f], label=n)
        for f, n in (("cloformer", "CloFormer"), ("fat", "FAT"), ("timm", "timm peers"))
    ]
    handles += [
        Line2D([], [], linestyle="none", marker="*", markersize=10, color="0.4", label=f"{c['model']} (benchmarked)"),
        Line2D(
            [],
            [],
            linestyle="none",
            marker="o",
            markerfacecolor="white",
            markeredgecolor="black",
            label="on the Pareto front (black edge)",
        ),
        Line2D([], [], color="black", linestyle="--", linewidth=1, label="Pareto front"),
    ]
    axes[0][-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    notes = [
        "Latency: batch 1, on this machine. † published at 256x256 (timed here at "
        f"{c['input_size'][0]}x{c['input_size'][1]}, as every model). ‡ trained with knowledge distillation "
        "(CloFormer and FAT were not). Sources: peers.md."
    ] + left_out
    note_below(axes[0][0], "\n".join(textwrap.fill(n, 120) for n in notes))
    fig.suptitle(
        f"{c['model']} {c['input_size'][0]}x{c['input_size'][1]} beside its peers: published accuracy "
        "against measured latency",
        fontsize=11,
    )
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return Plot(path, drawn, left_out)
