"""The options of ``cloformer-export`` / :func:`export` and ``cloformer-validate`` / :func:`validate_bundle`.

A format's own options (``--opset``, ``--coreml-input``, ``--backend``, ...) are declared in its module
(``Backend.options``) and become fields here, so a new format brings its flags with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..formats import BACKENDS
from ..formats.base import parse_formats
from ..inputs import InputError, existing_file, existing_folder, fraction, image_size, whole_number, writable_folder
from ..models.registry import check_input_size, get_variant, list_models
from ..options import option
from ..targets.options import TargetOptions

DEFAULT_CALIBRATION_SIZE = 32
PRECISIONS = ("fp32", "fp16", "int8", "w4")
MAX_CLASSES = 100_000
IMAGE_BYTES = 3 * 4  # a normalised float32 RGB pixel


class ExportInputError(InputError):
    """Bad input to export/validate: a one-line message that names the fix."""


def check_model(flag: str, value) -> str:
    return get_variant(str(value)).name


def check_weights(flag: str, value):
    return existing_file(flag, value, "a .pth/.pt/.safetensors checkpoint")


def check_size(flag: str, value) -> tuple[int, int]:
    return check_input_size(image_size(flag, value))


def check_bundle(flag: str, value) -> str:
    """A bundle folder whose manifest follows the published schema (its files and weights are checked later)."""
    from .bundle import read_manifest

    read_manifest(Path(value))
    return str(value)


def check_data(flag: str, value):
    return existing_folder(flag, value, "a folder of .jpg/.png images")


def _format_fields() -> list[tuple]:
    """Each format's own options as fields, in registry order (a name two formats share is declared once)."""
    out, seen = [], set()
    for backend in BACKENDS.values():
        for name, spec in backend.options.items():
            if name not in seen:
                seen.add(name)
                out.append((name, "typing.Any", spec))
    return out


@dataclass
class ModelChoice(TargetOptions):
    """Which model, with which weights, at which input size: export and bench share these."""

    model: str = option(
        "cloformer-xxs", f"one of: {', '.join(list_models())} (default cloformer-xxs)", check=check_model
    )
    weights: str | None = option(
        None,
        "checkpoint (.pth/.pt/.safetensors); without it the model is randomly initialised (seed 0)",
        check=check_weights,
    )
    img_size: object = option(224, "224 or HxW such as 256x320; multiples of 32 (default 224)", check=check_size)


@dataclass
class _ExportFields(ModelChoice):
    format: object = option(
        "all",
        "all, or a comma list of: "
        + ", ".join(
            f"{n} ({b.suffix}, {b.runtime}; {'/'.join(b.precisions)}, default {b.default_precision})"
            for n, b in BACKENDS.items()
        ),
        check=lambda flag, v: parse_formats(v),
    )
    num_classes: int | None = option(
        None,
        "classes of the head (default: the checkpoint's, else 1000)",
        check=lambda flag, v: whole_number(flag, v, 1, MAX_CLASSES),
    )
    batch: int = option(1, "static batch size (default 1)", check=lambda flag, v: whole_number(flag, v, 1, 1024))
    precision: str | None = option(
        None,
        "fp32, fp16, int8 or w4; default: "
        + ", ".join(f"{b.default_precision} for {n}" for n, b in BACKENDS.items())
        + "; int8: static int8, activations calibrated on real images ("
        + ", ".join(b.label for b in BACKENDS.values() if "int8" in b.calibration_recorded)
        + ") or 8-bit weights ("
        + ", ".join(
            b.label for b in BACKENDS.values() if "int8" in b.precisions and "int8" not in b.calibration_recorded
        )
        + "); w4: 4-bit palettised weights ("
        + ", ".join(b.label for b in BACKENDS.values() if "w4" in b.precisions)
        + ")",
    )
    calibration_size: int | None = option(
        None,
        f"int8: images to calibrate with (default {DEFAULT_CALIBRATION_SIZE})",
        check=lambda flag, v: whole_number(flag, v, 1, 10_000),
    )
    keep_float: int = option(
        0,
        "int8: leave the N layers whose quantisation moves the logits most in float",
        check=lambda flag, v: whole_number(flag, v, 0),
    )
    out: str = option(
        "export",
        "output folder (default export/); the bundle is <out>/<model>-<H>x<W>/ and keeps artifacts exported earlier",
    )
    labels: str | None = option(
        None,
        "class names, one per line (default: ImageNet-1k names for 1000 classes)",
        check=lambda flag, v: existing_file(flag, v, "a text file with one class name per line"),
    )
    no_validate: bool = option(False, "skip running the artifacts against PyTorch")
    force: bool = option(False, "replace an artifact of the same format and precision, or a bundle of other weights")
    zip: bool = option(False, "also write <bundle>.zip for an app")
    data: str | None = option(
        None, "folder of images for validation (default: photographs bundled with scikit-image)", check=check_data
    )
    min_top1_agreement: float | None = option(None, "also require this top-1 agreement (0..1)", check=fraction)


ExportOptions = dataclasses.make_dataclass(
    "ExportOptions", [(name, kind, spec) for name, kind, spec in _format_fields()], bases=(_ExportFields,)
)
ExportOptions.__doc__ = "The options of an export: the model, the formats and precisions, where the bundle goes."
ExportOptions.__module__ = __name__


def export_checked(opts) -> tuple:
    """``opts`` with every field checked, then what depends on several fields; before any work.

    Returns the checked options and the precision each chosen format is exported in.
    """
    opts = opts.checked()
    if opts.precision is not None and str(opts.precision).lower() not in PRECISIONS:
        raise ExportInputError(f"--precision {opts.precision!r} is not offered; choose from {', '.join(PRECISIONS)}")
    precisions = {}
    for f in opts.format:
        backend = BACKENDS[f]
        p = (opts.precision or backend.default_precision).lower()
        if p not in backend.precisions:
            raise ExportInputError(
                f"--precision {p} is not offered for {f}; choose from {', '.join(backend.precisions)}"
            )
        precisions[f] = p
    calibrated = any(p in BACKENDS[f].calibrated_precisions for f, p in precisions.items())
    if opts.calibration_size is not None and not calibrated:
        others = [f"{p} {b.label}" for b in BACKENDS.values() for p in b.calibrated_precisions if p != "int8"]
        also = f" (and {', '.join(others)})" if others else ""
        raise ExportInputError(
            f"--calibration-size applies to --precision int8{also} only; drop it or add --precision int8"
        )
    if opts.keep_float and not any(p == "int8" and BACKENDS[f].keeps_float_layers for f, p in precisions.items()):
        names = " and ".join(b.label for b in BACKENDS.values() if b.keeps_float_layers)
        raise ExportInputError(f"--keep-float applies to int8 {names} exports only; drop it or add --precision int8")
    for name in _given_format_options(opts):
        owners = [n for n, b in BACKENDS.items() if name in b.options]
        if not set(owners) & set(precisions):
            raise ExportInputError(
                f"--{name.replace('_', '-')} applies to {' and '.join(owners)}; drop it or add --format {owners[0]}"
            )
    for backend in BACKENDS.values():  # every format's options, chosen or not: a bad value is a bad value
        backend.check_options(format_options(opts))
    writable_folder("--out", opts.out)
    return opts, precisions


def _given_format_options(opts) -> list[str]:
    """The formats' own options set to something other than their defaults (a default passed on is no choice)."""
    return [
        name
        for b in BACKENDS.values()
        for name, spec in b.options.items()
        if opts.was_given(name) and getattr(opts, name) != spec.default
    ]


def format_options(opts) -> dict:
    """The formats' own options, as the format modules read them."""
    return {name: getattr(opts, name) for b in BACKENDS.values() for name in b.options}


def check_memory(opts, num_classes: int, calibration_images: int) -> None:
    """Refuse, before the model is built, a size, batch or calibration count this machine cannot hold."""
    from ..models.memory import check_fits

    h, w = opts.img_size
    # the int8 sensitivity of --keep-float runs 8 calibration images in one pass; everything else one batch
    at_once = max(opts.batch, 8 if opts.keep_float else 1)
    check_fits(
        opts.model,
        opts.img_size,
        at_once,
        num_classes,
        extra_bytes=calibration_images * h * w * IMAGE_BYTES,
        what=f"--img-size {h}x{w} at --batch {opts.batch}"
        + (f" with --calibration-size {calibration_images}" if calibration_images else ""),
    )


def check_cluster(flag: str, value) -> str:
    from ..validation.ray_cluster import check_address

    return check_address(flag, value)


DEFAULT_SHARD_SIZE = 64
EVALUATION_FIELDS = ("labels", "workers", "cluster", "out", "shard_size")  # they apply to --data only


@dataclass
class ValidateOptions(TargetOptions):
    bundle: str = option(None, "a folder written by cloformer-export", positional=True, check=check_bundle)
    weights: str | None = option(
        None, "the checkpoint the bundle was exported from (not needed for random weights)", check=check_weights
    )
    data: str | None = option(
        None,
        "a validation set to evaluate accuracy on, streamed shard by shard: one subfolder per class (named as in "
        "the bundle's labels.txt, or ImageNet synset ids), or a flat folder with --labels, or a flat folder "
        "without labels (drift and agreement only); default: the 12 photographs bundled with scikit-image",
        check=check_data,
    )
    labels: str | None = option(
        None,
        "with --data: a CSV of file,label rows over a flat folder (a label is a class index, a class name or a "
        "synset id), as ImageNet's validation set is distributed",
        check=lambda flag, v: existing_file(flag, v, "a CSV file of file,label rows"),
    )
    workers: int | None = option(
        None,
        "with --data: processes that run shards here (default: one per core); with --cluster: per node "
        "(default: the node's CPUs)",
        check=lambda flag, v: whole_number(flag, v, 1, 512),
    )
    cluster: str | None = option(
        None,
        "with --data: the address (host:port) of a Ray cluster to run shards on; its nodes need the project "
        'installed with pip install -e ".[cluster]"',
        check=check_cluster,
    )
    out: str | None = option(
        None,
        "with --data: folder for accuracy.json, accuracy.md, accuracy.png, flipped.csv and the finished shards "
        "(default: runtime_bench/<bundle folder name>/); a run stopped before its end continues from there. With "
        "--by-block: folder for drift_by_block.json, .md and .png (the same default)",
    )
    shard_size: int = option(
        DEFAULT_SHARD_SIZE,
        f"with --data: images per shard, the unit of work and of resumption (default {DEFAULT_SHARD_SIZE})",
        check=lambda flag, v: whole_number(flag, v, 1, 100_000),
    )
    min_top1_agreement: float | None = option(None, "also require this top-1 agreement (0..1)", check=fraction)
    by_block: bool = option(
        False,
        "locate drift: every artifact's outputs at each block boundary (stem, each block of each stage, head) on "
        "this machine and the target, against PyTorch fp32, and the first block that departs; writes "
        "drift_by_block.json, .md and .png in --out",
    )
    gpu: bool = option(
        False,
        "also validate every artifact whose format has a GPU path on the target's GPU, in each GPU runtime (LiteRT: "
        "litert-gpu computes in fp16 as a phone's GPU does, litert-gpu-fp32 in fp32); here on a software Vulkan "
        "device set up by cloformer-device setup gpu",
    )


def evaluation_checked(opts: ValidateOptions) -> None:
    """What depends on several fields of a validation, before any work: the evaluation's options need --data,
    a cluster runs on this machine's kind of target only, and --out must be writable."""
    if opts.gpu and opts.data is not None:
        raise ExportInputError("--gpu validates on the bundled photographs; drop --data, or drop --gpu")
    if opts.by_block and opts.data is not None:
        raise ExportInputError("--by-block runs on the bundled photographs; drop --data, or drop --by-block")
    if opts.data is None:
        given = [n for n in EVALUATION_FIELDS if opts.was_given(n) and not (n == "out" and opts.by_block)]
        if given:
            raise ExportInputError(
                f"--{given[0].replace('_', '-')} applies to --data; add --data with a validation set"
            )
        if opts.out is not None:
            writable_folder("--out", opts.out)
        return
    target = str(opts.target).strip().lower()
    if opts.cluster is not None and target.startswith(("ssh://", "adb://")):
        raise ExportInputError(
            "--cluster runs the local or arm64 target on every node; a device is driven from this machine: "
            "drop --cluster (--workers runs several runners on the device)"
        )
    if opts.out is not None:
        writable_folder("--out", opts.out)
