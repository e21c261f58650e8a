"""Where one inference's time goes: per-operator profiles, from each format's own profiler, as Markdown tables."""

from __future__ import annotations

from collections import defaultdict

from ..formats.profiling import OpTime


def op_tables(ops: list[OpTime], top: int = 15) -> str:
    """Markdown: time per operator kind, the ``top`` slowest operator instances, and what the times add up to."""
    total = sum(o.median_ms for o in ops)

    def share(ms: float) -> str:
        return f"{ms / total:.1%}" if total > 0 else "-"

    kinds: dict[str, list[OpTime]] = defaultdict(list)
    for o in ops:
        kinds[o.kind].append(o)
    by_kind = sorted(kinds.items(), key=lambda kv: (-sum(o.median_ms for o in kv[1]), kv[0]))
    lines = ["| op kind | ms per run | share | instances |", "|---|---:|---:|---:|"]
    for kind, members in by_kind:
        ms = sum(o.median_ms for o in members)
        lines.append(f"| {_cell(kind)} | {ms:.3f} | {share(ms)} | {len(members)} |")
    slowest = sorted(ops, key=lambda o: (-o.median_ms, o.name))[:top]
    lines += [
        "",
        f"Slowest {len(slowest)} of {len(ops)} ops:",
        "",
        "| op | kind | ms per run | share | calls per run |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {_cell(o.name)} | {_cell(o.kind)} | {o.median_ms:.3f} | {share(o.median_ms)} | {o.calls} |" for o in slowest
    ]
    lines += [
        "",
        f"The op times add up to {total:.3f} ms per run (each op's median over the profiled runs). "
        f"Time the runtime spends between and around ops is in no row, so the end-to-end latency "
        f"is somewhat higher.",
    ]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
