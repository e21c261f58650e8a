"""cloformer-validate --by-block: the block boundaries, the first-departure rule, and a corrupted block found."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from cloformer_deploy.pipeline.by_block import (
    DEPARTURE_FLOOR,
    DEPARTURE_JUMP,
    JSON_NAME,
    MD_NAME,
    PNG_NAME,
    block_figures,
    drift_by_block,
    first_departure,
)
from cloformer_deploy.pipeline.schema import problem


def _blocks(errors):
    return [{"name": f"b{i}", "exposed": e is not None, "finite": True, "rel_err": e} for i, e in enumerate(errors)]


def test_no_departure_while_errors_grow_as_rounding_does():
    assert first_departure(_blocks([3e-7, 5e-7, 8e-7, 6e-7])) is None  # fp32
    assert first_departure(_blocks([3e-4, 5e-4, 8e-4, 9e-4])) is None  # fp16: under the floor


def test_the_first_block_that_jumps_past_the_floor_departs():
    errors = [1e-6, 2e-6, 0.3, 0.5]
    assert first_departure(_blocks(errors)) == "b2"
    assert first_departure(_blocks([1e-6, 2e-6, 0.3])) == "b2"  # the last block has no next one to carry it
    # at int8's level, a jump of less than DEPARTURE_JUMP times what came before is carried error
    assert first_departure(_blocks([0.009, 0.011, 0.02, 0.03])) is None
    assert first_departure(_blocks([0.009, 0.011, 0.02, 0.02 * DEPARTURE_JUMP * 1.01, 0.1])) == "b3"
    # the stem departs on its own once past the floor: nothing before it carries error
    assert first_departure(_blocks([DEPARTURE_FLOOR * 2, 0.03])) == "b0"


def test_an_error_the_next_block_does_not_carry_is_not_a_departure():
    # one boundary's value alone is off (a converter named another block's value after it): not where drift starts
    assert first_departure(_blocks([1e-6, 0.6, 2e-6, 3e-6])) is None
    assert first_departure(_blocks([0.009, 0.6, 0.012, 0.02, 0.3, 0.4])) == "b4"
    # FAT-B0's int8 .tflite: its stem reads 0.64 and the first block 0.013: the stem's value is not carried on; the
    # first block's, past the floor, is
    assert first_departure(_blocks([0.64, 0.0133, 0.0274, 0.03])) == "b1"


def test_a_hidden_block_is_skipped_and_a_non_finite_one_departs():
    assert first_departure(_blocks([1e-6, None, 0.5])) == "b2"
    blocks = _blocks([1e-6, 1e-6])
    blocks[1]["finite"] = False
    assert first_departure(blocks) == "b1"


def test_figures_read_a_channels_last_map_in_pytorchs_layout():
    ref = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    same = block_figures(ref.transpose(0, 2, 3, 1), ref)
    assert same["max_abs"] == 0 and same["rel_err"] == 0 and same["cosine"] == pytest.approx(1.0)
    off = block_figures(ref * 1.1, ref)
    assert off["rel_err"] == pytest.approx(0.1, rel=1e-5)
    with pytest.raises(ValueError, match="not the boundary"):
        block_figures(np.zeros((2, 7)), ref)


def test_boundaries_are_the_models_blocks_in_network_order(tiny_variant):
    from cloformer_deploy import create_model
    from cloformer_deploy.models.blocks import BoundaryModule, block_outputs, block_paths

    model = create_model(tiny_variant, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    paths = block_paths(model, x)
    assert paths[0] == "patch_embed" and paths[-1] == "head"
    stage_blocks = [p for p in paths if p.startswith("layers.")]
    assert stage_blocks == [f"layers.{s}.blocks.{b}" for s, b in (tuple(p.split(".")[1::2]) for p in stage_blocks)]
    assert len(stage_blocks) == sum(len(stage.blocks) for stage in model.layers)
    outs = block_outputs(model, paths, x.numpy())
    with torch.no_grad():
        logits = model(x).numpy()
    np.testing.assert_array_equal(outs["head"], logits)
    probe = BoundaryModule(model, paths[:-1])
    with torch.no_grad():
        got = probe(x)
    assert len(got) == len(paths)
    np.testing.assert_array_equal(got[1].numpy(), outs[paths[0]])


def _onnx_only(bundle, folder, corrupt: str | None = None):
    """The bundle's fp32 ONNX artifact alone, one block's weights scaled inside the file when ``corrupt``; the
    manifest's hash follows the file, as a converter's mistake would leave it."""
    src = bundle.bundle
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.pte", "*.tflite", "*.mlpackage", "*.zip"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"] = [e for e in manifest["artifacts"] if e["format"] == "onnx" and e["precision"] == "fp32"]
    entry = manifest["artifacts"][0]
    path = folder / entry["path"]
    if corrupt:
        model = onnx.load(str(path))
        hit = [t for t in model.graph.initializer if t.name.startswith(corrupt + ".") and len(t.dims) == 4]
        assert hit, f"no convolution weight of {corrupt} in the graph"
        for t in hit:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * -3.0, t.name))
        onnx.save(model, str(path))
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    entry["size_bytes"] = path.stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


def test_a_corrupted_block_inside_the_file_is_named(tiny_bundle, tiny_checkpoint, tmp_path):
    from cloformer_deploy.models.blocks import block_paths

    clean = drift_by_block(
        bundle=str(_onnx_only(tiny_bundle, tmp_path / "clean")), weights=str(tiny_checkpoint), out=str(tmp_path / "c")
    )
    row = clean.document["artifacts"][0]
    assert row["probe"] is False and row["final_vs_shipped"]["bit_exact"]
    assert row["first_departure"] is None
    shown = [b for b in row["blocks"] if b["exposed"]]
    assert len(shown) >= len(row["blocks"]) - 2 and max(b["rel_err"] for b in shown) < 1e-4
    assert problem("drift_by_block", clean.document) is None
    for name in (JSON_NAME, MD_NAME, PNG_NAME):
        assert (tmp_path / "c" / name).stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted([JSON_NAME, MD_NAME, PNG_NAME])  # no probes

    blocks = [b["name"] for b in row["blocks"] if b["name"].startswith("layers.")]
    target = blocks[len(blocks) // 2]
    broken = drift_by_block(
        bundle=str(_onnx_only(tiny_bundle, tmp_path / "broken", corrupt=target)),
        weights=str(tiny_checkpoint),
        out=str(tmp_path / "b"),
    )
    row = broken.document["artifacts"][0]
    assert row["first_departure"] == target
    before = [b for b in row["blocks"][: [b["name"] for b in row["blocks"]].index(target)] if b["exposed"]]
    assert before and max(b["rel_err"] for b in before) < 1e-4
    assert target in (tmp_path / "b" / MD_NAME).read_text()
    assert block_paths  # the same names the model's modules have

    # a plain validation of the broken file fails, and its verdict names the block and the command
    from cloformer_deploy.pipeline import validate_bundle

    ok, reports = validate_bundle(bundle=str(tmp_path / "broken"), weights=str(tiny_checkpoint))
    assert not ok
    said = reports[0]["problems"][-1]
    assert f"first departs at {target}" in said and "--by-block" in said


def test_by_block_bad_input_is_one_line_and_writes_nothing(tiny_bundle, tmp_path, capsys):
    from cloformer_deploy.cli import validate_main

    out = tmp_path / "out"
    code = validate_main([str(tiny_bundle.bundle), "--by-block", "--data", str(tmp_path), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--by-block" in err[0] and "Traceback" not in err[0]
    assert not out.exists()
    code = validate_main([str(tmp_path / "missing"), "--by-block"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1


@pytest.mark.e2e
def test_every_format_of_the_bundle_by_block(tiny_bundle, tiny_checkpoint, tmp_path, capsys):
    from cloformer_deploy.cli import validate_main

    code = validate_main(
        [str(tiny_bundle.bundle), "--weights", str(tiny_checkpoint), "--by-block", "--out", str(tmp_path), "-q"]
    )
    doc = json.loads((tmp_path / JSON_NAME).read_text())
    assert problem("drift_by_block", doc) is None
    rows = {(a["format"], a["precision"]): a for a in doc["artifacts"]}
    assert code == 0, [a.get("error") for a in doc["artifacts"]]
    for (fmt, precision), a in rows.items():
        if fmt == "executorch" and precision == "int8":
            assert "note" in a  # said, not run
            continue
        assert a["probe"] is (fmt == "executorch")
        if fmt in ("onnx", "tflite", "coreml"):
            assert a["final_vs_shipped"]["bit_exact"], (fmt, precision)
        if precision == "fp16":
            shown = [b["rel_err"] for b in a["blocks"] if b["exposed"]]
            assert len(shown) >= len(a["blocks"]) - 2 and max(shown) < 1e-2, (fmt, shown)
        if precision == "fp32":
            shown = [b["rel_err"] for b in a["blocks"] if b["exposed"]]
            assert max(shown) < 1e-4, (fmt, shown)
            assert a["first_departure"] is None
    printed = capsys.readouterr().out
    assert "first departure" in printed and JSON_NAME in printed


@pytest.mark.e2e
def test_native_runners_return_every_output_as_python_does(tiny_bundle, tiny_checkpoint, native_runners, tmp_path):
    """The files showing their block boundaries, run by each native runner: every output, bit-exact with the
    Python runtime's (integer tensors as their stored values)."""
    from cloformer_deploy.formats import BACKENDS
    from cloformer_deploy.images import load_images
    from cloformer_deploy.models.blocks import block_paths
    from cloformer_deploy.models.deploy import deploy_form
    from cloformer_deploy.pipeline.by_block import _probe_job
    from cloformer_deploy.pipeline.opened import open_bundle
    from cloformer_deploy.targets.local import LocalTarget

    opened = open_bundle(tiny_bundle.bundle, tiny_checkpoint)
    spec = opened.spec
    batch = next(load_images(spec.input_size, spec.mean, spec.std).batches(spec.batch))
    example = torch.from_numpy(batch.tensor)
    paths = block_paths(opened.prepared.module, example)
    local = LocalTarget()
    checked = set()
    try:
        for entry in opened.manifest["artifacts"]:
            fmt = entry["format"]
            if fmt not in ("onnx", "tflite", "executorch") or not local.runs_natively(fmt):
                continue
            module = deploy_form(opened.prepared.module, spec.input_size, entry["deploy_steps"])
            job = _probe_job(BACKENDS[fmt], entry, module, example, spec, entry["precision"])
            exposed = BACKENDS[fmt].expose_blocks(opened.folder / entry["path"], job, paths, tmp_path, lambda t: None)
            python = BACKENDS[fmt].open(exposed.path, spec, entry).run_outputs(batch)
            native = local.runner(fmt, exposed.path, spec, entry, native=True)
            assert native.describe().get("runner") == "native"
            got = native.run_outputs(batch)
            assert len(got) == len(python) == max(exposed.outputs.values()) + 1
            for a, b in zip(python, got):
                np.testing.assert_array_equal(a.reshape(-1), b.reshape(-1))
            checked.add(fmt)
    finally:
        local.close()
    assert checked == {"onnx", "tflite", "executorch"}
