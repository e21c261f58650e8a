"""Where Core ML places each operation of a package, per compute unit (macOS 14.4+, ``MLComputePlan``).

Only a Mac runs :func:`compute_plan_placement` (coremltools' compute plan calls Core ML itself);
:func:`summarise_placement` is plain Python over (op type, preferred device, supported devices)
and is what the tests run everywhere. NEVER RUN HERE: the Core ML calls below have not run on the
Linux machine this project is built on (see the README's "What has never run").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

# Core ML's compute unit choices, as coremltools names them (ct.ComputeUnit); CPU_AND_NE needs macOS 13
COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")
# ops that carry data rather than compute (Core ML gives them no device)
NOT_COMPUTE = {"const", "constexpr_lut_to_dense", "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"}
DEVICE_NAMES = {"MLCPUComputeDevice": "CPU", "MLGPUComputeDevice": "GPU", "MLNeuralEngineComputeDevice": "NE"}


def device_name(device) -> str:
    """CPU, GPU or NE for one of coremltools' compute device objects (they carry no name of their own)."""
    return DEVICE_NAMES.get(type(device).__name__, type(device).__name__)


def summarise_placement(ops: Iterable[tuple[str, str | None, tuple[str, ...]]], compute_units: str) -> dict:
    """Count the compute ops per device Core ML prefers, and list those that leave the unit asked for.

    ``ops``: (op type, preferred device or None, devices that support it). For CPU_AND_NE and ALL
    the ops not on the Neural Engine are the fallbacks; for CPU_AND_GPU those not on the GPU.
    """
    by_device: Counter = Counter()
    fallback: Counter = Counter()
    unplaced = 0
    wanted = {"CPU_AND_NE": "NE", "ALL": "NE", "CPU_AND_GPU": "GPU"}.get(compute_units)
    for kind, preferred, supported in ops:
        if kind in NOT_COMPUTE:
            continue
        if preferred is None:
            unplaced += 1
            continue
        by_device[preferred] += 1
        if wanted and preferred != wanted:
            fallback[f"{kind} (on {preferred}{'' if wanted in supported else f', no {wanted} kernel'})"] += 1
    total = sum(by_device.values())
    return {
        "compute_units": compute_units,
        "ops": total,
        "by_device": dict(by_device.most_common()),
        "share_on_neural_engine": round(by_device["NE"] / total, 3) if total else None,
        "fallback_ops": dict(fallback.most_common(12)),
        "unplaced": unplaced,
    }


def _operations(block):
    for op in block.operations:
        yield op
        for inner in op.blocks:  # loops and conditionals nest their own blocks
            yield from _operations(inner)


def compute_plan_placement(model, compute_units: str) -> dict:
    """The placement of a loaded ``MLModel`` for one compute unit; {"unavailable": why} where the OS lacks it."""
    try:
        import coremltools as ct
        from coremltools.models.compute_plan import MLComputePlan

        plan = MLComputePlan.load_from_path(
            model.get_compiled_model_path(), compute_units=getattr(ct.ComputeUnit, compute_units)
        )
        ops = []
        for op in _operations(plan.model_structure.program.functions["main"].block):
            usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
            if usage is None:
                ops.append((op.operator_name, None, ()))
            else:
                ops.append(
                    (
                        op.operator_name,
                        device_name(usage.preferred_compute_device),
                        tuple(device_name(d) for d in usage.supported_compute_devices),
                    )
                )
        return summarise_placement(ops, compute_units)
    except Exception as e:  # macOS < 14.4, or a coremltools without the compute plan: the row stays, without it
        return {"compute_units": compute_units, "unavailable": f"{type(e).__name__}: {e}"[:200]}
