"""cloformer-deploy: CloFormer and FAT from a PyTorch checkpoint to ONNX, Core ML and ExecuTorch."""
from __future__ import annotations

from .models import (
    CheckpointError,
    InputSizeError,
    UnknownModelError,
    create_model,
    list_models,
    load_checkpoint,
    profile_model,
    to_deploy,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "InputSizeError", "UnknownModelError", "__version__", "create_model", "list_models",
    "load_checkpoint", "profile_model", "to_deploy",
]
