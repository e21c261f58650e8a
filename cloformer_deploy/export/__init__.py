"""Exporters: one module per format behind the interface in ``base``; ``export`` drives them."""
from __future__ import annotations

from . import onnx, coreml, executorch  # noqa: F401,I001  (each registers its backend; this order is the CLI order)
from .api import ExportInputError, ExportResult, export, validate_bundle
from .base import BACKENDS, Backend, Runner

__all__ = ["BACKENDS", "Backend", "ExportInputError", "ExportResult", "Runner", "export", "validate_bundle"]
