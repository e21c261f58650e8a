"""The small interface every export format implements, and the registry that lists them.

A backend turns a deploy-form module plus an example input into an artifact on
disk, and opens an artifact as a runner. The CLI's choices and help, validation,
packaging and the benchmark all read :data:`BACKENDS`; adding a format is adding a
module that registers itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..images import ImageBatch
from ..inputs import InputError

if TYPE_CHECKING:
    import torch


@dataclass
class ModelSpec:
    """What an artifact computes and how its input is prepared; written to the manifest."""

    name: str
    num_classes: int
    input_size: tuple[int, int]
    batch: int = 1
    # an artifact exported only to be timed records no normalisation: mean 0, std 1
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    labels: list[str] | None = None
    params: int = 0
    weights: str | None = None  # path of the checkpoint, or None for random initialisation
    weights_sha256: str | None = None

    def to_dict(self) -> dict:
        """The spec as plain data (a worker's message); :meth:`from_dict` reads it back."""
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_manifest(cls, model: dict, mean, std, labels: list[str] | None = None, weights: str | None = None):
        """The spec of a bundle's manifest ``model`` section, with the variant's normalisation."""
        return cls(
            model["name"],
            model["num_classes"],
            tuple(model["input_size"]),
            model["batch"],
            tuple(mean),
            tuple(std),
            labels,
            model["params"],
            weights,
            model.get("weights_sha256"),
        )

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        """The spec of :meth:`to_dict`'s data, also after JSON (which turns its tuples into lists)."""
        return cls(
            **{**data, "input_size": tuple(data["input_size"]), "mean": tuple(data["mean"]), "std": tuple(data["std"])}
        )


@dataclass
class ExportJob:
    """Everything a backend needs to write one artifact."""

    module: torch.nn.Module  # the fp32 deploy form, eval mode
    example: torch.Tensor  # (batch, 3, H, W) float32
    spec: ModelSpec
    precision: str
    options: dict[str, Any] = field(default_factory=dict)
    images: np.ndarray | None = None  # real images (normalised NCHW) for analysis
    calibration: np.ndarray | None = None  # real images (normalised NCHW) to calibrate int8 activations
    keep_float: list[str] = field(default_factory=list)  # deploy-form layer names to leave unquantised


class Runner(ABC):
    """An artifact opened in its own runtime."""

    method: str  # how it runs: "onnxruntime", "executorch", "coreml" (macOS), "emulated" (Core ML elsewhere)

    @abstractmethod
    def run(self, batch: ImageBatch) -> np.ndarray:
        """Logits (N, num_classes) as float32 for one batch of exactly the artifact's batch size."""

    def run_outputs(self, batch: ImageBatch) -> list[np.ndarray]:
        """Every output of one batch as float32, the logits first: what an artifact made by
        :meth:`Backend.expose_blocks` shows. An integer tensor comes as its stored values
        (:attr:`ExposedBlocks.scales` dequantises them)."""
        return [self.run(batch)]

    def prepare(self, batch: ImageBatch):
        """The batch in the runtime's own input form, made once so that timed runs time only the runtime."""
        return batch

    def infer(self, prepared) -> np.ndarray:
        """Logits of a batch made by :meth:`prepare`."""
        return self.run(prepared)

    def check_structure(self) -> list[str]:
        """Problems found in the artifact's interface (names, shapes, metadata); empty when sound."""
        return []

    def describe(self) -> dict:
        return {"method": self.method}


@dataclass
class ExposedBlocks:
    """An artifact that shows the network's block boundaries as outputs beyond its first (the logits).

    ``outputs`` maps each boundary (``layers.2.blocks.3``) to its output's index; a boundary the converter fused
    away has none. ``probe`` is true where the format's own export step made a new file with the boundaries as
    outputs (its runtime does not show the shipped file's intermediate values); false where the shipped file's
    own graph gained outputs (the same nodes, the same weights).
    """

    path: Path
    outputs: dict[str, int]
    probe: bool
    how: str  # one line for the report: how the boundaries were reached
    # output index -> (scale, zero point) of an output a runner returns as its stored integers
    scales: dict[int, tuple[float, int]] = field(default_factory=dict)
    open_info: dict = field(default_factory=dict)  # what its runner is opened with besides the manifest entry


def boundary_shapes(job: ExportJob, paths: list[str]) -> dict[str, tuple[int, ...]]:
    """Each boundary's shape for one image of the job's deploy form, in PyTorch's layout (what a candidate value
    must hold, in that layout or channels-last)."""
    from ..models.blocks import block_outputs

    example = job.example.detach().numpy()[:1]
    return {p: tuple(int(d) for d in v.shape) for p, v in block_outputs(job.module, paths, example).items()}


def channels_last(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(N, C, H, W) -> (N, H, W, C); other ranks unchanged."""
    return (shape[0], *shape[2:], shape[1]) if len(shape) == 4 else shape


@dataclass(frozen=True)
class BenchRuntime:
    """One way the benchmark runs a format's artifacts, a row kind of its own (``--formats`` names it)."""

    name: str  # "executorch-xnnpack"
    short: str  # "ET-XNNPACK", in plots
    label: str = ""  # "XNNPACK", in prose and tables
    aliases: tuple[str, ...] = ()  # other words --formats takes for it
    export_options: dict = field(default_factory=dict)  # options its artifact is exported with; {}: the bundle's
    in_all: bool = True  # part of --formats all
    peers: bool = False  # the peers (timm models) are exported for it and timed in it
    fixed_runs: int | None = None  # timed runs whatever --runs says (slow kernels); None: --runs
    position: int = 50  # where its rows stand in the benchmark's order
    switch: str | None = None  # the bench option that adds it (portable: --portable), when it is not in --formats
    # "gpu": it runs the format's artifacts on the target's GPU (its native runner only, opened with open_options)
    accelerator: str | None = None
    computes_in: str | None = None  # the precision that accelerator computes in ("fp16"): the bound it is held to
    open_options: dict = field(default_factory=dict)  # fields of its runner's open message: how it runs them


@dataclass(frozen=True)
class NativeRunner:
    """A format's runner in C++ (``cloformer_deploy/native/<source>``, speaking the worker protocol), built by
    ``cloformer-device setup`` against the libraries of the pinned wheel this host runs, so that a device needs no
    Python. Paths are relative to the installed package's folder (or the same folder of its wheel for another CPU).
    """

    source: str  # "executorch_runner.cpp"
    package: str  # the distribution whose libraries it links and whose version it is: "executorch"
    libraries: tuple[str, ...]  # glob patterns of the libraries it links: "lib/libexecutorch.so"
    registering: tuple[str, ...] = ()  # of those, the ones that register themselves when loaded (--no-as-needed)
    include_dirs: tuple[str, ...] = ()
    defines: tuple[str, ...] = ()
    # headers the wheel lacks, from a Debian package at set-up time: (package, suite, include folder inside it)
    debian_headers: tuple[str, str, str] | None = None
    # what the program states of its own memory, by the key its runner describes it under -> the row's key
    memory_facts: tuple[tuple[str, str], ...] = ()
    # libraries of the wheel its runtime opens itself at run time (an accelerator), bundled though not linked
    loaded: tuple[str, ...] = ()
    module: str | None = None  # the package's folder in its wheel, where it is not the distribution's name

    @property
    def folder(self) -> str:
        return self.module or self.package


class Backend(ABC):
    name: str  # "onnx", "coreml", "executorch"
    suffix: str  # ".onnx", ".mlpackage", ".pte"
    runtime: str  # what runs it, for help text
    label: str  # the format's name in prose: "ONNX", "Core ML", "ExecuTorch"
    position: int  # where it stands in the registry: the CLI's order
    bench_runtimes: tuple[BenchRuntime, ...] = ()  # the first runs the bundle's artifacts
    # this format's own export options, as fields of the export's options (made with cloformer_deploy.options.option)
    options: dict[str, Any] = {}
    keeps_float_layers = True  # int8 can leave chosen layers in float (--keep-float)
    input_note: str | None = None  # how its input differs from the manifest's preprocessing, for an app developer
    summary: str  # what its artifact is, for an app developer ("a .onnx file for ONNX Runtime (...)")
    manifest_facts: dict[str, dict] = {}  # what its export records in a manifest entry, as JSON Schema properties
    manifest_required: tuple[str, ...] = ()  # of those, the ones every entry of this format has
    calibration_recorded: tuple[str, ...] = ("int8",)  # precisions whose entry records the calibration images
    runner_methods: tuple[str, ...] = ()  # how a validation report says its runner ran it ("onnxruntime", ...)
    device_packages: tuple[str, ...] = ()  # Python distributions a device's worker imports to run it
    native_runner: NativeRunner | None = None  # its runner without Python, where the project builds one
    # a device package installed without its requirements -> what its runtime imports besides
    device_runtime_imports: dict[str, tuple[str, ...]] = {}
    precisions: tuple[str, ...] = ("fp32", "fp16")
    calibrated_precisions: tuple[str, ...] = ("int8",)  # precisions whose export reads calibration images
    default_precision = "fp32"

    def check_options(self, options: dict) -> dict:
        """This format's options (its fields of ``options``) checked and normalised; InputError for a value it
        cannot take. Runs before any work."""
        out = dict(options)
        for name, spec in self.options.items():
            value = options.get(name, spec.default)
            check = spec.metadata.get("check")
            out[name] = (
                check("--" + name.replace("_", "-"), value) if check is not None and value is not None else value
            )
        return out

    def deploy_steps(self, precision: str, options: dict) -> tuple[list[str], list[str]] | None:
        """(steps, extra steps) of the deploy form this format wants with these options; None: the default form."""
        return None

    def filename(self, spec: ModelSpec, precision: str) -> str:
        return f"{spec.name}-{spec.input_size[0]}x{spec.input_size[1]}-{precision}{self.suffix}"

    @abstractmethod
    def export(self, job: ExportJob, path: Path, log: Callable[[str], None]) -> dict:
        """Write the artifact at ``path``; return facts for the manifest (delegation, opset, ...)."""

    # where this format's runtime runs natively ("system-machine"); targets run only what they can
    platforms: tuple[str, ...] = ("linux-x86_64", "linux-aarch64", "darwin-arm64", "darwin-x86_64")
    uses_threads = True  # False: the runtime chooses its own threads, so its rows have no thread count

    def row_variants(self, platform: str) -> list[dict]:
        """The ways one artifact is run on ``platform``, a benchmark row each, as the ``info`` of :meth:`open`.

        [{}]: one way (threads vary separately). Core ML on Apple systems: one per compute unit.
        """
        return [{}]

    @abstractmethod
    def open(self, path: Path, spec: ModelSpec, info: dict, threads: int | None = None) -> Runner:
        """Open a written artifact as a runner (``threads``: its runtime's thread pool; None: the default)."""

    def versions(self) -> dict[str, str]:
        return {}

    def weight_storage(self, path: Path) -> dict[str, int]:
        """Bytes of the artifact's stored constants (weights, biases, quantisation scales) by storage type
        (:data:`STORAGE_TYPES`' names), read from the file itself: what an fp16 or int8 artifact promises to halve
        or quarter shows here."""
        raise NotImplementedError(f"{self.name} does not read its constants' storage")

    def expose_blocks(
        self, path: Path, job: ExportJob, paths: list[str], folder: Path, log: Callable[[str], None]
    ) -> ExposedBlocks:
        """A copy of the artifact at ``path`` (written in ``folder``) whose outputs after the first are the
        boundaries ``paths`` (the last of which is the logits). ``job`` is the artifact's export job again: its
        deploy form, precision and options, for a format that finds the boundaries by exporting once more."""
        raise NotImplementedError(f"{self.label} cannot show its block boundaries")

    profiler: str | None = None  # the runtime's own per-operator profiler, if the project reads it

    def profile(self, path: Path, images: np.ndarray, threads: int, runs: int) -> list:
        """Per-operator times (:class:`~cloformer_deploy.formats.profiling.OpTime`) of ``runs`` runs at ``threads``."""
        raise NotImplementedError(f"{self.name} has no profiler")


# numpy dtype names -> the storage types a manifest names
STORAGE_TYPES = {
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "float64": "fp64",
    "int8": "int8",
    "uint8": "uint8",
    "int16": "int16",
    "uint16": "uint16",
    "int32": "int32",
    "uint32": "uint32",
    "int64": "int64",
    "bool": "bool",
}


def storage_totals(pairs) -> dict[str, int]:
    """(storage type, bytes) pairs summed per type, in a stable order (largest first)."""
    totals: dict[str, int] = {}
    for kind, size in pairs:
        totals[kind] = totals.get(kind, 0) + int(size)
    return dict(sorted(totals.items(), key=lambda kv: (-kv[1], kv[0])))


BACKENDS: dict[str, Backend] = {}


def register(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.name] = cls()
    return cls


def order_registry() -> None:
    """The registry in the formats' ``position`` order (the CLI's, the reports', ``--format all``'s)."""
    ordered = sorted(BACKENDS.values(), key=lambda b: b.position)
    BACKENDS.clear()
    BACKENDS.update((b.name, b) for b in ordered)


class FormatError(InputError):
    pass


def parse_formats(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """``all``, one name or a comma list, in registry order; unknown names are an error listing the valid ones."""
    names = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not names:
        raise FormatError(f"--format: no format given; choose from: {', '.join(BACKENDS)}, all")
    if "all" in names:
        return list(BACKENDS)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise FormatError(f"--format: unknown format {unknown[0]!r}; choose from: {', '.join(BACKENDS)}, all")
    return [n for n in BACKENDS if n in names]
