"""Per-operator time tables from ExecuTorch's ETDump and ONNX Runtime's profiler: on a three-convolution model.

Structure (which ops, how many, what kinds, what the tables add up to) is asserted; timing values never.
"""

from __future__ import annotations

import os
import re
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cloformer_deploy.formats.executorch import _executorch_ops, profile_executorch
from cloformer_deploy.formats.onnx import _onnxruntime_ops, profile_onnxruntime
from cloformer_deploy.formats.profiling import OpTime
from cloformer_deploy.runtime_bench.op_profile import op_tables

CONVS = 3


class ThreeConvs(torch.nn.Module):
    """conv-GELU-conv-GELU-conv: GELU keeps ONNX Runtime from fusing an activation into a convolution."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(c, 8, 3, padding=1) for c in (3, 8, 8))

    def forward(self, x):
        x = torch.nn.functional.gelu(self.convs[0](x))
        x = torch.nn.functional.gelu(self.convs[1](x))
        return self.convs[2](x)


class CumsumBetween(torch.nn.Module):
    """conv, cumsum (which XNNPACK does not take), conv: two partitions and a kernel outside them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), 1))


def _pte(module: torch.nn.Module, example: torch.Tensor, path) -> str:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    exported = torch.export.export(module.eval(), (example,))
    path.write_bytes(to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
    return str(path)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("op_profile")
    model, example = ThreeConvs().eval(), torch.randn(1, 3, 24, 24)
    onnx_path = out / "three_convs.onnx"
    torch.onnx.export(
        model,
        (example,),
        str(onnx_path),
        dynamo=True,
        opset_version=20,
        input_names=["input"],
        external_data=False,
        verbose=False,
    )
    return SimpleNamespace(
        pte=_pte(model, example, out / "three_convs.pte"),
        onnx=str(onnx_path),
        cumsum=_pte(CumsumBetween(), example, out / "cumsum.pte"),
    )


@pytest.fixture
def images():
    return np.random.default_rng(0).standard_normal((3, 3, 24, 24)).astype(np.float32)


@pytest.fixture
def clean_temp(tmp_path, monkeypatch):
    """An empty temp dir and working dir for the call; the test checks both are empty after."""
    temp, work = tmp_path / "temp", tmp_path / "work"
    temp.mkdir()
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.chdir(work)
    return temp, work


def kind_table(markdown: str) -> dict[str, tuple[float, float, int]]:
    """kind -> (ms, share %, instances) from the first table of op_tables' output."""
    rows = {}
    for line in markdown.split("\n\n")[0].splitlines()[2:]:
        kind, ms, share, n = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows[kind.replace("\\|", "|")] = (float(ms), float(share.rstrip("%")), int(n))
    return rows


def test_executorch_names_xnnpack_ops_and_is_quiet(artifacts, images, clean_temp, capfd):
    from executorch.extension.pybindings import portable_lib

    threads_before = portable_lib._threadpool_get_thread_count()  # may log cpuinfo's probing: before the check
    capfd.readouterr()
    ops = profile_executorch(artifacts.pte, images, threads=1, runs=5)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured
    assert portable_lib._threadpool_get_thread_count() == threads_before  # the process's pool is set back

    convs = [o for o in ops if o.kind.startswith("Convolution (NHWC, F32)")]
    assert len(convs) == CONVS
    assert sum(o.kind == "GELU (NC)" for o in ops) == 2
    assert all(re.fullmatch(r".+ #\d+ in partition 1", o.name) for o in ops), [o.name for o in ops]
    assert len({o.name for o in ops}) == len(ops)
    assert all(o.calls == 1 and o.median_ms >= 0 for o in ops)
    assert not any(o.kind.endswith("(not delegated)") for o in ops)  # all of it runs in XNNPACK
    assert os.listdir(clean_temp[0]) == [] and os.listdir(clean_temp[1]) == []


def test_executorch_kernel_outside_partitions(artifacts, images):
    ops = profile_executorch(artifacts.cumsum, images, threads=1, runs=3)
    outside = [o for o in ops if o.kind.endswith("(not delegated)")]
    assert [o.kind for o in outside] == ["cumsum.out (not delegated)"]
    assert re.fullmatch(r"cumsum\.out \(instruction \d+\)", outside[0].name)
    partitions = {re.search(r"partition (\d+)$", o.name).group(1) for o in ops if o not in outside}
    assert partitions == {"1", "2"}
    assert sum(o.kind.startswith("Convolution") for o in ops) == 2


def test_onnxruntime_counts_the_models_convolutions(artifacts, images, clean_temp, capfd):
    capfd.readouterr()
    ops = profile_onnxruntime(artifacts.onnx, images, threads=1, runs=5)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured
    assert sum(o.kind == "Conv" for o in ops) == CONVS
    assert sum(o.kind == "Gelu" for o in ops) == 2
    assert all(not o.name.endswith("_kernel_time") and o.calls == 1 and o.median_ms >= 0 for o in ops)
    assert os.listdir(clean_temp[0]) == [] and os.listdir(clean_temp[1]) == []  # no profile JSON left


@pytest.mark.parametrize("runtime", ["executorch", "onnxruntime"])
def test_tables_of_a_real_profile_add_up(artifacts, images, runtime):
    ops = (
        profile_executorch(artifacts.pte, images, 1, 3)
        if runtime == "executorch"
        else profile_onnxruntime(artifacts.onnx, images, 1, 3)
    )
    text = op_tables(ops, top=4)
    kinds = kind_table(text)
    assert sum(n for _, _, n in kinds.values()) == len(ops)
    assert sum(share for _, share, _ in kinds.values()) == pytest.approx(100, abs=0.05 * len(kinds) + 0.01)
    assert sum(n for kind, (_, _, n) in kinds.items() if kind == "Conv" or kind.startswith("Convolution")) == CONVS
    assert f"Slowest 4 of {len(ops)} ops" in text
    total = float(re.search(r"add up to ([\d.]+) ms per run", text).group(1))
    assert total == pytest.approx(sum(o.median_ms for o in ops), abs=1e-3)


def test_op_tables_aggregates_sorts_and_escapes():
    ops = [
        OpTime("conv a", "Conv", 3.0),
        OpTime("conv b", "Conv", 1.0),
        OpTime("gelu", "Gelu", 4.0, calls=2),
        OpTime("x|y", "Odd|Kind", 2.0),
    ]
    text = op_tables(ops, top=3)
    assert kind_table(text) == {"Conv": (4.0, 40.0, 2), "Gelu": (4.0, 40.0, 1), "Odd|Kind": (2.0, 20.0, 1)}
    lines = text.splitlines()
    assert lines[2].startswith("| Conv |") and lines[3].startswith("| Gelu |")  # ties: by name
    top = [line for line in lines if line.startswith("| ") and "%" in line][3:]
    assert [row.split(" | ")[0] for row in top] == ["| gelu", "| conv a", "| x\\|y"]
    assert "| gelu | Gelu | 4.000 | 40.0% | 2 |" in top
    assert "Slowest 3 of 4 ops" in text and "add up to 10.000 ms per run" in text


def test_onnxruntime_events_split_by_run_and_skip_warmup():
    def run(ts, conv_us):  # one model_run with a Conv node (and its fence event, which is no kernel)
        return [
            {"cat": "Node", "name": "c_kernel_time", "ts": ts + 1, "dur": conv_us, "args": {"op_name": "Conv"}},
            {"cat": "Node", "name": "c_fence_after", "ts": ts + 2, "dur": 0, "args": {"op_name": "Conv"}},
            {"cat": "Node", "name": "r_kernel_time", "ts": ts + 3, "dur": 5, "args": {"op_name": "Relu"}},
            {"cat": "Session", "name": "model_run", "ts": ts, "dur": 500},
        ]

    events = run(0, 9000) + run(1000, 8000) + run(2000, 100) + run(3000, 300) + run(4000, 200)
    ops = _onnxruntime_ops(events, warmup=2, per_node_ms=0.004)
    assert [(o.name, o.kind, o.calls) for o in ops] == [("c", "Conv", 1), ("r", "Relu", 1)]
    assert ops[0].median_ms == pytest.approx(0.196)  # median of 96, 196, 296 µs: the warm-up's 9 ms gone
    assert ops[1].median_ms == pytest.approx(0.001)
    assert _onnxruntime_ops(events, 0, 0.01)[1].median_ms == 0  # never below zero


def test_executorch_events_skip_warmup_in_time_order():
    def event(name, raw, delegated=True, iid=0, start=None):
        return SimpleNamespace(
            name=name,
            perf_data=SimpleNamespace(raw=raw),
            is_delegated_op=delegated,
            _instruction_id=iid,
            start_time=start,
        )

    starts = [30, 10, 20, 40]  # the Inspector's order need not be the runs' order: 10 (run 1) is the warm-up
    block = SimpleNamespace(
        name="Execute",
        events=[
            event("Convolution (NHWC, F32) IGEMM #1", [0.5, 9.0, 0.7, 0.6]),
            event("native_call_cumsum.out", [0.2, 0.2, 0.2, 0.2], delegated=False, iid=1),
            event("OPERATOR_CALL", [0.3, 0.3, 0.3, 0.3], delegated=False, iid=1),
            event("DELEGATE_CALL", [1.0, 1.0, 1.0, 1.0], delegated=False),
            event("Method::execute", [2.0, 10.0, 2.0, 2.0], delegated=False, start=starts),
        ],
    )
    init = SimpleNamespace(name="Default", events=[event("Method::init", [1.0], delegated=False)])
    ops = _executorch_ops([init, block], warmup=1)
    assert [(o.name, o.kind) for o in ops] == [
        ("Convolution (NHWC, F32) IGEMM #1 in partition 1", "Convolution (NHWC, F32) IGEMM"),
        ("cumsum.out (instruction 1)", "cumsum.out (not delegated)"),
    ]
    assert ops[0].median_ms == pytest.approx(0.6)
    with pytest.raises(ValueError, match="no execution"):
        _executorch_ops([init, block], warmup=4)


def test_bad_arguments(artifacts, images):
    with pytest.raises(ValueError, match="at least 1"):
        profile_onnxruntime(artifacts.onnx, images, threads=1, runs=0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        profile_onnxruntime(artifacts.onnx, images[0], threads=1, runs=1)
