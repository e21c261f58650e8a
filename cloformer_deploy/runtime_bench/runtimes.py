"""The runtimes the benchmark can time, read from the formats' registry (no heavy import).

Every name here comes from a format's ``bench_runtimes``; "torch" (the eager model) is the only row kind
that is not a format.
"""

from __future__ import annotations

from ..formats import BACKENDS

EAGER = "torch"
_WAYS = {
    r.name: (b, r)
    for b, r in sorted(((b, r) for b in BACKENDS.values() for r in b.bench_runtimes), key=lambda br: br[1].position)
}
RUNTIMES = (EAGER, *_WAYS)
FORMAT_OF = {name: b.name for name, (b, _) in _WAYS.items()}
# the runtimes that run a format's own artifacts (the bundle's): all but those exporting their own
BUNDLE_RUNTIMES = {b.name: tuple(r.name for r in b.bench_runtimes if not r.export_options) for b in BACKENDS.values()}
GPU_RUNTIMES = tuple(name for name, (_, r) in _WAYS.items() if r.accelerator == "gpu")
ALIASES = {"pytorch": EAGER, **{a: name for name, (_, r) in _WAYS.items() for a in r.aliases}}
IN_ALL = (EAGER, *(name for name, (_, r) in _WAYS.items() if r.in_all))
PEER_RUNTIMES = tuple(name for name, (_, r) in _WAYS.items() if r.peers)
SHORT_RUNTIME = {name: r.short for name, (_, r) in _WAYS.items()}
# runtimes whose format has a native runner: their rows say which runner ran them
NATIVE_RUNTIMES = tuple(name for name, (b, _) in _WAYS.items() if b.native_runner is not None)


def runner_mark(row: dict) -> str:
    """' (Python)' for a row of a runtime that also runs natively but ran in its Python API; '' otherwise."""
    return " (Python)" if row.get("runner") == "python" and row["runtime"] in NATIVE_RUNTIMES else ""


def bench_runtime(name: str):
    """The :class:`~cloformer_deploy.formats.base.BenchRuntime` called ``name``."""
    return _WAYS[name][1]


def export_options(name: str) -> dict:
    """The format's options, checked, with those the runtime called ``name`` exports its own artifacts with."""
    backend, way = _WAYS[name]
    return backend.check_options(dict(way.export_options))
