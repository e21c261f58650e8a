"""Comparison of an artifact's outputs with the PyTorch fp32 authors' form, with bounds per precision."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..formats import BACKENDS
from ..formats.base import ModelSpec, Runner
from ..images import ImageBatch
from ..targets import WorkerError


@dataclass(frozen=True)
class Bounds:
    max_abs: float | None = None
    min_cosine: float | None = None
    min_top1_agreement: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


# fp32 artifacts must compute the same function; fp16 ones the same ranking and direction
# int8 and 4-bit weights change the numbers by design; they must keep the direction of the logits
DEFAULT_BOUNDS = {
    "fp32": Bounds(max_abs=1e-4),
    "fp16": Bounds(min_cosine=0.999),
    "int8": Bounds(min_cosine=0.99),
    "w4": Bounds(min_cosine=0.95),
}


def bounds_for(precision: str, min_top1_agreement: float | None = None) -> Bounds:
    b = DEFAULT_BOUNDS.get(precision, Bounds(min_cosine=0.99))
    if min_top1_agreement is not None:
        b = Bounds(b.max_abs, b.min_cosine, min_top1_agreement)
    return b


def compare(out: np.ndarray, ref: np.ndarray) -> dict:
    """max/mean abs difference, the lowest per-image cosine, and the share of images with the same top-1."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"output shape {out.shape} differs from the reference {ref.shape}")
    diff = np.abs(out - ref)
    num = (out * ref).sum(1)
    den = np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)
    finite = bool(np.isfinite(out).all())
    return {
        "max_abs": float(diff.max()) if finite else float("inf"),
        "mean_abs": float(diff.mean()) if finite else float("inf"),
        "cosine": float(cos.min()) if finite else float("nan"),
        "top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
        "images": int(out.shape[0]),
        "finite": finite,
    }


def check(figures: dict, bounds: Bounds) -> list[str]:
    """The bounds a set of figures breaches, as readable sentences."""
    failures = []
    if not figures.get("finite", True):
        failures.append("outputs contain inf or NaN")
    if bounds.max_abs is not None and not figures["max_abs"] <= bounds.max_abs:
        failures.append(f"max abs {figures['max_abs']:.3g} > {bounds.max_abs:g}")
    if bounds.min_cosine is not None and not figures["cosine"] >= bounds.min_cosine:
        failures.append(f"cosine {figures['cosine']:.6f} < {bounds.min_cosine:g}")
    if bounds.min_top1_agreement is not None and figures["top1_agreement"] < bounds.min_top1_agreement:
        failures.append(f"top-1 agreement {figures['top1_agreement']:.3f} < {bounds.min_top1_agreement:g}")
    return failures


def run_all(runner: Runner, images: ImageBatch, batch: int, on_progress=None) -> np.ndarray:
    """Outputs for every whole batch of images; ``on_progress(text)`` after each batch."""
    outs = []
    usable = len(images) - len(images) % batch
    for b in images.batches(batch):
        outs.append(runner.run(b))
        if on_progress is not None:
            on_progress(f"{len(outs) * batch}/{usable} images")
    return np.concatenate(outs)


def validate(
    runner: Runner, images: ImageBatch, reference: np.ndarray, batch: int, bounds: Bounds, on_progress=None
) -> dict:
    """Check the artifact's structure, run it on every image and judge its outputs against the bounds."""
    return validate_outputs(runner, images, reference, batch, bounds, on_progress)[0]


def validate_outputs(
    runner: Runner, images: ImageBatch, reference: np.ndarray, batch: int, bounds: Bounds, on_progress=None
) -> tuple[dict, np.ndarray]:
    """:func:`validate`'s report, and the outputs it judged (to compare one target's with another's)."""
    problems = runner.check_structure()
    out = run_all(runner, images, batch, on_progress)
    figures = compare(out, reference[: len(out)])
    failures = problems + check(figures, bounds)
    # described after running: e.g. the fp16 report of the Core ML interpreter
    report = {
        **runner.describe(),
        "bounds": bounds.as_dict(),
        "passed": not failures,
        "problems": failures,
        "figures": figures,
    }
    return report, out


def validate_on_target(
    target,
    fmt: str,
    path: Path,
    spec: ModelSpec,
    info: dict,
    images: ImageBatch,
    reference: np.ndarray,
    bounds,
    local_outputs: np.ndarray | None,
    stage,
) -> dict:
    """One artifact validated on a target other than this machine, with its difference from this machine's run.

    An artifact the target cannot run, cannot open or loses mid-run gets a report that says so
    (not run, or failed with the reason); it never stops the artifacts after it.
    """
    backend = BACKENDS[fmt]
    if not target.can_run(backend):
        return {"ran": False, "passed": None, "note": target.cannot_run(backend)}
    missing = target.missing(backend)
    if missing:
        return {"ran": False, "passed": False, "note": missing, "target": target.describe()}
    stage.update(f"starting the worker on {target.name}")
    try:
        runner = target.runner(fmt, path, spec, info)
    except WorkerError as e:
        return {"ran": True, "passed": False, "problems": [f"could not open it on {target.name}: {e}"]}
    try:
        report, out = validate_outputs(
            runner,
            images,
            reference,
            spec.batch,
            bounds,
            on_progress=lambda text: stage.update(f"{text} on {target.name}"),
        )
    except WorkerError as e:
        return {"ran": True, "passed": False, "problems": [f"stopped on {target.name}: {e}"]}
    report["load_seconds"] = round(runner.load_ms / 1e3, 2)
    # emulated: not a latency; on a device, the median of untimed validation runs (the benchmark times them)
    report["seconds_per_batch"] = round(float(np.median(runner.run_ms)) / 1e3, 3)
    if local_outputs is not None:
        report["vs_local"] = versus_local(out, local_outputs)
    return {"ran": True, **report, "target": target.describe()}


def versus_local(out: np.ndarray, local: np.ndarray) -> dict:
    """How a target's outputs differ from this machine's run of the same artifact on the same images."""
    vs = compare(out, local[: len(out)])
    return {
        **{k: vs[k] for k in ("max_abs", "mean_abs", "cosine", "top1_agreement")},
        "bit_exact": bool(np.array_equal(out, local[: len(out)])),
    }


def validate_on_gpu(
    target, fmt: str, path: Path, spec: ModelSpec, info: dict, images, reference, bounds, cpu_out, options, stage
) -> dict:
    """One artifact on ``target``'s GPU (its native runner with a GPU runtime's ``options``), with its difference
    from this machine's CPU run of the same artifact (``vs_local``). A GPU or runner the target lacks, and a GPU
    the runner cannot reach, make a failed report that says why; the rows after it still run."""
    backend = BACKENDS[fmt]
    if not target.can_run(backend):
        return {"ran": False, "passed": None, "note": target.cannot_run(backend)}
    missing = target.gpu_problem(backend)
    if missing is not None:
        return {"ran": False, "passed": False, "note": missing, "target": target.describe()}
    try:
        runner = target.gpu_runner(fmt, path, spec, info, options)
    except WorkerError as e:
        return {"ran": False, "passed": False, "note": f"could not open it on {target.name}'s GPU: {e}"}
    try:
        report, out = validate_outputs(
            runner, images, reference, spec.batch, bounds, on_progress=lambda text: stage.update(f"{text} on the GPU")
        )
    except WorkerError as e:
        return {"ran": True, "passed": False, "problems": [f"stopped on {target.name}'s GPU: {e}"]}
    if cpu_out is not None:
        report["vs_local"] = versus_local(out, cpu_out)
    said = report.get("gpu_software")  # None: the runner could not read which adapter it got
    if not (said is True or (said is None and target.gpu_software)):  # a software GPU's load is the CPU's
        report["load_seconds"] = round(runner.load_ms / 1e3, 2)
    return {"ran": True, **report, "target": target.describe()}


def validate_artifact(
    local,
    target,
    fmt: str,
    path: Path,
    spec: ModelSpec,
    info: dict,
    images: ImageBatch,
    reference: np.ndarray,
    bounds: Bounds,
    progress,
    label: str,
    gpu: tuple = (),
) -> tuple[dict, bool]:
    """One artifact validated on this machine (``local``) and, for another ``target``, there too; and on the
    target's GPU in each of ``gpu``'s runtimes ((name, open options, bounds) each).

    Returns this machine's report (its ``passed`` is this machine's verdict), with the target's under
    ``targets.<name>`` and the GPU's under ``gpu.<runtime>``, and the artifact's verdict: it passes when all do
    (a target that cannot run the format does not fail it).
    """
    with progress.stage(f"{label}: validate") as stage:
        runner = local.runner(fmt, path, spec, info)
        report, local_out = validate_outputs(runner, images, reference, spec.batch, bounds, on_progress=stage.update)
    progress.report(fmt, report)
    passed = report["passed"]
    if target.kind != "local":
        with progress.stage(f"{label}: validate on {target.name}") as stage:
            on_target = validate_on_target(target, fmt, path, spec, info, images, reference, bounds, local_out, stage)
        progress.report_target(fmt, target.name, on_target)
        report["targets"] = {target.name: on_target}
        passed = passed and on_target["passed"] is not False
    for name, options, gpu_bounds in gpu:
        with progress.stage(f"{label}: validate on {target.name}'s GPU ({name})") as stage:
            on_gpu = validate_on_gpu(
                target, fmt, path, spec, info, images, reference, gpu_bounds, local_out, options, stage
            )
        progress.report_target(fmt, f"{target.name} {name}", on_gpu)
        report.setdefault("gpu", {})[name] = on_gpu
        passed = passed and on_gpu["passed"] is not False
    return report, passed
