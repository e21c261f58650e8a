"""Parameters and multiply-accumulates per variant, counted by PyTorch's FLOP counter."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .registry import canonical_name, get_variant


@dataclass(frozen=True)
class ModelProfile:
    name: str
    input_size: tuple[int, int]
    params: int
    macs: int  # convolutions, linear layers and attention matmuls; element-wise ops are not counted
    paper_gmacs: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def count_macs(model: torch.nn.Module, input_size: tuple[int, int]) -> int:
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, *input_size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2


def profile_model(name: str, input_size=(224, 224), num_classes: int = 1000) -> ModelProfile:
    """Params and MACs of a variant in the authors' form at batch 1.

    Counted on the meta device: shapes only, no arithmetic, so a profile takes a fraction of a second.
    """
    from .deploy import check_input_size

    variant = get_variant(name)
    size = check_input_size(input_size)
    with torch.device("meta"):
        model = variant.build(num_classes=num_classes).eval()
    params = sum(p.numel() for p in model.parameters())
    return ModelProfile(canonical_name(name), size, params, count_macs(model, size), variant.paper_gmacs)
