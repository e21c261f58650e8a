"""The benchmark: interleaved rounds, rows, reports, peers, profiles and the deploy-form ablation.

``bench`` and ``ablation`` take a :class:`BenchOptions` or its fields as keyword arguments; they are
imported on first use, so that importing the package imports no runtime.
"""

from __future__ import annotations

from importlib import import_module

_WHERE = {
    "bench": "harness",
    "BenchResult": "harness",
    "ablation": "ablation",
    "BenchOptions": "options",
    "BenchInputError": "options",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_WHERE)
