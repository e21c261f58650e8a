"""cloformer-deploy: CloFormer and FAT from a PyTorch checkpoint to ONNX, Core ML and ExecuTorch.

The package imports torch only when a name that needs it is first used.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "InputSizeError",
    "UnknownModelError",
    "__version__",
    "create_model",
    "list_models",
    "load_checkpoint",
    "profile_model",
    "to_deploy",
]


def __getattr__(name: str):
    if name in __all__:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
