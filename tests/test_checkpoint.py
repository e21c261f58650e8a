"""Checkpoint loading: the forms users have, and every bad input with its message."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file

import cloformer_deploy as cd
from cloformer_deploy.models import CheckpointError


@pytest.fixture(scope="module")
def fat_b0():
    torch.manual_seed(0)
    return cd.create_model("fat_b0")


def _same(model, other):
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


class FakeCfgNode(dict):
    """Pickles under yacs' class name, as the authors' training script's config does."""


FakeCfgNode.__module__ = "yacs.config"
FakeCfgNode.__qualname__ = FakeCfgNode.__name__ = "CfgNode"


def test_training_checkpoint_with_yacs_config_loads_without_yacs(tmp_path, fat_b0, monkeypatch):
    import sys
    import types

    cfg = FakeCfgNode(MODEL=FakeCfgNode(NAME="fat_b0"), TRAIN=FakeCfgNode(EPOCHS=300))
    cfg.__dict__["__immutable__"] = True
    yacs = types.ModuleType("yacs")
    yacs.config = types.ModuleType("yacs.config")
    yacs.config.CfgNode = FakeCfgNode
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", yacs.config)
    path = tmp_path / "ckpt_epoch_299.pth"
    torch.save(
        {
            "model": fat_b0.state_dict(),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
            "lr_scheduler": {"t": 3},
            "max_accuracy": 71.2,
            "epoch": 299,
            "config": cfg,
        },
        path,
    )
    monkeypatch.delitem(sys.modules, "yacs")
    monkeypatch.delitem(sys.modules, "yacs.config")
    assert _same(fat_b0, cd.create_model("fat-b0", checkpoint=path))


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "ddp", "nested"])
def test_wrappers_and_prefixes(tmp_path, fat_b0, wrap):
    sd = fat_b0.state_dict()
    obj = {
        "bare": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd},
        "ddp": OrderedDict((f"module.{k}", v) for k, v in sd.items()),
        "nested": {"state_dict": {"model": {f"module.{k}": v for k, v in sd.items()}}},
    }[wrap]
    torch.save(obj, tmp_path / "w.pth")
    assert _same(fat_b0, cd.create_model("fat_b0", checkpoint=tmp_path / "w.pth"))


def test_safetensors(tmp_path, fat_b0):
    save_file({k: v.contiguous() for k, v in fat_b0.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert _same(fat_b0, cd.create_model("fat_b0", checkpoint=tmp_path / "w.safetensors"))


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("payload", ["system", "eval", "class"])
def test_malicious_pickle_is_refused_and_does_not_run(tmp_path, fat_b0, payload):
    marker = tmp_path / "pwned"
    evil = {"system": _Payload(marker), "eval": _Eval(marker), "class": _Plain()}[payload]
    torch.save({"model": fat_b0.state_dict(), "extra": evil}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="not on the allow-list.*nothing was executed"):
        cd.load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


class _Eval:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (eval, (f"open({str(self.path)!r}, 'w')",))


class _Plain:
    pass


def test_legacy_non_zip_pickle_is_guarded_too(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "legacy.pth", "wb") as f:
        pickle.dump({"x": _Payload(marker)}, f)
    with pytest.raises(CheckpointError):
        cd.load_checkpoint(tmp_path / "legacy.pth")
    assert not marker.exists()


def test_truncated_and_corrupt_files(tmp_path, fat_b0):
    torch.save(fat_b0.state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        cd.load_checkpoint(tmp_path / "cut.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        cd.load_checkpoint(tmp_path / "junk.pth")
    save_file({"a": torch.zeros(3)}, str(tmp_path / "t.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "t.safetensors").read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="truncated"):
        cd.load_checkpoint(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        cd.load_checkpoint(tmp_path / "nope.pth")


def test_other_variant_is_named(tmp_path):
    torch.save(cd.create_model("cloformer_xs").state_dict(), tmp_path / "xs.pth")
    with pytest.raises(CheckpointError, match="cloformer_xs checkpoint, not cloformer_xxs; use model='cloformer-xs'"):
        cd.create_model("cloformer_xxs", checkpoint=tmp_path / "xs.pth")


def test_other_class_count_asks_for_num_classes(tmp_path):
    torch.save(cd.create_model("cloformer_xxs", num_classes=100).state_dict(), tmp_path / "c100.pth")
    with pytest.raises(CheckpointError, match="100-class head.*num_classes=100"):
        cd.create_model("cloformer_xxs", checkpoint=tmp_path / "c100.pth")
    assert cd.create_model("cloformer_xxs", num_classes=100, checkpoint=tmp_path / "c100.pth").head.out_features == 100


def test_missing_and_unexpected_keys(tmp_path, fat_b0):
    sd = dict(fat_b0.state_dict())
    sd.pop("layers.1.blocks.0.attn.q.weight")
    sd["layers.9.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(
        CheckpointError,
        match=r"1 missing keys \(e.g. layers.1.blocks.0.attn.q.weight\); "
        r"1 unexpected keys \(e.g. layers.9.extra\)",
    ):
        cd.create_model("fat_b0", checkpoint=tmp_path / "odd.pth")


def test_file_without_state_dict(tmp_path):
    torch.save({"epoch": 3, "note": "hi"}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        cd.load_checkpoint(tmp_path / "meta.pth")
