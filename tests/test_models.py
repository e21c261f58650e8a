"""The model zoo: variants, parameter counts, shapes, names, features_only, profile."""

from __future__ import annotations

import pytest
import torch

import cloformer_deploy as cd
from cloformer_deploy.models import VARIANTS, UnknownModelError, profile_model

from helpers import max_abs, randomise_norms

# from the authors' code
AUTHORS_PARAMS = {
    "cloformer_xxs": 4_166_728,
    "cloformer_xs": 7_172_216,
    "cloformer_s": 12_345_576,
    "fat_b0": 4_494_488,
    "fat_b1": 7_819_720,
    "fat_b2": 13_466_728,
    "fat_b3": 29_196_264,
}


@pytest.mark.parametrize("name", sorted(AUTHORS_PARAMS))
def test_parameter_count_equals_authors(name):
    with torch.device("meta"):
        model = VARIANTS[name].build()
    assert sum(p.numel() for p in model.parameters()) == AUTHORS_PARAMS[name]


def test_authors_key_names():
    keys = cd.create_model("cloformer_xxs").state_dict().keys()
    assert "layers.0.blocks.0.attn.qkvs.0.weight" in keys
    assert "patch_embed.conv1.conv.1.running_var" in keys
    fat = cd.create_model("fat_b0").state_dict().keys()
    assert "layers.0.blocks.0.attn.pool.conv2.weight" in fat and "layers.0.blocks.1.ffn.bn.running_mean" in fat


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_runs_in_both_forms_at_224_and_non_square(name):
    torch.manual_seed(0)
    model = randomise_norms(cd.create_model(name, num_classes=10))
    for size, batch in (((224, 224), 1), ((96, 160), 2)):
        x = torch.randn(batch, 3, *size)
        deploy = cd.to_deploy(model, input_size=size)
        with torch.no_grad():
            ref, out = model(x), deploy(x)
        assert out.shape == ref.shape == (batch, 10)
        # random weights give logits of order 1..10; the bound scales with them
        assert max_abs(out, ref) <= 1e-5 * max(1.0, ref.abs().max().item()), (name, size)


def test_name_forms_and_unknown_name():
    assert type(cd.create_model("CloFormer-XXS")) is type(cd.create_model("cloformer_xxs"))
    with pytest.raises(UnknownModelError, match="cloformer_xxs.*fat_b3"):
        cd.create_model("cloformer_tiny")
    assert cd.list_models() == list(VARIANTS)


def test_num_classes_and_headless():
    assert cd.create_model("fat_b0", num_classes=37)(torch.randn(1, 3, 64, 64)).shape == (1, 37)
    assert cd.create_model("fat_b0", num_classes=0)(torch.randn(1, 3, 64, 64)).shape == (1, 256)


@pytest.mark.parametrize("name", ["cloformer_xxs", "fat_b0"])
def test_features_only_returns_four_stage_maps(name):
    model = cd.create_model(name, features_only=True)
    maps = model(torch.randn(1, 3, 128, 192))
    strides = [128 // m.shape[-2] for m in maps]
    assert strides == [4, 8, 16, 32] and [192 // m.shape[-1] for m in maps] == strides
    assert [m.shape[1] for m in maps] == [f["channels"] for f in model.feature_info]
    # a classifier checkpoint loads into the feature extractor (head and final norm are dropped)
    full = cd.create_model(name)
    from cloformer_deploy.models import apply_state_dict

    apply_state_dict(model, full.state_dict(), name)
    deploy = cd.to_deploy(model, (128, 192))
    with torch.no_grad():
        for a, b in zip(model(torch.ones(1, 3, 128, 192)), deploy(torch.ones(1, 3, 128, 192))):
            assert max_abs(a, b) <= 1e-5 * max(1.0, a.abs().max().item())


def test_profile_matches_paper_rounding():
    for name in ("cloformer_xxs", "fat_b0"):
        p = profile_model(name, 224)
        assert p.params == AUTHORS_PARAMS[name]
        # the paper rounds to 0.1 G; the counter adds the attention matmuls
        assert abs(p.macs / 1e9 - p.paper_gmacs) / p.paper_gmacs < 0.12
    assert profile_model("cloformer_xxs", (256, 320)).macs > profile_model("cloformer_xxs", 224).macs
