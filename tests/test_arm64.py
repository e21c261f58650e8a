"""The emulated ARM64 target end to end: set up (or reuse) the aarch64 native runners (ExecuTorch, ONNX Runtime,
LiteRT), validate a tiny model's artifacts with them under QEMU.

Needs QEMU and Debian's cross compiler (``apt-get install qemu-user-static g++-aarch64-linux-gnu``) and, the
first time, the network (about 60 MB of aarch64 wheels from PyPI). Skipped without the tools, a failure under CI.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def arm64_root():
    from cloformer_deploy.progress import Progress
    from cloformer_deploy.targets.setup import setup_target

    missing = [t for t in ("qemu-aarch64-static", "aarch64-linux-gnu-g++") if shutil.which(t) is None]
    if missing:
        msg = f"the ARM64 target needs {', '.join(missing)} (apt-get install qemu-user-static g++-aarch64-linux-gnu)"
        if os.environ.get("CI"):
            pytest.fail(msg + "; .ci/run installs them")
        pytest.skip(msg)
    return setup_target("arm64", progress=Progress(plain_interval=30))


@pytest.fixture(scope="module")
def bundle(tiny_variant, tiny_checkpoint, tmp_path_factory):
    """The tiny model's ExecuTorch, ONNX and LiteRT fp32/fp16/int8 in one bundle, validated on this machine."""
    from cloformer_deploy.pipeline import export

    out = tmp_path_factory.mktemp("arm64")
    for formats, precision in (
        ("onnx,executorch,tflite", "fp32"),
        ("onnx,executorch,tflite", "fp16"),
        ("onnx,executorch,tflite", "int8"),
    ):
        result = export(
            tiny_variant, weights=tiny_checkpoint, format=formats, precision=precision, img_size=64, out=out
        )
        assert result.passed
    return result.bundle


@pytest.fixture(scope="module")
def on_a76(arm64_root, bundle, tiny_checkpoint):
    from cloformer_deploy.pipeline import validate_bundle

    ok, reports = validate_bundle(bundle, weights=tiny_checkpoint, target="arm64")
    return ok, {(r["format"], r["precision"]): r["targets"]["arm64-cortex-a76"] for r in reports}


def test_tiny_model_validates_on_emulated_arm64(arm64_root, on_a76, bundle):
    ok, by = on_a76
    # the runners and their libraries only: no Python (the emulated one LiteRT needed before held 110 MB)
    assert set(arm64_root["bundles"]) == {"onnx", "executorch", "tflite"} and arm64_root["bytes"] < 150e6
    assert "python" not in arm64_root
    assert set(by) == {(f, p) for f in ("onnx", "executorch", "tflite") for p in ("fp32", "fp16", "int8")}
    for key, on in by.items():
        assert on["ran"] and on["passed"], (key, on)
        assert on["target"]["platform"] == "linux-aarch64" and on["target"]["qemu_cpu"] == "cortex-a76"
    assert ok
    # the same function in fp32 on either machine
    assert by[("executorch", "fp32")]["vs_local"]["max_abs"] < 1e-4
    assert by[("onnx", "fp32")]["vs_local"]["max_abs"] < 1e-4
    assert by[("tflite", "fp32")]["vs_local"]["max_abs"] < 1e-4
    assert all(on["runner"] == "native" for on in by.values())  # LiteRT too: its C API, no Python
    # int8 programs keep float ops (softmax, GELU, norm statistics) whose NEON and AVX-512 kernels differ in the
    # last bits, which can move a requantised value by one step: close, not always bit-exact
    for fmt in ("onnx", "executorch", "tflite"):
        vs = by[(fmt, "int8")]["vs_local"]
        assert vs["cosine"] > 0.999 and vs["top1_agreement"] == 1.0, (fmt, vs)
    # fp16 is computed in fp16 on ARM (fp32 kernels on x86): not the same bits, still within the fp16 bound
    assert not by[("onnx", "fp16")]["vs_local"]["bit_exact"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert all("arm64-cortex-a76" in e["validation"]["targets"] for e in manifest["artifacts"])


def test_the_cpu_profile_chooses_the_kernels(on_a76, bundle, tiny_checkpoint):
    """A Cortex-A72 has no fp16 arithmetic: the fp16 program still runs and passes, with other kernels than
    on the Cortex-A76, so its outputs differ; fp32 and int8 run as well."""
    from cloformer_deploy.pipeline import validate_bundle

    ok, reports = validate_bundle(bundle, weights=tiny_checkpoint, target="arm64", cpu="cortex-a72")
    by = {(r["format"], r["precision"]): r["targets"]["arm64-cortex-a72"] for r in reports}
    assert ok and all(on["passed"] for on in by.values()), by
    a76, a72 = on_a76[1][("executorch", "fp16")]["figures"], by[("executorch", "fp16")]["figures"]
    assert a72["mean_abs"] != a76["mean_abs"], (a72, a76)


def test_evaluation_runs_every_shard_on_emulated_arm64(arm64_root, bundle, tiny_checkpoint, tmp_path):
    """cloformer-validate --data --target arm64: two workers, each with its own emulator, run every artifact's
    shards in the aarch64 runners; the figures are those of the phone's kernels."""
    from cloformer_deploy.images import write_photo_set
    from cloformer_deploy.pipeline import evaluate_bundle

    data = write_photo_set(tmp_path / "set", 8, classes=[str(i) for i in range(10)], side=96)
    ev = evaluate_bundle(
        bundle, weights=tiny_checkpoint, data=data, target="arm64", workers=2, shard_size=2, out=tmp_path / "out"
    )
    doc = ev.document
    assert doc["target"]["name"] == "arm64-cortex-a76" and doc["skipped"] == []
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert len(doc["rows"]) == len(manifest["artifacts"])
    for row in doc["rows"]:
        assert "error" not in row and row["passed"], row
        assert row["images"] == 8 and row["target"] == "arm64-cortex-a76"
        assert {r["target"] for r in row["runner"]} == {"arm64-cortex-a76"}
        assert len(row["nodes"]) == 2  # both workers ran shards
        assert {r["runner"] for r in row["runner"]} == {"native"}
    # the same set on this machine into the same folder: one report with both targets' rows
    here = evaluate_bundle(bundle, weights=tiny_checkpoint, data=data, workers=1, shard_size=2, out=tmp_path / "out")
    targets = [(r["target"], bool(r.get("earlier"))) for r in here.rows]
    n = len(manifest["artifacts"])
    assert targets == [("local", False)] * n + [("arm64-cortex-a76", True)] * n
    assert "(an earlier run)" in (tmp_path / "out" / "accuracy.md").read_text()
