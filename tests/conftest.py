from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
GOLDEN = Path(os.environ.get("CLOFORMER_GOLDEN", GOLDEN))


def golden_file(name: str) -> Path:
    """A file of ../shared/golden: skipped where absent (a user's clone), a failure under CI."""
    path = GOLDEN / name
    if not path.exists():
        msg = f"parity data {path} is absent (it ships in the project's shared/ folder, not in the package)"
        if os.environ.get("CI"):
            pytest.fail(msg + "; CI must check parity")
        pytest.skip(msg)
    return path


def randomise_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every norm non-trivial statistics and affine, so that a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            elif isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(torch.rand(m.num_channels, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_channels, generator=g) * 0.2)
    return model


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


TINY = "cloformer_tiny_test"


@pytest.fixture(scope="session")
def tiny_variant():
    """A small CloFormer (all branch kinds, 4 blocks) registered for the session: fast exports."""
    from cloformer_deploy.models.cloformer import CloFormerConfig
    from cloformer_deploy.models.registry import VARIANTS, Variant

    cfg = CloFormerConfig(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(2, 2, 3, 4),
                          group_splits=((1, 1), (1, 1), (2, 1), (1, 3)), kernel_sizes=((3,), (5,), (7,), (9,)))
    VARIANTS[TINY] = Variant(TINY, "cloformer", cfg, None, "test-only tiny CloFormer")
    yield TINY
    VARIANTS.pop(TINY, None)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_variant, tmp_path_factory):
    torch.manual_seed(0)
    model = randomise_norms(__import__("cloformer_deploy").create_model(tiny_variant, num_classes=10), seed=5)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"model": model.state_dict(), "epoch": 1}, path)
    return path


TINY_SIZE = (64, 96)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_variant, tiny_checkpoint, tmp_path_factory):
    """The tiny model exported once to every format (fp32/fp16 defaults), validated and zipped."""
    from cloformer_deploy.pipeline import export

    return export(tiny_variant, weights=tiny_checkpoint, formats="all", img_size=TINY_SIZE,
                  out=tmp_path_factory.mktemp("export"), zip_bundle=True)
