"""``cloformer-validate --by-block``: where an artifact departs from PyTorch, block by block.

Every artifact of a bundle shows the outputs of the network's block boundaries (the stem, each block of each
stage, the norm, the pool and the head: :mod:`..models.blocks`) on the validation photographs, on this machine and
on the target given (and its GPU with ``--gpu``). Each is compared with PyTorch fp32 at the same boundary, in the
deploy form the artifact was exported from (the form whose logits are parity-checked against the authors'); the
report gives that form's own difference from the authors' at each boundary as ``deploy_vs_authors``.

Where the runtime shows the shipped file's intermediate values, the shipped file runs with them as added
outputs; where a delegate is opaque, a probe export of the same form, precision and quantisation stands in, and
its final output is compared with the shipped file's on the same target (``final_vs_shipped``).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..formats import BACKENDS
from ..formats.base import ExportJob, ExposedBlocks
from ..images import load_calibration, load_images
from ..progress import Progress
from ..quiet import quiet_libraries
from ..targets import WorkerError
from ..targets.local import LocalTarget
from ..validation.outputs import run_all
from . import schema
from .gpu_rows import gpu_checked, gpu_runtimes
from .opened import open_bundle
from .options import ExportInputError, ValidateOptions, evaluation_checked

SCHEMA_VERSION = 1
JSON_NAME, MD_NAME, PNG_NAME = "drift_by_block.json", "drift_by_block.md", "drift_by_block.png"
# The first departure: a block whose relative error is at least DEPARTURE_FLOOR and at least DEPARTURE_JUMP times
# the largest relative error of the blocks before it (what it was handed). The floor is where an error starts to
# matter (1% of the signal); the jump is what rounding growth alone does not make from one block to the next.
DEPARTURE_FLOOR = 1e-2
DEPARTURE_JUMP = 4.0


def block_figures(out: np.ndarray, ref: np.ndarray) -> dict:
    """max abs, mean abs, relative error (||out - ref|| / ||ref|| over all images) and the lowest per-image
    cosine of one boundary. A map in the runtime's channels-last layout is compared in PyTorch's."""
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    if out.shape != ref.shape and out.ndim == 4 and out.transpose(0, 3, 1, 2).shape == ref.shape:
        out = out.transpose(0, 3, 1, 2)
    if out.shape != ref.shape and tuple(d for d in out.shape if d != 1) == tuple(d for d in ref.shape if d != 1):
        out = out.reshape(ref.shape)  # the same values in the same order, some unit axes apart
    if out.shape != ref.shape:
        raise ValueError(f"its shape {out.shape} is not the boundary's {ref.shape}")
    if not np.isfinite(out).all():
        return {"max_abs": None, "mean_abs": None, "rel_err": None, "cosine": None, "finite": False}
    diff = out - ref
    a, b = out.reshape(len(out), -1), ref.reshape(len(ref), -1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-30), 1.0)
    norm = float(np.linalg.norm(ref))
    return {
        "max_abs": float(np.abs(diff).max()),
        "mean_abs": float(np.abs(diff).mean()),
        "rel_err": float(np.linalg.norm(diff) / norm) if norm > 0 else float(np.linalg.norm(diff)),
        "cosine": float(cos.min()),
        "finite": True,
    }


def first_departure(blocks: list[dict]) -> str | None:
    """The first block that departs (:data:`DEPARTURE_FLOOR`, :data:`DEPARTURE_JUMP`) and whose error the next
    block carries on (an error that falls back at the next boundary is that one value's, not where drift starts:
    e.g. a value an int8 converter names after the wrong block); a non-finite output departs at once. Blocks the
    artifact does not show are skipped; their error is carried by the next one."""
    shown = [b for b in blocks if b.get("exposed", True)]
    carried = 0.0
    for i, block in enumerate(shown):
        if not block["finite"]:
            return block["name"]
        err = block["rel_err"]
        bar = max(DEPARTURE_FLOOR, DEPARTURE_JUMP * carried)
        if err >= bar:
            after = shown[i + 1] if i + 1 < len(shown) else None
            if after is None or not after["finite"] or after["rel_err"] >= max(bar, err / DEPARTURE_JUMP):
                return block["name"]
            continue  # not carried on: left out of what later blocks are measured against
        carried = max(carried, err)
    return None


@dataclass
class DriftByBlock:
    document: dict
    out: Path


def _job_options(backend, entry: dict) -> dict:
    """The format's export options as the manifest entry records them (the ONNX opset, ...)."""
    return backend.check_options({k: entry[k] for k in backend.options if k in entry})


class _Forms:
    """Each artifact's deploy form and its boundaries' PyTorch outputs, made once per set of deploy steps."""

    def __init__(self, authors, size, paths, images):
        self.authors, self.size, self.paths, self.images = authors, size, paths, images
        self.cache: dict[tuple, tuple] = {}

    def get(self, steps: list[str]):
        from ..models.blocks import block_outputs
        from ..models.deploy import deploy_form

        key = tuple(steps)
        if key not in self.cache:
            module = deploy_form(self.authors, self.size, steps)
            self.cache[key] = (module, block_outputs(module, self.paths, self.images))
        return self.cache[key]


def drift_by_block(options: ValidateOptions | None = None, /, *, progress: Progress | None = None, **kwargs):
    """:class:`DriftByBlock` of every artifact of a bundle on this machine and on ``target`` (and its GPU with
    ``gpu``); writes ``drift_by_block.json``/``.md``/``.png`` in ``out`` (default ``runtime_bench/<bundle>/``).

    Takes a :class:`ValidateOptions` or its fields as keyword arguments, as :func:`~.revalidate.validate_bundle`.
    """
    with quiet_libraries():
        if isinstance(options, (str, Path)):
            options, kwargs = None, {"bundle": str(options), **kwargs}
        opts = ValidateOptions.of(options, **{"by_block": True, **kwargs}).checked()
        if opts.bundle is None:
            raise ExportInputError("no bundle given; pass the folder written by cloformer-export")
        evaluation_checked(opts)
        progress = progress or Progress(quiet=True)
        on = opts.open_target()
        try:
            if opts.gpu:
                missing = on.gpu_missing()
                if missing is not None:
                    raise ExportInputError(f"--gpu: {missing}")
            opened = open_bundle(opts.bundle, opts.weights)
            if opts.gpu:
                gpu_checked(opened.manifest, on)
            out = Path(opts.out) if opts.out is not None else Path("runtime_bench") / opened.folder.name
            return _run(opts, opened, on, out, progress)
        finally:
            on.close()


def _reference(opened):
    """The validation photographs, the boundaries and the deploy forms' PyTorch values at them (made on demand)."""
    import torch

    from ..models.blocks import block_paths

    spec = opened.spec
    images = load_images(spec.input_size, spec.mean, spec.std)
    usable = len(images) - len(images) % spec.batch
    example = torch.from_numpy(images.tensor[: spec.batch])
    paths = block_paths(opened.prepared.module, example)
    return (
        images,
        usable,
        example,
        paths,
        _Forms(opened.prepared.module, spec.input_size, paths, images.tensor[:usable]),
    )


def locate_departure(opened, entry: dict, progress: Progress) -> dict:
    """One artifact's blocks on this machine (what a failed validation's verdict names): its by-block row."""
    backend = BACKENDS[entry["format"]]
    images, _, example, paths, forms = _reference(opened)
    module, ref = forms.get(entry["deploy_steps"])
    job = _probe_job(backend, entry, module, example, opened.spec, entry["precision"])
    label = f"{entry['format']} {entry['precision']}"
    with tempfile.TemporaryDirectory() as tmp, progress.stage(f"{label}: where it departs") as stage:
        try:
            exposed = backend.expose_blocks(opened.folder / entry["path"], job, paths, Path(tmp), stage.update)
        except NotImplementedError as e:
            exposed = str(e)
        return _artifact(
            LocalTarget(), None, None, entry, opened.folder, exposed, paths, ref, opened.spec, images, stage
        )


def _run(opts, opened, on, out: Path, progress: Progress) -> DriftByBlock:
    from ..models.blocks import block_outputs

    spec = opened.spec
    images, usable, example, paths, forms = _reference(opened)
    with progress.stage("PyTorch fp32 at every block boundary"):
        authors_ref = block_outputs(opened.prepared.module, paths, images.tensor[:usable])
    targets = [on] if on.kind == "local" else [LocalTarget(), on]  # the GPU rows are the given target's
    scratch = tempfile.TemporaryDirectory(prefix="cloformer-blocks-")  # the files showing their blocks: not kept
    work = Path(scratch.name)
    artifacts, deploy_vs_authors = [], {}
    try:
        for entry in opened.manifest["artifacts"]:
            fmt, precision, backend = entry["format"], entry["precision"], BACKENDS[entry["format"]]
            label = f"{fmt} {precision}"
            module, ref = forms.get(entry["deploy_steps"])
            key = ",".join(entry["deploy_steps"])
            if key not in deploy_vs_authors:
                deploy_vs_authors[key] = {p: block_figures(ref[p], authors_ref[p])["rel_err"] for p in paths}
            job = _probe_job(backend, entry, module, example, spec, precision)
            with progress.stage(f"{label}: expose the block boundaries") as stage:
                try:
                    exposed = backend.expose_blocks(opened.folder / entry["path"], job, paths, work, stage.update)
                except NotImplementedError as e:
                    exposed = str(e)
            for target in targets:
                gpu = gpu_runtimes(fmt, precision, None) if opts.gpu and target is on else ()
                rows = [(target, None, None)] + [(target, name, options) for name, options, _ in gpu]
                for t, runtime, options in rows:
                    where = t.name if runtime is None else f"{t.name} {runtime}"
                    with progress.stage(f"{label}: by block on {where}") as stage:
                        artifacts.append(
                            _artifact(
                                t, runtime, options, entry, opened.folder, exposed, paths, ref, spec, images, stage
                            )
                        )
                    progress.log(f"{label} on {where}: first departure {artifacts[-1]['first_departure'] or 'none'}")
    finally:
        for t in targets:
            t.close()
        scratch.cleanup()
    document = {
        "schema_version": SCHEMA_VERSION,
        "bundle": str(opened.folder),
        "model": opened.manifest["model"]["name"],
        "input_size": list(spec.input_size),
        "images": usable,
        "reference": "PyTorch fp32, the deploy form each artifact was exported from",
        "rule": {
            "floor": DEPARTURE_FLOOR,
            "jump": DEPARTURE_JUMP,
            "text": departure_rule_text(),
        },
        "blocks": paths,
        "deploy_vs_authors": [{"deploy_steps": k.split(","), "rel_err": v} for k, v in deploy_vs_authors.items()],
        "artifacts": artifacts,
    }
    write_reports(document, out)
    return DriftByBlock(document, out)


def departure_rule_text() -> str:
    return (
        f"a block departs when its relative error is at least {DEPARTURE_FLOOR:g} and at least "
        f"{DEPARTURE_JUMP:g} times the largest relative error of the blocks before it, and the next block carries it on "
        f"(its error is past the same bar and at least 1/{DEPARTURE_JUMP:g} of this one); the first such block is the "
        "first departure (a non-finite output departs at once)"
    )


def _probe_job(backend, entry: dict, module, example, spec, precision: str) -> ExportJob:
    """The export job of the artifact again: its deploy form, options and (int8) calibration images."""
    calibration = None
    kept = []
    if precision in backend.calibrated_precisions:
        recorded = entry.get("calibration") or {}
        calibration = load_calibration(spec.input_size, spec.mean, spec.std, count=int(recorded.get("images", 32)))
        kept = list(recorded.get("kept_float") or [])
    return ExportJob(module, example, spec, precision, _job_options(backend, entry), None, calibration, kept)


def _artifact(target, runtime, options, entry, folder: Path, exposed, paths, ref, spec, images, stage) -> dict:
    fmt, backend = entry["format"], BACKENDS[entry["format"]]
    row = {
        "file": entry["path"],
        "format": fmt,
        "precision": entry["precision"],
        "target": target.name,
        "runtime": runtime,
        "probe": bool(isinstance(exposed, ExposedBlocks) and exposed.probe),
        "blocks": [],
        "first_departure": None,
    }
    if isinstance(exposed, str):  # the format cannot show its boundaries: said, not a failure
        return {**row, "note": exposed}
    if not target.can_run(backend):
        return {**row, "note": target.cannot_run(backend)}
    problem = target.gpu_problem(backend) if runtime is not None else target.missing(backend)
    if problem:
        return {**row, "error": problem}
    row["how"] = exposed.how
    try:
        outs = _outputs(
            target, runtime, options, fmt, exposed.path, spec, {**entry, **exposed.open_info}, images, stage
        )
        shipped = _final(target, runtime, options, fmt, folder / entry["path"], spec, entry, images, stage)
    except (WorkerError, RuntimeError, ValueError) as e:
        return {**row, "error": str(e).splitlines()[0][:300] if str(e) else type(e).__name__}
    for i, (scale, zero) in exposed.scales.items():
        if i < len(outs):
            outs[i] = (outs[i].astype(np.float64) - zero) * scale
    final = outs[0]
    row["final_vs_shipped"] = {
        "max_abs": float(np.abs(final.astype(np.float64) - shipped).max()),
        "bit_exact": bool(np.array_equal(final, shipped)),
    }
    for path in paths:
        index = exposed.outputs.get(path)
        if index is None or index >= len(outs):
            row["blocks"].append(
                {"name": path, "exposed": False, "max_abs": None, "mean_abs": None, "rel_err": None, "cosine": None}
            )
            continue
        row["blocks"].append({"name": path, "exposed": True, **block_figures(outs[index], ref[path])})
    row["first_departure"] = first_departure(row["blocks"])
    for block in row["blocks"]:
        block.pop("finite", None)
    return row


def _open(target, runtime, options, fmt, path, spec, entry):
    if runtime is None:
        return target.runner(fmt, path, spec, entry)
    return target.gpu_runner(fmt, path, spec, entry, options)


def _outputs(target, runtime, options, fmt, path, spec, entry, images, stage) -> list[np.ndarray]:
    runner = _open(target, runtime, options, fmt, path, spec, entry)
    per_batch = []
    usable = len(images) - len(images) % spec.batch
    for batch in images.batches(spec.batch):
        per_batch.append(runner.run_outputs(batch))
        stage.update(f"{len(per_batch) * spec.batch}/{usable} images")
    return [np.concatenate([b[i] for b in per_batch]) for i in range(len(per_batch[0]))]


def _final(target, runtime, options, fmt, path, spec, entry, images, stage) -> np.ndarray:
    """The shipped file's logits on the same target and runtime."""
    runner = _open(target, runtime, options, fmt, path, spec, entry)
    return run_all(runner, images, spec.batch, stage.update).astype(np.float64)


def write_reports(document: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_NAME).write_text(json.dumps(document, indent=2) + "\n")
    problem = schema.problem("drift_by_block", document)  # after writing: a schema bug must not cost the figures
    if problem is not None:
        raise RuntimeError(f"{out / JSON_NAME} breaks its own schema (a bug; please report it): {problem}")
    (out / MD_NAME).write_text(markdown(document))
    plot(document, out / PNG_NAME)


def _series_label(a: dict) -> str:
    where = a["target"] if a.get("runtime") is None else f"{a['target']} {a['runtime']}"
    return f"{a['format']} {a['precision']} on {where}" + (" (probe)" if a["probe"] else "")


def markdown(doc: dict) -> str:
    lines = [
        f"# Drift by block: {doc['model']} at {doc['input_size'][0]}x{doc['input_size'][1]}",
        "",
        f"Relative error (||artifact - PyTorch|| / ||PyTorch||) at each block boundary, on {doc['images']} "
        f"images, against {doc['reference']}. The first departure: {doc['rule']['text']}.",
        "",
        "| artifact | target | probe | final vs shipped | first departure |",
        "| --- | --- | --- | --- | --- |",
    ]
    for a in doc["artifacts"]:
        where = a["target"] if a.get("runtime") is None else f"{a['target']} {a['runtime']}"
        if "error" in a or "note" in a:
            lines.append(f"| {a['file']} | {where} | | | not run: {a.get('error') or a['note']} |")
            continue
        vs = a["final_vs_shipped"]
        same = "bit-exact" if vs["bit_exact"] else f"differs by {vs['max_abs']:.3g}"
        lines.append(
            f"| {a['file']} | {where} | {'yes' if a['probe'] else 'no'} | {same} | {a['first_departure'] or 'none'} |"
        )
    ran = [a for a in doc["artifacts"] if "error" not in a and "note" not in a]
    if ran:
        lines += ["", "Relative error per block (- where the artifact does not show the boundary):", ""]
        heads = [
            f"{a['format']} {a['precision']} {a['target']}" + (f" {a['runtime']}" if a.get("runtime") else "")
            for a in ran
        ]
        lines.append("| block | " + " | ".join(heads) + " |")
        lines.append("| --- |" + " --- |" * len(ran))
        for i, name in enumerate(doc["blocks"]):
            cells = []
            for a in ran:
                b = a["blocks"][i]
                cell = "-" if b["rel_err"] is None else f"{b['rel_err']:.2e}"
                cells.append(f"**{cell}**" if a["first_departure"] == name else cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    moved = [
        (d["deploy_steps"], p, e)
        for d in doc["deploy_vs_authors"]
        for p, e in d["rel_err"].items()
        if e is not None and e > 1e-4
    ]
    if moved:
        lines += [
            "",
            "Where a deploy form's boundary differs from the authors' form by design (a norm's scale folded into "
            "the next block): relative difference of PyTorch's values there.",
            "",
        ]
        lines += [f"- {p}: {e:.3g} (deploy steps ending {steps[-1]})" for steps, p, e in moved]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [a for a in doc["artifacts"] if "error" not in a and "note" not in a]
    names = doc["blocks"]
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(names) + 3), 5.5))
    floor = 1e-9
    # one colour per artifact, one line style per target (and GPU runtime): a file's rows on two targets pair up
    artifacts = list(dict.fromkeys(a["file"] for a in ran))
    places = list(dict.fromkeys((a["target"], a.get("runtime")) for a in ran))
    colours = plt.get_cmap("tab10" if len(artifacts) <= 10 else "tab20")
    styles = ["-", "--", ":", "-."]
    for a in ran:
        xs = [i for i, b in enumerate(a["blocks"]) if b["rel_err"] is not None]
        ys = [max(a["blocks"][i]["rel_err"], floor) for i in xs]
        (line,) = ax.plot(
            xs,
            ys,
            marker="o",
            markersize=3,
            linewidth=1.2,
            color=colours(artifacts.index(a["file"]) % colours.N),
            linestyle=styles[places.index((a["target"], a.get("runtime"))) % len(styles)],
            label=_series_label(a),
        )
        if a["first_departure"] is not None:
            i = names.index(a["first_departure"])
            ax.plot(
                [i],
                [max(a["blocks"][i]["rel_err"] or floor, floor)],
                marker="X",
                markersize=12,
                color=line.get_color(),
                markeredgecolor="black",
            )
    ax.axhline(doc["rule"]["floor"], color="grey", linestyle=":", linewidth=1)
    ax.text(len(names) - 1, doc["rule"]["floor"] * 1.15, "departure floor", color="grey", fontsize=8, ha="right")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("relative error vs PyTorch fp32")
    ax.set_title(
        f"Drift by block: {doc['model']} at {doc['input_size'][0]}x{doc['input_size'][1]} (X: first departure)"
    )
    ax.grid(True, which="major", axis="y", alpha=0.3)
    if ran:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
