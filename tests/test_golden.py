"""Parity with the authors' code, on the data in ../shared/golden made with it."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import cloformer_deploy as cd

from helpers import golden_file, max_abs

PARITY = 1e-5


def _golden(variant: str):
    path = golden_file(f"{variant}.safetensors")
    data = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    weights = {k[len("weights.") :]: v for k, v in data.items() if k.startswith("weights.")}
    return weights, data["input.0"], data["logits.0"], meta


@pytest.mark.parametrize("variant", ["cloformer_xxs", "fat_b0"])
def test_authors_and_deploy_form_reproduce_golden_logits(variant):
    weights, x, expected, meta = _golden(variant)
    assert meta["variant"] == variant
    model = cd.create_model(variant, num_classes=int(meta["num_classes"]))
    model.load_state_dict(weights, strict=True)
    deploy = cd.to_deploy(model, input_size=tuple(x.shape[-2:]))
    with torch.no_grad():
        authors, deployed = model(x), deploy(x)
    assert max_abs(authors, expected) <= PARITY
    assert max_abs(deployed, expected) <= PARITY


def test_authors_training_checkpoint_loads_and_matches():
    ckpt = golden_file("cloformer_xxs_official_ckpt.pth")
    _, x, expected, _ = _golden("cloformer_xxs")
    model = cd.create_model("cloformer-xxs", checkpoint=ckpt)
    with torch.no_grad():
        assert max_abs(model(x), expected) <= PARITY


def test_training_checkpoint_yields_exactly_the_model_tensors():
    weights, *_ = _golden("cloformer_xxs")
    sd = cd.load_checkpoint(golden_file("cloformer_xxs_official_ckpt.pth"))
    assert sd.keys() == weights.keys()
    assert all(torch.equal(sd[k], weights[k]) for k in sd)
