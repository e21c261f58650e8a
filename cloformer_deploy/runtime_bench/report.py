"""Benchmark results as JSON, CSV, a Markdown table, plots and a console table."""
from __future__ import annotations

import csv
import json
from pathlib import Path

COLUMNS = ["model", "form", "runtime", "precision", "threads", "median ms", "p90 ms", "min ms", "load ms",
           "peak RSS MB", "size MB", "max abs", "cosine", "top-1 agr.", "GFLOP/s", "efficiency", "partitions",
           "error"]


def _fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        lat, d = r.get("latency_ms") or {}, r.get("drift") or {}
        deleg = r.get("delegation") or {}
        out.append([
            r["model"], _fmt(r["form"]), r["runtime"], r["precision"], _fmt(r["threads"]),
            _fmt(lat.get("median"), ".2f"), _fmt(lat.get("p90"), ".2f"), _fmt(lat.get("min"), ".2f"),
            _fmt(r.get("load_ms"), ".0f"), _fmt(r.get("peak_rss_mb"), ".0f"), _fmt(r.get("size_mb"), ".1f"),
            _fmt(d.get("max_abs"), ".1e"), _fmt(d.get("cosine"), ".6f"), _fmt(d.get("top1_agreement"), ".0%"),
            _fmt(r.get("gflops_per_s"), ".1f"), _fmt(r.get("efficiency"), ".0%"),
            _fmt(deleg.get("partitions")), (r.get("error") or r.get("note") or "")[:80],
        ])
    return out


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
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(results["rows"])]
    ratios = speedups(results["rows"])
    if ratios:
        lines += ["", "Deploy form vs the authors' form, same runtime and threads (median latency ratio):", ""]
        lines += [f"- {k}: {v:.2f}x" for k, v in ratios.items()]
    return "\n".join(lines) + "\n"


def speedups(rows: list[dict]) -> dict[str, float]:
    """authors' median / deploy median per (runtime, precision, threads), from rows of one run."""
    by = {(r["form"], r["runtime"], r["precision"], r["threads"]): r for r in rows if r.get("latency_ms")}
    out = {}
    for (form, rt, prec, th), r in by.items():
        other = by.get(("authors", rt, prec, th))
        if form == "deploy" and other:
            out[f"{rt} {prec} {th} thread{'s' if th != 1 else ''}"] = other["latency_ms"]["median"] / r["latency_ms"]["median"]
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(table_rows(rows))


def plots(out: Path, results: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r.get("latency_ms")]
    paths = []
    if not rows:
        return paths
    short = {"onnxruntime": "ORT", "executorch-xnnpack": "ET-XNNPACK", "executorch-portable": "ET-portable"}
    labels = [f"{short.get(r['runtime'], r['runtime'])} {r['precision']} {r['threads']}t" for r in rows]
    med = [r["latency_ms"]["median"] for r in rows]
    err = [[m - r["latency_ms"]["min"] for m, r in zip(med, rows)],
           [r["latency_ms"]["p90"] - m for m, r in zip(med, rows)]]
    colors = ["tab:blue" if r["form"] == "deploy" else "tab:orange" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4.5))
    ax.bar(range(len(rows)), med, yerr=err, color=colors, capsize=3)
    ax.set_xticks(range(len(rows)), labels, fontsize=8, rotation=40, ha="right")
    ax.set_ylabel("latency, ms (median; whiskers min..p90)")
    ax.set_yscale("log")
    ax.set_title(f"{results['config']['model']} latency per runtime and thread count (blue: deploy, orange: authors')")
    fig.tight_layout()
    paths.append(out / "latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    pts = [r for r in rows if r.get("drift")]
    if pts:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for r in pts:
            y = max(r["drift"]["max_abs"], 1e-9)
            ax.scatter(r["latency_ms"]["median"], y, color="tab:blue" if r["form"] == "deploy" else "tab:orange")
            ax.annotate(f"{r['runtime']} {r['precision']} {r['threads']}t", (r["latency_ms"]["median"], y), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("median latency, ms")
        ax.set_ylabel("max abs drift vs PyTorch fp32")
        ax.set_title("latency against drift")
        fig.tight_layout()
        paths.append(out / "latency_vs_drift.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write_reports(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_csv(out / "results.csv", results["rows"])
    (out / "results.md").write_text(markdown(results))
    plots(out, results)


def console_table(results: dict, stream=None) -> None:
    from rich.console import Console
    from rich.table import Table

    keep = [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 14, 15, 16, 17]
    t = Table(title=f"cloformer-bench {results['config']['model']} {results['config']['input_size']}")
    for i in keep:
        t.add_column(COLUMNS[i], justify="right" if 4 <= i <= 16 else "left")
    for r in table_rows(results["rows"]):
        t.add_row(*[r[i] for i in keep])
    Console(file=stream, width=220).print(t)
    for k, v in speedups(results["rows"]).items():
        Console(file=stream).print(f"deploy vs authors', {k}: {v:.2f}x")
