"""Validation: a runner's outputs against PyTorch fp32 on real images, with bounds per precision.

It uses targets and formats through their interfaces and names neither a format nor a target.
"""

from __future__ import annotations

from .outputs import (
    DEFAULT_BOUNDS,
    Bounds,
    bounds_for,
    compare,
    validate,
    validate_artifact,
    validate_on_target,
    validate_outputs,
    versus_local,
)

__all__ = [
    "DEFAULT_BOUNDS",
    "Bounds",
    "bounds_for",
    "compare",
    "validate",
    "validate_artifact",
    "validate_on_target",
    "validate_outputs",
    "versus_local",
]
