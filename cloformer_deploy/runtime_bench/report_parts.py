"""What the benchmark's reports share: cell formatting, the latency axis, and what a plot drew."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .runtimes import SHORT_RUNTIME  # noqa: F401  (the reports' short runtime names)


def fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")


@dataclass
class Plot:
    """What a plot function drew, read back from the figure's artists, so that tests can check it."""

    path: Path | None
    drawn: list[tuple[str, float, float]] = field(default_factory=list)  # (label, x, y)
    left_out: list[str] = field(default_factory=list)  # rows not drawn, each with the reason


def nice_floor(v: float) -> float:
    """Largest 1-2-5 x 10^k value <= v."""
    e = math.floor(math.log10(v))
    return max(s * 10.0**e for s in (1, 2, 5) if s * 10.0**e <= v * (1 + 1e-9))


def nice_ceil(v: float) -> float:
    e = math.floor(math.log10(v))
    return min(s * 10.0**e for s in (1, 2, 5, 10) if s * 10.0**e >= v * (1 - 1e-9))


def plain(v: float, _pos=None) -> str:
    return f"{v:g}"


def ms_axis(ax, which: str, lo: float, hi: float) -> bool:
    """Latency axis: log with plain 1-2-5 labels when values span more than 10x, else linear. True if log."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    if hi / lo <= 10:
        axis.get_major_formatter().set_scientific(False)
        return False
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    axis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5) if math.log10(hi / lo) <= 4 else (1,)))
    axis.set_major_formatter(FuncFormatter(plain))
    axis.set_minor_formatter(NullFormatter())  # minor labels are what printed 6x10^1
    return True


def note_below(ax, text: str) -> None:
    if text:  # anchored under the x label so that it never covers tick labels; bbox_inches="tight" keeps it
        ax.annotate(
            text,
            xy=(0, 0),
            xycoords=("axes fraction", ax.xaxis.label),
            xytext=(0, -8),
            textcoords="offset points",
            ha="left",
            va="top",
            fontsize=8,
            color="0.3",
            annotation_clip=False,
        )
