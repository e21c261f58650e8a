"""Which GPU runtimes validate an artifact, and the checks made before any GPU row runs (validation and by-block)."""

from __future__ import annotations

from ..formats import BACKENDS
from ..validation import bounds_for
from .options import ExportInputError


def gpu_runtimes(fmt: str, precision: str, min_top1_agreement: float | None) -> tuple:
    """(name, open options, bounds) of each GPU runtime of ``fmt``. The GPU computes in its own precision: an
    fp32 artifact computed in fp16 is held to the fp16 bound; int8 keeps its own, looser one."""
    out = []
    for way in BACKENDS[fmt].bench_runtimes:
        if way.accelerator != "gpu":
            continue
        held = precision if precision == "int8" or way.computes_in != "fp16" else "fp16"
        out.append((way.name, dict(way.open_options), bounds_for(held, min_top1_agreement)))
    return tuple(out)


def gpu_checked(manifest: dict, on) -> None:
    """--gpu before any run: ExportInputError (one line) when no artifact of the bundle has a GPU path, or when
    this machine's native runner for one is not built."""
    with_gpu = {e["format"] for e in manifest["artifacts"] if gpu_runtimes(e["format"], e["precision"], None)}
    if not with_gpu:
        have = ", ".join(sorted({e["format"] for e in manifest["artifacts"]}))
        raise ExportInputError(f"--gpu: no artifact of this bundle has a GPU path (it holds {have}); drop --gpu")
    if on.kind == "local":
        unbuilt = [BACKENDS[f].label for f in sorted(with_gpu) if on.native_bundle(BACKENDS[f]) is None]
        if unbuilt:
            raise ExportInputError(
                f"--gpu: the GPU rows run in the native {unbuilt[0]} runner; build it with: cloformer-device setup gpu"
            )
