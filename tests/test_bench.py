"""cloformer-bench measures and reports: on a tiny model with few runs. Timings are printed, never asserted."""

from __future__ import annotations

import csv
import json

import pytest

from cloformer_deploy.cli import bench_main
from cloformer_deploy.runtime_bench.harness import bench


@pytest.fixture(scope="module")
def result(tiny_variant, tiny_checkpoint, tmp_path_factory):
    return bench(
        tiny_variant,
        weights=tiny_checkpoint,
        formats="torch,onnx,executorch,coreml",
        threads=(1, 2),
        runs=4,
        warmup=1,
        img_size=64,
        compare_authors=True,
        out=tmp_path_factory.mktemp("bench"),
    )


@pytest.mark.e2e
def test_rows_cover_every_runtime_form_and_thread_count(result):
    keys = {(r["form"], r["runtime"], r["threads"]) for r in result.rows}
    for form in ("deploy", "authors"):
        for rt in ("torch", "onnxruntime", "executorch-xnnpack"):
            assert {(form, rt, 1), (form, rt, 2)} <= keys
    assert ("deploy", "coreml", None) in keys
    assert not [r for r in result.rows if r["error"]], [r["error"] for r in result.rows if r["error"]]


@pytest.mark.e2e
def test_each_row_is_measured(result):
    for r in result.rows:
        if r["runtime"] == "coreml":
            assert r["latency_ms"] is None and r["note"] and r["drift"]["cosine"] >= 0.999
            continue
        lat = r["latency_ms"]
        assert lat["runs"] == 4 and 0 < lat["min"] <= lat["median"] <= lat["p90"]
        assert r["load_ms"] > 0 and r["peak_rss_mb"] > 0 and r["size_mb"] > 0
        # a Python process holds the interpreter and its modules; a native runner only the model and its runtime
        assert r["peak_rss_mb"] > 50 if r["runner"] == "python" else r["peak_rss_mb"] < 150
        assert r["drift"]["max_abs"] <= 1e-4 and r["drift"]["top1_agreement"] == 1.0
        assert r["gflops_per_s"] > 0 and r["efficiency"] > 0
    xnn = [r for r in result.rows if r["runtime"] == "executorch-xnnpack" and r["form"] == "deploy"]
    assert all(r["delegation"]["partitions"] == 1 for r in xnn)


@pytest.mark.e2e
def test_machine_and_outputs_written(result):
    m = result.results["machine"]
    assert m["cpu"] and m["cores"] >= 1 and set(m["matmul_gflops"]) == {"1", "2"}
    assert all(v > 0 for v in m["matmul_gflops"].values())
    saved = json.loads((result.out / "results.json").read_text())
    assert len(saved["rows"]) == len(result.rows)
    with open(result.out / "results.csv") as f:
        assert len(list(csv.reader(f))) == len(result.rows) + 1
    md = (result.out / "results.md").read_text()
    assert "| model |" in md and "Deploy form vs the authors' form" in md
    assert (result.out / "latency.png").stat().st_size > 10_000
    assert (result.out / "latency_vs_drift.png").stat().st_size > 10_000


def test_failing_runtime_becomes_an_error_row(tiny_variant, tmp_path, monkeypatch):
    from cloformer_deploy.runtime_bench import harness

    real = harness._artifacts

    def broken(*args, **kwargs):
        arts = real(*args, **kwargs)
        arts[("deploy", "onnxruntime", "fp32")]["path"] = str(tmp_path / "missing.onnx")
        return arts

    monkeypatch.setattr(harness, "_artifacts", broken)
    r = bench(tiny_variant, formats="torch,onnx", threads=(1,), runs=2, warmup=0, img_size=64, out=tmp_path)
    rows = {r_["runtime"]: r_ for r_ in r.rows}
    assert rows["onnxruntime"]["error"] and rows["onnxruntime"]["latency_ms"] is None
    assert rows["torch"]["latency_ms"] is not None and rows["torch"]["error"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--formats", "tensorrt"], "unknown runtime"),
        (["--threads", "a"], "--threads"),
        (["--img-size", "100"], "multiple of 32"),
        (["--model", "vgg"], "unknown model"),
    ],
)
def test_bad_input(args, message, tmp_path, capsys):
    assert bench_main(args + ["--out", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_labelled_folder_gives_top1_and_top5(tmp_path):
    import numpy as np
    from PIL import Image

    from cloformer_deploy.images import load_images
    from cloformer_deploy.runtime_bench.harness import _accuracy, _labelled

    rng = np.random.default_rng(0)
    for cls in ("n01", "n02", "n03"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    images = load_images((32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), folder=tmp_path)
    labels = _labelled(images, tmp_path)
    assert labels == [0, 0, 1, 1, 2, 2]
    logits = np.zeros((6, 10))
    logits[np.arange(6), labels] = 1.0  # right
    logits[1] = np.arange(10)  # class 0 is not in image 1's top-5
    logits[3, 1], logits[3, 9] = 2.0, 5.0  # class 1 second: in top-5, not top-1
    acc = _accuracy(logits, labels)
    assert acc == {"top1": 4 / 6, "top5": 5 / 6, "images": 6}
    assert _labelled(images, None) is None


@pytest.mark.slow
def test_ablation_table_covers_every_step_and_the_shipped_forms(tiny_variant, tiny_checkpoint, tmp_path):
    from cloformer_deploy.models import DEPLOY_STEPS
    from cloformer_deploy.runtime_bench.ablation import ablation

    res = ablation(tiny_variant, weights=tiny_checkpoint, img_size=64, runs=2, warmup=1, out=tmp_path)
    stages = [r["stage"] for r in res["rows"]]
    onnx_form = "default without merge_parallel_convs + single_reduce_norm"
    assert stages == ["authors' form"] + [f"+ {s.name}" for s in DEPLOY_STEPS] + [onnx_form, "+ split_wide_depthwise"]
    shipped = {rt: r["stage"] for r in res["rows"] for rt in r["shipped_by"]}
    assert shipped == {"onnxruntime": onnx_form, "executorch-xnnpack": "+ split_wide_depthwise"}
    for r in res["rows"]:
        assert r["ort_error"] is None and r["xnnpack_error"] is None
        assert r["ort_max_abs"] <= 1e-4 and r["xnnpack_max_abs"] <= 1e-4
        assert r["ort_median_ms"] > 0 and r["xnnpack_median_ms"] > 0
    # from static_shapes on, every form XNNPACK could be given lowers whole (the ONNX form's one-pass norm
    # mean is not one: XNNPACK reduces only the two innermost dims, hence that row's many partitions)
    assert all(r["partitions"] == 1 and r["kernels_outside"] == 0 for r in res["rows"][2:] if r["stage"] != onnx_form)
    md = (tmp_path / f"{res['model']}-64x64-ablation.md").read_text()
    assert md.count("\n| ") == len(stages) + 1 and "| XNNPACK |" in md  # header + one row per stage
