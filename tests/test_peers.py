"""Peers in the same run: name resolution, the peers table and pareto.png, and the bench path end to end."""

from __future__ import annotations

import json

import pytest

from cloformer_deploy.runtime_bench.peers import DEFAULT_PEERS, FAMILY, PeerError, published_top1, resolve_peers
from cloformer_deploy.runtime_bench.peers_report import markdown, pareto_front, plot_pareto, summary

SMALLEST_TIMM = "test_byobnet"  # timm's own test network (0.2 M params): exercises timm's path in seconds


def test_baselines_are_the_default_peers_and_the_family_without_the_model_itself():
    peers = resolve_peers(True, None, "cloformer-xxs")
    names = [p.name for p in peers]
    assert names[: len(DEFAULT_PEERS)] == list(DEFAULT_PEERS)
    assert set(names[len(DEFAULT_PEERS) :]) == set(FAMILY) - {"cloformer_xxs"}
    assert {p.source for p in peers[: len(DEFAULT_PEERS)]} == {"timm"}
    assert {p.source for p in peers[len(DEFAULT_PEERS) :]} == {"cloformer-deploy"}
    # every default has a published top-1 with a source
    assert all(p.published and p.published["source"] for p in peers)


def test_peers_are_deduplicated_and_project_names_normalised():
    peers = resolve_peers(True, "fat-b1,mobileone_s0,FastViT_T8", "fat_b0")
    names = [p.name for p in peers]
    assert len(names) == len(set(names)) and "fat_b0" not in names and "fat_b1" in names


def test_unknown_peer_names_the_closest():
    with pytest.raises(PeerError, match="did you mean mobileone_s0"):
        resolve_peers(False, "mobileone_s", "cloformer_xxs")


def test_published_top1_has_provenance_and_no_measured_figures():
    data = published_top1()
    assert {"mobilenetv3_large_100", "cloformer_xxs", "fat_b0"} <= set(data)
    for name, entry in data.items():
        assert entry["source_kind"] in ("paper", "timm results file", "model card"), name
        assert 50 < entry["top1"] < 90 and entry["source"], name


def test_pareto_front_keeps_only_the_unbeaten():
    pts = [(10.0, 75.0), (20.0, 77.0), (15.0, 74.0), (30.0, 76.0), (8.0, 71.0), (20.0, 78.0)]
    assert pareto_front(pts) == [4, 0, 5]


def _results(rows, peers):
    return {
        "config": {"model": "cloformer_xxs", "input_size": [224, 224], "threads": [1], "peers": peers},
        "rows": rows,
    }


def _row(model, role, rt, ms, top1=None, source="timm", error=None, partitions=1):
    r = {
        "model": model,
        "role": role,
        "form": "deploy" if role == "subject" else "timm",
        "runtime": rt,
        "precision": "fp32",
        "threads": 1,
        "params": 1_000_000,
        "macs": 500_000_000,
        "latency_ms": {"median": ms} if ms else None,
        "gflops_per_s": 1.0 / ms if ms else None,
        "delegation": {"partitions": partitions} if rt == "executorch-xnnpack" else {},
        "error": error,
    }
    if role == "peer":
        r["source"] = source
        r["published"] = (
            {"top1": top1, "eval_size": 224, "source": f"paper of {model}", "source_kind": "paper"} if top1 else None
        )
    return r


def test_peers_table_and_pareto_show_a_peer_that_beats_cloformer(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    rows = []
    for rt in ("onnxruntime", "executorch-xnnpack"):
        rows += [
            _row("cloformer_xxs", "subject", rt, 20.0),
            _row("fastnet", "peer", rt, 10.0, top1=79.0),  # beats it on both axes
            _row("slownet", "peer", rt, 40.0, top1=76.0),  # loses on both
            _row("unpublished", "peer", rt, 5.0),  # no published top-1
            _row("broken", "peer", rt, None, top1=80.0, error="export failed: boom"),
        ]
    results = _results(rows, ["fastnet", "slownet", "unpublished", "broken"])
    md = markdown(results)
    assert "faster than cloformer_xxs (20.00 ms) *and* more accurate (published) than its 77.0%: fastnet." in md
    assert "export failed: boom" in md and "paper of fastnet" in md
    assert [m["model"] for m in summary(results)][0] == "cloformer_xxs"
    plot = plot_pareto(tmp_path / "pareto.png", results)
    assert plot.path.exists()
    drawn = {label for label, _, _ in plot.drawn}
    assert {"fastnet (ORT)", "cloformer_xxs (ORT)", "slownet (ET-XNNPACK)"} <= drawn
    assert not any(label.startswith(("unpublished", "broken")) for label in drawn)
    assert any("unpublished" in note for note in plot.left_out) and any("broken" in n for n in plot.left_out)


def test_pareto_names_a_peer_missing_from_one_runtimes_panel(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    rows = [
        _row("cloformer_xxs", "subject", "onnxruntime", 20.0),
        _row("cloformer_xxs", "subject", "executorch-xnnpack", 20.0),
        _row("halfnet", "peer", "onnxruntime", 10.0, top1=79.0),
        _row("halfnet", "peer", "executorch-xnnpack", None, top1=79.0, error="export failed: boom"),
    ]
    plot = plot_pareto(tmp_path / "pareto.png", _results(rows, ["halfnet"]))
    assert "halfnet (ORT)" in {label for label, _, _ in plot.drawn}
    assert plot.left_out == ["Not in the ET-XNNPACK panel (no latency: see peers.md): halfnet"]


def _bench_peers(tiny_variant, tmp_path, peers):
    from cloformer_deploy.runtime_bench.harness import bench

    return bench(
        tiny_variant,
        formats="onnx,xnnpack",
        threads=1,
        runs=2,
        warmup=0,
        img_size=64,
        peers=peers,
        profile=True,
        out=tmp_path,
    )


@pytest.mark.e2e
def test_peer_path_end_to_end_with_profile_and_an_error_row(tiny_variant, tmp_path, monkeypatch):
    """The smallest timm model through both backends in the same rounds; a peer that fails to build is an
    error row and the others still run; --profile writes per-op tables for the benchmarked model."""
    import cloformer_deploy.runtime_bench.peers as peers_module

    real = peers_module.build_timm_peer

    def build(name, num_classes=1000):
        if name == "test_resnet":
            raise RuntimeError("cannot build this one")
        return real(name, num_classes)

    monkeypatch.setattr(peers_module, "build_timm_peer", build)
    res = _bench_peers(tiny_variant, tmp_path, f"{SMALLEST_TIMM},test_resnet")
    peer_rows = [r for r in res.rows if r["role"] == "peer"]
    good = [r for r in peer_rows if r["model"] == SMALLEST_TIMM]
    bad = [r for r in peer_rows if r["model"] == "test_resnet"]
    assert {r["runtime"] for r in good} == {"onnxruntime", "executorch-xnnpack"}
    for r in good:
        assert r["error"] is None and r["latency_ms"]["median"] > 0 and r["macs"] > 0 and r["params"] > 0
        assert r["drift"]["max_abs"] < 1e-3  # against its own PyTorch output
        assert r["published"] is None  # not in the data file: nothing invented
    assert next(r for r in good if r["runtime"] == "executorch-xnnpack")["delegation"]["partitions"] >= 1
    assert len(bad) == 2 and all("build failed: RuntimeError: cannot build this one" in r["error"] for r in bad)
    out = res.out
    peers_md = (out / "peers.md").read_text()
    assert SMALLEST_TIMM in peers_md and "cannot build" in peers_md
    # neither the tiny model nor these peers have a published top-1: no picture, and the table says why
    assert not (out / "pareto.png").exists() and "No pareto.png" in peers_md
    assert json.loads((out / "results.json").read_text())["config"]["peers"] == [SMALLEST_TIMM, "test_resnet"]
    profile = (out / "profile.md").read_text()
    assert "onnxruntime, fp32" in profile and "executorch-xnnpack, fp32" in profile
    assert "| Conv |" in profile and "Convolution (NHWC, F32)" in profile


@pytest.mark.slow
def test_two_real_peers_beside_cloformer_xxs(tmp_path):
    """MobileOne-S0 (reparameterized: fewer parameters than timm builds it with) and MobileNetV3-Large at 224,
    each one XNNPACK partition, with their published top-1 in the table and on the Pareto plot."""
    from cloformer_deploy.runtime_bench.harness import bench

    res = bench(
        "cloformer_xxs",
        formats="onnx,xnnpack",
        threads=1,
        runs=3,
        warmup=1,
        peers="mobileone_s0,mobilenetv3_large_100",
        out=tmp_path,
    )
    peer_rows = [r for r in res.rows if r["role"] == "peer"]
    assert len(peer_rows) == 4 and all(r["error"] is None for r in peer_rows)
    for r in peer_rows:
        assert r["published"]["top1"] > 70 and r["latency_ms"]["median"] > 0
        if r["runtime"] == "executorch-xnnpack":
            assert r["delegation"]["partitions"] == 1
    mobileone = next(r for r in peer_rows if r["model"] == "mobileone_s0")
    assert mobileone["params"] < 5.0e6  # unfused it is 5.29 M (timm); reparameterized 2.08 M
    plot = {
        label
        for label, _, _ in __import__("cloformer_deploy.runtime_bench.peers_report", fromlist=["x"])
        .plot_pareto(tmp_path / "p.png", res.results)
        .drawn
    }
    assert {"cloformer_xxs (ORT)", "mobileone_s0 (ET-XNNPACK)", "mobilenetv3_large_100 (ORT)"} <= plot
