"""The manifest an app reads beside the artifacts, and which artifacts of an existing bundle an export keeps."""

from __future__ import annotations

from pathlib import Path

from ..formats import BACKENDS
from ..formats.base import ModelSpec
from ..images import CROP_PCT, ImageBatch
from .bundle import LABELS, SCHEMA_VERSION, BundleError, check_files, identity, read_manifest
from .model import RANDOM_SEED, PreparedModel
from .options import ExportInputError


def kept_artifacts(
    final: Path, force: bool, spec: ModelSpec, prepared: PreparedModel, labels: list[str], precisions: dict[str, str]
) -> list[dict]:
    """The entries of an existing bundle at ``final`` that this export keeps beside its own artifacts.

    A bundle holds one model, size, batch, class count, set of weights and labels; an export that
    differs in any of these would mix artifacts that compute different functions, so it is refused
    unless ``force`` (then the old bundle is replaced whole).
    """
    if not final.exists():
        return []
    try:
        old = read_manifest(final)
        check_files(final, old)
        old_labels = (final / LABELS).read_text().splitlines()
    except (BundleError, OSError) as e:
        if force:
            return []
        why = e.cli_message.split("; ")[0] if isinstance(e, BundleError) else (e.strerror or str(e))
        raise ExportInputError(
            f"{final} exists but is not a sound bundle ({why}); pass --force to replace it or --out another folder"
        ) from None
    new_manifest = {
        "model": {
            "name": spec.name,
            "input_size": list(spec.input_size),
            "batch": spec.batch,
            "num_classes": spec.num_classes,
            "weights_sha256": prepared.weights_sha256,
            "state_sha256": prepared.state_sha256,
        }
    }
    mine, theirs = identity(new_manifest, labels), identity(old, old_labels)
    differs = [k for k in mine if mine[k] != theirs[k]]
    if differs:
        if force:
            return []
        raise ExportInputError(
            f"{final} holds artifacts that differ in {', '.join(differs)}; pass --force to "
            "replace the whole bundle or --out another folder"
        )
    clashes = [e for e in old["artifacts"] if precisions.get(e["format"]) == e["precision"]]
    if clashes and not force:
        names = ", ".join(f"{e['format']} {e['precision']}" for e in clashes)
        raise ExportInputError(
            f"{final} already holds {names}; pass --force to replace "
            f"{'it' if len(clashes) == 1 else 'them'} (the bundle's other artifacts stay)"
        )
    return [e for e in old["artifacts"] if e not in clashes]


def build_manifest(
    spec: ModelSpec,
    variant,
    prepared: PreparedModel,
    results: list,
    images: ImageBatch | None,
    data,
    command,
    created,
    run_versions,
) -> dict:
    h, w = spec.input_size
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "name": spec.name,
            "family": variant.family,
            "num_classes": spec.num_classes,
            "input_size": [h, w],
            "batch": spec.batch,
            "params": spec.params,
            "weights": Path(spec.weights).name if spec.weights else None,
            "weights_sha256": spec.weights_sha256,
            "state_sha256": prepared.state_sha256,
            "random_init": prepared.random_init,
            **({"random_seed": RANDOM_SEED} if prepared.random_init else {}),
        },
        "preprocessing": {
            "mean": list(spec.mean),
            "std": list(spec.std),
            "scale": 1 / 255,
            "formula": "(pixel / 255 - mean) / std",
            "color_order": "RGB",
            "layout": "NCHW",
            "dtype": "float32",
            "resize": f"bicubic, shorter side to size / {CROP_PCT}",
            "crop": "center",
            "crop_pct": CROP_PCT,
            **{name: b.input_note for name, b in BACKENDS.items() if b.input_note},
        },
        "labels": LABELS,
        "artifacts": [r.entry for r in results],
        "validation_images": None
        if images is None
        else {
            "source": str(data) if data else "scikit-image bundled photographs",
            "count": len(images),
            "names": images.names,
        },
        "passed": all(r.passed is not False for r in results),
        "versions": run_versions,
        "command": command,
        "created": created,
    }
