"""Model zoo: CloFormer and FAT in the authors' form, checkpoint loading, and the deploy form.

Names are imported on first use, so that listing variants or printing help does not import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..lazy import lazy_names
from .registry import VARIANTS, UnknownModelError, Variant, canonical_name, get_variant, list_models

if TYPE_CHECKING:
    import torch.nn as nn

_LAZY = {
    "CheckpointError": "checkpoint",
    "apply_state_dict": "checkpoint",
    "guess_variant": "checkpoint",
    "load_checkpoint": "checkpoint",
    "DEPLOY_STEPS": "deploy",
    "InputSizeError": "registry",
    "check_input_size": "registry",
    "to_deploy": "deploy",
    "ModelProfile": "profile",
    "count_macs": "profile",
    "profile_model": "profile",
}


__getattr__ = lazy_names(__name__, _LAZY)


def create_model(
    name: str, *, num_classes: int = 1000, checkpoint: str | Path | None = None, features_only: bool = False
) -> nn.Module:
    """A CloFormer or FAT variant in the authors' form, in eval mode.

    ``name`` accepts ``cloformer_xxs`` and ``cloformer-xxs`` alike. ``checkpoint``
    loads weights (see :func:`load_checkpoint`) with strict key matching.
    ``features_only`` returns the four stage maps (strides 4, 8, 16, 32) instead of logits.
    """
    from .checkpoint import apply_state_dict, load_checkpoint

    variant = get_variant(name)
    model = variant.build(num_classes=num_classes, features_only=features_only)
    if checkpoint is not None:
        apply_state_dict(model, load_checkpoint(checkpoint), variant.name, source=Path(checkpoint).name)
    model.variant = variant.name
    return model.eval()


__all__ = [
    "CheckpointError",
    "DEPLOY_STEPS",
    "InputSizeError",
    "ModelProfile",
    "UnknownModelError",
    "VARIANTS",
    "Variant",
    "apply_state_dict",
    "canonical_name",
    "check_input_size",
    "count_macs",
    "create_model",
    "get_variant",
    "guess_variant",
    "list_models",
    "load_checkpoint",
    "profile_model",
    "to_deploy",
]
