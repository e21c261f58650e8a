"""A bundle opened again: its manifest and files checked, and the model it was exported from rebuilt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..files import sha256_file
from ..formats import BACKENDS
from ..formats.base import ModelSpec
from ..inputs import existing_file
from ..models import get_variant
from .bundle import LABELS, BundleError, check_files, read_manifest
from .model import RANDOM_SEED, PreparedModel, prepare_model
from .options import ExportInputError


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
