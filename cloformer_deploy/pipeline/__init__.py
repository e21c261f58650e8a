"""The pipeline: checkpoint -> deploy form -> artifacts -> validation -> bundle and manifest.

``export`` writes a bundle; ``validate_bundle`` validates one again (here and on a target); ``drift_by_block``
locates its drift block by block (``validate_bundle(..., by_block=True)`` runs it too). They take an options object (:class:`ExportOptions`, :class:`ValidateOptions`) or its fields as keyword arguments.

Importing the package imports neither torch nor a converter (the CLI parses its flags from
:mod:`.options` first); the functions are imported on first use.
"""

from __future__ import annotations

from ..lazy import lazy_names

_WHERE = {
    "ArtifactResult": "exporter",
    "DriftByBlock": "by_block",
    "drift_by_block": "by_block",
    "Evaluation": "evaluate",
    "evaluate_bundle": "evaluate",
    "ExportResult": "exporter",
    "export": "exporter",
    "PreparedModel": "model",
    "prepare_model": "model",
    "ExportInputError": "options",
    "ExportOptions": "options",
    "ValidateOptions": "options",
    "OpenedBundle": "opened",
    "open_bundle": "opened",
    "validate_bundle": "revalidate",
}


__getattr__ = lazy_names(__name__, _WHERE)


__all__ = sorted(_WHERE)
