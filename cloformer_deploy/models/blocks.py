"""The network's block boundaries: where drift is located (``cloformer-validate --by-block``).

A boundary is the output of one block by the name the model's module has: the stem (``patch_embed``), each block
of each stage (``layers.2.blocks.3``), then ``norm``, ``avgpool`` and ``head`` (the logits). The authors' form and
every deploy form keep these names: the deploy steps change what is inside a block, never the blocks.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn


def _expand(path: str, module: nn.Module) -> Iterator[str]:
    """A module list, and a module holding only one (a stage's ``blocks``), are expanded into their blocks."""
    children = list(module.named_children())
    if isinstance(module, nn.ModuleList):
        for name, child in children:
            yield from _expand(f"{path}.{name}", child)
    elif len(children) == 1 and isinstance(children[0][1], nn.ModuleList):
        yield from _expand(f"{path}.{children[0][0]}", children[0][1])
    else:
        yield path


def block_paths(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The boundaries of ``model``, in the order its forward computes them (one run on ``example``)."""
    candidates = [p for name, child in model.named_children() for p in _expand(name, child)]
    order: list[str] = []
    with _hooks(model, candidates, lambda path, out: path in order or order.append(path)), torch.no_grad():
        model(example)
    return order


class _hooks:
    def __init__(self, model: nn.Module, paths: list[str], record):
        self.handles = []
        modules = dict(model.named_modules())
        for path in paths:
            self.handles.append(modules[path].register_forward_hook(lambda m, a, out, p=path: record(p, out)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def block_outputs(model: nn.Module, paths: list[str], images: np.ndarray) -> dict[str, np.ndarray]:
    """Each boundary's output on every image (image by image, as the reference logits are made), as float32
    arrays of shape (images, ...) in PyTorch's layout (NCHW for maps)."""
    got: dict[str, list[np.ndarray]] = {p: [] for p in paths}
    with _hooks(model, paths, lambda p, out: got[p].append(out.detach().float().numpy().copy())), torch.no_grad():
        for i in range(len(images)):
            model(torch.from_numpy(images[i : i + 1]))
    return {p: np.concatenate(v) for p, v in got.items()}


class BoundaryModule(nn.Module):
    """``model`` returning its logits and then each boundary's output, as the probe exports of a format whose
    runtime does not show a file's intermediate values (an opaque delegate) are made."""

    def __init__(self, model: nn.Module, paths: list[str]):
        super().__init__()
        self.model = copy.deepcopy(model)  # its hooks stay on this copy
        self.paths = list(paths)
        for path in self.paths:
            # kept on the block itself, so that a copy of this module (an fp16 pass) keeps working
            self.model.get_submodule(path).register_forward_hook(_keep_output)

    def forward(self, x: torch.Tensor):
        logits = self.model(x)
        return (logits, *[self.model.get_submodule(p).__dict__.pop("_boundary_output") for p in self.paths])


def _keep_output(module: nn.Module, args, out) -> None:
    module.__dict__["_boundary_output"] = out
