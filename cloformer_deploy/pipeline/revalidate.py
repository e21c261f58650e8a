"""A bundle validated again, here and on a target (or, with a validation set, evaluated: :mod:`.evaluate`)."""

from __future__ import annotations

from pathlib import Path

from ..images import load_images
from ..progress import Progress
from ..quiet import quiet_libraries
from ..targets.local import LocalTarget
from ..validation import bounds_for, validate_artifact
from .bundle import MANIFEST, schema_bug, write_manifest
from .gpu_rows import gpu_checked, gpu_runtimes
from .model import reference_outputs
from .opened import open_bundle
from .options import ExportInputError, ValidateOptions, evaluation_checked

LOCAL = LocalTarget()


def validate_bundle(
    options: ValidateOptions | None = None, /, *, progress: Progress | None = None, **kwargs
) -> tuple[bool, list[dict]]:
    """Re-run validation of every artifact of an existing bundle; True when all pass.

    Takes a :class:`ValidateOptions` or its fields as keyword arguments (``validate_bundle(bundle="export/...",
    weights="ckpt.pth")``). With a ``target`` other than ``local``, every artifact it can run is also
    validated there, and the figures (with their difference from this machine's) are recorded in the
    bundle's manifest under ``validation.targets.<target name>``.

    With ``data`` (a validation set), it is :func:`~.evaluate.evaluate_bundle`'s evaluation, streamed shard by
    shard, and the reports are its rows (one per artifact, each with ``passed``).
    """
    with quiet_libraries():
        if isinstance(options, (str, Path)):  # validate_bundle("export/cloformer_xxs-224x224", ...)
            options, kwargs = None, {"bundle": str(options), **kwargs}
        opts = ValidateOptions.of(options, **kwargs).checked()
        if opts.bundle is None:
            raise ExportInputError("no bundle given; pass the folder written by cloformer-export")
        evaluation_checked(opts)
        if opts.by_block:
            from .by_block import drift_by_block

            found = drift_by_block(opts, progress=progress)
            rows = found.document["artifacts"]
            return all("error" not in r for r in rows), rows
        if opts.data is not None:
            from .evaluate import evaluate_bundle

            evaluation = evaluate_bundle(opts, progress=progress)
            return evaluation.passed, evaluation.rows
        progress = progress or Progress(quiet=True)
        on = opts.open_target()
        if opts.gpu:
            missing = on.gpu_missing()
            if missing is not None:  # before any work: the one line names the setup step or says why not
                on.close()
                raise ExportInputError(f"--gpu: {missing}")
        try:
            opened = open_bundle(opts.bundle, opts.weights)
            if opts.gpu:
                gpu_checked(opened.manifest, on)
            spec = opened.spec
            images = load_images(spec.input_size, spec.mean, spec.std)
            reference = reference_outputs(opened.prepared.module, images.tensor)
            reports = []
            for entry in opened.manifest["artifacts"]:
                fmt, path = entry["format"], opened.folder / entry["path"]
                report, passed = validate_artifact(
                    LOCAL,
                    on,
                    fmt,
                    path,
                    spec,
                    entry,
                    images,
                    reference,
                    bounds_for(entry["precision"], opts.min_top1_agreement),
                    progress,
                    f"{fmt} {entry['precision']}",
                    gpu_runtimes(fmt, entry["precision"], opts.min_top1_agreement) if opts.gpu else (),
                )
                if report.get("gpu"):  # by target, then GPU runtime: a run on another target keeps this one
                    entry.setdefault("validation", {}).setdefault("gpu", {})[on.name] = report["gpu"]
                if on.kind != "local":
                    validation = entry.setdefault("validation", {})
                    validation.setdefault("targets", {})[on.name] = report["targets"][on.name]
                if not report["passed"]:  # where it starts: named in the verdict, the whole picture one command away
                    report["problems"].append(departure_sentence(opened, entry, progress))
                    progress.log(f"{fmt} {entry['precision']}: {report['problems'][-1]}")
                # this machine's and the target's verdict together, as the command's exit code tells
                reports.append(
                    {"format": fmt, "path": entry["path"], "precision": entry["precision"], **report, "passed": passed}
                )
        finally:
            on.close()  # its validation worker: nothing left running
        if on.kind != "local" or opts.gpu:
            write_manifest(opened.folder, opened.manifest)
            schema_bug(opened.manifest, opened.folder / MANIFEST)
        return all(r["passed"] for r in reports), reports


def departure_sentence(opened, entry: dict, progress: Progress) -> str:
    """Which block a failed artifact first departs at on this machine, and the command that draws every block."""
    from .by_block import locate_departure

    command = f"cloformer-validate {opened.folder} --by-block" + (
        f" --weights {opened.spec.weights}" if opened.spec.weights else ""
    )
    try:
        row = locate_departure(opened, entry, progress)
    except Exception as e:  # the verdict stands without it
        return f"its blocks could not be examined ({type(e).__name__}); see: {command}"
    if "error" in row or "note" in row:
        return f"its blocks are not shown here ({row.get('error') or row.get('note')}); see: {command}"
    block = row["first_departure"]
    if block is None:
        return f"no block departs by itself (the error grows evenly); see: {command}"
    err = next(b["rel_err"] for b in row["blocks"] if b["name"] == block)
    return f"it first departs at {block} (relative error {err:.3g}); see: {command}"
