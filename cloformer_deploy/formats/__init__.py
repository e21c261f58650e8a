"""Formats: one module per format behind the contract in ``base``, and the registry that lists them.

Importing this package registers every format without importing torch or any converter, so help
text and bad-input checks stay instant. The registry is in the formats' ``position`` order, the CLI's.
"""

from __future__ import annotations

from . import coreml, executorch, litert, onnx  # noqa: F401  (each registers its format)
from .base import BACKENDS, Backend, Runner, order_registry

order_registry()

__all__ = ["BACKENDS", "Backend", "Runner"]
