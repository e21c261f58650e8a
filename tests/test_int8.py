"""int8 (and Core ML 4-bit weights): calibrated on real images, smaller, drift measured and bounded."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from cloformer_deploy.cli import validate_main
from cloformer_deploy.formats import BACKENDS
from cloformer_deploy.pipeline import export

from helpers import TINY_SIZE


@pytest.fixture(scope="module")
def bundles(tiny_variant, tiny_checkpoint, tiny_bundle, tmp_path_factory):
    int8 = export(
        tiny_variant,
        weights=tiny_checkpoint,
        format="all",
        precision="int8",
        img_size=TINY_SIZE,
        out=tmp_path_factory.mktemp("int8"),
        calibration_size=16,
        keep_float=2,
    )
    return tiny_bundle, int8


@pytest.mark.e2e
def test_every_format_int8_passes_its_bound(bundles):
    _, int8 = bundles
    offered = [name for name, b in BACKENDS.items() if "int8" in b.precisions]
    assert int8.passed and [a.format for a in int8.artifacts] == offered
    for a in int8.artifacts:
        v = a.entry["validation"]
        assert v["bounds"] == {"min_cosine": 0.99} and v["figures"]["cosine"] >= 0.99
        assert v["figures"]["max_abs"] > 1e-5  # quantised: the numbers really changed


@pytest.mark.e2e
def test_int8_is_smaller(bundles):
    fp32, int8 = bundles
    size = {a.format: a.entry["size_bytes"] for a in fp32.artifacts if a.precision == "fp32"}
    for a in int8.artifacts:
        if a.format in size:  # a tiny model carries proportionally more scales and metadata than XXS
            assert a.entry["size_bytes"] < 0.5 * size[a.format], a.format


@pytest.mark.e2e
def test_calibration_and_kept_layers_are_recorded(bundles):
    _, int8 = bundles
    m = json.loads((int8.bundle / "manifest.json").read_text())
    for entry in m["artifacts"]:
        cal = entry["calibration"]
        assert cal["images"] == 16 and len(cal["sha256"]) == 64
        assert len(cal["sensitivity_top"]) >= 2
        if BACKENDS[entry["format"]].keeps_float_layers:
            assert cal["kept_float"] == [s["layer"] for s in cal["sensitivity_top"][:2]]
        else:  # Core ML's weight compression and LiteRT's int8 keep no layer float
            assert cal["kept_float"] == [], entry["format"]


@pytest.mark.e2e
def test_onnx_int8_is_qdq_with_kept_layers_in_float(bundles):
    _, int8 = bundles
    entry = next(a.entry for a in int8.artifacts if a.format == "onnx")
    model = onnx.load(str(int8.bundle / entry["path"]))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert entry["quantization"]["excluded_nodes"] == 2
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    for layer in entry["calibration"]["kept_float"]:
        assert f"{layer}.weight" in floats


@pytest.mark.e2e
def test_executorch_int8_stays_in_one_xnnpack_partition(bundles):
    _, int8 = bundles
    entry = next(a.entry for a in int8.artifacts if a.format == "executorch")
    assert entry["partitions"] == 1 and entry["non_delegated_kernels"] == 0


@pytest.mark.e2e
def test_coreml_int8_and_w4_run_in_the_interpreter(bundles, tiny_variant, tiny_checkpoint, tmp_path):
    _, int8 = bundles
    entry = next(a.entry for a in int8.artifacts if a.format == "coreml")
    assert (
        entry["ops"].get("constexpr_affine_dequantize", 0) > 0
        or entry["ops"].get("constexpr_blockwise_shift_scale", 0) > 0
        or entry["compression"]["weights"].startswith("int8")
    )
    w4 = export(tiny_variant, weights=tiny_checkpoint, format="coreml", precision="w4", img_size=64, out=tmp_path)
    v = w4.artifacts[0].entry["validation"]
    assert w4.passed and v["method"] in ("emulated", "coreml") and v["figures"]["cosine"] >= 0.95


@pytest.mark.e2e
def test_validate_applies_int8_bounds(bundles, tiny_checkpoint):
    _, int8 = bundles
    assert validate_main([str(int8.bundle), "--weights", str(tiny_checkpoint), "-q"]) == 0


def test_int8_precision_per_format():
    assert "int8" in BACKENDS["onnx"].precisions and "int8" in BACKENDS["executorch"].precisions
    assert {"int8", "w4"} <= set(BACKENDS["coreml"].precisions)


@pytest.mark.slow
def test_cloformer_xxs_int8_sizes_and_drift(tmp_path):
    """The issue's figures: each int8 artifact at most 35% of the fp32 weights (16.7 MB), cosine >= 0.99."""
    r = export("cloformer-xxs", format="all", precision="int8", out=tmp_path)
    assert r.passed
    for a in r.artifacts:
        assert a.entry["size_bytes"] <= 0.35 * 16.7e6, (a.format, a.entry["size_bytes"])
        assert a.entry["validation"]["figures"]["cosine"] >= 0.99
    assert np.isfinite([a.entry["validation"]["figures"]["max_abs"] for a in r.artifacts]).all()
