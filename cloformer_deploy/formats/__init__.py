"""Formats: one module per format behind the contract in ``base``, and the registry that lists them.

Importing this package registers every format without importing torch or any converter, so help
text and bad-input checks stay instant. The registry's order is the CLI's order.
"""
from __future__ import annotations

from . import coreml, executorch, onnx  # noqa: F401,I001  (each registers its format; this order is the CLI order)
from .base import BACKENDS, Backend, Runner

__all__ = ["BACKENDS", "Backend", "Runner"]
