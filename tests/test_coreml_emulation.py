"""Core ML packages executed on Linux by the interpreter: parity, fp16 overflow guard, corrupted weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cloformer_deploy as cd
from cloformer_deploy.formats.base import ExportJob, ModelSpec
from cloformer_deploy.formats.coreml import CoreMLBackend, CoreMLRunner
from cloformer_deploy.images import load_images
from cloformer_deploy.validation import bounds_for, compare, validate

SIZE = (64, 64)


@pytest.fixture(scope="module")
def setup(tiny_variant):
    torch.manual_seed(0)
    authors = cd.create_model(tiny_variant, num_classes=10)
    images = load_images(SIZE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    spec = ModelSpec(
        tiny_variant,
        10,
        SIZE,
        1,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        [str(i) for i in range(10)],
        0,
        None,
        None,
    )
    return authors, images, spec


def _export(authors, images, spec, path, precision, **options):
    job = ExportJob(
        cd.to_deploy(authors, SIZE), torch.from_numpy(images.tensor[:1]), spec, precision, options, images.tensor
    )
    info = CoreMLBackend().export(job, path, print)
    return CoreMLRunner(path, spec, emulate=True), info


@pytest.mark.parametrize("coreml_input", ["image", "tensor"])
def test_fp32_package_matches_pytorch(setup, tmp_path, coreml_input):
    authors, images, spec = setup
    runner, _ = _export(authors, images, spec, tmp_path / "m.mlpackage", "fp32", coreml_input=coreml_input)
    with torch.no_grad():
        ref = authors(torch.from_numpy(images.tensor)).numpy()
    report = validate(runner, images, ref, 1, bounds_for("fp32"))
    assert report["method"] == "emulated" and report["passed"], report
    assert report["figures"]["max_abs"] <= 1e-4


@pytest.mark.e2e
def test_fp16_norm_statistics_stay_finite_where_naive_fp16_overflows(setup, tmp_path):
    """Activations 2000x larger into the stem norm: the function is the same (a norm is scale-free),
    but a naive fp16 conversion squares deviations past 65504 and returns NaN."""
    authors, images, spec = setup
    loud = cd.create_model(spec.name, num_classes=10)
    loud.load_state_dict(authors.state_dict())
    with torch.no_grad():
        loud.patch_embed.conv5.weight.mul_(2000)
        loud.patch_embed.conv5.bias.mul_(2000)
        ref = loud(torch.from_numpy(images.tensor)).numpy()
    naive, _ = _export(loud, images, spec, tmp_path / "naive.mlpackage", "fp16", norm_statistics_fp32=False)
    guarded, info = _export(loud, images, spec, tmp_path / "guarded.mlpackage", "fp16")
    sub = next(images.batches(1))
    naive.run(sub)
    assert naive.fp16["first_nonfinite_op"] is not None and naive.fp16["nonfinite_ops"] > 0
    figures = compare(np.concatenate([guarded.run(b) for b in images.batches(1)]), ref)
    assert guarded.fp16["first_nonfinite_op"] is None
    assert figures["finite"] and figures["cosine"] >= 0.999
    assert info["norm_statistics"]["max_squared_deviation"] > info["norm_statistics"]["fp16_max"]


def test_corrupted_weights_inside_the_package_fail_validation(setup, tmp_path):
    """The interpreter runs the package's own weight blob: corrupt it and validation fails."""
    authors, images, spec = setup
    path = tmp_path / "m.mlpackage"
    _export(authors, images, spec, path, "fp32")
    blob = path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(blob.read_bytes())
    # the blob file: 64-byte aligned records, each a header (0xDEADBEEF, dtype, size, offset) then data
    corrupted = 0
    for pos in range(64, len(data), 64):
        if data[pos : pos + 4] != b"\xef\xbe\xad\xde":
            continue
        size, offset = (int.from_bytes(data[pos + k : pos + k + 8], "little") for k in (8, 16))
        w = np.frombuffer(bytes(data[offset : offset + size]), dtype=np.float32).copy()
        w[::7] *= -3.0  # every 7th weight, in place: same size, same offsets
        data[offset : offset + size] = w.tobytes()
        corrupted += 1
    assert corrupted > 10
    blob.write_bytes(bytes(data))
    with torch.no_grad():
        ref = authors(torch.from_numpy(images.tensor)).numpy()
    report = validate(CoreMLRunner(path, spec, emulate=True), images, ref, 1, bounds_for("fp32"))
    assert not report["passed"] and "max abs" in report["problems"][0]
