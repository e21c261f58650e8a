"""The bundle an app consumes: artifacts, labels and a manifest, moved into place atomically.

Layout: ``<out>/<variant>-<H>x<W>/`` holds one model at one input size, batch, class count and
set of weights; each export adds its artifacts (``<variant>-<H>x<W>-<precision>.<suffix>``) beside
those already there, so formats and precisions exported in separate runs never remove each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..files import sha256_file, sha256_path, size_bytes  # noqa: F401  (re-exported for the pipeline)
from ..inputs import InputError, default_umask_mode
from . import schema

MANIFEST = "manifest.json"
LABELS = "labels.txt"
# the manifest's published schema (pipeline/schemas/manifest.schema.json, rendered in docs/manifest.md) and the
# version it describes: any change to the manifest's fields changes both
SCHEMA_VERSION = 1  # the manifests written before the schema was published follow it too


class BundleError(InputError):
    """A folder that is not a sound bundle: one line saying what is wrong with it."""


def read_manifest(folder: Path) -> dict:
    """The manifest of a bundle folder, checked against the published schema; BundleError (one line) otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        state = "is a file" if folder.exists() else "does not exist"
        raise BundleError(f"bundle {str(folder)!r} {state}; pass a folder written by cloformer-export")
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"{str(folder)!r} is not a bundle (no {MANIFEST}); pass a folder written by cloformer-export")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = "it is empty" if path.stat().st_size == 0 else f"it is not valid JSON ({str(e).splitlines()[0][:80]})"
        raise BundleError(f"{path} cannot be read: {why}; export the bundle again") from None
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest, path: Path | str = MANIFEST) -> None:
    """A manifest against the published schema (:data:`SCHEMA_VERSION`); BundleError with one line naming
    ``path``, the first place it breaks the schema and the fix."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("model"), dict):
        raise BundleError(f"{path} has no 'model' section; export the bundle again")
    version = manifest.get("schema_version")
    if version is None or (type(version) is int and version < SCHEMA_VERSION):
        written = "no schema_version" if version is None else f"schema {version}"
        raise BundleError(
            f"{path} was written by an older version of cloformer-deploy ({written}; this one reads "
            f"schema {SCHEMA_VERSION}); export it again"
        )
    if type(version) is int and version > SCHEMA_VERSION:
        raise BundleError(
            f"{path} was written by a newer version of cloformer-deploy (schema {version}; this one "
            f"reads schema {SCHEMA_VERSION}); upgrade cloformer-deploy or export it again with this one"
        )
    artifacts = manifest.get("artifacts")
    if not isinstance(artifacts, list) or not artifacts:
        raise BundleError(f"{path} lists no artifacts; export the bundle again")
    why = schema.problem("manifest", manifest)
    if why is not None:
        raise BundleError(f"{path}: {why}; export the bundle again")


def check_files(folder: Path, manifest: dict) -> None:
    """Every artifact the manifest lists is there and unchanged since export; BundleError otherwise."""
    for entry in manifest["artifacts"]:
        path = Path(folder) / entry["path"]
        if not path.exists() or Path(entry["path"]).name != entry["path"]:
            raise BundleError(
                f"{entry['path']} is listed in {MANIFEST} but missing from {folder}; export that artifact again"
            )
        if sha256_path(path) != entry["sha256"]:
            raise BundleError(
                f"{entry['path']} changed since export (sha256 differs from {MANIFEST}); export that artifact again"
            )
    if not (Path(folder) / LABELS).is_file():
        raise BundleError(f"{folder} has no {LABELS}; export the bundle again")


def identity(manifest: dict, labels: list[str]) -> dict:
    """What every artifact of one bundle shares: model, input, batch, classes, weights, labels."""
    m = manifest["model"]
    return {
        "model": m["name"],
        "input size": list(m["input_size"]),
        "batch": m["batch"],
        "classes": m["num_classes"],
        "weights": m.get("weights_sha256") or m.get("state_sha256"),
        "labels": hashlib.sha256("\n".join(labels).encode()).hexdigest(),
    }


def state_sha256(state_dict) -> str:
    """A hash of a model's weights themselves (names, shapes, values), whatever file they came from."""
    import torch

    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows (kept artifacts cost no space), else a copy."""

    def one(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if Path(src).is_dir():
        shutil.copytree(src, dst, copy_function=one)
    else:
        one(src, dst)


class StagingDir:
    """A temporary folder beside the final bundle; ``commit`` renames it into place, anything else removes it
    (with the parent folders it had to create, so that an interrupted export leaves no empty --out behind)."""

    def __init__(self, final: Path):
        self.final = Path(final)
        self.created: list[Path] = []
        parent = self.final.parent.absolute()
        while not parent.exists():
            self.created.append(parent)
            parent = parent.parent
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=".partial", dir=self.final.parent))
        os.chmod(self.path, default_umask_mode())  # mkdtemp's 0700 would travel into the zip

    def commit(self, target: Path | None = None) -> Path:
        target = Path(target or self.final)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
        self.path.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        for folder in self.created:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break


def write_manifest(folder: Path, manifest: dict) -> None:
    """Written to a temporary name and renamed: a manifest is never half-written (validation rewrites it)."""
    tmp = folder / f".{MANIFEST}.partial"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, folder / MANIFEST)


def schema_bug(manifest: dict, where: Path) -> None:
    """After the work is written: a manifest this version made that breaks its own schema is this project's bug
    (RuntimeError naming it), never the user's, and it must not cost the artifacts."""
    problem = schema.problem("manifest", manifest)
    if problem is not None:
        raise RuntimeError(
            f"the manifest written at {where} breaks its own schema (a bug; please report it): {problem}"
        )


def zip_bundle(folder: Path) -> Path:
    """``<bundle>.zip`` beside the bundle, written to a temporary name first."""
    folder = Path(folder)
    tmp = shutil.make_archive(str(folder.parent / f".{folder.name}.zip-partial"), "zip", folder.parent, folder.name)
    final = folder.parent / f"{folder.name}.zip"
    os.replace(tmp, final)
    return final
