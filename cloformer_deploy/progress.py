"""Per-stage progress with timings: a rich spinner on a terminal, plain timestamped lines in a log.

A long stage reports how far it is from inside (``stage.update("7/12 images")``): on a
terminal the spinner's text changes; in a log a line is written at most every
``plain_interval`` seconds, so that a CI log shows a stage is alive without flooding.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class Stage:
    def __init__(self, progress: Progress, name: str, status=None):
        self.progress, self.name, self.status = progress, name, status
        self.last_line = time.perf_counter()

    def update(self, text: str) -> None:
        if self.status is not None:
            self.status.update(f"{self.name}: {text}")
        elif time.perf_counter() - self.last_line >= self.progress.plain_interval:
            self.last_line = time.perf_counter()
            self.progress.log(f"{self.name}: {text}")


class Progress:
    def __init__(self, quiet: bool = False, stream=None, plain_interval: float = 10.0):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.plain_interval = plain_interval
        self.t0 = time.perf_counter()
        self.console = None
        if not quiet and self.stream.isatty():
            from rich.console import Console

            self.console = Console(file=self.stream)
        self.timings: dict[str, float] = {}

    def _line(self, text: str) -> None:
        if self.quiet:
            return
        stamp = f"[{time.perf_counter() - self.t0:6.1f}s]"
        if self.console is not None:
            self.console.print(f"[dim]{stamp}[/dim] {text}", highlight=False)
        else:
            print(f"{stamp} {text}", file=self.stream, flush=True)

    def log(self, text: str) -> None:
        self._line(text)

    def warn(self, text: str) -> None:
        if self.console is not None:
            self._line(f"[bold yellow]WARNING[/bold yellow] {text}")
        else:
            self._line(f"WARNING {text}")

    @contextmanager
    def stage(self, name: str):
        t = time.perf_counter()
        if self.console is not None and not self.quiet:
            with self.console.status(name) as status:
                yield Stage(self, name, status)
        else:
            yield Stage(self, name)
        dt = time.perf_counter() - t
        self.timings[name] = dt
        self._line(f"{name} ... done in {dt:.1f}s")

    def report(self, fmt: str, report: dict) -> None:
        fig = report.get("figures")
        verdict = "PASS" if report.get("passed") else "FAIL"
        if fig:
            text = (
                f"{fmt}: {verdict} ({report.get('method')}) max abs {fig['max_abs']:.2e}, "
                f"mean abs {fig['mean_abs']:.2e}, cosine {fig['cosine']:.6f}, "
                f"top-1 agreement {fig['top1_agreement']:.0%} on {fig['images']} images"
            )
        else:
            text = f"{fmt}: {verdict} ({report.get('method')}) {report.get('note', '')}"
        if report.get("problems"):
            text += " -- " + "; ".join(report["problems"])
        self._line(text)

    def report_target(self, fmt: str, target: str, report: dict) -> None:
        """One artifact's validation on another target, with its difference from this machine's run."""
        if not report.get("ran"):
            failed = "FAIL, " if report.get("passed") is False else ""
            self._line(f"{fmt} on {target}: {failed}not run ({report.get('note')})")
            return
        self.report(f"{fmt} on {target}", report)
        vs = report.get("vs_local")
        if vs:
            self._line(
                f"{fmt} on {target} vs this machine: "
                + (
                    "bit-exact"
                    if vs["bit_exact"]
                    else f"max abs {vs['max_abs']:.2e}, cosine {vs['cosine']:.6f}, top-1 {vs['top1_agreement']:.0%}"
                )
            )
