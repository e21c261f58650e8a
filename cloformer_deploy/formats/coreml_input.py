"""The Core ML image input's normalisation, as a module wrapped around the deploy form before conversion."""

from __future__ import annotations

import torch


class PixelNormalize(torch.nn.Module):
    """(pixel / 255 - mean) / std per channel, as one multiply-add inside the model.

    coremltools' ImageType has a single ``scale`` and so cannot express per-channel
    std; folding it into the first convolution would be wrong where that conv pads
    with zeros (a zero-padded normalised image is not a zero-padded pixel image).
    """

    def __init__(self, module: torch.nn.Module, mean, std):
        super().__init__()
        self.module = module
        self.register_buffer("scale", torch.tensor([1.0 / (255.0 * s) for s in std]).reshape(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor([-m / s for m, s in zip(mean, std)]).reshape(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module(pixels * self.scale + self.shift)
