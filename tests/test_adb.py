"""The adb:// target through a stand-in ``adb`` (tests/standin_adb.py): the real client and a phone cannot be
exercised here. The stand-in's "device" is this machine, so a row there must match this machine's bit for bit.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from cloformer_deploy.targets import TargetError, get_target
from cloformer_deploy.targets import adb as adb_module

from helpers import bundle_with_formats, live_processes

STANDIN = Path(__file__).with_name("standin_adb.py")


@pytest.fixture
def adb(tmp_path, monkeypatch):
    """``adb`` on PATH is the stand-in; returns a function that sets the attached devices."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "adb").write_text(f'#!/bin/sh\nexec {sys.executable} {STANDIN} "$@"\n')
    (folder / "adb").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_ADB_LOG", str(tmp_path / "adb.log"))

    def attach(devices: str) -> None:
        monkeypatch.setenv("STANDIN_ADB_DEVICES", devices)

    attach("")
    return attach


@pytest.fixture
def phone(adb, tmp_path, native_runners):
    """One authorised device; its work folder a fresh folder here (a phone's would be /data/local/tmp/...)."""
    adb("R58M42ABCDE:device")
    return {"remote_dir": str(tmp_path / "phone")}


def test_addresses_parse():
    assert adb_module.parse_serial("adb://") is None
    assert adb_module.parse_serial("adb://192.168.1.20:5555") == "192.168.1.20:5555"
    with pytest.raises(TargetError, match="is not an adb address"):
        adb_module.parse_serial("adb://a b")
    assert adb_module.AdbTarget("adb://").remote_dir == "/data/local/tmp/cloformer-deploy"


def test_no_adb_here_is_one_line(monkeypatch):
    monkeypatch.setattr(adb_module, "adb_binary", lambda: None)
    with pytest.raises(
        TargetError, match="uses Android's adb, which is not installed; install it with: apt-get install adb"
    ):
        get_target("adb://")


@pytest.mark.parametrize(
    "devices,address,why",
    [
        ("", "adb://", "adb lists no device: connect the phone by USB with USB debugging on"),
        ("A1:device,B2:device", "adb://", r"adb lists 2 devices \(A1, B2\); choose one with (--)?target adb://SERIAL"),
        ("A1:unauthorized", "adb://A1", "adb://A1 is unauthorized: unlock the phone and accept"),
        ("A1:offline", "adb://", "adb://A1 is offline: reconnect the cable, or restart adb"),
        ("A1:device", "adb://Z9", r"adb has no device 'Z9' \(it lists: A1\)"),
    ],
)
def test_device_problems_are_one_line(adb, devices, address, why):
    adb(devices)
    with pytest.raises(TargetError, match=why):
        get_target(address)


def test_a_device_is_probed_by_its_shell_and_its_runners_named(phone, adb, tmp_path):
    target = get_target("adb://", device=phone)  # one device: chosen without its serial
    d = target.describe()
    assert d["serial"] == "R58M42ABCDE" and d["kind"] == "adb" and d["measures_latency"]
    assert d["platform"] == f"linux-{os.uname().machine}" and set(d["runners"]) == {"onnx", "executorch", "tflite"}
    empty = tmp_path / "empty-cache"
    with pytest.raises(TargetError, match="runner for linux-.* is not built .*setup adb://R58M42ABCDE"):
        get_target("adb://R58M42ABCDE", cache=empty, device=phone)


@pytest.mark.e2e
def test_bench_and_validate_on_the_phone_with_the_native_runners(phone, tiny_bundle, tiny_checkpoint, tmp_path):
    import shutil

    from cloformer_deploy.pipeline import validate_bundle
    from cloformer_deploy.runtime_bench.harness import bench

    res = bench(
        bundle=tiny_bundle.bundle,
        weights=tiny_checkpoint,
        formats="onnxruntime,executorch-xnnpack,litert",
        threads="1",
        runs=3,
        warmup=1,
        out=tmp_path / "bench",
        target="adb://R58M42ABCDE",
        **phone,
    )
    rows = {(r["runtime"], r["target"]): r for r in res.rows}
    for rt in ("onnxruntime", "executorch-xnnpack", "litert"):
        there = rows[(rt, "adb://R58M42ABCDE")]
        assert there["error"] is None and there["runner"] == "native", there["error"]
        assert there["latency_ms"]["runs"] == 3 and 0 < there["peak_rss_mb"] < 150
        assert there["vs_local"]["bit_exact"]
    log = (tmp_path / "adb.log").read_text().splitlines()
    pushes = [line for line in log if " push " in line]
    # each runner bundle and each artifact pushed once
    assert len([p for p in pushes if ".tar.gz.part" in p]) == 3 and len(pushes) == 6, pushes
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle.bundle, bundle)
    ok, reports = validate_bundle(bundle=bundle, weights=tiny_checkpoint, target="adb://R58M42ABCDE", **phone)
    by = {r["format"]: r["targets"]["adb://R58M42ABCDE"] for r in reports}
    assert ok and by["onnx"]["passed"] and by["executorch"]["vs_local"]["bit_exact"]
    assert by["coreml"]["ran"] is False
    # LiteRT in its native runner: a phone runs every Android format without Python
    assert by["tflite"]["passed"] and by["tflite"]["runner"] == "native" and by["tflite"]["vs_local"]["bit_exact"]
    assert not live_processes(phone["remote_dir"])


@pytest.mark.e2e
def test_drift_by_block_on_the_phone(phone, tiny_bundle, tiny_checkpoint, tmp_path):
    """--by-block --target adb://: the phone's native runners return every block, the same figures as here."""

    from cloformer_deploy.pipeline import drift_by_block

    bundle = bundle_with_formats(tiny_bundle.bundle, tmp_path / "b", ("onnx", "tflite"))
    found = drift_by_block(
        bundle=str(bundle), weights=str(tiny_checkpoint), target="adb://R58M42ABCDE", out=str(tmp_path / "o"), **phone
    )
    rows = found.document["artifacts"]
    for fmt in ("onnx", "tflite"):
        here = next(r for r in rows if r["format"] == fmt and r["target"] == "local")
        there = next(r for r in rows if r["format"] == fmt and r["target"] == "adb://R58M42ABCDE")
        assert "error" not in there and there["final_vs_shipped"]["bit_exact"], there
        assert [b["rel_err"] for b in there["blocks"]] == [b["rel_err"] for b in here["blocks"]]
    assert not live_processes(phone["remote_dir"])


def test_check_and_setup_a_phone(phone, capsys, tmp_path):
    from cloformer_deploy.cli import device_main

    assert device_main(["check", "adb://R58M42ABCDE", "--remote-dir", phone["remote_dir"]]) == 0
    out = capsys.readouterr().out
    assert "device   adb://R58M42ABCDE: linux-" in out and "no Python is needed on the device" in out
    assert device_main(["setup", "adb://R58M42ABCDE", "--remote-dir", phone["remote_dir"]]) == 0
    installed = sorted(p.parent.name for p in Path(phone["remote_dir"]).glob("native/*/build.json"))
    assert [n.split("-")[0] for n in installed] == ["executorch", "onnx", "tflite"]
    record = json.loads(next(Path(phone["remote_dir"]).glob("native/onnx-*/build.json")).read_text())
    assert record["platform"] == f"linux-{os.uname().machine}"
