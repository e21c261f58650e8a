"""``export(...)``: checkpoint -> deploy form -> artifacts -> validation -> bundle. The CLI is a thin layer over it.

Every option and file argument is checked before a model is built or converted; bad input raises
:class:`ExportInputError` (one line naming the fix) and writes nothing.
"""
from __future__ import annotations

import hashlib
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..inputs import InputError, existing_file, existing_folder, fraction, image_size, whole_number, writable_folder
from ..models import apply_state_dict, check_input_size, get_variant, load_checkpoint, to_deploy
from ..models.checkpoint import num_classes_of
from ..quiet import quiet_libraries
from ..targets import get_target
from ..targets.local import LocalTarget
from . import bundle as bundle_io
from ..formats.base import BACKENDS, ExportJob, ModelSpec, parse_formats
from ..images import CROP_PCT, ImageBatch, load_calibration, load_images
from ..progress import Progress
from ..validation import bounds_for, validate_on_target, validate_outputs

RANDOM_SEED = 0  # random weights are drawn with this seed, so a bundle of random weights can be re-validated
DEFAULT_CALIBRATION_SIZE = 32
PRECISIONS = ("fp32", "fp16", "int8", "w4")
LOCAL = LocalTarget()  # this machine: artifacts are validated here first, then on a --target


class ExportInputError(InputError):
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


@dataclass
class PreparedModel:
    """The authors' form with its weights, and what identifies those weights."""

    variant: object
    module: torch.nn.Module
    weights_sha256: str | None  # of the checkpoint file; None for random weights
    state_sha256: str  # of the weights themselves

    @property
    def random_init(self) -> bool:
        return self.weights_sha256 is None


def imagenet_labels() -> list[str]:
    text = resources.files("cloformer_deploy").joinpath("data/imagenet1k_labels.txt").read_text()
    return text.splitlines()


def read_labels(path: str | Path, num_classes: int) -> list[str]:
    p = existing_file("--labels", path, "a text file with one class name per line")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise ExportInputError(f"--labels {str(p)!r} is not text; pass a text file with one class name per line") from None
    labels = [line.strip() for line in text.splitlines() if line.strip()]
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


def _precisions(formats: list[str], precision: str | None) -> dict[str, str]:
    if precision is not None and str(precision).lower() not in PRECISIONS:
        raise ExportInputError(f"--precision {precision!r} is not offered; choose from {', '.join(PRECISIONS)}")
    out = {}
    for f in formats:
        backend = BACKENDS[f]
        p = (precision or backend.default_precision).lower()
        if p not in backend.precisions:
            raise ExportInputError(f"--precision {p} is not offered for {f}; choose from {', '.join(backend.precisions)}")
        out[f] = p
    return out


def layer_sensitivity(deploy: torch.nn.Module, calibration: np.ndarray, limit: int = 8, on_progress=None) -> list[dict]:
    """How much int8 weights in each single layer move the logits (1 - cosine), worst first.

    Each convolution or linear layer in turn gets its weights rounded to int8 (per output
    channel, symmetric) while every other layer stays fp32; measured on calibration images.
    """
    import copy

    x = torch.from_numpy(calibration[:limit])
    model = copy.deepcopy(deploy).eval()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        ref = model(x).flatten(1).double()
        out = []
        for i, (name, mod) in enumerate(layers):
            w = mod.weight.data
            scale = w.abs().flatten(1).amax(1).clamp_min(1e-12) / 127
            shape = (-1,) + (1,) * (w.ndim - 1)
            q = (w / scale.reshape(shape)).round().clamp(-127, 127) * scale.reshape(shape)
            mod.weight.data = q
            y = model(x).flatten(1).double()
            mod.weight.data = w
            cos = torch.nn.functional.cosine_similarity(y, ref, dim=1).min().item()
            out.append({"layer": name, "drift": float(f"{1 - cos:.3g}")})
            if on_progress is not None:
                on_progress(f"{i + 1}/{len(layers)} layers")
    return sorted(out, key=lambda d: -d["drift"])


def quantisable_layers(module: torch.nn.Module) -> int:
    return sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in module.modules())


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


def check_weights(weights) -> Path | None:
    return None if weights is None else existing_file("--weights", weights, "a .pth/.pt/.safetensors checkpoint")


def prepare_model(model: str, weights: str | Path | None, num_classes: int | None) -> PreparedModel:
    """The authors' form with weights loaded (or random ones drawn with :data:`RANDOM_SEED`)."""
    variant = get_variant(model)
    state = sha = None
    if weights is not None:
        state = load_checkpoint(check_weights(weights))
        sha = bundle_io.sha256_file(Path(weights))
        if num_classes is None:
            num_classes = num_classes_of(state) or 1000
    num_classes = 1000 if num_classes is None else num_classes
    with torch.random.fork_rng():  # random weights are the same in every run, so reference runs repeat
        torch.manual_seed(RANDOM_SEED)
        net = variant.build(num_classes=num_classes).eval()
    if state is not None:
        apply_state_dict(net, state, variant.name, source=Path(weights).name)
    return PreparedModel(variant, net, sha, bundle_io.state_sha256(net.state_dict()))


def _calibrated(precisions: dict[str, str]) -> bool:
    """Whether any chosen (format, precision) reads calibration images."""
    return any(p in BACKENDS[f].calibrated_precisions for f, p in precisions.items())


def _check_export_inputs(formats, img_size, num_classes, batch, precision, out, data, min_top1_agreement,
                         calibration_size, keep_float, weights, labels, options: dict):
    """Every option and file argument of :func:`export`, checked and normalised before any work."""
    fmts = parse_formats(formats)
    size = check_input_size(image_size("--img-size", img_size))
    if num_classes is not None:
        num_classes = whole_number("--num-classes", num_classes, 1)
    batch = whole_number("--batch", batch, 1, 1024)
    precisions = _precisions(fmts, precision)
    if calibration_size is not None and not _calibrated(precisions):
        raise ExportInputError("--calibration-size applies to --precision int8 (and fp16 ExecuTorch) only; "
                               "drop it or add --precision int8")
    calibration_size = whole_number("--calibration-size", DEFAULT_CALIBRATION_SIZE if calibration_size is None
                                    else calibration_size, 1, 10_000)
    keep_float = whole_number("--keep-float", keep_float, 0)
    if keep_float and not any(p == "int8" and f != "coreml" for f, p in precisions.items()):
        raise ExportInputError("--keep-float applies to int8 ONNX and ExecuTorch exports only; "
                               "drop it or add --precision int8")
    if min_top1_agreement is not None:
        min_top1_agreement = fraction("--min-top1-agreement", min_top1_agreement)
    for backend in BACKENDS.values():  # every format's options, chosen or not: a bad value is a bad value
        options = backend.check_options(options)
    check_weights(weights)
    if labels is not None:
        existing_file("--labels", labels, "a text file with one class name per line")
    if data is not None:
        existing_folder("--data", data, "a folder of .jpg/.png images")
    writable_folder("--out", out)
    return fmts, size, num_classes, batch, precisions, calibration_size, keep_float, min_top1_agreement, options


def export(model: str = "cloformer_xxs", *, weights: str | Path | None = None, formats="all",
           img_size=224, num_classes: int | None = None, batch: int = 1, precision: str | None = None,
           out: str | Path = "export", labels: str | Path | None = None, opset: int | None = None,
           simplify: bool = True, validate_artifacts: bool = True, force: bool = False, zip_bundle: bool = False,
           data: str | Path | None = None, coreml_input: str = "image", coreml_target: str = "iOS16",
           et_backend: str = "xnnpack", min_top1_agreement: float | None = None,
           calibration_size: int | None = None, keep_float: int = 0, target: str = "local",
           cpu: str | None = None, target_cache: str | Path | None = None, device: dict | None = None,
           progress: Progress | None = None, argv: list[str] | None = None) -> ExportResult:
    """Export one model to the given formats, validate every artifact, and add them to the bundle.

    The bundle ``<out>/<variant>-<H>x<W>/`` keeps artifacts of other formats and precisions
    exported earlier from the same weights, batch and labels; ``force`` replaces an artifact of
    the same format and precision, or a bundle of other weights. Raises :class:`ExportInputError`
    for bad input before anything is written. A validation breach leaves the bundle at
    ``<bundle>.failed`` and ``passed`` False. ``target`` other than ``local`` (``arm64``, emulated, with
    ``cpu`` and the ``target_cache`` of its root; ``ssh://[user@]host[:port]``, a device, with its ``device``
    options) also validates every artifact it can run there and records those figures, and their
    difference from this machine's, in the manifest.
    """
    with quiet_libraries():
        return _export(model, weights, formats, img_size, num_classes, batch, precision, out, labels,
                       {"opset": opset, "simplify": simplify, "coreml_input": coreml_input,
                        "coreml_target": coreml_target, "et_backend": et_backend},
                       validate_artifacts, force, zip_bundle, data, min_top1_agreement, calibration_size,
                       keep_float, (target, cpu, target_cache, device), progress or Progress(quiet=True), argv)


def _export(model, weights, formats, img_size, num_classes, batch, precision, out, labels, options,
            validate_artifacts, force, zip_bundle, data, min_top1_agreement, calibration_size, keep_float,
            target_choice, progress: Progress, argv) -> ExportResult:
    t0 = time.perf_counter()
    variant = get_variant(model)
    (fmts, size, num_classes, batch, precisions, calibration_size, keep_float, min_top1_agreement,
     options) = _check_export_inputs(formats, img_size, num_classes, batch, precision, out, data,
                                     min_top1_agreement, calibration_size, keep_float, weights, labels, options)
    target = get_target(*target_choice)
    if target.kind != "local" and not validate_artifacts:
        raise ExportInputError(f"--target {target_choice[0]} validates the artifacts there; drop --no-validate")
    out = Path(out)
    with progress.stage("load model"):
        prepared = prepare_model(variant.name, weights, num_classes)
    authors = prepared.module
    n_classes = authors.num_classes
    if keep_float > quantisable_layers(authors):
        raise ExportInputError(f"--keep-float {keep_float} is more than the model's "
                               f"{quantisable_layers(authors)} quantisable layers; give fewer")
    if labels is not None:
        label_list = read_labels(labels, n_classes)
    elif n_classes == 1000:
        label_list = imagenet_labels()
    else:
        label_list = [str(i) for i in range(n_classes)]
    final = out / f"{variant.name}-{size[0]}x{size[1]}"
    spec = ModelSpec(name=variant.name, num_classes=n_classes, input_size=size, batch=batch, mean=variant.mean,
                     std=variant.std, labels=label_list, params=sum(p.numel() for p in authors.parameters()),
                     weights=str(weights) if weights else None, weights_sha256=prepared.weights_sha256)
    kept = _kept_artifacts(final, force, spec, prepared, label_list, precisions)
    images = None
    if validate_artifacts:
        images = load_images(size, variant.mean, variant.std, folder=data)
        if len(images) < batch:  # a static batch needs at least one full batch
            reps = -(-batch // len(images))
            images = ImageBatch(images.names * reps, np.concatenate([images.images] * reps),
                                np.concatenate([images.tensor] * reps))
    calibration = None
    if _calibrated(precisions):
        calibration = load_calibration(size, variant.mean, variant.std, folder=data, count=calibration_size)
        if len(calibration) < calibration_size:
            progress.warn(f"--calibration-size {calibration_size}: the images give only {len(calibration)} "
                          "distinct views; calibrating with those (pass --data with more photographs)")
    if weights is None:
        progress.warn(f"no --weights: exporting RANDOMLY INITIALISED weights (seed {RANDOM_SEED}; "
                      "for testing the pipeline only)")

    with progress.stage("deploy form"):
        deploy = to_deploy(authors, size)
    sensitivities: dict[int, list[dict]] = {}  # per exported module: formats may take different forms

    def sensitivity_of(module) -> list[dict]:
        if id(module) not in sensitivities:
            with progress.stage(f"per-layer int8 sensitivity on {min(len(calibration), 8)} calibration images") as st:
                sensitivities[id(module)] = layer_sensitivity(module, calibration, on_progress=st.update)
        return sensitivities[id(module)]
    reference = None
    if images is not None:
        with progress.stage(f"reference (PyTorch fp32, authors' form, {len(images)} images)"), torch.no_grad():
            reference = authors(torch.from_numpy(images.tensor)).numpy()
    example = torch.from_numpy(images.tensor[:batch]) if images is not None else torch.randn(batch, 3, *size)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    command = argv if argv is not None else sys.argv
    run_versions = versions()

    try:
        staging = bundle_io.StagingDir(final)
    except OSError as e:
        raise ExportInputError(f"--out {str(out)!r} is not writable ({e.strerror}); choose another folder") from None
    results: list[ArtifactResult] = []
    try:
        for entry in kept:
            bundle_io.link_or_copy(final / entry["path"], staging.path / entry["path"])
            passed = (entry.get("validation") or {}).get("passed")
            results.append(ArtifactResult(entry["format"], final / entry["path"], entry["precision"], passed, entry))
        for fmt in fmts:
            backend = BACKENDS[fmt]
            prec = precisions[fmt]
            path = staging.path / backend.filename(spec, prec)
            form = backend.deploy_steps(prec, options)
            module = deploy if form is None else to_deploy(authors, size, steps=form[0], extra_steps=form[1])
            sensitivity = sensitivity_of(module) if prec == "int8" and keep_float else None
            kept_float = [d["layer"] for d in sensitivity[:keep_float]] if sensitivity else []
            job = ExportJob(module, example, spec, prec, options, images.tensor if images is not None else None,
                            calibration, kept_float)
            t = time.perf_counter()
            with progress.stage(f"{fmt}: export ({prec})"):
                info = backend.export(job, path, lambda text, fmt=fmt: progress.log(f"{fmt}: {text}"))
            entry = {"format": fmt, "path": path.name, "precision": prec, "size_bytes": bundle_io.size_bytes(path),
                     "sha256": bundle_io.sha256_path(path), "export_seconds": round(time.perf_counter() - t, 2),
                     "deploy_steps": list(module.deploy_steps), **info}
            if prec == "int8" and calibration is not None:
                entry["calibration"] = {"images": int(len(calibration)), "requested": calibration_size,
                                        "source": str(data) if data else
                                        "scikit-image bundled photographs, mirrored / wider / tighter crops",
                                        "sha256": hashlib.sha256(calibration.tobytes()).hexdigest(),
                                        "kept_float": kept_float if fmt != "coreml" else [],
                                        "sensitivity_top": (sensitivity or [])[:10]}
            passed = None
            if reference is not None:
                bounds = bounds_for(prec, min_top1_agreement)
                with progress.stage(f"{fmt}: validate") as st:
                    runner = LOCAL.runner(fmt, path, spec, info)
                    report, local_out = validate_outputs(runner, images, reference, batch, bounds,
                                                         on_progress=st.update)
                entry["validation"] = report
                passed = report["passed"]
                progress.report(fmt, report)
                if target.kind != "local":
                    with progress.stage(f"{fmt}: validate on {target.name}") as st:
                        on_target = validate_on_target(target, fmt, path, spec, info, images, reference, bounds,
                                                       local_out, st)
                    report["targets"] = {target.name: on_target}
                    progress.report_target(fmt, target.name, on_target)
                    passed = passed and on_target["passed"] is not False
            entry.update(created=created, command=command, versions=run_versions)
            results.append(ArtifactResult(fmt, final / path.name, prec, passed, entry))
        manifest = build_manifest(spec, variant, prepared, results, images, data, command, created, run_versions)
        (staging.path / bundle_io.LABELS).write_text("\n".join(label_list) + "\n")
        bundle_io.write_manifest(staging.path, manifest)
        ok = all(r.passed is not False for r in results)
        bundle_path = staging.commit(final if ok else final.with_name(final.name + ".failed"))
    except BaseException:
        staging.discard()
        raise
    finally:
        target.close()  # its validation worker: nothing left running
    for r in results:
        r.path = bundle_path / r.path.name
    zip_path = bundle_io.zip_bundle(bundle_path) if zip_bundle and ok else None
    new = [r for r in results if r.entry.get("created") == created]
    return ExportResult(bundle_path, manifest, new, ok, time.perf_counter() - t0, zip_path)


def _kept_artifacts(final: Path, force: bool, spec: ModelSpec, prepared: PreparedModel, labels: list[str],
                    precisions: dict[str, str]) -> list[dict]:
    """The entries of an existing bundle at ``final`` that this export keeps beside its own artifacts.

    A bundle holds one model, size, batch, class count, set of weights and labels; an export that
    differs in any of these would mix artifacts that compute different functions, so it is refused
    unless ``force`` (then the old bundle is replaced whole).
    """
    if not final.exists():
        return []
    try:
        old = bundle_io.read_manifest(final)
        bundle_io.check_files(final, old)
        old_labels = (final / bundle_io.LABELS).read_text().splitlines()
    except (bundle_io.BundleError, OSError):
        if force:
            return []
        raise ExportInputError(f"{final} exists but is not a sound bundle; pass --force to replace it "
                               "or --out another folder") from None
    new_manifest = {"model": {"name": spec.name, "input_size": list(spec.input_size), "batch": spec.batch,
                              "num_classes": spec.num_classes, "weights_sha256": prepared.weights_sha256,
                              "state_sha256": prepared.state_sha256}}
    mine, theirs = bundle_io.identity(new_manifest, labels), bundle_io.identity(old, old_labels)
    differs = [k for k in mine if mine[k] != theirs[k]]
    if differs:
        if force:
            return []
        raise ExportInputError(f"{final} holds artifacts that differ in {', '.join(differs)}; pass --force to "
                               "replace the whole bundle or --out another folder")
    clashes = [e for e in old["artifacts"] if precisions.get(e["format"]) == e["precision"]]
    if clashes and not force:
        names = ", ".join(f"{e['format']} {e['precision']}" for e in clashes)
        raise ExportInputError(f"{final} already holds {names}; pass --force to replace "
                               f"{'it' if len(clashes) == 1 else 'them'} (the bundle's other artifacts stay)")
    return [e for e in old["artifacts"] if e not in clashes]


def build_manifest(spec: ModelSpec, variant, prepared: PreparedModel, results: list[ArtifactResult],
                   images: ImageBatch | None, data, command, created, run_versions) -> dict:
    h, w = spec.input_size
    return {
        "schema_version": bundle_io.SCHEMA_VERSION,
        "model": {"name": spec.name, "family": variant.family, "num_classes": spec.num_classes,
                  "input_size": [h, w], "batch": spec.batch, "params": spec.params,
                  "weights": Path(spec.weights).name if spec.weights else None,
                  "weights_sha256": spec.weights_sha256, "state_sha256": prepared.state_sha256,
                  "random_init": prepared.random_init,
                  **({"random_seed": RANDOM_SEED} if prepared.random_init else {})},
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
        "versions": run_versions,
        "command": command,
        "created": created,
    }


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
    manifest = bundle_io.read_manifest(folder)
    m = manifest["model"]
    get_variant(m["name"])
    for entry in manifest["artifacts"]:
        if entry["format"] not in BACKENDS:
            raise bundle_io.BundleError(f"{entry['path']} has format {entry['format']!r}, which this version "
                                        f"does not know ({', '.join(BACKENDS)}); export the bundle again")
    bundle_io.check_files(folder, manifest)
    if m.get("random_init"):
        if weights is not None:
            raise ExportInputError(f"the bundle holds random weights (seed {m.get('random_seed', RANDOM_SEED)}), "
                                   "not a checkpoint's; drop --weights, or export again with --weights")
        if not m.get("state_sha256"):
            raise ExportInputError("the bundle holds random weights from a version that did not record them; "
                                   "export it again")
    else:
        if weights is None:
            raise ExportInputError(f"the bundle was exported from {m.get('weights')}; pass --weights with that "
                                   "checkpoint")
        check_weights(weights)
        if m.get("weights_sha256") and bundle_io.sha256_file(Path(weights)) != m["weights_sha256"]:
            raise ExportInputError(f"{Path(weights).name} is not the checkpoint this bundle was exported from "
                                   f"(sha256 differs); pass {m.get('weights')}")
    prepared = prepare_model(m["name"], weights, m["num_classes"])
    if m.get("random_init") and prepared.state_sha256 != m["state_sha256"]:
        raise ExportInputError("this torch draws other random weights than the one that exported the bundle "
                               f"(torch {manifest.get('versions', {}).get('torch')}); export it again here")
    variant = prepared.variant
    labels = (folder / bundle_io.LABELS).read_text().splitlines()
    spec = ModelSpec(m["name"], m["num_classes"], tuple(m["input_size"]), m["batch"], variant.mean, variant.std,
                     labels, m["params"], str(weights) if weights else None, m.get("weights_sha256"))
    return OpenedBundle(folder, manifest, prepared, spec)


def validate_bundle(folder: str | Path, *, weights: str | Path | None = None, data: str | Path | None = None,
                    min_top1_agreement: float | None = None, target: str = "local", cpu: str | None = None,
                    target_cache: str | Path | None = None, device: dict | None = None,
                    progress: Progress | None = None
                    ) -> tuple[bool, list[dict]]:
    """Re-run validation of every artifact of an existing bundle; True when all pass.

    With a ``target`` other than ``local``, every artifact it can run is also validated there, and
    the figures (with their difference from this machine's) are recorded in the bundle's manifest
    under ``validation.targets.<target name>``.
    """
    with quiet_libraries():
        progress = progress or Progress(quiet=True)
        if min_top1_agreement is not None:
            min_top1_agreement = fraction("--min-top1-agreement", min_top1_agreement)
        if data is not None:
            existing_folder("--data", data, "a folder of .jpg/.png images")
        on = get_target(target, cpu, target_cache, device)
        opened = open_bundle(folder, weights)
        spec = opened.spec
        images = load_images(spec.input_size, spec.mean, spec.std, folder=data)
        with torch.no_grad():
            reference = opened.prepared.module(torch.from_numpy(images.tensor)).numpy()
        reports = []
        try:
            for entry in opened.manifest["artifacts"]:
                fmt, path = entry["format"], opened.folder / entry["path"]
                bounds = bounds_for(entry["precision"], min_top1_agreement)
                with progress.stage(f"{fmt} {entry['precision']}: validate") as st:
                    runner = LOCAL.runner(fmt, path, spec, entry)
                    report, local_out = validate_outputs(runner, images, reference, spec.batch, bounds,
                                                         on_progress=st.update)
                progress.report(fmt, report)
                if on.kind != "local":
                    with progress.stage(f"{fmt} {entry['precision']}: validate on {on.name}") as st:
                        on_target = validate_on_target(on, fmt, path, spec, entry, images, reference, bounds,
                                                       local_out, st)
                    progress.report_target(fmt, on.name, on_target)
                    report["targets"] = {on.name: on_target}
                    report["passed"] = report["passed"] and on_target["passed"] is not False
                    validation = entry.setdefault("validation", {})
                    validation.setdefault("targets", {})[on.name] = on_target
                reports.append({"format": fmt, "path": entry["path"], "precision": entry["precision"], **report})
        finally:
            on.close()  # its validation worker: nothing left running
        if on.kind != "local":
            bundle_io.write_manifest(opened.folder, opened.manifest)
        return all(r["passed"] for r in reports), reports
