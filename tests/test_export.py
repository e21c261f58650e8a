"""cloformer-export and cloformer-validate: artifacts, validation, bundle, metadata, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
import torch

from cloformer_deploy.cli import export_main, validate_main
from cloformer_deploy.export import BACKENDS, export, validate_bundle
from cloformer_deploy.export.bundle import sha256_path
from cloformer_deploy.export.images import load_images

from conftest import TINY_SIZE as SIZE


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle


def test_every_format_exported_and_validated(bundle):
    assert bundle.passed
    assert [a.format for a in bundle.artifacts] == list(BACKENDS)
    for a in bundle.artifacts:
        v = a.entry["validation"]
        assert v["passed"], (a.format, v)
        assert v["figures"]["images"] >= 10
        if a.precision == "fp32":
            assert v["figures"]["max_abs"] <= 1e-4
        else:
            assert v["figures"]["cosine"] >= 0.999
    methods = {a.format: a.entry["validation"]["method"] for a in bundle.artifacts}
    assert methods == {"onnx": "onnxruntime", "executorch": "executorch",
                       "coreml": "coreml" if sys.platform == "darwin" else "emulated"}


def test_bundle_layout_and_manifest(bundle):
    folder = bundle.bundle
    assert folder.name == f"cloformer_tiny_test-{SIZE[0]}x{SIZE[1]}"
    m = json.loads((folder / "manifest.json").read_text())
    assert m["model"]["num_classes"] == 10 and m["model"]["input_size"] == list(SIZE)
    assert m["model"]["weights_sha256"] and not m["model"]["random_init"]
    assert m["preprocessing"]["mean"] == [0.485, 0.456, 0.406] and m["preprocessing"]["color_order"] == "RGB"
    assert {"torch", "onnx", "onnxruntime", "coremltools", "executorch", "cloformer_deploy"} <= set(m["versions"])
    assert (folder / "labels.txt").read_text().splitlines() == [str(i) for i in range(10)]
    for entry in m["artifacts"]:
        path = folder / entry["path"]
        assert path.exists() and entry["sha256"] == sha256_path(path) and entry["size_bytes"] > 10_000
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "no staging leftovers"
    with zipfile.ZipFile(bundle.zip_path) as z:
        assert f"{folder.name}/manifest.json" in z.namelist()


def test_onnx_artifact(bundle):
    entry = next(a.entry for a in bundle.artifacts if a.format == "onnx")
    model = onnx.load(str(bundle.bundle / entry["path"]))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17 and entry["simplified"]
    assert not [n for n in model.graph.node if n.op_type == "Shape"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["model"] == "cloformer_tiny_test" and meta["input_size"] == "64x96"
    assert json.loads(meta["mean"]) == [0.485, 0.456, 0.406] and len(json.loads(meta["labels"])) == 10
    assert model.graph.input[0].name == "input"
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, *SIZE]


def test_executorch_artifact_is_one_xnnpack_partition(bundle):
    entry = next(a.entry for a in bundle.artifacts if a.format == "executorch")
    assert entry["partitions"] == 1 and entry["non_delegated_kernels"] == 0
    runner = BACKENDS["executorch"].open(bundle.bundle / entry["path"], None, entry)
    assert runner.constant("input_size") == list(SIZE) and runner.constant("num_classes") == [10]
    assert runner.constant("mean") == pytest.approx([0.485, 0.456, 0.406])


def test_coreml_artifact_structure(bundle):
    import coremltools as ct

    entry = next(a.entry for a in bundle.artifacts if a.format == "coreml")
    assert entry["precision"] == "fp16" and entry["classifier"] and entry["input"] == "image"
    # the norm statistics stay fp32 inside the fp16 program
    assert entry["fp32_ops_in_fp16_program"] > 0 and entry["ops"]["cast"] > 0
    mlmodel = ct.models.MLModel(str(bundle.bundle / entry["path"]), skip_model_load=True)
    spec = mlmodel.get_spec()
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.description.input[0].type.imageType.height == SIZE[0]
    meta = dict(spec.description.metadata.userDefined)
    assert meta["model"] == "cloformer_tiny_test" and meta["mean"] == "0.485,0.456,0.406"
    assert spec.description.metadata.author and spec.description.metadata.shortDescription
    v = entry["validation"]
    assert v["method"] in ("emulated", "coreml") and v["figures"]["cosine"] >= 0.999
    if v["method"] == "emulated":  # the fp16 report names ops, and nothing overflowed
        assert v["fp16"]["first_nonfinite_op"] is None and v["fp16"]["largest_fp16_departures"]


def test_validate_bundle_passes_and_detects_tampering(bundle, tiny_checkpoint, tmp_path, capsys):
    import shutil

    ok, reports = validate_bundle(bundle.bundle, weights=tiny_checkpoint)
    assert ok and len(reports) == 3
    copy = tmp_path / bundle.bundle.name
    shutil.copytree(bundle.bundle, copy)
    onnx_file = next(copy.glob("*.onnx"))
    data = bytearray(onnx_file.read_bytes())
    data[-100] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    assert validate_main([str(copy), "--weights", str(tiny_checkpoint), "-q"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_validate_refuses_other_weights(bundle, tmp_path, capsys, tiny_variant):
    import torch

    import cloformer_deploy as cd
    other = tmp_path / "other.pth"
    torch.save(cd.create_model(tiny_variant, num_classes=10).state_dict(), other)
    assert validate_main([str(bundle.bundle), "--weights", str(other)]) == 2
    assert "not the checkpoint" in capsys.readouterr().err


def test_breach_fails_and_is_recorded_not_placed(tiny_variant, tiny_checkpoint, tmp_path, capsys):
    rc = export_main(["--model", tiny_variant, "--weights", str(tiny_checkpoint), "--format", "onnx",
                      "--img-size", "64", "--out", str(tmp_path), "--min-top1-agreement", "1.5", "-q"])
    assert rc == 1
    assert not (tmp_path / "cloformer_tiny_test-64x64").exists()
    m = json.loads((tmp_path / "cloformer_tiny_test-64x64.failed" / "manifest.json").read_text())
    assert m["passed"] is False and "top-1 agreement" in m["artifacts"][0]["validation"]["problems"][0]


def test_existing_bundle_kept_without_force(bundle, tiny_variant, tiny_checkpoint, capsys):
    before = sha256_path(bundle.bundle)
    rc = export_main(["--model", tiny_variant, "--weights", str(tiny_checkpoint), "--format", "onnx",
                      "--img-size", "64x96", "--out", str(bundle.bundle.parent)])
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert sha256_path(bundle.bundle) == before


def test_interrupted_export_leaves_nothing(tiny_variant, tmp_path, monkeypatch):
    backend = BACKENDS["executorch"]

    def broken(job, path, log):
        path.write_bytes(b"half a program")
        raise KeyboardInterrupt

    monkeypatch.setattr(backend, "export", broken)
    with pytest.raises(KeyboardInterrupt):
        export(tiny_variant, formats="onnx,executorch", img_size=64, out=tmp_path, num_classes=10)
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_atomically(tiny_variant, tmp_path):
    first = export(tiny_variant, formats="onnx", img_size=64, out=tmp_path, num_classes=10, validate_artifacts=False)
    second = export(tiny_variant, formats="onnx", img_size=64, out=tmp_path, num_classes=10, force=True,
                    validate_artifacts=False, batch=2)
    assert first.bundle == second.bundle and json.loads((second.bundle / "manifest.json").read_text())["model"]["batch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [second.bundle.name]


def test_batch_and_tensor_input_and_opset17(tiny_variant, tmp_path):
    r = export(tiny_variant, formats="onnx,coreml", img_size=64, out=tmp_path, num_classes=10, batch=2,
               opset=17, coreml_input="tensor", precision="fp32")
    assert r.passed
    onnx_model = onnx.load(str(next(r.bundle.glob("*.onnx"))))
    assert onnx_model.opset_import[0].version == 17
    assert onnx_model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    coreml = next(a.entry for a in r.artifacts if a.format == "coreml")
    assert coreml["input"] == "tensor" and not coreml["classifier"]  # batch 2: a tensor of logits


def test_data_folder_used_for_validation(tiny_variant, tmp_path):
    from PIL import Image
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(photos / f"p{i}.jpg")
    (photos / "notes.txt").write_text("not an image")
    r = export(tiny_variant, formats="onnx", img_size=64, out=tmp_path / "out", num_classes=10, data=photos)
    assert r.manifest["validation_images"]["count"] == 3
    assert r.artifacts[0].entry["validation"]["figures"]["images"] == 3


def test_default_images_are_real_photographs():
    batch = load_images((64, 64), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert len(batch) >= 10 and batch.images.dtype == np.uint8
    assert batch.images.std() > 30  # photographs, not constant or noise-free fills


BAD_INPUTS = [
    (["--model", "resnet50"], "choose one of"),
    (["--format", "tflite"], "choose from: onnx, coreml, executorch, all"),
    (["--img-size", "230"], "use 224x224"),
    (["--img-size", "abc"], "use 224 or HxW"),
    (["--data", "{tmp}/missing"], "is not a folder"),
    (["--data", "{tmp}/empty"], "holds no .jpg/.png"),
    (["--out", "{tmp}/file.txt/out"], "not writable"),
    (["--weights", "{tmp}/other.pth"], "not cloformer_xxs; use --model cloformer-xs"),
    (["--format", "executorch", "--precision", "fp16"], "not offered for executorch"),
    (["--labels", "{tmp}/labels.txt"], "has 2 names but the model has 1000 classes"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[a[0][1] for a in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_nothing_written(args, message, tmp_path, capsys):
    import torch

    import cloformer_deploy as cd
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    if any("other.pth" in a for a in args):
        torch.save(cd.create_model("cloformer_xs").state_dict(), tmp_path / "other.pth")
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(out)]
    try:
        rc = export_main(argv + ["-q"])
    except SystemExit as e:  # argparse's own errors exit directly
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_subprocess_bad_input_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cloformer_deploy.cli", "--model", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.startswith("cloformer-export")]
    assert lines and "unknown model" in lines[0] and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_random_weights_are_the_same_in_every_run():
    from cloformer_deploy.export.api import prepare_model

    torch.manual_seed(123)  # the caller's RNG state must neither matter nor change
    state = torch.random.get_rng_state()
    a = prepare_model("cloformer_xxs", None, None)[1].state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(456)
    b = prepare_model("cloformer_xxs", None, None)[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
