"""Benchmark results as JSON, CSV, a Markdown table, plots and a console table."""

from __future__ import annotations

import csv
import json
import math
import textwrap
from pathlib import Path

from .report_parts import SHORT_RUNTIME, Plot, fmt, md_cell, ms_axis, nice_ceil, nice_floor, note_below
from .runtimes import NATIVE_RUNTIMES, PEER_RUNTIMES, runner_mark

COLUMNS = [
    "model",
    "form",
    "runtime",
    "precision",
    "threads",
    "median ms",
    "p90 ms",
    "min ms",
    "load ms",
    "peak RSS MB",
    "size MB",
    "stored as",
    "max abs",
    "cosine",
    "top-1 agr.",
    "GFLOP/s",
    "efficiency",
    "partitions",
    "error",
]
CONSOLE_TEXT_WIDTH = 60  # the error/note column in the console table; files keep the whole text
FORM_COLOURS = {"deploy": "tab:blue", "authors": "tab:orange"}
FORM_NAMES = {"deploy": "deploy form", "authors": "authors' form"}


def shorten(text: str, width: int) -> str:
    """At most ``width`` characters, cut at a word boundary and ending in an ellipsis when cut."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    head = text[:width]  # a space at index width-1 or width still counts as a boundary
    cut = head.rfind(" ")
    if cut < width // 2:  # a long path or token: break inside it at a separator rather than lose the rest
        cut = max(cut, max(head.rfind(c) for c in "/\\,;:") + 1)
    if cut <= 0:
        cut = width - 1
    return text[: min(cut, width - 1)].rstrip(" ,;:") + "…"


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        lat, d = r.get("latency_ms") or {}, r.get("drift") or {}
        deleg = r.get("delegation") or {}
        out.append(
            [
                r["model"],
                fmt(r["form"]),
                _runtime_cell(r),
                r["precision"],
                fmt(r["threads"]),
                fmt(lat.get("median"), ".2f"),
                fmt(lat.get("p90"), ".2f"),
                fmt(lat.get("min"), ".2f"),
                fmt(r.get("load_ms"), ".0f"),
                fmt(r.get("peak_rss_mb"), ".0f"),
                fmt(r.get("size_mb"), ".1f"),
                stored_as(r.get("weight_bytes")),
                fmt(d.get("max_abs"), ".1e"),
                fmt(d.get("cosine"), ".6f"),
                fmt(d.get("top1_agreement"), ".0%"),
                fmt(r.get("gflops_per_s"), ".1f"),
                fmt(r.get("efficiency"), ".0%"),
                fmt(deleg.get("partitions")),
                r.get("error") or r.get("note") or "",
            ]
        )
    return out


def stored_as(weight_bytes: dict | None) -> str:
    """The storage type most of an artifact's weight bytes have, and its share: ``fp16 99%``."""
    if not weight_bytes:
        return "-"
    total = sum(weight_bytes.values())
    kind, size = max(weight_bytes.items(), key=lambda kv: kv[1])
    return f"{kind} {size / total:.0%}" if total else "-"


def _runtime_cell(r: dict) -> str:
    where = r.get("target", "local")
    runtime = r["runtime"] + runner_mark(r) + (f" {r['compute_units']}" if r.get("compute_units") else "")
    return runtime if where == "local" else f"{runtime} on {where}"


def target_markdown(results: dict) -> list[str]:
    """Per artifact run on another target: its drift there beside this machine's, and how far the two differ;
    on a device that measures latency, also its latency beside this machine's at the same thread count."""
    rows = [r for r in subject_rows(results) if r.get("target", "local") != "local"]
    if not rows:
        return []
    # this machine's row of the same runtime: its native runner's where both ran (what a device runs)
    here_rows = sorted(subject_rows(results), key=lambda r: r.get("runner") == "native")
    local = {
        (r["form"], r["runtime"], r["precision"]): r
        for r in here_rows
        if r.get("target", "local") == "local" and r.get("drift")
    }
    timed_here = {
        (r["form"], r["runtime"], r["precision"], r["threads"]): r
        for r in here_rows
        if r.get("target", "local") == "local" and r.get("latency_ms")
    }
    out = []
    for name in dict.fromkeys(r["target"] for r in rows):
        about = results.get("targets", {}).get(name, {})
        if about.get("measures_latency"):
            out += [
                "",
                f"## On {name}",
                "",
                f"{about.get('label', '')}. Timed in the same interleaved rounds as "
                "this machine's rows; drift is against PyTorch fp32 (authors' form), as above.",
            ]
            thermal = (results.get("thermal") or {}).get(name, [])
            out += [""] if thermal else []
            for t in thermal:
                out.append(
                    f"- thermal zones, {t['threads']} thread(s): before "
                    + ", ".join(f"{k} {v:.1f} C" for k, v in t["before_c"].items())
                    + "; after "
                    + ", ".join(f"{k} {v:.1f} C" for k, v in (t["after_c"] or {}).items())
                )
            out += [
                "",
                "| form | runtime | precision | threads | median ms here | median ms there | there / here "
                "| load ms there | max abs there | there vs here |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
        else:
            out += [
                "",
                f"## Drift on {name}",
                "",
                f"{about.get('cpu', '')}. Emulated by {about.get('emulator')}: figures are the numerics of that "
                "CPU's kernels, not a latency. Drift is against PyTorch fp32 (authors' form), as above.",
                "",
                "| form | runtime | precision | max abs here | max abs on target | cosine on target | top-1 agr. "
                "on target | target vs here |",
                "|---|---|---|---|---|---|---|---|",
            ]
        for r in rows:
            if r["target"] != name:
                continue
            here = (local.get((r["form"], r["runtime"], r["precision"])) or {}).get("drift") or {}
            d, vs = r.get("drift") or {}, r.get("vs_local")
            if r.get("error"):
                versus = md_cell(r["error"])
            elif vs is None:
                versus = "-"
            else:
                versus = "bit-exact" if vs["bit_exact"] else f"max abs {vs['max_abs']:.1e}, cosine {vs['cosine']:.6f}"
            if about.get("measures_latency"):
                lat = (r.get("latency_ms") or {}).get("median")
                mine = (
                    (timed_here.get((r["form"], r["runtime"], r["precision"], r["threads"])) or {}).get("latency_ms")
                    or {}
                ).get("median")
                runtime = r["runtime"] + (f" {r['compute_units']}" if r.get("compute_units") else "")
                out.append(
                    f"| {r['form']} | {runtime} | {r['precision']} | {r['threads'] or '-'} | {fmt(mine, '.2f')} | "
                    f"{fmt(lat, '.2f')} | {fmt(lat / mine if lat and mine else None, '.3f')} | "
                    f"{fmt(r.get('load_ms'), '.0f')} | {fmt(d.get('max_abs'), '.1e')} | {versus} |"
                )
                continue
            out.append(
                f"| {r['form']} | {r['runtime']} | {r['precision']} | {fmt(here.get('max_abs'), '.1e')} | "
                f"{fmt(d.get('max_abs'), '.1e')} | {fmt(d.get('cosine'), '.6f')} | "
                f"{fmt(d.get('top1_agreement'), '.0%')} | {versus} |"
            )
    return out


def subject_rows(results: dict) -> list[dict]:
    """The benchmarked model's rows (peers have their own table and plot)."""
    return [r for r in results["rows"] if r.get("role", "subject") == "subject"]


def markdown(results: dict) -> str:
    m, c = results["machine"], results["config"]
    peaks = ", ".join(f"{t} thread{'s' if t != '1' else ''}: {g} GFLOP/s" for t, g in m["matmul_gflops"].items())
    lines = [
        f"# cloformer-bench: {c['model']} at {c['input_size'][0]}x{c['input_size'][1]}",
        "",
        f"{results['created']} on {m['cpu']} ({m['cores']} cores); fp32 matmul peak measured in the same run: {peaks}. "
        f"{c['runs']} timed runs after {c['warmup']} warm-up, interleaved in rounds, batch 1; "
        f"{'random weights' if c['random_init'] else 'checkpoint ' + str(c['weights_sha256'])[:12]}; "
        f"drift vs PyTorch fp32 authors' form on {c['images']} images ({c['data']}). "
        f"{c['macs'] / 1e9:.3f} GMACs.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(md_cell(x) for x in r) + " |" for r in table_rows(subject_rows(results))]
    lines += target_markdown(results)
    lines += runner_markdown(subject_rows(results))
    ratios = speedups(subject_rows(results))
    if ratios:
        lines += ["", "Deploy form vs the authors' form, same runtime and threads (median latency ratio):", ""]
        lines += [f"- {k}: {v:.2f}x" for k, v in ratios.items()]
    if c.get("peers"):
        from .peers_report import markdown as peers_markdown

        lines += ["", peers_markdown(results).replace("# ", "## ", 1).rstrip("\n"), "", "![pareto](pareto.png)"]
    return "\n".join(lines) + "\n"


def runner_markdown(rows: list[dict]) -> list[str]:
    """Where one artifact ran both natively and in its Python runtime (--runner both): the two side by side, at the
    same thread count in the same rounds; memory is what each process held at its peak."""
    by = {}
    for r in rows:
        if r.get("runner") and r.get("latency_ms") and r["runtime"] in NATIVE_RUNTIMES:
            by.setdefault((r.get("target", "local"), r["form"], r["runtime"], r["precision"], r["threads"]), {})[
                r["runner"]
            ] = r
    pairs = [(k, v) for k, v in by.items() if {"native", "python"} <= set(v)]
    if not pairs:
        return []
    out = [
        "",
        "## Native runner vs Python runtime (same artifact, same rounds)",
        "",
        "The native runner is the process an app would be: the C++ runtime and its libraries, no interpreter. "
        "Peak RSS is each process's own high-water mark (VmHWM); the planned arena is the activation memory the "
        "program itself plans (ExecuTorch).",
        "",
        "| target | form | runtime | precision | threads | native ms | Python ms | Python / native | native load ms "
        "| Python load ms | native peak MB | Python peak MB | weights MB | planned arena MB |",
        "|" + "---|" * 14,
    ]
    for (target, form, rt, prec, th), v in pairs:
        n, p = v["native"], v["python"]
        nm, pm = n["latency_ms"]["median"], p["latency_ms"]["median"]
        out.append(
            f"| {target} | {form} | {rt} | {prec} | {th} | {nm:.2f} | {pm:.2f} | {pm / nm:.3f} | "
            f"{fmt(n.get('load_ms'), '.0f')} | {fmt(p.get('load_ms'), '.0f')} | {fmt(n.get('peak_rss_mb'), '.0f')} | "
            f"{fmt(p.get('peak_rss_mb'), '.0f')} | {fmt(n.get('size_mb'), '.1f')} | {fmt(n.get('planned_arena_mb'), '.2f')} |"
        )
    return out


def speedups(rows: list[dict]) -> dict[str, float]:
    """authors' median / deploy median per (runtime, precision, threads), from rows of one run."""
    by = {
        (r["form"], r["runtime"] + runner_mark(r), r["precision"], r["threads"]): r for r in rows if r.get("latency_ms")
    }
    out = {}
    for (form, rt, prec, th), r in by.items():
        other = by.get(("authors", rt, prec, th))
        if form == "deploy" and other:
            out[f"{rt} {prec} {th} thread{'s' if th != 1 else ''}"] = (
                other["latency_ms"]["median"] / r["latency_ms"]["median"]
            )
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(table_rows(rows))


# ---------------------------------------------------------------- plots


def _label(r: dict, threads: bool = True) -> str:
    s = f"{SHORT_RUNTIME.get(r['runtime'], r['runtime'])}{runner_mark(r)} {r['precision']}"
    if r.get("compute_units"):
        s += f" {r['compute_units']}"
    if r.get("target", "local") != "local":
        s += f" on {r['target']}"
    return f"{s} {r['threads']}t" if threads and r.get("threads") is not None else s


def _timed(r: dict) -> bool:
    lat = r.get("latency_ms") or {}
    return isinstance(lat.get("median"), (int, float)) and math.isfinite(lat["median"]) and lat["median"] > 0


def _left_out_note(left_out: list[str], width: int) -> str:
    return "\n".join(textwrap.fill(s, width, subsequent_indent="    ", break_on_hyphens=False) for s in left_out)


def _reasons(rows: list[dict], why_default: str) -> list[str]:
    """'label (form): reason' for rows not drawn, rows with the same reason grouped on one line."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        why = r.get("error") or r.get("note") or why_default
        groups.setdefault(shorten(why, 110), []).append(f"{_label(r)} ({r['form']})")
    return [f"Not shown: {', '.join(labels)}: {why}" for why, labels in groups.items()]


def plot_latency(path: Path, results: dict) -> Plot:
    """Median latency bars (whiskers min..p90) for the rows with a latency; other rows only in a note."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    all_rows = results["rows"]
    rows = [r for r in all_rows if _timed(r)]
    left_out = _reasons([r for r in all_rows if not _timed(r)], "no latency")
    if not rows:
        return Plot(None, [], left_out)
    c = results["config"]
    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 0.62 * n), 4.6))
    med = [r["latency_ms"]["median"] for r in rows]
    # a missing or zero min/p90 must not break the log axis: the whisker then ends at the median
    lo = [
        a if isinstance(a := r["latency_ms"].get("min"), (int, float)) and 0 < a <= m else m for m, r in zip(med, rows)
    ]
    hi = [b if isinstance(b := r["latency_ms"].get("p90"), (int, float)) and b >= m else m for m, r in zip(med, rows)]
    colours = [FORM_COLOURS.get(r["form"], "tab:gray") for r in rows]
    bars = ax.bar(
        range(n),
        med,
        width=0.7,
        color=colours,
        yerr=[[m - a for m, a in zip(med, lo)], [b - m for m, b in zip(med, hi)]],
        capsize=3,
        error_kw={"elinewidth": 1, "ecolor": "black"},
    )
    log = ms_axis(ax, "y", min(lo), max(hi))
    if log:
        ax.set_ylim(nice_floor(min(lo)), max(hi) * 1.6)  # headroom for the value labels
    else:
        ax.set_ylim(0, max(hi) * 1.12)
    for i, (m, b) in enumerate(zip(med, hi)):
        ax.annotate(
            f"{m:.0f}" if m >= 100 else f"{m:.1f}" if m >= 10 else f"{m:.2f}",
            (i, b),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_xticks(range(n), [_label(r) for r in rows], fontsize=8, rotation=40, ha="right", rotation_mode="anchor")
    pad = max(0, 4 - n) / 2  # a few rows: narrower bars rather than slabs
    ax.set_xlim(-0.6 - pad, n - 0.4 + pad)
    ax.set_ylabel(f"latency per image, ms{' (log scale)' if log else ''}")
    ax.grid(axis="y", which="major", color="0.9")
    ax.set_axisbelow(True)
    forms = list(dict.fromkeys(r["form"] for r in rows))
    handles = [Patch(color=FORM_COLOURS.get(f, "tab:gray"), label=FORM_NAMES.get(f, f"{f} form")) for f in forms]
    handles.append(
        Line2D(
            [], [], color="black", marker="_", markersize=8, linestyle="-", linewidth=1, label="whiskers: min to p90"
        )
    )
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        frameon=False,
        title="bar: median",
        title_fontsize=8,
        alignment="left",
    )
    width_in = fig.get_size_inches()[0]
    title = f"{c['model']} {c['input_size'][0]}x{c['input_size'][1]}: latency per runtime, precision, threads"
    ax.set_title(textwrap.fill(title, max(30, int(width_in * 11))), fontsize=10)
    note_below(ax, _left_out_note(left_out, max(50, int(width_in * 13))))
    drawn = [
        (f"{_label(r)} ({r['form']})", float(p.get_x() + p.get_width() / 2), float(p.get_height()))
        for p, r in zip(bars.patches, rows)
    ]
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return Plot(path, drawn, left_out)


_THREAD_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def plot_drift(path: Path, results: dict) -> Plot:
    """Median latency against max abs drift: colour per runtime+precision, marker per thread count,
    filled for the deploy form, hollow for the authors' form; rows without latency or drift only in a note."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def drift(r):
        v = (r.get("drift") or {}).get("max_abs")
        return v if isinstance(v, (int, float)) and math.isfinite(v) else None

    all_rows = results["rows"]
    rows = [r for r in all_rows if _timed(r) and drift(r) is not None]
    left_out = _reasons([r for r in all_rows if not _timed(r)], "no latency")
    left_out += _reasons([r for r in all_rows if _timed(r) and drift(r) is None], "no finite drift")
    if not rows:
        return Plot(None, [], left_out)
    c = results["config"]
    positive = [drift(r) for r in rows if drift(r) > 0]
    floor = (min(positive) / 10) if positive else 1e-9
    if len(positive) < len(rows):
        left_out.append(f"A drift of exactly 0 is drawn at {floor:.0e}.")
    combos = list(dict.fromkeys(_label(r, threads=False) for r in rows))
    palette = [
        "tab:green",
        "tab:red",
        "tab:purple",
        "tab:cyan",
        "tab:olive",
        "tab:brown",
        "tab:pink",
        "black",
        "tab:gray",
        "gold",
        "teal",
        "magenta",
        "navy",
        "maroon",
        "lime",
        "slateblue",
    ]  # blue/orange mean forms in latency.png: not reused here; 16, so that --runner both's rows stay apart
    colour = {k: palette[i % len(palette)] for i, k in enumerate(combos)}
    threads = sorted({r["threads"] for r in rows}, key=lambda t: (t is None, t or 0))
    marker = {t: _THREAD_MARKERS[i % len(_THREAD_MARKERS)] for i, t in enumerate(threads)}
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    # a faint line joins the thread counts of one runtime+precision+form: which points belong together
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((_label(r, threads=False), r["form"]), []).append(r)
    for (k, form), g in groups.items():
        if len(g) > 1:
            g = sorted(g, key=lambda r: r["latency_ms"]["median"])
            ax.plot(
                [r["latency_ms"]["median"] for r in g],
                [max(drift(r), floor) for r in g],
                color=colour[k],
                linewidth=0.8,
                alpha=0.5,
                linestyle="-" if form == "deploy" else "--",
                zorder=2,
            )
    # hollow (authors') markers drawn larger and on top, so a deploy point at the same place shows inside the ring
    for r in sorted(rows, key=lambda r: r["form"] != "deploy"):
        filled = r["form"] == "deploy"
        k = _label(r, threads=False)
        # translucent fill, solid edge: a point hidden under another of nearly the same figures still shows
        coll = ax.scatter(
            r["latency_ms"]["median"],
            max(drift(r), floor),
            marker=marker[r["threads"]],
            s=50 if filled else 120,
            linewidths=1.3 if filled else 1.6,
            facecolors=to_rgba(colour[k], 0.45) if filled else "none",
            edgecolors=colour[k],
            zorder=3 if filled else 4,
        )
        coll.set_gid(f"{_label(r)} ({r['form']})")
    lat = [r["latency_ms"]["median"] for r in rows]
    ys = [max(drift(r), floor) for r in rows]
    if ms_axis(ax, "x", min(lat), max(lat)):
        ax.set_xlim(nice_floor(min(lat) / 1.15), nice_ceil(max(lat) * 1.15))
    else:  # from 0, so that a 1% difference does not fill the width
        ax.set_xlim(0, max(lat) * 1.12)
    ax.set_yscale("log")
    # whole decades, so that at least two labelled ticks show however narrow the data; no point on the edge
    e_lo, e_hi = math.floor(math.log10(min(ys) / 1.3)), math.ceil(math.log10(max(ys) * 1.3))
    if e_hi - e_lo < 2:
        e_lo, e_hi = e_lo - 1, e_hi + 1
    ax.set_ylim(10.0**e_lo, 10.0**e_hi)
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=12))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"1e{round(math.log10(v))}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(which="major", color="0.9")
    ax.set_axisbelow(True)
    ax.set_xlabel("median latency per image, ms" + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel("max abs difference of the logits\nvs PyTorch fp32 authors' form (log scale)")
    ax.set_title(
        f"{c['model']} {c['input_size'][0]}x{c['input_size'][1]}: latency against drift (lower left is better)",
        fontsize=10,
    )

    headings = [Line2D([], [], linestyle="none", label=t) for t in ("runtime, precision", "threads", "form")]
    handles = [headings[0]]
    handles += [
        Line2D(
            [],
            [],
            linestyle="none",
            marker="o",
            markersize=8,
            markerfacecolor=to_rgba(colour[k], 0.45),
            markeredgecolor=colour[k],
            markeredgewidth=1.3,
            label=k,
        )
        for k in combos
    ]
    handles.append(headings[1])
    handles += [
        Line2D(
            [],
            [],
            linestyle="none",
            marker=marker[t],
            markersize=7,
            color="0.3",
            label="runtime's default" if t is None else f"{t} thread{'s' if t != 1 else ''}",
        )
        for t in threads
    ]
    forms = list(dict.fromkeys(r["form"] for r in rows))
    handles.append(headings[2])
    handles += [
        Line2D(
            [],
            [],
            linestyle="none",
            marker="o",
            markersize=7 if f == "deploy" else 9,
            markerfacecolor=to_rgba("0.3", 0.45) if f == "deploy" else "none",
            markeredgecolor="0.3",
            markeredgewidth=1.6,
            label=f"{FORM_NAMES.get(f, f'{f} form')}: {'filled' if f == 'deploy' else 'hollow'}",
        )
        for f in forms
    ]
    leg = ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        frameon=False,
        handletextpad=0.4,
        borderaxespad=0,
    )
    for t, h in zip(leg.get_texts(), handles):
        if any(h is x for x in headings):
            t.set_fontweight("bold")
            t.set_x(-20)  # headings start at the handles' left edge
    note_below(ax, _left_out_note(left_out, 95))
    drawn = [(coll.get_gid(), *map(float, coll.get_offsets()[0])) for coll in ax.collections if coll.get_gid()]
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return Plot(path, drawn, left_out)


def plots(out: Path, results: dict) -> dict[str, Plot]:
    import matplotlib

    matplotlib.use("Agg")
    own = {**results, "rows": subject_rows(results)}
    drawn = {
        "latency": plot_latency(out / "latency.png", own),
        "latency_vs_drift": plot_drift(out / "latency_vs_drift.png", own),
    }
    if results["config"].get("peers"):
        from .peers_report import plot_pareto

        drawn["pareto"] = plot_pareto(out / "pareto.png", results)
    return drawn


def write_reports(out: Path, results: dict) -> dict[str, Plot]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_csv(out / "results.csv", results["rows"])
    (out / "results.md").write_text(markdown(results))
    if results["config"].get("peers"):
        from .peers_report import markdown as peers_markdown

        (out / "peers.md").write_text(peers_markdown(results))
    return plots(out, results)


def console_table(results: dict, stream=None, text_width: int = CONSOLE_TEXT_WIDTH) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    keep = [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 15, 16, 17, 18]
    t = Table(title=f"cloformer-bench {results['config']['model']} {results['config']['input_size']}")
    for i in keep:
        t.add_column(COLUMNS[i], justify="right" if 4 <= i <= 17 else "left")
    for r in table_rows(subject_rows(results)):
        r[-1] = shorten(r[-1], text_width)
        t.add_row(*[escape(r[i]) for i in keep])  # error text like "[...]" is not rich markup
    Console(file=stream, width=220).print(t)
    for k, v in speedups(subject_rows(results)).items():
        Console(file=stream).print(f"deploy vs authors', {k}: {v:.2f}x")
    if results["config"].get("peers"):
        from .peers_report import summary

        p = Table(title="beside its peers (median ms, fp32; top-1 published, not measured)")
        threads = results["config"]["threads"]
        rts = PEER_RUNTIMES
        for col in [
            "model",
            "GMACs",
            *[f"{SHORT_RUNTIME[rt]} {th}t" for th in threads for rt in rts],
            "top-1 %",
            "error",
        ]:
            p.add_column(col, justify="left" if col in ("model", "error") else "right")
        for m in summary(results):
            pub = m.get("published") or {}
            p.add_row(
                escape(m["model"]),
                fmt(m["macs"] and m["macs"] / 1e9, ".3f"),
                *[fmt(m["latency"].get((rt, th)), ".2f") for th in threads for rt in rts],
                fmt(pub.get("top1"), ".1f"),
                escape(shorten("; ".join(m["errors"]), text_width)),
            )
        Console(file=stream, width=220).print(p)
