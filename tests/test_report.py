"""report.py on a synthetic results dict (the keys of a real results.json): tables keep whole texts, plots
draw only rows with a latency, and tick labels are plain. No export, no benchmark: fast."""

from __future__ import annotations

import csv
import io
import re

import matplotlib
import pytest

from cloformer_deploy.runtime_bench import report

matplotlib.use("Agg")

LONG_ERROR = (
    "RuntimeError: [ONNXRuntimeError] : 1 : FAIL : Load model from /tmp/bench/deploy/model-int8.onnx "
    "failed: Protobuf parsing failed | see the worker log for the whole message"
)
COREML_NOTE = "latency not measurable here: Core ML runs on Apple hardware; drift by the package interpreter"


def _row(form, runtime, precision, threads, median=None, max_abs=None, error=None, note=None):
    lat = None if median is None else {"median": median, "p90": median * 1.1, "min": median * 0.95, "runs": 50}
    drift = (
        None
        if max_abs is None
        else {"max_abs": max_abs, "mean_abs": max_abs / 5, "cosine": 0.9999, "top1_agreement": 1.0}
    )
    return {
        "model": "cloformer_xxs",
        "form": form,
        "runtime": runtime,
        "precision": precision,
        "threads": threads,
        "latency_ms": lat,
        "load_ms": 300.0,
        "peak_rss_mb": 300.0,
        "size_mb": 16.8,
        "drift": drift,
        "accuracy": None,
        "gflops_per_s": None if median is None else 47.8,
        "efficiency": None if median is None else 0.224,
        "note": note,
        "error": error,
    }


def _results(rows):
    return {
        "machine": {
            "cpu": "test CPU",
            "cores": 2,
            "platform": "Linux",
            "python": "3.11",
            "matmul_gflops": {"1": 200.0, "2": 400.0},
            "matmul_gflops_by_library": {"1": {"torch": 100.0}, "2": {"torch": 200.0}},
        },
        "versions": {},
        "config": {
            "model": "cloformer_xxs",
            "input_size": [224, 224],
            "threads": [1, 2],
            "runs": 50,
            "warmup": 10,
            "weights_sha256": None,
            "random_init": True,
            "images": 12,
            "data": "test images",
            "macs": 660528256,
            "params": 4166728,
            "compare_authors": True,
        },
        "rows": rows,
        "command": ["cloformer-bench"],
        "created": "2025-01-01T00:00:00+00:00",
    }


@pytest.fixture
def results():
    return _results(
        [
            _row("deploy", "torch", "fp32", 1, 27.6, 9.5e-7),
            _row("deploy", "torch", "fp32", 2, 16.2, 9.5e-7),
            _row("deploy", "onnxruntime", "int8", 1, error=LONG_ERROR),  # failed: neither latency nor drift
            _row("deploy", "executorch-portable", "fp32", 1, 1832.8, 1.5e-6),  # > 10x the others: log axis
            _row("deploy", "coreml", "fp16", None, max_abs=2.6e-3, note=COREML_NOTE),  # drift but no latency
            _row("authors", "torch", "fp32", 1, 29.1, 9.5e-7),
        ]
    )


def _md_cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_csv_and_markdown_keep_the_whole_error_text(tmp_path, results):
    report.write_reports(tmp_path, results)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.reader(f))
    assert rows[3][-1] == LONG_ERROR and rows[5][-1] == COREML_NOTE
    md = (tmp_path / "results.md").read_text().splitlines()
    line = next(x for x in md if "onnxruntime" in x)
    cells = _md_cells(line)
    assert len(cells) == len(report.COLUMNS)  # the '|' in the error did not split the cell
    assert cells[-1] == LONG_ERROR.replace("|", "\\|")


def test_markdown_cell_newlines_do_not_break_the_table(tmp_path, results):
    results["rows"][2]["error"] = "first line\nsecond line"
    report.write_reports(tmp_path, results)
    line = next(x for x in (tmp_path / "results.md").read_text().splitlines() if "onnxruntime" in x)
    assert _md_cells(line)[-1] == "first line<br>second line"


@pytest.fixture
def figures(monkeypatch):
    """Every figure saved, inspected after drawing: independent of what the plot functions return."""
    from matplotlib.figure import Figure

    saved = {}
    real = Figure.savefig

    def spy(self, fname, *a, **k):
        real(self, fname, *a, **k)
        ax = self.axes[0]
        saved[str(fname).rsplit("/", 1)[-1]] = {
            "bars": len(ax.patches),
            "points": len([c for c in ax.collections if c.get_gid()]),
            "yticks": [t.get_text() for t in ax.get_yticklabels() if t.get_visible() and t.get_text()],
            "yminor": [t.get_text() for t in ax.yaxis.get_minorticklabels() if t.get_text()],
            "xticks": [t.get_text() for t in ax.get_xticklabels() if t.get_text()],
            "title": ax.get_title(),
            "yscale": ax.get_yscale(),
        }

    monkeypatch.setattr(Figure, "savefig", spy)
    return saved


def test_both_plots_written_and_only_rows_with_latency_drawn(tmp_path, results, figures):
    out = report.write_reports(tmp_path, results)
    assert (tmp_path / "latency.png").stat().st_size > 10_000
    assert (tmp_path / "latency_vs_drift.png").stat().st_size > 10_000
    timed = [
        "torch fp32 1t (deploy)",
        "torch fp32 2t (deploy)",
        "ET-portable fp32 1t (deploy)",
        "torch fp32 1t (authors)",
    ]
    lat, drift = out["latency"], out["latency_vs_drift"]
    assert [d[0] for d in lat.drawn] == timed and [d[0] for d in drift.drawn] == timed
    assert [d[2] for d in lat.drawn] == [27.6, 16.2, 1832.8, 29.1]  # bar heights: the medians
    assert figures["latency.png"]["bars"] == 4 and figures["latency_vs_drift.png"]["points"] == 4
    assert not any("Core ML" in t or "ORT" in t for t in figures["latency.png"]["xticks"])
    # left out, but said so
    assert any("Core ML fp16" in s and "Apple hardware" in s for s in lat.left_out)
    assert any("ORT int8 1t" in s and "RuntimeError" in s for s in lat.left_out)


def test_latency_axis_has_plain_labels_and_a_short_title(tmp_path, results, figures):
    report.write_reports(tmp_path, results)
    lat = figures["latency.png"]
    assert lat["yscale"] == "log"
    assert lat["yticks"] and all(re.fullmatch(r"\d+(\.\d+)?", t) for t in lat["yticks"]), lat["yticks"]
    assert {"10", "100", "1000"} <= set(lat["yticks"]) and not lat["yminor"]  # no '6x10^1' minor labels
    assert "blue" not in lat["title"]  # the form colours are in a legend
    assert all(re.fullmatch(r"1e-\d+", t) for t in figures["latency_vs_drift.png"]["yticks"])


def test_few_close_rows_plot_on_linear_axes_with_labels(tmp_path, figures):
    res = _results(
        [
            _row("deploy", "onnxruntime", "fp32", 2, 6.395, 1.55e-6),
            _row("authors", "onnxruntime", "fp32", 2, 6.431, 1.79e-6),
            _row("deploy", "coreml", "int8", None, max_abs=3e-2, note=COREML_NOTE),
        ]
    )
    out = report.write_reports(tmp_path, res)
    assert len(out["latency"].drawn) == 2 and len(out["latency_vs_drift"].drawn) == 2
    assert figures["latency.png"]["yscale"] == "linear" and len(figures["latency.png"]["yticks"]) >= 3
    assert len(figures["latency_vs_drift.png"]["yticks"]) >= 2  # two close drifts still get labelled decades


def test_no_timed_rows_writes_no_plot(tmp_path):
    res = _results([_row("deploy", "coreml", "fp16", None, max_abs=2.6e-3, note=COREML_NOTE)])
    out = report.write_reports(tmp_path, res)
    assert out["latency"].path is None and out["latency_vs_drift"].path is None
    assert not list(tmp_path.glob("*.png")) and (tmp_path / "results.md").exists()


def test_console_table_shortens_at_a_word_boundary(results):
    buf = io.StringIO()
    report.console_table(results, stream=buf, text_width=40)
    text = " ".join(re.sub(r"[│┃]", " ", buf.getvalue()).split())  # rich may wrap the cell over lines
    assert "RuntimeError: [ONNXRuntimeError] : 1…" in text  # "[...]" not eaten as rich markup
    assert "Protobuf" not in text and "latency not measurable here: Core ML…" in text  # a note, too


@pytest.mark.parametrize("width", range(14, len(LONG_ERROR), 7))  # the first word is 13 long
def test_shorten_cuts_before_a_space(width):
    got = report.shorten(LONG_ERROR, width)
    assert len(got) <= width and got.endswith("…")
    kept = got[:-1]
    assert LONG_ERROR.startswith(kept) and LONG_ERROR[len(kept)] in " :"  # the next word was dropped whole


@pytest.mark.parametrize(
    "text, width, expected",
    [
        ("short text", 40, "short text"),
        ("latency not measurable here: Core ML runs on Apple hardware", 30, "latency not measurable here…"),
        ("word boundary, then cut", 15, "word boundary…"),
        ("Error: /a/long/path/without/spaces/model.onnx", 30, "Error: /a/long/path/without/…"),
        ("abcdefghijklmnopqrstuvwxyz", 10, "abcdefghi…"),
    ],
)
def test_shorten(text, width, expected):
    got = report.shorten(text, width)
    assert got == expected and len(got) <= width
