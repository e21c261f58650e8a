"""The published top-1 table (cloformer_deploy/data/published_top1.json): well formed, sourced, complete."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest

ALLOWED_KINDS = {"paper", "timm results file", "model card"}
DEFAULT_PEERS = [
    "mobilenetv3_large_100",
    "mobilenetv4_conv_small",
    "efficientformerv2_s0",
    "fastvit_t8",
    "repvit_m0_9",
    "mobileone_s0",
    "efficientvit_b0",
    "mobilevitv2_050",
]
PROJECT_MODELS = ["cloformer_xxs", "cloformer_xs", "cloformer_s", "fat_b0", "fat_b1"]


@pytest.fixture(scope="module")
def table() -> dict:
    # read the file as the installed package ships it (package-data "data/*")
    return json.loads(files("cloformer_deploy").joinpath("data/published_top1.json").read_text(encoding="utf-8"))


def test_top_level_keys(table):
    assert table["about"].strip()
    assert table["retrieved"] == "2026-11-22"
    assert isinstance(table["models"], dict) and table["models"]


@pytest.mark.parametrize("name", DEFAULT_PEERS + PROJECT_MODELS)
def test_required_models_are_present(table, name):
    assert name in table["models"], f"{name} missing from published_top1.json"


def test_every_entry_is_sourced_and_plausible(table):
    for name, entry in table["models"].items():
        assert isinstance(entry["top1"], (int, float)) and 50 < entry["top1"] < 90, (name, entry["top1"])
        assert isinstance(entry["source"], str) and entry["source"].strip(), name
        assert entry["source_kind"] in ALLOWED_KINDS, (name, entry["source_kind"])
        assert isinstance(entry["eval_size"], int) and 128 <= entry["eval_size"] <= 512, (name, entry["eval_size"])
        if "paper_top1" in entry:
            assert 50 < entry["paper_top1"] < 90 and entry.get("paper_top1_source", "").strip(), name
        if "top1_at_test_size" in entry:
            assert entry["test_size"] > entry["eval_size"], name


def test_timm_rows_name_their_default_tag(table):
    for name, entry in table["models"].items():
        if entry["source_kind"] == "timm results file":
            assert entry["timm_tag"].startswith(name + "."), (name, entry["timm_tag"])
            assert entry["timm_tag"] in entry["source"], name
