"""What a model at a size and batch will hold in memory, found on the meta device before any work.

An absurd input size (100000x100000) would otherwise start building and tracing the model and grow
until the machine runs out of memory; a shape-only forward pass tells the largest activation at once.
"""

from __future__ import annotations

import os

from ..inputs import InputError

# an exporter holds the traced graph's inputs, outputs and workspace of several ops at once
ACTIVATIONS_HELD = 8


def largest_activation_bytes(
    name: str, size: tuple[int, int], batch: int = 1, num_classes: int = 1000
) -> tuple[int, int]:
    """(bytes of the largest float32 tensor a forward pass makes, bytes of the weights), from shapes alone."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from .registry import get_variant

    largest = 0

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal largest
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    largest = max(largest, t.numel() * 4)
            return out

    with torch.device("meta"):
        model = get_variant(name).build(num_classes=num_classes).eval()
        weights = sum(p.numel() for p in model.parameters()) * 4
        x = torch.empty(batch, 3, *size)
        with torch.no_grad(), Largest():
            model(x)
    return largest, weights


def available_bytes() -> int | None:
    """Memory the kernel says a new process can take without swapping (MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(
    name: str,
    size: tuple[int, int],
    batch: int = 1,
    num_classes: int = 1000,
    extra_bytes: int = 0,
    what: str | None = None,
) -> int:
    """The bytes the work will need; InputError (one line naming the fix) when the machine cannot hold them."""
    largest, weights = largest_activation_bytes(name, size, batch, num_classes)
    need = ACTIVATIONS_HELD * largest + 4 * weights + extra_bytes
    have = available_bytes()
    if have is not None and need > have:
        h, w = size
        what = what or f"--img-size {h}x{w} at --batch {batch}"
        raise InputError(
            f"{what} needs about {_gb(need)} of memory (one activation alone is {_gb(largest)}) but "
            f"this machine has {_gb(have)} available; give a smaller size or batch, such as 224 at 1"
        )
    return need


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"
