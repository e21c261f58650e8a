"""A bundle opened again: its manifest and files checked, its model rebuilt; validated again here and on a target."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..files import sha256_file
from ..formats import BACKENDS
from ..formats.base import ModelSpec
from ..images import load_images
from ..inputs import existing_file
from ..models import get_variant
from ..progress import Progress
from ..quiet import quiet_libraries
from ..targets.local import LocalTarget
from ..validation import bounds_for, validate_artifact
from .bundle import LABELS, MANIFEST, BundleError, check_files, read_manifest, schema_bug, write_manifest
from .model import RANDOM_SEED, PreparedModel, prepare_model, reference_outputs
from .options import ExportInputError, ValidateOptions, evaluation_checked

LOCAL = LocalTarget()


@dataclass
class OpenedBundle:
    """A checked bundle with the weights it was exported from, ready to validate or benchmark."""

    folder: Path
    manifest: dict
    prepared: PreparedModel
    spec: ModelSpec


def open_bundle(folder, weights=None) -> OpenedBundle:
    """Check a bundle (manifest, files, hashes) and the weights it needs, then build its model.

    A bundle of random weights is rebuilt from the seed its manifest records; one exported from a
    checkpoint needs that very checkpoint (its sha256 is compared before anything is built).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    m = manifest["model"]
    get_variant(m["name"])
    for entry in manifest["artifacts"]:
        if entry["format"] not in BACKENDS:
            raise BundleError(
                f"{entry['path']} has format {entry['format']!r}, which this version "
                f"does not know ({', '.join(BACKENDS)}); export the bundle again"
            )
    check_files(folder, manifest)
    if m.get("random_init"):
        if weights is not None:
            raise ExportInputError(
                f"the bundle holds random weights (seed {m.get('random_seed', RANDOM_SEED)}), "
                "not a checkpoint's; drop --weights, or export again with --weights"
            )
        if not m.get("state_sha256"):
            raise ExportInputError(
                "the bundle holds random weights from a version that did not record them; export it again"
            )
    else:
        if weights is None:
            raise ExportInputError(
                f"the bundle was exported from {m.get('weights')}; pass --weights with that checkpoint"
            )
        existing_file("--weights", weights, "a .pth/.pt/.safetensors checkpoint")
        if m.get("weights_sha256") and sha256_file(Path(weights)) != m["weights_sha256"]:
            raise ExportInputError(
                f"{Path(weights).name} is not the checkpoint this bundle was exported from "
                f"(sha256 differs); pass {m.get('weights')}"
            )
    prepared = prepare_model(m["name"], weights, m["num_classes"])
    if m.get("random_init") and prepared.state_sha256 != m["state_sha256"]:
        raise ExportInputError(
            "this torch draws other random weights than the one that exported the bundle "
            f"(torch {manifest.get('versions', {}).get('torch')}); export it again here"
        )
    variant = prepared.variant
    labels = (folder / LABELS).read_text().splitlines()
    spec = ModelSpec.from_manifest(m, variant.mean, variant.std, labels, str(weights) if weights else None)
    return OpenedBundle(folder, manifest, prepared, spec)


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
        if opts.data is not None:
            from .evaluate import evaluate_bundle

            evaluation = evaluate_bundle(opts, progress=progress)
            return evaluation.passed, evaluation.rows
        progress = progress or Progress(quiet=True)
        on = opts.open_target()
        try:
            opened = open_bundle(opts.bundle, opts.weights)
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
                )
                if on.kind != "local":
                    validation = entry.setdefault("validation", {})
                    validation.setdefault("targets", {})[on.name] = report["targets"][on.name]
                # this machine's and the target's verdict together, as the command's exit code tells
                reports.append(
                    {"format": fmt, "path": entry["path"], "precision": entry["precision"], **report, "passed": passed}
                )
        finally:
            on.close()  # its validation worker: nothing left running
        if on.kind != "local":
            write_manifest(opened.folder, opened.manifest)
            schema_bug(opened.manifest, opened.folder / MANIFEST)
        return all(r["passed"] for r in reports), reports
