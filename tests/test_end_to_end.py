"""CloFormer-XXS at 224 with the golden weights through every format: the artifacts reproduce the authors' logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cloformer_deploy.formats import BACKENDS
from cloformer_deploy.formats.base import ModelSpec
from cloformer_deploy.images import ImageBatch
from cloformer_deploy.pipeline import export

from helpers import golden_file

EXPORTED_FP32 = 1e-4  # the golden README's bound for exported fp32 artifacts

pytestmark = pytest.mark.e2e  # CloFormer-XXS at 224 in every format on the golden weights


@pytest.fixture(scope="module")
def golden_bundle(tmp_path_factory):
    data = load_file(str(golden_file("cloformer_xxs.safetensors")))
    tmp = tmp_path_factory.mktemp("e2e")
    ckpt = tmp / "cloformer_xxs.pth"
    torch.save({k[len("weights.") :]: v for k, v in data.items() if k.startswith("weights.")}, ckpt)
    result = export("cloformer-xxs", weights=ckpt, format="all", img_size=224, out=tmp / "export")
    # Core ML also as fp32 with a tensor input, to feed the golden (already normalised) input
    coreml32 = export(
        "cloformer-xxs",
        weights=ckpt,
        format="coreml",
        precision="fp32",
        coreml_input="tensor",
        img_size=224,
        out=tmp / "coreml32",
    )
    result.artifacts += coreml32.artifacts
    return result, data["input.0"].numpy(), data["logits.0"].numpy()


def test_all_formats_pass_validation(golden_bundle):
    result, _, _ = golden_bundle
    assert result.passed and len(result.artifacts) == len(BACKENDS) + 1
    et = next(a.entry for a in result.artifacts if a.format == "executorch")
    assert et["partitions"] == 1 and et["non_delegated_kernels"] == 0
    tflite = next(a.entry for a in result.artifacts if a.format == "tflite")
    assert tflite["partitions"] == 1 and tflite["non_delegated_kernels"] == 0
    coreml16 = next(a.entry for a in result.artifacts if a.format == "coreml" and a.precision == "fp16")
    assert coreml16["validation"]["figures"]["cosine"] >= 0.999  # on real photographs


@pytest.mark.parametrize(
    "fmt, precision", [("onnx", "fp32"), ("executorch", "fp32"), ("coreml", "fp32"), ("tflite", "fp32")]
)
def test_artifact_reproduces_golden_logits(golden_bundle, fmt, precision):
    result, x, expected = golden_bundle
    art = next(a for a in result.artifacts if a.format == fmt and a.precision == precision)
    spec = ModelSpec(
        "cloformer_xxs", 1000, (224, 224), 1, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), None, 0, None, None
    )
    runner = BACKENDS[fmt].open(art.path, spec, art.entry)
    for i in range(x.shape[0]):  # the artifact's static batch is 1
        batch = ImageBatch([f"golden{i}"], np.zeros((1, 224, 224, 3), np.uint8), x[i : i + 1])
        assert np.abs(runner.run(batch) - expected[i : i + 1]).max() <= EXPORTED_FP32
