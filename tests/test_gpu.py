"""GPU rows: LiteRT's GPU accelerator in the native runner, on Mesa's lavapipe (a software Vulkan device) here.

The fast tests check what needs no GPU: the runtimes' names, the bounds a GPU row is held to, and the one-line
answers where no GPU is reachable. The e2e ones set up the software device once (``cloformer-device setup gpu``:
about 60 MB from Debian's bookworm-backports) and run the tiny model's .tflite on it; skipped without apt-get and
dpkg-deb, a failure under CI.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from cloformer_deploy.runtime_bench.runtimes import BUNDLE_RUNTIMES, GPU_RUNTIMES, IN_ALL, RUNTIMES

from helpers import bundle_with_formats


def test_the_gpu_runtimes_run_the_bundles_tflite_and_are_named_not_implied():
    assert GPU_RUNTIMES == ("litert-gpu", "litert-gpu-fp32")
    assert set(GPU_RUNTIMES) <= set(RUNTIMES) and not set(GPU_RUNTIMES) & set(IN_ALL)
    assert BUNDLE_RUNTIMES["tflite"] == ("litert", "litert-gpu", "litert-gpu-fp32")


def test_all_takes_the_gpu_runtimes_only_when_named():
    from cloformer_deploy.runtime_bench.options import check_runtimes

    assert not set(check_runtimes("--formats", "all")) & set(GPU_RUNTIMES)
    assert check_runtimes("--formats", "all,litert-gpu")[-2:] == ["litert", "litert-gpu"]


def test_a_gpu_row_is_held_to_the_precision_the_gpu_computes_in():
    from cloformer_deploy.pipeline.gpu_rows import gpu_runtimes

    fp32 = {name: bounds for name, _, bounds in gpu_runtimes("tflite", "fp32", None)}
    assert fp32["litert-gpu"].min_cosine == 0.999 and fp32["litert-gpu"].max_abs is None  # fp16 arithmetic
    assert fp32["litert-gpu-fp32"].max_abs == 1e-4  # the same function as the CPU's
    int8 = {name: bounds for name, _, bounds in gpu_runtimes("tflite", "int8", None)}
    assert int8["litert-gpu"].min_cosine == 0.99 and int8["litert-gpu-fp32"].min_cosine == 0.99
    options = {name: o for name, o, _ in gpu_runtimes("tflite", "fp16", None)}
    assert options["litert-gpu"] == {"accelerator": "gpu", "gpu_precision": "fp16"}
    assert gpu_runtimes("onnx", "fp32", None) == () and gpu_runtimes("executorch", "fp32", None) == ()


def test_targets_that_reach_no_gpu_say_why():
    from cloformer_deploy.targets.adb import AdbTarget
    from cloformer_deploy.targets.arm64 import EmulatedArm64Target
    from cloformer_deploy.targets.local import LocalTarget

    assert "bionic" in AdbTarget.gpu_missing(SimpleNamespace(name="adb://X"))
    assert "no GPU" in EmulatedArm64Target().gpu_missing()
    assert "cloformer-device setup gpu" in LocalTarget(cache="/nonexistent").gpu_missing()


def test_gpu_validation_needs_an_artifact_with_a_gpu_path_and_its_runner():
    from cloformer_deploy.pipeline.gpu_rows import gpu_checked
    from cloformer_deploy.pipeline.options import ExportInputError

    onnx_only = {"artifacts": [{"format": "onnx", "precision": "fp32"}]}
    with pytest.raises(ExportInputError, match=r"no artifact of this bundle has a GPU path \(it holds onnx\)"):
        gpu_checked(onnx_only, SimpleNamespace(kind="local"))
    unbuilt = SimpleNamespace(kind="local", native_bundle=lambda backend: None)
    with pytest.raises(ExportInputError, match="native LiteRT runner; build it with: cloformer-device setup gpu"):
        gpu_checked({"artifacts": [{"format": "tflite", "precision": "fp16"}]}, unbuilt)


def test_no_vulkan_device_here_is_one_line_before_any_work(tiny_bundle, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from cloformer_deploy.cli import bench_main, validate_main

    monkeypatch.setenv("CLOFORMER_DEPLOY_CACHE", str(tmp_path / "cache"))
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle.bundle, bundle)
    before = (bundle / "manifest.json").read_bytes()
    weights = ["--weights", str(tiny_checkpoint)]
    assert validate_main([str(bundle), "--gpu", *weights]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cloformer-device setup gpu" in err[0], err
    assert (bundle / "manifest.json").read_bytes() == before
    out = tmp_path / "bench"
    assert bench_main(["--bundle", str(bundle), *weights, "--formats", "litert,litert-gpu", "--out", str(out)]) == 2
    assert "--formats litert-gpu:" in capsys.readouterr().err
    python = ["--formats", "litert-gpu", "--runner", "python", "--out", str(out)]
    assert bench_main(["--bundle", str(bundle), *weights, *python]) == 2
    assert "run in the native runner only" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "cache").exists()
    assert validate_main([str(bundle), "--gpu", "--data", str(tmp_path), *weights]) == 2
    assert "drop --data, or drop --gpu" in capsys.readouterr().err


# ------------------------------------------------------------------ on the software Vulkan device


@pytest.fixture(scope="module")
def software_gpu(native_runners):
    from cloformer_deploy.targets.setup import setup_target

    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        msg = "the software Vulkan device comes from Debian with apt-get and dpkg-deb"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return setup_target("gpu")


@pytest.mark.e2e
def test_validation_on_the_software_gpu(software_gpu, tiny_bundle, tiny_checkpoint, tmp_path):
    """fp16 arithmetic shows (not the CPU's bits, within the fp16 bound); fp32 precision is the CPU's function;
    the adapter is named and known to be software; the manifest keeps the GPU's reports, valid by its schema."""
    from cloformer_deploy.pipeline import validate_bundle

    assert software_gpu["gpu"]["mesa_major"] >= 25
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle.bundle, bundle)
    ok, reports = validate_bundle(bundle, weights=tiny_checkpoint, gpu=True)
    assert ok
    tflite = next(r for r in reports if r["format"] == "tflite")
    assert set(tflite["gpu"]) == {"litert-gpu", "litert-gpu-fp32"}
    for name, on in tflite["gpu"].items():
        assert on["ran"] and on["passed"], (name, on)
        assert on["runner"] == "native" and on["gpu_software"] is True and "llvmpipe" in on["gpu_adapter"]
        assert "load_seconds" not in on  # a software GPU's load is the CPU's
    fp16, fp32 = tflite["gpu"]["litert-gpu"], tflite["gpu"]["litert-gpu-fp32"]
    assert fp16["gpu_precision"] == "fp16" and not fp16["vs_local"]["bit_exact"]
    assert fp16["vs_local"]["max_abs"] > 10 * fp32["vs_local"]["max_abs"]
    assert fp32["vs_local"]["max_abs"] < 1e-5 and fp32["bounds"] == {"max_abs": 1e-4}
    assert all("gpu" not in r for r in reports if r["format"] != "tflite")
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = next(e for e in manifest["artifacts"] if e["format"] == "tflite")
    assert set(entry["validation"]["gpu"]["local"]) == {"litert-gpu", "litert-gpu-fp32"}


@pytest.mark.e2e
def test_bench_gpu_rows_are_drift_beside_the_cpu_rows(software_gpu, tiny_bundle, tiny_checkpoint, tmp_path):
    from cloformer_deploy.runtime_bench.harness import bench

    res = bench(
        bundle=tiny_bundle.bundle,
        weights=tiny_checkpoint,
        formats="litert,litert-gpu,litert-gpu-fp32",
        threads="1",
        runs=3,
        warmup=1,
        out=tmp_path / "bench",
    )
    rows = {r["runtime"]: r for r in res.rows}
    assert rows["litert"]["latency_ms"]["runs"] == 3 and rows["litert"]["runner"] == "native"
    for name in ("litert-gpu", "litert-gpu-fp32"):
        row = rows[name]
        assert row["error"] is None and row["runner"] == "native", row["error"]
        assert row["latency_ms"] is None and row["load_ms"] is None and row["peak_rss_mb"] is None
        assert row["gpu"]["software"] and "llvmpipe" in row["gpu"]["adapter"] and "software GPU" in row["note"]
    assert rows["litert-gpu"]["gpu"]["precision"] == "fp16" and rows["litert-gpu-fp32"]["gpu"]["precision"] == "fp32"
    assert rows["litert-gpu"]["drift"]["max_abs"] > rows["litert-gpu-fp32"]["drift"]["max_abs"]
    text = Path(res.out / "results.md").read_text()
    assert "litert-gpu" in text and "software GPU" in text


@pytest.mark.e2e
def test_drift_by_block_on_the_software_gpu(software_gpu, tiny_bundle, tiny_checkpoint, tmp_path):
    """--by-block --gpu: the .tflite's blocks on the GPU in both precisions, beside its CPU row; fp32 arithmetic
    keeps every block at the CPU's level, fp16 arithmetic shows at every block."""
    from cloformer_deploy.pipeline import drift_by_block

    bundle = bundle_with_formats(tiny_bundle.bundle, tmp_path / "b", ("tflite",), ("fp32",))
    found = drift_by_block(bundle=str(bundle), weights=str(tiny_checkpoint), gpu=True, out=str(tmp_path / "o"))
    rows = {a["runtime"]: a for a in found.document["artifacts"]}
    assert set(rows) == {None, "litert-gpu", "litert-gpu-fp32"}
    for row in rows.values():
        assert "error" not in row and row["final_vs_shipped"]["bit_exact"], row
    worst = {k: max(b["rel_err"] for b in r["blocks"] if b["exposed"]) for k, r in rows.items()}
    assert worst[None] < 1e-5 and worst["litert-gpu-fp32"] < 1e-5
    assert worst["litert-gpu"] > 10 * worst["litert-gpu-fp32"]
