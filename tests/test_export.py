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

import cloformer_deploy as cd
from cloformer_deploy.cli import export_main, validate_main
from cloformer_deploy.formats import BACKENDS
from cloformer_deploy.images import load_images
from cloformer_deploy.pipeline import export, validate_bundle
from cloformer_deploy.pipeline.bundle import sha256_path

from helpers import TINY_SIZE as SIZE


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
    assert methods == {
        "onnx": "onnxruntime",
        "executorch": "executorch",
        "coreml": "coreml" if sys.platform == "darwin" else "emulated",
        "tflite": "litert",
    }


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
    assert ok and len(reports) == len(BACKENDS)
    copy = tmp_path / bundle.bundle.name
    shutil.copytree(bundle.bundle, copy)
    onnx_file = next(copy.glob("*.onnx"))
    data = bytearray(onnx_file.read_bytes())
    data[-100] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    # a bundle whose files do not match its manifest is bad input: one line, before any work
    assert validate_main([str(copy), "--weights", str(tiny_checkpoint), "-q"]) == 2
    assert "changed since export (sha256 differs" in capsys.readouterr().err


def test_validate_refuses_other_weights(bundle, tmp_path, capsys, tiny_variant):
    import torch

    import cloformer_deploy as cd

    other = tmp_path / "other.pth"
    torch.save(cd.create_model(tiny_variant, num_classes=10).state_dict(), other)
    assert validate_main([str(bundle.bundle), "--weights", str(other)]) == 2
    assert "not the checkpoint" in capsys.readouterr().err


def test_breach_fails_and_is_recorded_not_placed(tiny_variant, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from cloformer_deploy import validation as validate

    monkeypatch.setitem(validate.DEFAULT_BOUNDS, "fp32", validate.Bounds(max_abs=1e-12))  # no export meets it
    rc = export_main(
        [
            "--model",
            tiny_variant,
            "--weights",
            str(tiny_checkpoint),
            "--format",
            "onnx",
            "--img-size",
            "64",
            "--out",
            str(tmp_path),
            "-q",
        ]
    )
    assert rc == 1
    assert not (tmp_path / "cloformer_tiny_test-64x64").exists()
    m = json.loads((tmp_path / "cloformer_tiny_test-64x64.failed" / "manifest.json").read_text())
    assert m["passed"] is False and "max abs" in m["artifacts"][0]["validation"]["problems"][0]


def test_existing_bundle_kept_without_force(bundle, tiny_variant, tiny_checkpoint, capsys):
    before = sha256_path(bundle.bundle)
    rc = export_main(
        [
            "--model",
            tiny_variant,
            "--weights",
            str(tiny_checkpoint),
            "--format",
            "onnx",
            "--img-size",
            "64x96",
            "--out",
            str(bundle.bundle.parent),
        ]
    )
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert sha256_path(bundle.bundle) == before


def test_interrupted_export_leaves_nothing(tiny_variant, tmp_path, monkeypatch):
    backend = BACKENDS["executorch"]

    def broken(job, path, log):
        path.write_bytes(b"half a program")
        raise KeyboardInterrupt

    monkeypatch.setattr(backend, "export", broken)
    with pytest.raises(KeyboardInterrupt):
        export(tiny_variant, format="onnx,executorch", img_size=64, out=tmp_path, num_classes=10)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.e2e
def test_force_replaces_atomically(tiny_variant, tmp_path):
    first = export(tiny_variant, format="onnx", img_size=64, out=tmp_path, num_classes=10, no_validate=True)
    second = export(
        tiny_variant, format="onnx", img_size=64, out=tmp_path, num_classes=10, force=True, no_validate=True, batch=2
    )
    assert (
        first.bundle == second.bundle
        and json.loads((second.bundle / "manifest.json").read_text())["model"]["batch"] == 2
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [second.bundle.name]


@pytest.mark.e2e
def test_batch_and_tensor_input_and_opset17(tiny_variant, tmp_path):
    r = export(
        tiny_variant,
        format="onnx,coreml",
        img_size=64,
        out=tmp_path,
        num_classes=10,
        batch=2,
        opset=17,
        coreml_input="tensor",
        precision="fp32",
    )
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
    r = export(tiny_variant, format="onnx", img_size=64, out=tmp_path / "out", num_classes=10, data=photos)
    assert r.manifest["validation_images"]["count"] == 3
    assert r.artifacts[0].entry["validation"]["figures"]["images"] == 3


def test_default_images_are_real_photographs():
    batch = load_images((64, 64), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert len(batch) >= 10 and batch.images.dtype == np.uint8
    assert batch.images.std() > 30  # photographs, not constant or noise-free fills


def test_cli_subprocess_bad_input_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cloformer_deploy.cli", "--model", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.startswith("cloformer-export")]
    assert lines and "unknown model" in lines[0] and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_random_weights_are_the_same_in_every_run():
    from cloformer_deploy.pipeline import prepare_model

    torch.manual_seed(123)  # the caller's RNG state must neither matter nor change
    state = torch.random.get_rng_state()
    first = prepare_model("cloformer_xxs", None, None)
    a = first.module.state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(456)
    second = prepare_model("cloformer_xxs", None, None)
    b = second.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and first.state_sha256 == second.state_sha256


@pytest.mark.e2e
def test_bundle_of_random_weights_validates_from_its_seed(tiny_variant, tmp_path, capsys):
    """Random weights are drawn from a recorded seed, so their bundle validates without a checkpoint;
    a checkpoint given for it is refused, as the wrong checkpoint is."""
    from cloformer_deploy.runtime_bench.harness import bench

    r = export(tiny_variant, format="onnx", img_size=64, out=tmp_path, num_classes=10, no_validate=True)
    m = r.manifest["model"]
    assert m["random_init"] and m["random_seed"] == 0 and m["state_sha256"]
    assert validate_main([str(r.bundle), "-q"]) == 0
    other = tmp_path / "other.pth"
    torch.save(cd.create_model(tiny_variant, num_classes=10).state_dict(), other)
    assert validate_main([str(r.bundle), "--weights", str(other), "-q"]) == 2
    assert "holds random weights (seed 0)" in capsys.readouterr().err
    res = bench(formats="onnx", threads=1, runs=2, warmup=0, bundle=r.bundle, out=tmp_path / "bench")
    (row,) = res.rows
    assert row["error"] is None and row["drift"]["max_abs"] <= 1e-4 and row["drift"]["top1_agreement"] == 1.0


def test_onnx_fp16_exported_and_validated(tiny_variant, tiny_checkpoint, tmp_path):
    r = export(tiny_variant, weights=tiny_checkpoint, format="onnx", precision="fp16", img_size=SIZE, out=tmp_path)
    assert r.passed
    entry = r.artifacts[0].entry
    v = entry["validation"]
    assert v["passed"] and v["figures"]["cosine"] >= 0.999 and v["figures"]["top1_agreement"] == 1.0
    model = onnx.load(str(r.artifacts[0].path))
    onnx.checker.check_model(model, full_check=True)  # topologically sorted, typed
    weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(weights) > 10 and model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert entry["fp32_nodes_in_fp16_graph"] > 0  # the norm statistics
    # pooling stays fp32: ONNX Runtime on ARM64 has no fp16 NHWC AveragePool kernel (the file would not load)
    typed = onnx.shape_inference.infer_shapes(model).graph
    elem = {v.name: v.type.tensor_type.elem_type for v in [*typed.value_info, *typed.input, *typed.output]}
    pools = [n for n in typed.node if n.op_type == "AveragePool"]
    assert pools and all(elem[n.input[0]] == onnx.TensorProto.FLOAT for n in pools)


def test_onnx_fp16_norm_statistics_stay_finite_where_naive_fp16_overflows(tiny_variant, tmp_path):
    """Stem activations 2000x larger (a norm is scale-free, so the function is the same): squared deviations
    pass fp16's 65504. Ours types every norm statistic fp32 (a naive conversion types them fp16; ONNX Runtime's
    CPU provider happens to compute those in fp32, but fp16 providers would not) and stays accurate."""
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from cloformer_deploy.formats.base import ExportJob, ModelSpec
    from cloformer_deploy.formats.onnx import to_fp16, topological_sort

    torch.manual_seed(0)
    loud = cd.create_model(tiny_variant, num_classes=10)
    with torch.no_grad():
        loud.patch_embed.conv5.weight.mul_(2000)
        loud.patch_embed.conv5.bias.mul_(2000)
    x = load_images((64, 64), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).tensor[:2]
    fp32 = tmp_path / "fp32.onnx"
    spec = ModelSpec(tiny_variant, 10, (64, 64))
    job = ExportJob(cd.to_deploy(loud, (64, 64)), torch.from_numpy(x[:1]), spec, "fp32", {})
    BACKENDS["onnx"].export(job, fp32, print)
    base = onnx.load(str(fp32))
    naive = convert_float_to_float16(base, keep_io_types=True)
    topological_sort(naive.graph)
    ours, kept = to_fp16(base)

    def run(model):
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))])

    def statistic_types(model):
        typed = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type for v in typed.graph.value_info}
        return {types.get(n.output[0]) for n in typed.graph.node if n.op_type in ("ReduceMean", "Sqrt", "Reciprocal")}

    assert statistic_types(naive) == {onnx.TensorProto.FLOAT16}
    assert statistic_types(ours) == {onnx.TensorProto.FLOAT}
    with torch.no_grad():
        ref = loud(torch.from_numpy(x)).numpy()
    out = run(ours)
    cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
    assert kept > 0 and np.isfinite(out).all() and cos.min() >= 0.999


@pytest.mark.e2e
def test_precisions_and_formats_exported_separately_share_one_bundle(tiny_variant, tmp_path, capsys):
    """fp16 then fp32 Core ML, then ONNX: each run adds to the bundle; --force replaces only its own artifact."""
    common = dict(img_size=64, out=tmp_path, num_classes=10, no_validate=True)
    a = export(tiny_variant, format="coreml", precision="fp16", **common)
    b = export(tiny_variant, format="coreml", precision="fp32", **common)
    c = export(tiny_variant, format="onnx", **common)
    assert a.bundle == b.bundle == c.bundle
    names = sorted(p.name for p in a.bundle.iterdir())
    assert names == sorted(
        [
            "labels.txt",
            "manifest.json",
            "cloformer_tiny_test-64x64-fp16.mlpackage",
            "cloformer_tiny_test-64x64-fp32.mlpackage",
            "cloformer_tiny_test-64x64-fp32.onnx",
        ]
    )
    manifest = json.loads((a.bundle / "manifest.json").read_text())
    assert [(e["format"], e["precision"]) for e in manifest["artifacts"]] == [
        ("coreml", "fp16"),
        ("coreml", "fp32"),
        ("onnx", "fp32"),
    ]
    fp16 = next(e for e in manifest["artifacts"] if e["precision"] == "fp16")
    assert fp16["sha256"] == sha256_path(a.bundle / fp16["path"])  # kept byte for byte
    kept_sha = {e["path"]: e["sha256"] for e in manifest["artifacts"]}
    d = export(tiny_variant, format="onnx", force=True, **common)
    after = {e["path"]: e["sha256"] for e in d.manifest["artifacts"]}
    assert (
        set(after) == set(kept_sha)
        and after["cloformer_tiny_test-64x64-fp16.mlpackage"] == kept_sha["cloformer_tiny_test-64x64-fp16.mlpackage"]
    )
    assert [a.format for a in d.artifacts] == ["onnx"]  # the result lists what this run wrote
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bundle_folders_follow_the_umask(tiny_variant, tmp_path):
    old = os.umask(0o022)
    try:
        r = export(tiny_variant, format="onnx", img_size=64, out=tmp_path, num_classes=10, no_validate=True)
    finally:
        os.umask(old)
    assert r.bundle.stat().st_mode & 0o777 == 0o755


def test_calibration_gives_the_requested_count_or_says_why_not(tmp_path):
    from PIL import Image

    from cloformer_deploy.images import load_calibration

    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    assert len(load_calibration((64, 64), mean, std, count=32)) == 32  # default photographs: 3 views each
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    assert len(load_calibration((64, 64), mean, std, folder=tmp_path, count=32)) == 6


@pytest.mark.e2e
def test_api_prints_nothing_but_our_own_progress(tiny_variant, tiny_checkpoint, tmp_path, capfd):
    """Converters' warnings, progress bars and the ExecuTorch runtime's native cpuinfo lines stay off the
    terminal, from the Python API too (file descriptor level: capfd sees what C++ writes)."""
    import io

    from cloformer_deploy.progress import Progress

    log = io.StringIO()
    r = export(
        tiny_variant,
        weights=tiny_checkpoint,
        format="executorch,coreml",
        img_size=64,
        out=tmp_path,
        progress=Progress(stream=log, plain_interval=0),
    )
    assert r.passed
    out, err = capfd.readouterr()
    assert err == "" and out == "", (out, err)
    text = log.getvalue()
    assert "executorch: validate: 12/12 images" in text  # progress inside a long stage
    assert "cpuinfo" not in text and "coremltools" not in text


@pytest.mark.e2e
def test_executorch_fp16_is_one_partition_and_validated(tiny_variant, tiny_checkpoint, tmp_path):
    r = export(
        tiny_variant, weights=tiny_checkpoint, format="executorch", precision="fp16", img_size=SIZE, out=tmp_path
    )
    entry = r.artifacts[0].entry
    assert r.passed and entry["validation"]["figures"]["top1_agreement"] == 1.0
    assert entry["partitions"] == 1 and entry["non_delegated_kernels"] == 0 and entry["input_dtype"] == "float16"
    assert {"gelu_as_erfc_polynomial", "silu_as_sigmoid_product"} <= set(entry["deploy_steps"])
    runner = BACKENDS["executorch"].open(r.artifacts[0].path, None, entry)
    assert runner.dtype == np.float16
    # no mean of a value times itself (variance_from_two_differences); every value is fp16 in the file
    from cloformer_deploy.formats.executorch import xnnpack_graphs, xnnpack_tensors

    (graph,) = xnnpack_graphs(r.artifacts[0].path)
    # flatc leaves out a field at its default: an id of 0
    nodes = [(n["xnode_union_type"], n["xnode_union"]) for n in graph["xnodes"]]
    squares = {
        u.get("output_id", 0)
        for kind, u in nodes
        if kind == "XNNMultiply" and u.get("input1_id", 0) == u.get("input2_id", 0)
    }
    means = [u for kind, u in nodes if kind == "XNNGlobalAvgPooling2d"]
    assert means and not [u for u in means if u.get("input_id", 0) in squares]
    assert {t["datatype"] for t in xnnpack_tensors(graph).values()} == {"xnn_datatype_fp16"}


@pytest.mark.e2e
def test_executorch_fp16_scales_loud_norms_and_stays_accurate(tiny_variant, tmp_path):
    """Stem activations 2000x larger: squared deviations pass fp16's 65504. The export scales those norms'
    inputs and stays one partition and accurate. (The eager fp16 test shows the overflow the scaling prevents.)"""
    from cloformer_deploy.formats.base import ExportJob, ModelSpec
    from cloformer_deploy.formats.executorch import ExecuTorchRunner
    from cloformer_deploy.images import ImageBatch
    from cloformer_deploy.models.deploy import FP16_XNNPACK_STEPS

    torch.manual_seed(0)
    loud = cd.create_model(tiny_variant, num_classes=10).eval()
    with torch.no_grad():
        loud.patch_embed.conv5.weight.mul_(2000)
        loud.patch_embed.conv5.bias.mul_(2000)
    images = load_images((64, 64), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with torch.no_grad():
        ref = loud(torch.from_numpy(images.tensor)).numpy()
    spec = ModelSpec(tiny_variant, 10, (64, 64))
    steps, extra = BACKENDS["executorch"].deploy_steps("fp16", {})
    assert set(FP16_XNNPACK_STEPS) <= set(extra)
    module = cd.to_deploy(loud, (64, 64), steps=steps, extra_steps=extra)
    job = ExportJob(module, torch.from_numpy(images.tensor[:1]), spec, "fp16", {}, None, images.tensor)
    info = BACKENDS["executorch"].export(job, tmp_path / "scaled.pte", lambda text: None)
    assert info["scaled_norms"] and info["partitions"] == 1 and info["non_delegated_kernels"] == 0

    def cosine(path):
        runner = ExecuTorchRunner(path)
        out = np.concatenate(
            [
                runner.run(ImageBatch(["x"], images.images[i : i + 1], images.tensor[i : i + 1]))
                for i in range(len(images))
            ]
        )
        return np.nan_to_num((out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1))

    assert cosine(tmp_path / "scaled.pte").min() >= 0.999


@pytest.fixture(scope="module")
def reduced(tiny_variant, tmp_path_factory):
    """The tiny model in fp16 and int8 in every format that offers them (one bundle)."""
    from cloformer_deploy.formats import BACKENDS

    out = tmp_path_factory.mktemp("reduced")
    for precision in ("fp16", "int8"):
        formats = ",".join(n for n, b in BACKENDS.items() if precision in b.precisions)
        result = export(tiny_variant, format=formats, precision=precision, img_size=64, out=out, num_classes=10)
    return result.bundle


@pytest.mark.e2e
def test_reduced_precision_artifacts_store_their_weights_reduced(reduced):
    """An fp16 artifact of any format stores its convolution and linear weights in fp16, an int8 one in int8: the
    wider types hold only what a precision keeps wide (norm parameters, int8 biases, scales): at most a quarter
    in the tiny model, whose layers are narrow (a few percent in CloFormer-XXS)."""
    from cloformer_deploy.formats import BACKENDS

    manifest = json.loads((reduced / "manifest.json").read_text())
    seen = set()
    for entry in manifest["artifacts"]:
        stored = BACKENDS[entry["format"]].weight_storage(reduced / entry["path"])
        assert stored == entry["weight_bytes"], entry["path"]  # the manifest says what the file holds
        total = sum(stored.values())
        narrow = stored.get("fp16" if entry["precision"] == "fp16" else "int8", 0)
        assert narrow >= 0.75 * total, f"{entry['path']} stores {stored}"
        seen.add((entry["format"], entry["precision"]))
    assert seen == {(n, p) for n, b in BACKENDS.items() for p in ("fp16", "int8") if p in b.precisions}


@pytest.mark.e2e
def test_fp16_pte_is_about_half_the_fp32_file(reduced, bundle):
    fp32 = json.loads((bundle.bundle / "manifest.json").read_text())
    fp16 = json.loads((reduced / "manifest.json").read_text())
    (a,) = [e for e in fp32["artifacts"] if e["format"] == "executorch"]
    (b,) = [e for e in fp16["artifacts"] if e["format"] == "executorch" and e["precision"] == "fp16"]
    assert sum(b["weight_bytes"].values()) == pytest.approx(sum(a["weight_bytes"].values()) / 2, rel=0.02)
    assert b["partitions"] == 1 and b["non_delegated_kernels"] == 0
