"""What each deploy rewrite buys: the deploy form built step by step, each prefix exported and timed in one run."""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ..files import size_bytes
from ..formats import BACKENDS
from ..formats.base import ExportJob, ModelSpec
from ..images import load_images
from ..inputs import writable_folder
from ..models import to_deploy
from ..models.deploy import DEFAULT_STEPS
from ..models.memory import check_fits
from ..pipeline import prepare_model
from ..pipeline.model import reference_outputs
from ..progress import Progress
from ..quiet import quiet_libraries
from ..validation import compare
from .harness import Combo, _measure
from .machine import machine_info
from .options import BenchOptions, ablation_checked
from .runtimes import FORMAT_OF, PEER_RUNTIMES, SHORT_RUNTIME, bench_runtime

# the runtimes that take any PyTorch model, with the prefix of their columns ("ort_median_ms", "xnnpack_...")
COLUMN = {rt: SHORT_RUNTIME[rt].lower().removeprefix("et-") for rt in PEER_RUNTIMES}
# the table's columns: ONNX Runtime's and XNNPACK's. LiteRT is not ablated yet (its naive export does not load;
# its forms are compared in docs/litert.md)
TABLE_COLUMNS = ("ort", "xnnpack")
RUNTIMES = tuple((FORMAT_OF[rt], rt) for rt in PEER_RUNTIMES if COLUMN[rt] in TABLE_COLUMNS)
NAMES = {rt: bench_runtime(rt).label for rt in PEER_RUNTIMES}


def ablation(options: BenchOptions | str | None = None, /, *, progress: Progress | None = None, **kwargs) -> dict:
    """Time the deploy form step by step at the first of ``threads``; writes <out>/<model>-<H>x<W>-ablation.md/json.

    Takes the benchmark's options (:class:`BenchOptions`) or its fields as keyword arguments.
    """
    with quiet_libraries():
        if isinstance(options, str):  # ablation("cloformer-xxs", ...)
            options, kwargs = None, {"model": options, **kwargs}
        opts = ablation_checked(BenchOptions.of(options, **kwargs))
        writable_folder("--out", opts.out)
        check_fits(opts.model, opts.img_size, 1, what=f"--img-size {opts.img_size[0]}x{opts.img_size[1]}")
        return _ablation(
            opts.model,
            opts.weights,
            opts.img_size,
            opts.threads[0],
            opts.runs,
            opts.warmup,
            Path(opts.out),
            progress or Progress(quiet=True),
        )


def _ablation(model, weights, size, threads, runs, warmup, out: Path, progress: Progress) -> dict:
    prepared = prepare_model(model, weights, None)
    variant, authors = prepared.variant, prepared.module
    images = load_images(size, variant.mean, variant.std)
    reference = reference_outputs(authors, images.tensor)
    names = list(DEFAULT_STEPS)
    stages = [("authors' form", authors)] + [
        (f"+ {n}", to_deploy(authors, size, steps=names[: i + 1])) for i, n in enumerate(names)
    ]
    # what each runtime's fp32 export really takes: the default form, or the default plus format-only steps
    shipped = {}
    for fmt, rt in RUNTIMES:
        form = BACKENDS[fmt].deploy_steps("fp32", {}) or (names, [])
        label = form_label(names, *form)
        if label not in [s[0] for s in stages]:
            stages.append((label, to_deploy(authors, size, steps=form[0], extra_steps=form[1])))
        shipped.setdefault(label, []).append(rt)
    work = Path(tempfile.mkdtemp(prefix="cloformer-ablation-"))
    spec = ModelSpec(variant.name, authors.num_classes, size, mean=variant.mean, std=variant.std)
    combos, facts = [], []
    try:
        torch.save(authors.state_dict(), work / "weights.pth")
        example = torch.from_numpy(images.tensor[:1])
        for i, (label, module) in enumerate(stages):
            fact = {"stage": label, "shipped_by": shipped.get(label, [])}
            for fmt, rt in RUNTIMES:
                path = work / f"stage{i}{BACKENDS[fmt].suffix}"
                with progress.stage(f"{label}: export {fmt}"):
                    info = BACKENDS[fmt].export(ExportJob(module, example, spec, "fp32", {}), path, progress.log)
                if "partitions" in info:  # a delegating runtime's export reports its partitions
                    fact["partitions"] = info["partitions"]
                    fact["kernels_outside"] = info["non_delegated_kernels"]
                else:
                    fact["onnx_nodes"] = info["nodes"]
                combos.append(
                    Combo(variant.name, label, rt, "fp32", threads, str(path), round(size_bytes(path) / 1e6, 2))
                )
            facts.append(fact)
        _measure(combos, work, variant, authors.num_classes, size, images, runs, warmup, 900.0, progress)
    finally:
        for c in combos:
            if c.worker is not None:
                c.worker.close()
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for fact in facts:
        row = dict(fact)
        for c in combos:
            if c.form != fact["stage"]:
                continue
            key = COLUMN[c.runtime]
            row[f"{key}_median_ms"] = round(float(np.median(c.times)), 2) if c.times else None
            row[f"{key}_max_abs"] = compare(c.outputs, reference)["max_abs"] if c.outputs is not None else None
            row[f"{key}_error"] = c.error
        rows.append(row)
    result = {
        "model": variant.name,
        "input_size": list(size),
        "threads": threads,
        "runs": runs,
        "machine": machine_info([threads]),
        "rows": rows,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{variant.name}-{size[0]}x{size[1]}-ablation"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(ablation_markdown(result))
    result["path"] = str(out / f"{stem}.md")
    return result


def form_label(names: list[str], steps: list[str], extra: list[str]) -> str:
    """The ablation row of a deploy form: a prefix of the default steps is its last step's row."""
    steps = list(steps)
    if steps == names[: len(steps)] and not extra:
        return f"+ {steps[-1]}" if steps else "authors' form"
    base = "" if steps == names else "default without " + ", ".join(n for n in names if n not in steps) + " "
    return f"{base}+ " + " + ".join(extra) if extra else base.strip()


def ablation_markdown(result: dict) -> str:
    base = result["rows"][0]
    lines = [
        f"# What each deploy rewrite buys: {result['model']} at {result['input_size'][0]}x{result['input_size'][1]}",
        "",
        f"{result['created']}, {result['machine']['cpu']}, {result['threads']} thread, median of "
        f"{result['runs']} interleaved runs. Each row adds one rewrite step to the row above; the first is "
        "a naive export of the authors' form. Speed-up is against that first row, measured in the same run. "
        "Rows after the last default step are format-only steps, added to the default form; "
        "'shipped by' names the runtime whose fp32 export takes that row's form.",
        "",
        "| stage | ONNX Runtime ms | speed-up | XNNPACK ms | speed-up | XNNPACK partitions | kernels outside "
        "| ONNX nodes | max abs vs authors | shipped by |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:

        def sp(key, r=r):
            a, b = base.get(key), r.get(key)
            return f"{a / b:.2f}x" if a and b else "-"

        shipped = ", ".join(NAMES.get(rt, rt) for rt in r.get("shipped_by", [])) or "-"
        drift = (
            max(v for v in (r.get("ort_max_abs"), r.get("xnnpack_max_abs")) if v is not None)
            if r.get("ort_max_abs") is not None or r.get("xnnpack_max_abs") is not None
            else None
        )
        lines.append(
            f"| {r['stage']} | {r.get('ort_median_ms') or '-'} | {sp('ort_median_ms')} | "
            f"{r.get('xnnpack_median_ms') or '-'} | {sp('xnnpack_median_ms')} | {r['partitions']} | "
            f"{r['kernels_outside']} | {r['onnx_nodes']} | {drift:.1e} | {shipped} |"
            if drift is not None
            else f"| {r['stage']} | - | - | - | - | {r['partitions']} | {r['kernels_outside']} | {r['onnx_nodes']} | - "
            f"| {shipped} |"
        )
    return "\n".join(lines) + "\n"
