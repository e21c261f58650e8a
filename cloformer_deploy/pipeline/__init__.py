"""The pipeline: checkpoint -> deploy form -> artifacts -> validation -> bundle and manifest.

``export`` writes a bundle; ``validate_bundle`` validates one again (here and on a target).
"""
from __future__ import annotations

from .api import ExportInputError, ExportResult, export, open_bundle, validate_bundle

__all__ = ["ExportInputError", "ExportResult", "export", "open_bundle", "validate_bundle"]
