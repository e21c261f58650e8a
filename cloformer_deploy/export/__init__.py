"""Exporters: one module per format behind the interface in ``base``; ``export`` drives them.

The backends register on import without importing torch or any converter (help text and
bad-input checks stay instant); the API is imported on first use.
"""
from __future__ import annotations

from . import onnx, coreml, executorch  # noqa: F401,I001  (each registers its backend; this order is the CLI order)
from .base import BACKENDS, Backend, Runner

_API = ("ExportInputError", "ExportResult", "export", "validate_bundle")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "Backend", "ExportInputError", "ExportResult", "Runner", "export", "validate_bundle"]
