"""LiteRT (.tflite): the artifact's interface, its delegation to XNNPACK, its precisions and its bench rows."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch

import cloformer_deploy as cd
from cloformer_deploy.formats import BACKENDS
from cloformer_deploy.formats.base import ExportJob, ModelSpec
from cloformer_deploy.formats.litert import read_metadata
from cloformer_deploy.pipeline import export
from cloformer_deploy.runtime_bench.harness import bench

from helpers import TINY_SIZE as SIZE

LITERT = BACKENDS["tflite"]


def _entry(result, precision="fp32"):
    art = next(a for a in result.artifacts if a.format == "tflite" and a.precision == precision)
    return art, art.entry


def test_tflite_is_one_xnnpack_partition_with_nhwc_float_input(tiny_bundle):
    art, entry = _entry(tiny_bundle)
    assert entry["partitions"] == 1 and entry["non_delegated_kernels"] == 0 and entry["non_delegated_ops"] == {}
    assert entry["input_layout"] == "NHWC" and entry["delegate"] == "XNNPACK"
    assert entry["validation"]["passed"] and entry["validation"]["figures"]["max_abs"] <= 1e-4
    assert entry["validation"]["method"] == "litert"
    runner = LITERT.open(art.path, None, entry, threads=1)
    assert runner.check_structure() == []
    assert [int(v) for v in runner.input["shape"]] == [1, *SIZE, 3] and runner.input["dtype"] == np.float32
    assert [int(v) for v in runner.output["shape"]] == [1, 10] and runner.output["dtype"] == np.float32
    meta = read_metadata(art.path)
    assert meta["model"] == "cloformer_tiny_test" and meta["input_size"] == list(SIZE)
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["layout"].startswith("NHWC")


def _profiled_partitions_and_outside(path) -> tuple[int, Counter]:
    """How many XNNPACK partitions LiteRT's profiler saw in one file, and the nodes it ran outside them."""
    images = np.random.default_rng(0).standard_normal((1, 3, *SIZE)).astype(np.float32)
    ops = LITERT.profile(path, images, threads=1, runs=2)
    outside = Counter(o.kind.removesuffix(" (not delegated)") for o in ops if o.kind.endswith("(not delegated)"))
    partitions = {re.search(r"in partition (\d+)$", o.name).group(1) for o in ops if " in partition " in o.name}
    return len(partitions), outside


def test_litert_profile_is_xnnpacks_ops_in_one_partition_and_quiet(tiny_bundle, capfd):
    from cloformer_deploy.formats.litert_profiler import ProfiledModel

    art, entry = _entry(tiny_bundle)
    images = np.random.default_rng(0).standard_normal((2, 3, *SIZE)).astype(np.float32)
    capfd.readouterr()
    ops = LITERT.profile(art.path, images, threads=1, runs=3)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured
    assert all(re.fullmatch(r".+ #\d+ in partition 1", o.name) for o in ops), [o.name for o in ops]
    assert len({o.name for o in ops}) == len(ops) and all(o.median_ms >= 0 and o.calls == 1 for o in ops)
    assert any(o.kind.startswith("Convolution (NHWC, F32)") for o in ops)
    # the profiled compiled model computes what the interpreter that validated the file computes
    nhwc = np.ascontiguousarray(images[:1].transpose(0, 2, 3, 1))
    runner = LITERT.open(art.path, None, entry, threads=1)
    with ProfiledModel(art.path, threads=1) as model:
        assert model.input.shape == (1, *SIZE, 3) and model.output.shape == (1, 10)
        np.testing.assert_allclose(model.run(nhwc), runner.infer(nhwc), rtol=0, atol=1e-5)


def test_run_ops_splits_partitions_where_numbering_restarts_or_a_node_runs_outside():
    from cloformer_deploy.formats.litert_profiler import run_ops

    xnn, node, invoke = 1 << 3, 1 << 1, 1
    events = [
        (invoke, "Invoke", 0, 900),
        (xnn, "Convolution (NHWC, F32) IGEMM", 0, 100),
        (xnn, "Add (ND)", 1, 10),
        (xnn, "Convolution (NHWC, F32) IGEMM", 0, 200),  # numbering restarts: a second partition
        (node, "GELU", 7, 50),
        (xnn, "Add (ND)", 0, 20),
    ]
    assert run_ops(events) == {
        ("Convolution (NHWC, F32) IGEMM #0 in partition 1", "Convolution (NHWC, F32) IGEMM"): 0.1,
        ("Add (ND) #1 in partition 1", "Add (ND)"): 0.01,
        ("Convolution (NHWC, F32) IGEMM #0 in partition 2", "Convolution (NHWC, F32) IGEMM"): 0.2,
        ("GELU (node 7)", "GELU (not delegated)"): 0.05,
        ("Add (ND) #0 in partition 3", "Add (ND)"): 0.02,
    }


def test_litert_profile_refuses_no_runs(tiny_bundle):
    art, _ = _entry(tiny_bundle)
    with pytest.raises(ValueError, match="threads and runs must be at least 1"):
        LITERT.profile(art.path, np.zeros((1, 3, *SIZE), np.float32), threads=1, runs=0)


def test_the_manifest_says_what_a_tflite_takes(tiny_bundle):
    import json

    m = json.loads((tiny_bundle.bundle / "manifest.json").read_text())
    assert m["preprocessing"]["tflite"].startswith("NHWC float32")


def test_without_keys_first_attention_the_single_head_matmul_falls_outside_xnnpack(tiny_variant, tmp_path):
    """The converter makes single-head attention's attn @ v a FULLY_CONNECTED with computed weights, which
    XNNPACK refuses: the step LiteRT's form takes is what keeps the network in one partition."""
    model = cd.create_model(tiny_variant, num_classes=10).eval()
    steps, extra = LITERT.deploy_steps("fp32", {})
    assert "keys_first_attention" in extra
    spec = ModelSpec(tiny_variant, 10, SIZE)
    example = torch.randn(1, 3, *SIZE)
    without = cd.to_deploy(model, SIZE, steps=steps, extra_steps=[s for s in extra if s != "keys_first_attention"])
    info = LITERT.export(ExportJob(without, example, spec, "fp32"), tmp_path / "without.tflite", lambda text: None)
    assert info["partitions"] > 1 and info["non_delegated_ops"].get("FULLY_CONNECTED", 0) >= 1
    # LiteRT's profiler sees the same partitions and the same nodes outside them
    partitions, outside = _profiled_partitions_and_outside(tmp_path / "without.tflite")
    assert outside == info["non_delegated_ops"]
    assert partitions == info["partitions"]


def test_the_authors_form_is_refused_with_the_converters_reason(tiny_variant, tmp_path):
    model = cd.create_model(tiny_variant, num_classes=10).eval()
    path = tmp_path / "authors.tflite"
    with pytest.raises(RuntimeError, match=r"LiteRT cannot load the converted model: .*FULLY_CONNECTED"):
        LITERT.export(
            ExportJob(model, torch.randn(1, 3, *SIZE), ModelSpec(tiny_variant, 10, SIZE), "fp32"), path, print
        )
    assert not path.exists()


@pytest.mark.e2e
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_fp16_and_int8_keep_float_io_and_stay_close(tiny_variant, tiny_checkpoint, tiny_bundle, tmp_path, precision):
    result = export(
        tiny_variant, weights=tiny_checkpoint, format="tflite", precision=precision, img_size=SIZE, out=tmp_path
    )
    art, entry = _entry(result, precision)
    assert result.passed, entry["validation"]
    figures = entry["validation"]["figures"]
    runner = LITERT.open(art.path, None, entry, threads=1)
    assert runner.check_structure() == []  # float32 input and output
    assert entry["quantization"]["io"].startswith("float32")
    if precision == "fp16":
        assert entry["partitions"] == 1 and entry["non_delegated_kernels"] == 0
        assert figures["cosine"] >= 0.9999 and figures["max_abs"] <= 1e-2
        assert art.path.stat().st_size < 0.75 * _entry(tiny_bundle)[0].path.stat().st_size  # float16 weights
    else:
        # the int8 GELUs stay outside XNNPACK; the average pools are depthwise convolutions inside it
        assert entry["partitions"] >= 1 and "AVERAGE_POOL_2D" not in entry["non_delegated_ops"]
        assert "pool_as_depthwise_conv" in entry["deploy_steps"] and figures["cosine"] >= 0.99
        assert entry["calibration"]["images"] >= 8
        assert "QUANTIZE" in entry["op_types"] and "DEQUANTIZE" in entry["op_types"]
    # LiteRT's profiler sees the partitions and the nodes outside them that the manifest records
    partitions, outside = _profiled_partitions_and_outside(art.path)
    assert outside == entry["non_delegated_ops"]
    assert partitions == entry["partitions"]


@pytest.mark.e2e
def test_bench_rows_and_the_authors_form_error_row(tiny_variant, tiny_checkpoint, native_runners, tmp_path):
    result = bench(
        tiny_variant,
        weights=tiny_checkpoint,
        formats="litert",
        threads=(1, 2),
        runs=4,
        warmup=1,
        img_size=64,
        compare_authors=True,
        baselines=False,
        profile=True,
        out=tmp_path,
    )
    deploy = [r for r in result.rows if r["runtime"] == "litert" and r["form"] == "deploy"]
    assert sorted(r["threads"] for r in deploy) == [1, 2]
    for r in deploy:
        assert r["error"] is None and r["latency_ms"]["runs"] == 4 and r["delegation"]["partitions"] == 1
        assert r["drift"]["max_abs"] <= 1e-4 and r["runner"] == "native"  # LiteRT's C API, as an app runs it
    authors = [r for r in result.rows if r["runtime"] == "litert" and r["form"] == "authors"]
    assert authors and all("FULLY_CONNECTED" in r["error"] for r in authors)
    assert "LiteRT" in (result.out / "results.md").read_text()
    profile = (result.out / "profile.md").read_text()
    assert "deploy form, litert, fp32, 1 thread(s)" in profile and "Convolution (NHWC, F32)" in profile
    assert "LiteRT: LiteRT's profiler" in profile
