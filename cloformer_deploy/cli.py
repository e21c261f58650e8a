"""Command-line entry points: argument parsing and display only; the work is in the Python API."""
from __future__ import annotations

import argparse
import sys

from .models import InputSizeError, UnknownModelError, list_models, profile_model


def _size(text: str) -> tuple[int, int]:
    """``224`` or ``256x320`` (height x width)."""
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"invalid size {text!r}; use 224 or HxW such as 256x320")


def models_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cloformer-models",
                                description="List the CloFormer and FAT variants with params and MACs.")
    p.add_argument("--img-size", type=_size, default=(224, 224), help="224 or HxW (default 224)")
    args = p.parse_args(argv)
    try:
        rows = [profile_model(n, args.img_size) for n in list_models()]
    except (InputSizeError, UnknownModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    h, w = args.img_size
    print(f"{'model':<22}{'params':>12}{'GMACs @' + f'{h}x{w}':>18}{'paper GMACs':>13}")
    for r in rows:
        paper = f"{r.paper_gmacs:.1f}" if r.paper_gmacs else "-"
        print(f"{r.name:<22}{r.params:>12,}{r.macs / 1e9:>18.3f}{paper:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(models_main())
