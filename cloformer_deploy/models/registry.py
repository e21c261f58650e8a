"""Variant table and ``create_model``: every variant of both papers, hyperparameters as in the authors' configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..inputs import InputError
from .configs import CloFormerConfig, FATConfig

if TYPE_CHECKING:
    import torch.nn as nn

STRIDE = 32  # the stem (4) times three stride-2 stages; the pooling windows 8/4/2/1 tile exactly
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Variant:
    name: str
    family: str  # "cloformer" or "fat"
    config: CloFormerConfig | FATConfig
    paper_gmacs: float | None  # as the paper rounds it, at 224x224 (None: not reported)
    description: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def build(self, num_classes: int = 1000, features_only: bool = False) -> nn.Module:
        if self.family == "cloformer":
            from .cloformer import CloFormer as cls
        else:
            from .fat import FAT as cls
        return cls(self.config, num_classes=num_classes, features_only=features_only)


def _clo(dims, heads, splits, paper_gmacs, description, kernels=((3,), (5,), (7,), (9,)), dpr=0.0):
    return (
        CloFormerConfig(
            embed_dims=dims,
            depths=(2, 2, 6, 2),
            num_heads=heads,
            group_splits=splits,
            kernel_sizes=kernels,
            drop_path_rate=dpr,
        ),
        paper_gmacs,
        description,
    )


def _fat(dims, heads, paper_gmacs, description, depths=(2, 2, 6, 2), dpr=0.0):
    return (
        FATConfig(embed_dims=dims, depths=depths, kernel_sizes=(3, 5, 7, 9), num_heads=heads, drop_path_rate=dpr),
        paper_gmacs,
        description,
    )


_TABLE = {
    "cloformer_xxs": (
        "cloformer",
        *_clo((32, 64, 128, 256), (4, 4, 8, 16), ((3, 1), (2, 2), (4, 4), (4, 12)), 0.6, "CloFormer-XXS, 4.2 M params"),
    ),
    "cloformer_xs": (
        "cloformer",
        *_clo(
            (48, 96, 160, 352),
            (3, 6, 10, 22),
            ((2, 1), (3, 3), (5, 5), (7, 15)),
            1.1,
            "CloFormer-XS, 7.2 M params",
            dpr=0.06,
        ),
    ),
    "cloformer_s": (
        "cloformer",
        *_clo(
            (64, 128, 224, 448),
            (4, 8, 14, 28),
            ((3, 1), (4, 4), (7, 7), (7, 21)),
            2.0,
            "CloFormer-S, 12.3 M params",
            dpr=0.06,
        ),
    ),
    # the paper's ablations on the XXS frame: global attention only, local branch only
    "cloformer_global": (
        "cloformer",
        *_clo(
            (32, 64, 128, 256),
            (4, 4, 8, 16),
            ((4,), (4,), (8,), (16,)),
            None,
            "CloFormer-XXS ablation: global branch only",
            kernels=((), (), (), ()),
        ),
    ),
    "cloformer_no_global": (
        "cloformer",
        *_clo(
            (32, 64, 128, 256),
            (4, 4, 8, 16),
            ((4, 0), (4, 0), (8, 0), (16, 0)),
            None,
            "CloFormer-XXS ablation: local branch only",
        ),
    ),
    "fat_b0": ("fat", *_fat((32, 80, 160, 256), (2, 5, 10, 16), 0.7, "FAT-B0, 4.5 M params", dpr=0.05)),
    "fat_b1": ("fat", *_fat((48, 96, 192, 384), (3, 6, 12, 24), 1.2, "FAT-B1, 7.8 M params", dpr=0.1)),
    "fat_b2": ("fat", *_fat((64, 128, 256, 512), (2, 4, 8, 16), 2.0, "FAT-B2, 13.5 M params", dpr=0.1)),
    "fat_b3": (
        "fat",
        *_fat((64, 128, 256, 512), (2, 4, 8, 16), 4.4, "FAT-B3, 29.2 M params", depths=(4, 4, 16, 4), dpr=0.15),
    ),
}

# (params, MACs) at 224x224 with 1000 classes, as profile_model counts them; listed so that
# `cloformer-models` needs no torch import (tests/test_models.py checks every row against the counter)
PROFILE_224 = {
    "cloformer_xxs": (4_166_728, 660_528_256),
    "cloformer_xs": (7_172_216, 1_219_194_464),
    "cloformer_s": (12_345_576, 2_169_830_880),
    "cloformer_global": (3_998_024, 616_944_128),
    "cloformer_no_global": (4_733_256, 742_057_984),
    "fat_b0": (4_494_488, 754_119_040),
    "fat_b1": (7_819_720, 1_243_486_560),
    "fat_b2": (13_466_728, 2_131_442_816),
    "fat_b3": (29_196_264, 4_631_781_888),
}

VARIANTS: dict[str, Variant] = {
    name: Variant(name, family, cfg, gmacs, desc) for name, (family, cfg, gmacs, desc) in _TABLE.items()
}


class UnknownModelError(InputError):
    pass


def canonical_name(name: str) -> str:
    """``cloformer-xxs``, ``CloFormer_XXS`` and ``cloformer_xxs`` name the same variant."""
    key = name.strip().lower().replace("-", "_")
    if key not in VARIANTS:
        raise UnknownModelError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return key


def get_variant(name: str) -> Variant:
    return VARIANTS[canonical_name(name)]


def list_models() -> list[str]:
    return list(VARIANTS)


class InputSizeError(InputError):
    pass


def check_input_size(input_size) -> tuple[int, int]:
    """(H, W) as ints, each a positive multiple of 32, or an error naming the nearest valid sizes."""
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    h, w = (int(v) for v in input_size)
    if h <= 0 or w <= 0:
        raise InputSizeError(
            f"input size {h}x{w}: sizes must be positive multiples of {STRIDE}, such as 224 or 256x320"
        )
    if h % STRIDE == 0 and w % STRIDE == 0:
        return h, w

    def near(v):
        lo = max(STRIDE, v // STRIDE * STRIDE)
        return sorted({lo, lo + STRIDE}) if v % STRIDE else [v]

    hs, ws = near(h), near(w)
    options = sorted({(a, b) for a in hs for b in ws}, key=lambda s: abs(s[0] - h) + abs(s[1] - w))
    nearest = " or ".join(f"{a}x{b}" for a, b in options[:2])
    raise InputSizeError(
        f"input size {h}x{w} is not a multiple of {STRIDE} in each dimension "
        f"(the attention pooling windows 8/4/2/1 need it); use {nearest}"
    )
