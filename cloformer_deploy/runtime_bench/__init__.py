"""The benchmark: interleaved rounds, rows, reports, peers, profiles and the deploy-form ablation.

``bench`` and ``ablation`` take a :class:`BenchOptions` or its fields as keyword arguments; they are
imported on first use, so that importing the package imports no runtime.
"""

from __future__ import annotations

from ..lazy import lazy_names

_WHERE = {
    "bench": "harness",
    "BenchResult": "harness",
    "ablation": "ablation",
    "BenchOptions": "options",
    "BenchInputError": "options",
}


__getattr__ = lazy_names(__name__, _WHERE)


__all__ = sorted(_WHERE)
