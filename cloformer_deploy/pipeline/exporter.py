"""``export(...)``: checkpoint -> deploy form -> artifacts -> validation -> bundle. The CLI is a thin layer over it.

Every option and file argument is checked before a model is built or converted; bad input raises
:class:`ExportInputError` (one line naming the fix) and writes nothing.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ..files import sha256_path, size_bytes
from ..formats import BACKENDS
from ..formats.base import ExportJob, ModelSpec
from ..images import ImageBatch, load_calibration, load_images
from ..models import to_deploy
from ..progress import Progress
from ..quiet import quiet_libraries
from ..targets.local import LocalTarget
from ..validation import bounds_for, validate_artifact
from . import bundle as bundle_io
from .manifest import build_manifest, kept_artifacts
from .model import (
    RANDOM_SEED,
    PreparedModel,
    labels_for,
    layer_sensitivity,
    prepare_model,
    quantisable_layers,
    reference_outputs,
    versions,
)
from .options import (
    DEFAULT_CALIBRATION_SIZE,
    ExportInputError,
    ExportOptions,
    check_memory,
    export_checked,
    format_options,
)

LOCAL = LocalTarget()  # this machine: artifacts are validated here first, then on a --target


@dataclass
class ArtifactResult:
    format: str
    path: Path
    precision: str
    passed: bool | None
    entry: dict


@dataclass
class ExportResult:
    bundle: Path
    manifest: dict
    artifacts: list[ArtifactResult] = field(default_factory=list)
    passed: bool = True
    seconds: float = 0.0
    zip_path: Path | None = None


@dataclass
class _Run:
    """What every artifact of one export shares: the model, its inputs, the reference outputs, the record."""

    final: Path  # the bundle's folder
    kept: list[dict]  # the entries of an existing bundle there that this export keeps
    opts: ExportOptions
    precisions: dict[str, str]
    prepared: PreparedModel
    spec: ModelSpec
    images: ImageBatch | None  # validation images; None with --no-validate
    reference: np.ndarray | None  # PyTorch fp32 outputs of the authors' form on them
    calibration: np.ndarray | None
    calibration_size: int
    example: torch.Tensor
    target: object
    created: str
    command: list[str]
    versions: dict
    deploy: torch.nn.Module | None = None
    sensitivities: dict = field(default_factory=dict)  # per exported module: formats may take different forms


def export(
    options: ExportOptions | str | None = None,
    /,
    *,
    progress: Progress | None = None,
    argv: list[str] | None = None,
    **kwargs,
) -> ExportResult:
    """Export one model to the given formats, validate every artifact, and add them to the bundle.

    Takes an :class:`ExportOptions` or its fields as keyword arguments (``export(model="cloformer-xxs",
    format="onnx", precision="int8")``); the names are the CLI's flags. The bundle
    ``<out>/<variant>-<H>x<W>/`` keeps artifacts of other formats and precisions exported earlier from
    the same weights, batch and labels; ``force`` replaces an artifact of the same format and precision,
    or a bundle of other weights. Raises :class:`ExportInputError` for bad input before anything is
    written. A validation breach leaves the bundle at ``<bundle>.failed`` and ``passed`` False. A
    ``target`` other than ``local`` (``arm64``, emulated; ``ssh://[user@]host[:port]``, a device) also
    validates every artifact it can run there and records those figures, and their difference from this
    machine's, in the manifest.
    """
    with quiet_libraries():
        if isinstance(options, str):  # export("cloformer-xxs", ...)
            options, kwargs = None, {"model": options, **kwargs}
        opts, precisions = export_checked(ExportOptions.of(options, **kwargs))
        progress = progress or Progress(quiet=True)
        t0 = time.perf_counter()
        calibrated = any(p in BACKENDS[f].calibrated_precisions for f, p in precisions.items())
        calibration_size = opts.calibration_size or DEFAULT_CALIBRATION_SIZE
        check_memory(opts, opts.num_classes or 1000, calibration_size if calibrated else 0)
        target = opts.open_target()
        if target.kind != "local" and opts.no_validate:
            target.close()
            raise ExportInputError(f"--target {opts.target} validates the artifacts there; drop --no-validate")
        try:
            run = _prepare(opts, precisions, calibrated, calibration_size, target, progress, argv)
            return _write_bundle(run, progress, t0)
        finally:
            target.close()  # its validation worker: nothing left running


def _prepare(opts, precisions, calibrated: bool, calibration_size: int, target, progress: Progress, argv) -> _Run:
    """The model with its weights and labels, the images it is validated and calibrated on, its reference outputs."""
    with progress.stage("load model"):
        prepared = prepare_model(opts.model, opts.weights, opts.num_classes)
    authors, variant = prepared.module, prepared.variant
    if opts.keep_float > quantisable_layers(authors):
        raise ExportInputError(
            f"--keep-float {opts.keep_float} is more than the model's "
            f"{quantisable_layers(authors)} quantisable layers; give fewer"
        )
    labels = labels_for(opts.labels, authors.num_classes)
    size = opts.img_size
    spec = ModelSpec(
        name=variant.name,
        num_classes=authors.num_classes,
        input_size=size,
        batch=opts.batch,
        mean=variant.mean,
        std=variant.std,
        labels=labels,
        params=sum(p.numel() for p in authors.parameters()),
        weights=str(opts.weights) if opts.weights else None,
        weights_sha256=prepared.weights_sha256,
    )
    final = Path(opts.out) / f"{spec.name}-{size[0]}x{size[1]}"
    kept = kept_artifacts(final, opts.force, spec, prepared, labels, precisions)  # a clash refused before the work
    images = reference = calibration = None
    if not opts.no_validate:
        images = load_images(size, variant.mean, variant.std, folder=opts.data)
        if len(images) < opts.batch:  # a static batch needs at least one full batch
            reps = -(-opts.batch // len(images))
            images = ImageBatch(
                images.names * reps, np.concatenate([images.images] * reps), np.concatenate([images.tensor] * reps)
            )
    if calibrated:
        calibration = load_calibration(size, variant.mean, variant.std, folder=opts.data, count=calibration_size)
        if len(calibration) < calibration_size:
            progress.warn(
                f"--calibration-size {calibration_size}: the images give only {len(calibration)} "
                "distinct views; calibrating with those (pass --data with more photographs)"
            )
    if opts.weights is None:
        progress.warn(
            f"no --weights: exporting RANDOMLY INITIALISED weights (seed {RANDOM_SEED}; for testing the pipeline only)"
        )
    if images is not None:
        with progress.stage(f"reference (PyTorch fp32, authors' form, {len(images)} images)"), torch.no_grad():
            reference = reference_outputs(authors, images.tensor)
    example = torch.from_numpy(images.tensor[: opts.batch]) if images is not None else torch.randn(opts.batch, 3, *size)
    return _Run(
        final,
        kept,
        opts,
        precisions,
        prepared,
        spec,
        images,
        reference,
        calibration,
        calibration_size,
        example,
        target,
        datetime.now(timezone.utc).isoformat(timespec="seconds"),
        argv if argv is not None else sys.argv,
        versions(),
    )


def _write_bundle(run: _Run, progress: Progress, t0: float) -> ExportResult:
    """Every artifact exported and validated in a staging folder beside the bundle, then moved into place."""
    opts, final, kept = run.opts, run.final, run.kept
    try:
        staging = bundle_io.StagingDir(final)
    except OSError as e:
        raise ExportInputError(
            f"--out {str(opts.out)!r} is not writable ({e.strerror}); choose another folder"
        ) from None
    results: list[ArtifactResult] = []
    try:
        for entry in kept:
            bundle_io.link_or_copy(final / entry["path"], staging.path / entry["path"])
            passed = (entry.get("validation") or {}).get("passed")
            results.append(ArtifactResult(entry["format"], final / entry["path"], entry["precision"], passed, entry))
        for fmt in opts.format:
            entry, passed = _export_artifact(run, fmt, staging.path, progress)
            results.append(ArtifactResult(fmt, final / entry["path"], entry["precision"], passed, entry))
        manifest = build_manifest(
            run.spec,
            run.prepared.variant,
            run.prepared,
            results,
            run.images,
            opts.data,
            run.command,
            run.created,
            run.versions,
        )
        (staging.path / bundle_io.LABELS).write_text("\n".join(run.spec.labels) + "\n")
        bundle_io.write_manifest(staging.path, manifest)
        ok = all(r.passed is not False for r in results)
        bundle_path = staging.commit(final if ok else final.with_name(final.name + ".failed"))
    except BaseException:
        staging.discard()
        raise
    for r in results:
        r.path = bundle_path / r.path.name
    zip_path = bundle_io.zip_bundle(bundle_path) if opts.zip and ok else None
    bundle_io.schema_bug(manifest, bundle_path / bundle_io.MANIFEST)
    new = [r for r in results if r.entry.get("created") == run.created]
    return ExportResult(bundle_path, manifest, new, ok, time.perf_counter() - t0, zip_path)


def _deploy_form(run: _Run, fmt: str, precision: str, progress: Progress) -> torch.nn.Module:
    """The deploy form this format takes: the default one (made once), or its own steps."""
    authors, size = run.prepared.module, run.spec.input_size
    form = BACKENDS[fmt].deploy_steps(precision, format_options(run.opts))
    if form is not None:
        return to_deploy(authors, size, steps=form[0], extra_steps=form[1])
    if run.deploy is None:
        with progress.stage("deploy form"):
            run.deploy = to_deploy(authors, size)
    return run.deploy


def _kept_float(run: _Run, module, precision: str, progress: Progress) -> tuple[list[str], list[dict] | None]:
    """The layers --keep-float leaves in float (the most sensitive to int8 weights), and the sensitivities."""
    if precision != "int8" or not run.opts.keep_float:
        return [], None
    if id(module) not in run.sensitivities:
        with progress.stage(f"per-layer int8 sensitivity on {min(len(run.calibration), 8)} calibration images") as st:
            run.sensitivities[id(module)] = layer_sensitivity(module, run.calibration, on_progress=st.update)
    sensitivity = run.sensitivities[id(module)]
    return [d["layer"] for d in sensitivity[: run.opts.keep_float]], sensitivity


def _export_artifact(run: _Run, fmt: str, folder: Path, progress: Progress) -> tuple[dict, bool | None]:
    """One format's artifact written into ``folder`` and validated: its manifest entry and its verdict (here and
    on the target; None when not validated)."""
    backend, precision, opts = BACKENDS[fmt], run.precisions[fmt], run.opts
    path = folder / backend.filename(run.spec, precision)
    module = _deploy_form(run, fmt, precision, progress)
    kept_float, sensitivity = _kept_float(run, module, precision, progress)
    job = ExportJob(
        module,
        run.example,
        run.spec,
        precision,
        backend.check_options(format_options(opts)),
        run.images.tensor if run.images is not None else None,
        run.calibration,
        kept_float,
    )
    t = time.perf_counter()
    with progress.stage(f"{fmt}: export ({precision})"):
        info = backend.export(job, path, lambda text: progress.log(f"{fmt}: {text}"))
    entry = {
        "format": fmt,
        "path": path.name,
        "precision": precision,
        "size_bytes": size_bytes(path),
        "weight_bytes": backend.weight_storage(path),
        "sha256": sha256_path(path),
        "export_seconds": round(time.perf_counter() - t, 2),
        "deploy_steps": list(module.deploy_steps),
        **info,
    }
    if precision == "int8" and run.calibration is not None:
        entry["calibration"] = {
            "images": int(len(run.calibration)),
            "requested": run.calibration_size,
            "source": str(opts.data)
            if opts.data
            else "scikit-image bundled photographs, mirrored / wider / tighter crops",
            "sha256": hashlib.sha256(run.calibration.tobytes()).hexdigest(),
            "kept_float": kept_float if backend.keeps_float_layers else [],
            "sensitivity_top": (sensitivity or [])[:10],
        }
    passed = None
    if run.reference is not None:
        entry["validation"], passed = validate_artifact(
            LOCAL,
            run.target,
            fmt,
            path,
            run.spec,
            info,
            run.images,
            run.reference,
            bounds_for(precision, opts.min_top1_agreement),
            progress,
            fmt,
        )
    entry.update(created=run.created, command=run.command, versions=run.versions)
    return entry, passed
