"""What several test modules share: the golden data, the tiny model's name and size, tensor helpers."""

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


def register_tiny() -> str:
    """Register the tiny CloFormer (all branch kinds, 4 blocks) under :data:`TINY`; a test's own scripts call it too."""
    from cloformer_deploy.models.cloformer import CloFormerConfig
    from cloformer_deploy.models.registry import VARIANTS, Variant

    cfg = CloFormerConfig(
        embed_dims=(16, 32, 48, 64),
        depths=(1, 1, 1, 1),
        num_heads=(2, 2, 3, 4),
        group_splits=((1, 1), (1, 1), (2, 1), (1, 3)),
        kernel_sizes=((3,), (5,), (7,), (9,)),
    )
    VARIANTS[TINY] = Variant(TINY, "cloformer", cfg, None, "test-only tiny CloFormer")
    return TINY


TINY_SIZE = (64, 96)


def live_processes(marker: str, seconds: float = 8.0) -> list[str]:
    """Command lines of live (not zombie) processes that mention ``marker``, after giving ended ones ``seconds``
    to go: what a device's runners or workers left running."""
    import os
    import time
    from pathlib import Path

    end = time.monotonic() + seconds
    while True:
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in text and state != "Z" and int(cmdline.parent.name) != os.getpid():
                found.append(text)
        if not found or time.monotonic() > end:
            return found
        time.sleep(0.2)


def bundle_with_formats(bundle, folder, formats, precisions=None):
    """A copy of ``bundle`` at ``folder`` holding only the artifacts of ``formats`` (and ``precisions``, if given)."""
    import json
    import shutil
    from pathlib import Path

    folder = Path(folder)
    shutil.copytree(bundle, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    kept = [
        e
        for e in manifest["artifacts"]
        if e["format"] in formats and (precisions is None or e["precision"] in precisions)
    ]
    for e in manifest["artifacts"]:
        if e not in kept:
            target = folder / e["path"]
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    manifest["artifacts"] = kept
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder
