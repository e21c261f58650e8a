"""``export(...)``: checkpoint -> deploy form -> artifacts -> validation -> bundle. The CLI is a thin layer over it."""
from __future__ import annotations

import hashlib
import platform
import tempfile
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..models import (CheckpointError, InputSizeError, UnknownModelError, apply_state_dict, check_input_size,
                      get_variant, load_checkpoint, to_deploy)
from ..models.checkpoint import num_classes_of
from . import bundle as bundle_io
from .base import BACKENDS, ExportJob, FormatError, ModelSpec, parse_formats
from .images import CROP_PCT, ImageBatch, ImageDataError, load_calibration, load_images
from .progress import Progress
from .validate import bounds_for, validate


class ExportInputError(ValueError):
    """Bad input to export/validate: a one-line message that names the fix."""


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


def imagenet_labels() -> list[str]:
    text = resources.files("cloformer_deploy").joinpath("data/imagenet1k_labels.txt").read_text()
    return text.splitlines()


def read_labels(path: str | Path, num_classes: int) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ExportInputError(f"--labels {str(p)!r} does not exist; pass a text file with one class name per line")
    labels = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if len(labels) != num_classes:
        raise ExportInputError(f"--labels has {len(labels)} names but the model has {num_classes} classes; "
                               "give one name per class")
    return unique_labels(labels)


def unique_labels(labels: list[str]) -> list[str]:
    """Core ML classifiers key scores by label, so repeated names get their class index appended."""
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    return [f"{lab} ({i})" if seen[lab] > 1 else lab for i, lab in enumerate(labels)]


def _check_writable(out: Path) -> None:
    """Fail early, writing nothing that stays, when --out cannot hold the bundle."""
    probe = out.absolute()
    while not probe.exists():
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise OSError
        tempfile.TemporaryDirectory(dir=probe).cleanup()  # root passes os.access everywhere; try for real
    except OSError:
        raise ExportInputError(f"--out {str(out)!r} is not writable; choose a folder you can write to") from None


def _precisions(formats: list[str], precision: str | None) -> dict[str, str]:
    out = {}
    for f in formats:
        backend = BACKENDS[f]
        p = (precision or backend.default_precision).lower()
        if p not in backend.precisions:
            raise ExportInputError(f"--precision {p} is not offered for {f}; choose from {', '.join(backend.precisions)}")
        out[f] = p
    return out


def layer_sensitivity(deploy: torch.nn.Module, calibration: np.ndarray, limit: int = 8) -> list[dict]:
    """How much int8 weights in each single layer move the logits (1 - cosine), worst first.

    Each convolution or linear layer in turn gets its weights rounded to int8 (per output
    channel, symmetric) while every other layer stays fp32; measured on calibration images.
    """
    import copy

    x = torch.from_numpy(calibration[:limit])
    model = copy.deepcopy(deploy).eval()
    with torch.no_grad():
        ref = model(x).flatten(1).double()
        out = []
        for name, mod in model.named_modules():
            if not isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                continue
            w = mod.weight.data
            scale = w.abs().flatten(1).amax(1).clamp_min(1e-12) / 127
            shape = (-1,) + (1,) * (w.ndim - 1)
            q = (w / scale.reshape(shape)).round().clamp(-127, 127) * scale.reshape(shape)
            mod.weight.data = q
            y = model(x).flatten(1).double()
            mod.weight.data = w
            cos = torch.nn.functional.cosine_similarity(y, ref, dim=1).min().item()
            out.append({"layer": name, "drift": float(f"{1 - cos:.3g}")})
    return sorted(out, key=lambda d: -d["drift"])


def versions() -> dict[str, str | None]:
    v: dict[str, str | None] = {"cloformer_deploy": __version__, "torch": torch.__version__,
                                "python": platform.python_version()}
    for backend in BACKENDS.values():
        try:
            v.update(backend.versions())
        except Exception:  # a broken optional runtime must not stop the manifest
            pass
    v["git_commit"] = bundle_io.git_commit()
    return v


def prepare_model(model: str, weights: str | Path | None, num_classes: int | None):
    """The authors' form with weights loaded, its spec facts, and the checkpoint's hash."""
    try:
        variant = get_variant(model)
    except UnknownModelError as e:
        raise ExportInputError(str(e)) from None
    state = None
    sha = None
    if weights is not None:
        try:
            state = load_checkpoint(weights)
        except CheckpointError as e:
            raise ExportInputError(str(e)) from None
        sha = bundle_io.sha256_file(Path(weights))
        if num_classes is None:
            num_classes = num_classes_of(state) or 1000
    num_classes = 1000 if num_classes is None else num_classes
    with torch.random.fork_rng():  # random weights are the same in every run, so reference runs repeat
        torch.manual_seed(0)
        net = variant.build(num_classes=num_classes).eval()
    if state is not None:
        try:
            apply_state_dict(net, state, variant.name, source=Path(weights).name)
        except CheckpointError as e:
            raise ExportInputError(str(e)) from None
    return variant, net, sha


def export(model: str = "cloformer_xxs", *, weights: str | Path | None = None, formats="all",
           img_size=224, num_classes: int | None = None, batch: int = 1, precision: str | None = None,
           out: str | Path = "export", labels: str | Path | None = None, opset: int | None = None,
           simplify: bool = True, validate_artifacts: bool = True, force: bool = False, zip_bundle: bool = False,
           data: str | Path | None = None, coreml_input: str = "image", coreml_target: str = "iOS16",
           et_backend: str = "xnnpack", min_top1_agreement: float | None = None,
           calibration_size: int = 32, keep_float: int = 0,
           progress: Progress | None = None, argv: list[str] | None = None) -> ExportResult:
    """Export one model to the given formats, validate every artifact, and write the bundle.

    Raises :class:`ExportInputError` for bad input before anything is written.
    A validation breach leaves the bundle at ``<bundle>.failed`` and ``passed`` False.
    """
    t0 = time.perf_counter()
    progress = progress or Progress(quiet=True)
    # --- check every input before writing anything ---
    try:
        fmts = parse_formats(formats)
        size = check_input_size(img_size)
    except (FormatError, InputSizeError) as e:
        raise ExportInputError(str(e)) from None
    if batch < 1:
        raise ExportInputError(f"--batch {batch} must be 1 or more")
    if coreml_input not in ("image", "tensor"):
        raise ExportInputError(f"--coreml-input {coreml_input!r}: choose image or tensor")
    if et_backend not in ("xnnpack", "portable"):
        raise ExportInputError(f"--backend {et_backend!r}: choose xnnpack or portable")
    precisions = _precisions(fmts, precision)
    out = Path(out)
    _check_writable(out)
    with progress.stage("load model"):
        variant, authors, weights_sha = prepare_model(model, weights, num_classes)
    n_classes = authors.num_classes
    if labels is not None:
        label_list = read_labels(labels, n_classes)
    elif n_classes == 1000:
        label_list = imagenet_labels()
    else:
        label_list = [str(i) for i in range(n_classes)]
    name = f"{variant.name}-{size[0]}x{size[1]}"
    final = out / name
    if final.exists() and not force:
        raise ExportInputError(f"{final} already exists; pass --force to replace it or --out another folder")
    images = None
    if validate_artifacts:
        try:
            images = load_images(size, variant.mean, variant.std, folder=data)
        except ImageDataError as e:
            raise ExportInputError(str(e)) from None
        if len(images) < batch:  # a static batch needs at least one full batch
            reps = -(-batch // len(images))
            images = ImageBatch(images.names * reps, np.concatenate([images.images] * reps),
                                np.concatenate([images.tensor] * reps))
    quantised = [f for f in fmts if precisions[f] in ("int8",)]
    calibration = None
    if quantised:
        if calibration_size < 1:
            raise ExportInputError("--calibration-size must be 1 or more")
        try:
            calibration = load_calibration(size, variant.mean, variant.std, folder=data, count=calibration_size)
        except ImageDataError as e:
            raise ExportInputError(str(e)) from None
    if weights is None:
        progress.warn("no --weights: exporting RANDOMLY INITIALISED weights (seed 0; for testing the pipeline only)")

    with progress.stage("deploy form"):
        deploy = to_deploy(authors, size)
    sensitivities: dict[int, list[dict]] = {}  # per exported module: formats may take different forms

    def sensitivity_of(module) -> list[dict]:
        if id(module) not in sensitivities:
            with progress.stage(f"per-layer int8 sensitivity on {min(len(calibration), 8)} calibration images"):
                sensitivities[id(module)] = layer_sensitivity(module, calibration)
        return sensitivities[id(module)]
    spec = ModelSpec(name=variant.name, num_classes=n_classes, input_size=size, batch=batch, mean=variant.mean,
                     std=variant.std, labels=label_list, params=sum(p.numel() for p in authors.parameters()),
                     weights=str(weights) if weights else None, weights_sha256=weights_sha)
    reference = None
    if images is not None:
        with progress.stage(f"reference (PyTorch fp32, authors' form, {len(images)} images)"), torch.no_grad():
            reference = authors(torch.from_numpy(images.tensor)).numpy()
    example = torch.from_numpy(images.tensor[:batch]) if images is not None else torch.randn(batch, 3, *size)
    options = {"opset": opset, "simplify": simplify, "coreml_input": coreml_input, "coreml_target": coreml_target,
               "et_backend": et_backend}

    try:
        staging = bundle_io.StagingDir(final)
    except OSError as e:
        raise ExportInputError(f"--out {str(out)!r} is not writable ({e.strerror}); choose another folder") from None
    results: list[ArtifactResult] = []
    try:
        for fmt in fmts:
            backend = BACKENDS[fmt]
            prec = precisions[fmt]
            path = staging.path / backend.filename(spec, prec)
            form = backend.deploy_steps(prec, options)
            module = deploy if form is None else to_deploy(authors, size, steps=form[0], extra_steps=form[1])
            sensitivity = sensitivity_of(module) if prec == "int8" and keep_float else None
            kept = [d["layer"] for d in sensitivity[:keep_float]] if sensitivity else []
            job = ExportJob(module, example, spec, prec, options, images.tensor if images is not None else None,
                            calibration, kept)
            t = time.perf_counter()
            with progress.stage(f"{fmt}: export ({prec})"):
                info = backend.export(job, path, progress.log)
            entry = {"format": fmt, "path": path.name, "precision": prec, "size_bytes": bundle_io.size_bytes(path),
                     "sha256": bundle_io.sha256_path(path), "export_seconds": round(time.perf_counter() - t, 2),
                     "deploy_steps": list(module.deploy_steps), **info}
            if prec == "int8" and calibration is not None:
                entry["calibration"] = {"images": int(len(calibration)), "source": str(data) if data else
                                        "scikit-image bundled photographs, mirrored / wider crops",
                                        "sha256": hashlib.sha256(calibration.tobytes()).hexdigest(),
                                        "kept_float": kept if fmt != "coreml" else [],
                                        "sensitivity_top": (sensitivity or [])[:10]}
            passed = None
            if reference is not None:
                with progress.stage(f"{fmt}: validate"):
                    runner = backend.open(path, spec, info)
                    report = validate(runner, images, reference, batch, bounds_for(prec, min_top1_agreement))
                entry["validation"] = report
                passed = report["passed"]
                progress.report(fmt, report)
            results.append(ArtifactResult(fmt, final / path.name, prec, passed, entry))
        manifest = build_manifest(spec, variant, results, images, data, argv)
        (staging.path / bundle_io.LABELS).write_text("\n".join(label_list) + "\n")
        bundle_io.write_manifest(staging.path, manifest)
        ok = all(r.passed is not False for r in results)
        target = final if ok else final.with_name(final.name + ".failed")
        bundle_path = staging.commit(target)
    except BaseException:
        staging.discard()
        raise
    for r in results:
        r.path = bundle_path / r.path.name
    zip_path = bundle_io.zip_bundle(bundle_path) if zip_bundle and ok else None
    return ExportResult(bundle_path, manifest, results, ok, time.perf_counter() - t0, zip_path)


def build_manifest(spec: ModelSpec, variant, results: list[ArtifactResult], images: ImageBatch | None,
                   data, argv) -> dict:
    h, w = spec.input_size
    return {
        "schema_version": bundle_io.SCHEMA_VERSION,
        "model": {"name": spec.name, "family": variant.family, "num_classes": spec.num_classes,
                  "input_size": [h, w], "batch": spec.batch, "params": spec.params,
                  "weights": Path(spec.weights).name if spec.weights else None,
                  "weights_sha256": spec.weights_sha256, "random_init": spec.weights is None},
        "preprocessing": {"mean": list(spec.mean), "std": list(spec.std), "scale": 1 / 255,
                          "formula": "(pixel / 255 - mean) / std", "color_order": "RGB", "layout": "NCHW",
                          "dtype": "float32", "resize": f"bicubic, shorter side to size / {CROP_PCT}",
                          "crop": "center", "crop_pct": CROP_PCT,
                          "coreml": "image input: RGB pixels 0-255; normalisation is inside the model"},
        "labels": bundle_io.LABELS,
        "artifacts": [r.entry for r in results],
        "validation_images": None if images is None else {
            "source": str(data) if data else "scikit-image bundled photographs", "count": len(images),
            "names": images.names},
        "passed": all(r.passed is not False for r in results),
        "versions": versions(),
        "command": argv if argv is not None else sys.argv,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def validate_bundle(folder: str | Path, *, weights: str | Path | None = None, data: str | Path | None = None,
                    min_top1_agreement: float | None = None, progress: Progress | None = None,
                    update_manifest: bool = True) -> tuple[bool, list[dict]]:
    """Re-run validation of every artifact of an existing bundle; True when all pass."""
    progress = progress or Progress(quiet=True)
    folder = Path(folder)
    if not (folder / bundle_io.MANIFEST).is_file():
        raise ExportInputError(f"{str(folder)!r} is not a bundle (no {bundle_io.MANIFEST}); "
                               "pass a folder written by cloformer-export")
    manifest = bundle_io.read_manifest(folder)
    m = manifest["model"]
    if weights is None and not m["random_init"]:
        raise ExportInputError(f"the bundle was exported from {m['weights']}; pass --weights with that checkpoint")
    if weights is None:
        raise ExportInputError("the bundle holds randomly initialised weights that were not saved; "
                               "re-export with --weights to validate later")
    if m.get("weights_sha256") and bundle_io.sha256_file(Path(weights)) != m["weights_sha256"]:
        raise ExportInputError(f"{Path(weights).name} is not the checkpoint this bundle was exported from "
                               f"(sha256 differs); pass {m['weights']}")
    variant, authors, _ = prepare_model(m["name"], weights, m["num_classes"])
    size = tuple(m["input_size"])
    labels = (folder / bundle_io.LABELS).read_text().splitlines()
    try:
        images = load_images(size, variant.mean, variant.std, folder=data)
    except ImageDataError as e:
        raise ExportInputError(str(e)) from None
    spec = ModelSpec(m["name"], m["num_classes"], size, m["batch"], variant.mean, variant.std, labels,
                     m["params"], str(weights), m.get("weights_sha256"))
    with torch.no_grad():
        reference = authors(torch.from_numpy(images.tensor)).numpy()
    reports = []
    for entry in manifest["artifacts"]:
        backend = BACKENDS[entry["format"]]
        path = folder / entry["path"]
        if not path.exists():
            report = {"passed": False, "problems": [f"{entry['path']} is missing"]}
        elif bundle_io.sha256_path(path) != entry["sha256"]:
            report = {"passed": False, "problems": [f"{entry['path']} changed since export (sha256 differs)"]}
        else:
            with progress.stage(f"{entry['format']}: validate"):
                runner = backend.open(path, spec, entry)
                report = validate(runner, images, reference, m["batch"],
                                  bounds_for(entry["precision"], min_top1_agreement))
        progress.report(entry["format"], report)
        reports.append({"format": entry["format"], "path": entry["path"], **report})
    ok = all(r["passed"] for r in reports)
    return ok, reports
