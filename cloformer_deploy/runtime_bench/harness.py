"""``bench(...)``: latency, load time, peak memory, size and drift per runtime, precision and thread count.

Every runtime runs in its own process (its own thread pool and memory accounting).
The processes stay loaded and are timed in turns, a slice of runs each per round, so
that a noisy neighbour affects all rows alike; medians and p90 come from all rounds.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ..files import size_bytes
from ..formats import BACKENDS
from ..formats.base import ExportJob, ModelSpec
from ..images import ImageBatch, load_images
from ..inputs import spoken_list, writable_folder
from ..models import profile_model
from ..models.memory import check_fits
from ..pipeline import export, open_bundle, prepare_model, schema
from ..pipeline.model import reference_outputs, versions
from ..pipeline.schema import RESULTS_SCHEMA_VERSION
from ..progress import Progress
from ..quiet import quiet_libraries
from ..targets import Target, TargetError, WorkerError, WorkerProcess
from ..targets.local import LocalTarget
from ..targets.native import TRIPLES
from ..targets.worker import unpack
from ..validation import compare, versus_local
from .machine import machine_info
from .options import BenchInputError, BenchOptions
from .peers import Peer, resolve_peers
from .report import write_reports
from .runtimes import (
    BUNDLE_RUNTIMES,
    EAGER,
    FORMAT_OF,
    GPU_RUNTIMES,
    PEER_RUNTIMES,
    RUNTIMES,
    bench_runtime,
    export_options,
)

LOCAL = LocalTarget()  # this machine, where a row with no target of its own runs (the eager and peer rows)


@dataclass
class Combo:
    model: str
    form: str | None
    runtime: str
    precision: str
    threads: int | None
    path: str | None = None
    size_mb: float | None = None
    extra: dict = field(default_factory=dict)
    worker: WorkerProcess | None = None
    times: list[float] = field(default_factory=list)
    load_ms: float | None = None
    error: str | None = None
    outputs: np.ndarray | None = None
    peak_rss_mb: float | None = None
    role: str = "subject"  # the benchmarked model, or a "peer" timed beside it
    target: Target | None = None  # where it runs; None: this machine
    native: bool = False  # run by the format's native runner (as an app runs it), not its Python runtime
    where: Target | None = None  # the target that starts its process (None: LOCAL); set with the runner chosen
    variant: dict = field(default_factory=dict)  # how the runtime runs it (Core ML: its compute unit)
    timed: bool | None = None  # None: timed when it has a thread count
    described: dict = field(default_factory=dict)  # the runner's own description, from the worker

    def __post_init__(self):
        if self.timed is None:
            self.timed = self.threads is not None


@dataclass
class BenchResult:
    out: Path
    results: dict
    rows: list[dict]


def profiler_of(runtime: str) -> str | None:
    """The profiler of a runtime's format, for the runtime that runs the format's own artifacts."""
    if runtime not in FORMAT_OF:
        return None
    backend = BACKENDS[FORMAT_OF[runtime]]
    return backend.profiler if bench_runtime(runtime) is backend.bench_runtimes[0] else None


def _labelled(images: ImageBatch, data: str | Path | None) -> list[int] | None:
    """Class indices for an ImageNet-validation-layout folder (one subfolder per class, sorted by name, as
    ImageNet's synset folders give the class order), from the images' paths; None for a flat folder."""
    if data is None:
        return None
    classes = sorted(p.name for p in Path(data).iterdir() if p.is_dir())
    if not classes:
        return None
    index = {c: i for i, c in enumerate(classes)}
    return [index[name.split("/")[0]] for name in images.names]


def _accuracy(outputs: np.ndarray, labels: list[int]) -> dict:
    y = np.asarray(labels[: len(outputs)])
    top5 = np.argsort(-outputs, axis=1)[:, :5]
    return {
        "top1": float((top5[:, 0] == y).mean()),
        "top5": float((top5 == y[:, None]).any(1).mean()),
        "images": int(len(y)),
    }


def bench(
    options: BenchOptions | str | None = None,
    /,
    *,
    progress: Progress | None = None,
    argv: list[str] | None = None,
    **kwargs,
) -> BenchResult:
    """Time every runtime (own process each) on the deploy form, optionally beside the authors' form.

    Takes a :class:`BenchOptions` or its fields as keyword arguments (``bench(model="cloformer-xxs",
    formats="onnxruntime", threads="1,2")``); the names are the CLI's flags. ``bundle`` takes the
    artifacts of an existing export instead of exporting; its checkpoint must be given as ``weights``
    exactly as :func:`~cloformer_deploy.pipeline.validate_bundle` requires. ``baselines`` adds the default
    peers (timm mobile backbones and the other CloFormer/FAT sizes) and ``peers`` names more; they are
    exported for the runtimes that take any PyTorch model and timed in the same rounds. ``profile`` adds
    per-operator time tables (each runtime's own profiler) in profile.md. ``target`` other than ``local``
    adds, for every artifact of the benchmarked model it can run, rows run there: ``arm64`` (emulated,
    with ``cpu``) gives drift only; ``ssh://[user@]host[:port]`` (a real device, with its options) gives
    rows timed in the same interleaved rounds as this machine's. ``cooldown`` seconds pass between rounds
    (a phone's clocks drop when it heats up). A runtime the device lacks is an error row.
    """
    with quiet_libraries():
        if isinstance(options, str):  # bench("cloformer-xxs", ...)
            options, kwargs = None, {"model": options, **kwargs}
        opts = BenchOptions.of(options, **kwargs).checked()
        progress = progress or Progress(quiet=True)
        if opts.ablation:
            raise BenchInputError("--ablation is a run of its own: call ablation() with these options")
        # a runtime that a switch adds (--portable) joins the ones --formats names
        switched = [r for r in FORMAT_OF if bench_runtime(r).switch and getattr(opts, bench_runtime(r).switch)]
        runtimes = [r for r in RUNTIMES if r in opts.formats or r in switched]
        writable_folder("--out", opts.out)
        size, model = opts.img_size, opts.model
        if opts.bundle is not None:
            opened = open_bundle(opts.bundle, opts.weights)
            m = opened.manifest["model"]
            if opts.was_given("model") and model != m["name"]:
                raise BenchInputError(f"--bundle holds {m['name']}, not {model}; drop --model or pass another bundle")
            if opts.was_given("img_size") and size != tuple(m["input_size"]):
                raise BenchInputError(
                    f"--bundle is for {m['input_size'][0]}x{m['input_size'][1]} images, "
                    f"not {size[0]}x{size[1]}; drop --img-size or pass another bundle"
                )
            size, model = tuple(m["input_size"]), m["name"]
        peer_list = resolve_peers(opts.baselines, opts.peers, model)
        if peer_list and not set(runtimes) & set(PEER_RUNTIMES):
            raise BenchInputError(
                f"--baselines/--peers are timed on {spoken_list(PEER_RUNTIMES)}; add one of them to --formats"
            )
        if opts.profile and not any(profiler_of(r) for r in runtimes):
            names = [r for r in RUNTIMES if profiler_of(r)]
            raise BenchInputError(
                f"--profile reads the profilers of {spoken_list(names)}; add one of them to --formats"
            )
        check_fits(model, size, 1, what=f"--img-size {size[0]}x{size[1]}")
        prepared = opened.prepared if opts.bundle is not None else prepare_model(model, opts.weights, None)
        remote = opts.open_target()
        local = LocalTarget(opts.target_cache)
        _check_runner(opts.runner, runtimes, local, remote if remote.kind != "local" else None)
        if remote.kind == "local":
            remote = None
        elif not any(remote.can_run(BACKENDS[FORMAT_OF[r]]) for r in runtimes if r in FORMAT_OF):
            there = [r for r in RUNTIMES if r in FORMAT_OF and remote.can_run(BACKENDS[FORMAT_OF[r]])]
            raise BenchInputError(f"--target {opts.target}: none of --formats runs there; add {' or '.join(there)}")
        try:
            return _bench(opts, prepared, runtimes, size, peer_list, local, remote, progress, argv)
        finally:
            if remote is not None:
                remote.close()


def _check_runner(runner: str, runtimes, local: Target, remote: Target | None) -> None:
    """--runner against what is built and where Python runs; BenchInputError (one line naming the fix) before work."""
    formats = [BACKENDS[FORMAT_OF[r]] for r in runtimes if r in FORMAT_OF]
    natives = [b for b in formats if b.native_runner is not None]
    if runner == "native":
        unbuilt = [b for b in natives if local.native_bundle(b) is None]
        if unbuilt and local.platform not in TRIPLES:
            raise BenchInputError(f"--runner native: no native runners are built for {local.platform}; drop --runner")
        if unbuilt:
            raise BenchInputError(
                f"--runner native: the native {unbuilt[0].label} runner is not built here; build it with: "
                "cloformer-device setup local (or drop --runner)"
            )
        if not natives:
            raise BenchInputError("--runner native: none of --formats has a native runner; drop --runner")
    if runner in ("python", "both") and remote is not None and not remote.has_python:
        if hasattr(remote, "check_python"):  # a device that may have Python (ssh)
            try:
                remote.check_python()
            except TargetError:
                if runner == "python":
                    raise  # one line naming the fix; with --runner both its rows are native only
        elif runner == "python":
            raise BenchInputError(f"--runner python: {remote.name} runs the native runners only; drop --runner")
    if runner == "python" and remote is not None and remote.has_python:
        if not any(remote.runs_in_python(b) for b in formats):
            raise BenchInputError(f"--runner python: {remote.name}'s Python runs none of --formats; drop --runner")
    gpu = [r for r in runtimes if r in GPU_RUNTIMES]
    if gpu and runner == "python":
        raise BenchInputError(
            f"--runner python: {', '.join(gpu)} run in the native runner only; drop --runner, or drop them from --formats"
        )
    # without a device the GPU rows are this machine's: no Vulkan device here is one line; with a device, this
    # machine's GPU rows are left out where it has none (the device's run there)
    missing = local.gpu_missing() if gpu and remote is None else None
    if missing is not None:
        raise BenchInputError(f"--formats {','.join(gpu)}: {missing}")


def _runners(runner: str, backend, on: Target) -> list[bool]:
    """Whether each row of ``backend`` on ``on`` is run natively: one row, or two with --runner both."""
    native = backend.native_runner is not None and on.native_bundle(backend) is not None
    if runner == "both":
        return [k for k, ok in ((True, native), (False, on.runs_in_python(backend))) if ok] or [True]
    if runner == "python" and on.runs_in_python(backend):
        return [False]
    return [native or not on.runs_in_python(backend)]


def _bench(
    opts: BenchOptions,
    prepared,
    runtimes,
    size,
    peer_list,
    local: Target,
    remote: Target | None,
    progress: Progress,
    argv,
) -> BenchResult:
    threads, runs, warmup, data, bundle = opts.threads, opts.runs, opts.warmup, opts.data, opts.bundle
    compare_authors, timeout, precisions, profile = opts.compare_authors, opts.timeout, opts.precisions, opts.profile
    cooldown, out = opts.cooldown, Path(opts.out)
    variant, authors = prepared.variant, prepared.module
    weights_sha = prepared.weights_sha256
    images = load_images(size, variant.mean, variant.std, folder=data)
    labels = _labelled(images, data)
    out_dir = out / f"{variant.name}-{size[0]}x{size[1]}"
    work = Path(tempfile.mkdtemp(prefix="cloformer-bench-"))
    combos: list[Combo] = []
    try:
        torch.save(authors.state_dict(), work / "weights.pth")
        reference = reference_outputs(authors, images.tensor)
        with progress.stage("machine (matmul peak per thread count)"):
            machine = machine_info(threads)
        prof = profile_model(variant.name, size, authors.num_classes)
        artifacts = _artifacts(
            variant.name, work, size, authors, runtimes, compare_authors, bundle, progress, list(precisions), data
        )
        forms = ["deploy", "authors"] if compare_authors else ["deploy"]
        for form in forms:
            for rt in runtimes:
                if rt == EAGER:
                    combos += [
                        Combo(variant.name, form, rt, "fp32", t, size_mb=size_bytes(work / "weights.pth") / 1e6)
                        for t in threads
                    ]
                    continue
                for (f, r, _), art in artifacts.items():
                    if (f, r) == (form, rt):
                        combos += _artifact_combos(variant.name, form, rt, art, threads, local, remote, opts.runner)
        for c in combos:
            c.extra = {"params": prof.params, "macs": prof.macs, **c.extra}
        references = {variant.name: reference}
        peers = _peer_combos(
            peer_list, runtimes, threads, work, size, images, authors.num_classes, references, progress
        )
        for c in peers:  # timed the way the model is timed here, one row each
            if c.path is not None:
                c.where, c.native = local, _runners(opts.runner, BACKENDS[FORMAT_OF[c.runtime]], local)[0]
        combos += peers
        unbuilt = [
            c for c in combos if c.where is local and not c.native and BACKENDS[FORMAT_OF[c.runtime]].native_runner
        ]
        if unbuilt and opts.runner == "auto" and local.platform in TRIPLES:
            progress.warn(
                "the native runners are not built here: ExecuTorch, ONNX Runtime and LiteRT rows run in their Python "
                "runtimes (latency as Python calls them, memory of a Python process); build them with: "
                "cloformer-device setup local"
            )
        thermal = _measure(
            combos, work, variant, authors.num_classes, size, images, runs, warmup, timeout, progress, cooldown
        )
        rows = [_row(c, references.get(c.model), machine, labels) for c in combos]
        _versus_local(combos, rows)
        profiles = _profiles(combos, images, threads[0], min(runs, 20), progress) if profile else None
    finally:
        for c in combos:
            if c.worker is not None:
                c.worker.close()
        shutil.rmtree(work, ignore_errors=True)
    results = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "machine": machine,
        "versions": versions(),
        "config": {
            "model": variant.name,
            "input_size": list(size),
            "threads": threads,
            "runs": runs,
            "warmup": warmup,
            "cooldown_s": cooldown,
            "weights_sha256": weights_sha,
            "random_init": prepared.random_init,
            "images": len(images),
            "data": str(data) if data else "scikit-image bundled photographs",
            "macs": prof.macs,
            "params": prof.params,
            "compare_authors": compare_authors,
            "peers": [p.name for p in peer_list],
        },
        "targets": {"local": local.describe(), **({remote.name: remote.describe()} if remote else {})},
        "thermal": thermal,
        "rows": rows,
        "command": argv if argv is not None else sys.argv,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("profile.md", "peers.md", "pareto.png"):  # an earlier run's, which this run would not replace
        (out_dir / stale).unlink(missing_ok=True)
    write_reports(out_dir, results)
    if profiles is not None:
        (out_dir / "profile.md").write_text(profiles)
    problem = schema.problem("results", results)  # after writing: a schema bug must not cost the measurements
    if problem is not None:
        raise RuntimeError(f"results.json breaks its own schema (written all the same): {problem}")
    return BenchResult(out_dir, results, rows)


def _profiles(combos, images: ImageBatch, threads: int, runs: int, progress: Progress) -> str:
    """profile.md: per-operator tables of each of the benchmarked model's artifacts that has a profiler."""
    from .op_profile import op_tables

    seen, parts = set(), []
    for c in combos:
        key = (c.form, c.runtime, c.precision)
        if c.role != "subject" or c.target is not None or not profiler_of(c.runtime) or c.path is None or key in seen:
            continue
        seen.add(key)
        with progress.stage(f"profile {c.form} form, {c.runtime} {c.precision}, {threads} thread(s), {runs} runs"):
            try:
                tables = op_tables(BACKENDS[FORMAT_OF[c.runtime]].profile(c.path, images.tensor, threads, runs))
            except Exception as e:  # a profiler that fails costs its section, not the run's results
                tables = f"profiling failed: {_one_line(e)}"
        parts.append(f"## {c.model}, {c.form} form, {c.runtime}, {c.precision}, {threads} thread(s)\n\n{tables}")
    profilers = "; ".join(f"{b.label}: {b.profiler}" for b in BACKENDS.values() if b.profiler)
    head = (
        f"# Where the time goes: per-operator profiles\n\nEach artifact run {runs} times after warm-up, "
        f"{threads} thread(s), batch 1, by the runtime's own profiler ({profilers}). Kinds are the runtime's "
        "kernel names.\n"
    )
    return "\n\n".join([head, *parts]) + "\n"


def _bare_spec(name: str, num_classes: int, size) -> ModelSpec:
    """The spec of an artifact exported only to be timed: batch 1, no normalisation or labels recorded."""
    return ModelSpec(name, num_classes, size)


def _one_line(e: Exception) -> str:
    text = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _peer_combos(
    peer_list: list[Peer],
    runtimes,
    threads,
    work: Path,
    size,
    images: ImageBatch,
    num_classes,
    references: dict,
    progress: Progress,
) -> list[Combo]:
    """Each peer exported (fp32) for ONNX Runtime and XNNPACK, with its own PyTorch output as the drift reference.

    A peer that fails to build, export or run becomes an error row; the others still run.
    """
    from ..models import count_macs
    from .peers import build_timm_peer

    combos: list[Combo] = []
    chosen = [r for r in PEER_RUNTIMES if r in runtimes]
    x = torch.from_numpy(images.tensor)
    for i, peer in enumerate(peer_list, 1):
        extra = {"source": peer.source, "published": peer.published}
        with progress.stage(f"peer {i}/{len(peer_list)}: {peer.name} ({', '.join(chosen)})") as stage:
            try:
                if peer.source == "timm":
                    module = build_timm_peer(peer.name, num_classes)
                    form = "timm"  # counted as for CloFormer (PyTorch's FLOP counter), on the fused form
                    extra["params"] = sum(p.numel() for p in module.parameters())
                    extra["macs"] = count_macs(module, size)
                else:  # this project's own sizes, random (seed 0) weights
                    module = prepare_model(peer.name, None, num_classes).module
                    form = "deploy"
                    prof = profile_model(peer.name, size, num_classes)
                    extra["params"], extra["macs"] = prof.params, prof.macs
                with torch.no_grad():
                    references[peer.name] = np.concatenate([module(x[j : j + 1]).numpy() for j in range(len(x))])
            except Exception as e:  # a peer that cannot even be built is one error row per runtime
                combos += [
                    Combo(
                        peer.name,
                        "timm" if peer.source == "timm" else "deploy",
                        rt,
                        "fp32",
                        t,
                        extra=extra,
                        error=f"build failed: {_one_line(e)}",
                        role="peer",
                    )
                    for rt in chosen
                    for t in threads
                ]
                continue
            for rt in chosen:
                backend = BACKENDS[FORMAT_OF[rt]]
                stage.update(f"export for {rt}")
                try:
                    if peer.source == "timm":
                        path = work / f"peer-{peer.name}{backend.suffix}"
                        spec = _bare_spec(peer.name, num_classes, size)
                        options = export_options(rt)
                        job = ExportJob(module, torch.from_numpy(images.tensor[:1]), spec, "fp32", options)
                        art = _art(path, {"precision": "fp32", **backend.export(job, path, lambda text: None)})
                    else:  # exactly as the benchmarked model: each format's own deploy form
                        result = export(
                            peer.name,
                            format=[backend.name],
                            img_size=size,
                            num_classes=num_classes,
                            out=work / f"peer-{peer.name}",
                            no_validate=True,
                            precision="fp32",
                        )
                        entry = next(e for e in result.manifest["artifacts"] if e["format"] == backend.name)
                        art = _art(result.bundle / entry["path"], entry)
                except Exception as e:
                    combos += [
                        Combo(
                            peer.name,
                            form,
                            rt,
                            "fp32",
                            t,
                            extra=extra,
                            error=f"export failed: {_one_line(e)}",
                            role="peer",
                        )
                        for t in threads
                    ]
                    continue
                combos += [
                    Combo(
                        peer.name,
                        form,
                        rt,
                        "fp32",
                        t,
                        art["path"],
                        art["size_mb"],
                        {**extra, **art["extra"]},
                        role="peer",
                    )
                    for t in threads
                ]
    return combos


def _artifacts(
    name, work: Path, size, authors, runtimes, compare_authors, bundle, progress, precisions: list[str], data
) -> dict:
    """(form, runtime, precision) -> {path, precision, size_mb, extra}: exported now, or taken from --bundle."""
    out: dict = {}
    # formats whose own artifacts (the bundle's) some chosen runtime runs; other runtimes export their own below
    formats = [f for f, rts in BUNDLE_RUNTIMES.items() if any(rt in runtimes for rt in rts)]
    entries: list[tuple[Path, dict]] = []
    if bundle is not None:  # checked by open_bundle: the manifest, its files and the weights
        from ..pipeline.bundle import read_manifest

        entries = [(Path(bundle), e) for e in read_manifest(Path(bundle))["artifacts"]]
    else:
        ckpt = work / "weights.pth"
        for prec in precisions:
            # a format whose default precision is this one was exported with "default" already
            fmts = [
                f
                for f in formats
                if prec == "default"
                or (
                    prec in BACKENDS[f].precisions
                    and not ("default" in precisions and BACKENDS[f].default_precision == prec)
                )
            ]
            if not fmts:
                continue
            with progress.stage(f"export deploy form ({', '.join(fmts)}; {prec} precision)"):
                result = export(
                    name,
                    weights=ckpt,
                    format=fmts,
                    img_size=size,
                    num_classes=authors.num_classes,
                    out=work / f"export-{prec}",
                    no_validate=True,
                    data=data,
                    **({} if prec == "default" else {"precision": prec}),
                )
            entries += [(result.bundle, e) for e in result.manifest["artifacts"]]
    for root, e in entries:
        for rt in BUNDLE_RUNTIMES[e["format"]]:
            if rt in runtimes:
                out[("deploy", rt, e["precision"])] = _art(root / e["path"], e)
    spec = _bare_spec(name, authors.num_classes, size)
    example = torch.randn(1, 3, *size)
    jobs = []
    for rt in runtimes:  # a runtime with export options of its own (portable kernels) exports its own artifact
        if rt in FORMAT_OF and bench_runtime(rt).export_options:
            from ..models import to_deploy

            jobs.append(("deploy", rt, to_deploy(authors, size)))
    if compare_authors:  # a naive export, in the runtimes that take any PyTorch model
        jobs += [("authors", rt, authors) for rt in PEER_RUNTIMES if rt in runtimes]
    for form, rt, module in jobs:
        backend = BACKENDS[FORMAT_OF[rt]]
        options = export_options(rt)
        path = work / f"{form}-{rt}{backend.suffix}"
        with progress.stage(f"export {form} form for {rt}"):
            try:
                info = backend.export(ExportJob(module, example, spec, "fp32", options), path, progress.log)
            except Exception as e:  # a naive export a converter cannot make is a row saying why, not a stop
                if form != "authors":
                    raise
                out[(form, rt, "fp32")] = {
                    "path": None,
                    "precision": "fp32",
                    "size_mb": None,
                    "extra": {},
                    "error": f"export failed: {_one_line(e)}",
                }
                continue
        out[(form, rt, "fp32")] = _art(path, {"precision": "fp32", **info})
    return out


def _artifact_combos(
    model: str, form: str, rt: str, art: dict, threads, local: Target, remote: Target | None, runner: str = "auto"
) -> list[Combo]:
    """The rows of one artifact: here, and on the target if it runs there.

    A row is timed where the runtime runs natively and the target measures latency (Core ML off
    Apple systems: drift by the interpreter, untimed). Each way the runtime runs the artifact on a
    platform is a row (Core ML on a Mac: a compute unit each), and so is each runner (``runner``
    ``both``: the native runner and the Python runtime); thread counts only for runtimes that take one.
    """
    backend = BACKENDS[FORMAT_OF[rt]]
    gpu = rt in GPU_RUNTIMES
    out = []
    for where in (local, remote) if remote is not None else (local,):
        if where is remote and not where.can_run(backend):
            continue
        if gpu and where is local and remote is not None and local.gpu_missing() is not None:
            continue
        timed = where.platform in backend.platforms and where.measures_latency
        if gpu:  # one row, never timed on a software GPU: its time is the CPU's, not a GPU's
            timed = timed and not where.gpu_software
        counts = threads if timed and backend.uses_threads and not gpu else [None]
        # a GPU row runs in the native runner only, where the target reaches a GPU
        for native in [True] if gpu else _runners(runner, backend, where):
            error = art.get("error")
            if gpu and error is None:
                error = where.gpu_problem(backend)
            if where is remote and error is None:
                error = where.missing(backend, native)
            for way in backend.row_variants(where.platform):
                out += [
                    Combo(
                        model,
                        form,
                        rt,
                        art["precision"],
                        t,
                        art["path"],
                        art["size_mb"],
                        art["extra"],
                        target=where if where is remote else None,
                        variant=way,
                        timed=timed,
                        error=error,
                        native=native,
                        where=where,
                    )
                    for t in counts
                ]
    return out


def _art(path: Path, entry: dict) -> dict:
    keys = ("partitions", "non_delegated_kernels", "non_delegated_ops", "nodes", "op_types", "ops")
    return {
        "path": str(path),
        "precision": entry["precision"],
        "size_mb": round(size_bytes(path) / 1e6, 3),
        "extra": {k: entry[k] for k in (*keys, "weight_bytes") if k in entry},
    }


def _measure(
    combos,
    work: Path,
    variant,
    num_classes,
    size,
    images: ImageBatch,
    runs,
    warmup,
    timeout,
    progress,
    cooldown: float = 0.0,
) -> dict:
    """Load, time (interleaved rounds) and read outputs, one thread count at a time: every row of a thread
    count shares its rounds, and only those processes (120-770 MB each) are loaded at once. A device's rows
    share the rounds of this machine's at the same thread count. Rows of a target that measures no latency
    run one at a time: they are never timed, so nothing is interleaved.

    Returns the thermal zones' temperatures per target before and after each thread count's rounds.
    """
    eager = {
        "model": variant.name,
        "family": variant.family,
        "architecture": dataclasses.asdict(variant.config),
        "num_classes": num_classes,
        "input_size": list(size),
        "weights": str(work / "weights.pth"),
    }
    spec = _bare_spec(variant.name, num_classes, size).to_dict()
    done: dict = {}  # one artifact's outputs do not depend on its thread count: run them once
    groups: dict = {}
    first = next((c.threads for c in combos if c.threads is not None), None)
    for c in combos:
        if c.error is not None:
            continue
        if c.target is not None and not c.target.measures_latency:
            key = (c.target.name, None)
        else:  # runtimes that choose their own threads (Core ML) share the first thread count's rounds
            key = ("timed", c.threads if c.threads is not None else first) if c.timed else ("local", None)
        groups.setdefault(key, []).append(c)
    thermal: dict = {}
    for (where, threads), group in groups.items():
        if where not in ("local", "timed"):
            for i, c in enumerate(group, 1):
                what = f"{where} (emulated: drift only) {i}/{len(group)}, {c.form} form {c.runtime} {c.precision}"
                _load_workers([c], eager, spec, images, timeout, progress, what)
                _outputs([c], images, done, progress, what)
            continue
        what = "untimed" if threads is None else f"{threads} thread{'s' if threads != 1 else ''}"
        _load_workers(group, eager, spec, images, timeout, progress, what)
        before = _thermal(group)
        _time(group, runs, warmup, progress, what, cooldown)
        after = _thermal(group)
        for name in before:
            thermal.setdefault(name, []).append(
                {"threads": threads, "before_c": before[name], "after_c": after.get(name)}
            )
        _outputs(group, images, done, progress, what)
    return thermal


def _thermal(group) -> dict:
    """Per target of the group that exposes thermal zones: {zone: degrees C}, read by one of its workers."""
    zones = {}
    for c in group:
        name = c.target.name if c.target else "local"
        if c.worker is None or not c.timed or name in zones:
            continue
        try:
            zones[name] = c.worker.ask({"cmd": "thermal"}, timeout=60)["zones"]
        except (WorkerError, OSError) as e:  # the row cannot go on without its worker
            c.error = f"reading the thermal zones failed: {e}"
            c.worker.close()
            c.worker = None
    return {k: v for k, v in zones.items() if v}


def _open_message(c: Combo, eager: dict, spec: dict) -> dict:
    if c.runtime == EAGER:
        return {"cmd": "open", "format": "eager", "threads": c.threads or 1, "eager": {**eager, "form": c.form}}
    where = c.where or LOCAL
    return {
        "cmd": "open",
        "format": FORMAT_OF[c.runtime],
        "path": where.ship(c.path),
        "spec": {**spec, "name": c.model},
        "info": c.variant,
        "threads": c.threads or 1,
        **bench_runtime(c.runtime).open_options,
    }


def _run(worker: WorkerProcess, images: ImageBatch, i: int) -> dict:
    return worker.run_batch(images.names[i : i + 1], images.images[i : i + 1], images.tensor[i : i + 1])


def _load_workers(group, eager, spec, images: ImageBatch, timeout, progress, what) -> None:
    with progress.stage(f"{what}: load {len(group)} runtime process{'es' if len(group) > 1 else ''}") as stage:
        for i, c in enumerate(group, 1):
            where = c.where or LOCAL
            stage.update(f"{i}/{len(group)}" + (f" on {where.name}" if c.target else ""))
            try:
                message = _open_message(c, eager, spec)  # ships the artifact to a device: may fail there
                c.worker = where.start(
                    max(timeout, where.step_timeout) if c.target else timeout,
                    fmt=FORMAT_OF.get(c.runtime),
                    native=c.native,
                    gpu=c.runtime in GPU_RUNTIMES,
                )
                opened = c.worker.ask(message)
                c.described = opened.get("describe") or {}
                # the first run initialises lazily in several runtimes: part of loading
                first = _run(c.worker, images, 0)
                c.load_ms = opened["load_ms"] + first["ms"]
            except (WorkerError, OSError) as e:
                c.error = str(e)
                if c.worker is not None:
                    c.worker.close()
                c.worker = None


def _time(group, runs, warmup, progress, what, cooldown: float = 0.0) -> None:
    timed = [c for c in group if c.worker is not None and c.timed]
    if not timed:
        return
    rounds = max(1, min(5, runs))
    with progress.stage(
        f"{what}: time {len(timed)} rows: {warmup} warm-up + {runs} runs each, in {rounds} interleaved rounds"
    ) as stage:
        for r in range(rounds):
            stage.update(f"round {r + 1}/{rounds}")
            for c in timed:
                if c.worker is None:
                    continue
                n = runs // rounds + (1 if r < runs % rounds else 0)
                w = warmup if r == 0 else 0
                fixed = bench_runtime(c.runtime).fixed_runs if c.runtime in FORMAT_OF else None
                if fixed is not None:  # kernels that take seconds per run: a fixed count, in the first round
                    n, w = (fixed if r == 0 else 0), (1 if r == 0 else 0)
                try:
                    if w:
                        c.worker.ask({"cmd": "time", "n": w})
                    if n:
                        c.times += c.worker.ask({"cmd": "time", "n": n})["times_ms"]
                except (WorkerError, OSError) as e:
                    c.error = f"timing failed: {e}"
                    c.worker.close()
                    c.worker = None
                time.sleep(0.2)  # let the previous runtime's spinning threads go idle
            if cooldown and r + 1 < rounds:
                stage.update(f"round {r + 1}/{rounds} done; cooling down {cooldown:g}s")
                time.sleep(cooldown)


def _outputs(group, images: ImageBatch, done: dict, progress, what) -> None:
    with progress.stage(f"{what}: outputs on the validation images (drift)") as stage:
        for c in group:
            if c.worker is None:
                continue
            # a compute unit is its own way of computing (the Neural Engine's fp16 is not the CPU's)
            key = (
                c.model,
                c.form,
                c.runtime,
                c.native,
                c.precision,
                c.path,
                c.target.name if c.target else "local",
                tuple(sorted(c.variant.items())),
            )
            try:
                if key not in done:
                    outs = []
                    for i in range(len(images)):
                        stage.update(f"{c.model} {c.runtime} {c.precision}: image {i + 1}/{len(images)}")
                        outs.append(unpack(_run(c.worker, images, i)["logits"]))
                    done[key] = np.concatenate(outs).astype(np.float32)
                c.outputs = done[key]
                if c.target is None or c.target.measures_latency:  # an emulator's memory is not the runtime's
                    c.peak_rss_mb = round(c.worker.ask({"cmd": "rss"})["peak_rss_mb"], 1)
            except (WorkerError, OSError) as e:
                c.error = f"outputs failed: {e}"
            c.worker.close()
            c.worker = None


def _versus_local(combos: list[Combo], rows: list[dict]) -> None:
    """A target's row gets its outputs' difference from this machine's run of the same artifact."""

    def key(c):
        return c.model, c.form, c.runtime, c.precision, c.path, tuple(sorted(c.variant.items()))

    # the native runner's outputs here where it ran (what the target's runner is compared with), else Python's
    here = {
        key(c): c.outputs for c in sorted(combos, key=lambda c: c.native) if c.target is None and c.outputs is not None
    }
    for c, row in zip(combos, rows):
        if c.target is not None and c.outputs is not None and key(c) in here:
            row["vs_local"] = versus_local(c.outputs, here[key(c)])


def _row(c: Combo, reference: np.ndarray | None, machine: dict, labels) -> dict:
    lat = None
    gflops = eff = None
    if c.times:
        t = np.asarray(c.times)
        lat = {
            "median": round(float(np.median(t)), 3),
            "p90": round(float(np.percentile(t, 90)), 3),
            "min": round(float(t.min()), 3),
            "runs": int(len(t)),
        }
    if c.times and c.extra.get("macs"):
        gflops = round(2 * c.extra["macs"] / (lat["median"] / 1e3) / 1e9, 2)
        # the peak is this machine's: a device's row has no efficiency against it
        peak = machine["matmul_gflops"].get(str(c.threads)) if c.target is None else None
        # against the fp32 matmul peak: an int8 row's integer arithmetic has another peak, so none is given
        if peak and c.precision != "int8":
            eff = float(f"{gflops / peak:.3g}")  # significant digits: a slow row is not 0
    drift = None
    accuracy = None
    if c.outputs is not None and reference is not None:
        figures = compare(c.outputs, reference[: len(c.outputs)])
        drift = {k: figures[k] for k in ("max_abs", "mean_abs", "cosine", "top1_agreement")}
        if labels and c.role == "subject":  # peers' random weights: accuracy on labels would mean nothing
            accuracy = _accuracy(c.outputs, labels)
    note = None
    on = c.where or LOCAL
    if not c.timed and on.measures_latency and c.runtime in FORMAT_OF:
        backend = BACKENDS[FORMAT_OF[c.runtime]]
        note = (
            f"latency not measurable on {on.platform}: {backend.runtime} runs on "
            f"{', '.join(backend.platforms)}; drift by its reference interpreter"
        )
    if c.target is not None and not c.target.measures_latency:
        note = f"{c.target.name} is emulated: the drift of its kernels, no latency"
        lat = gflops = eff = None
        c.load_ms = None
    gpu = None
    if c.described.get("accelerator") == "gpu":
        adapter = (c.described.get("gpu_adapter") or "not named").split(", arch=")[0]
        said = c.described.get("gpu_software")  # the runner's word; None: its log could not be read
        software = said is True or (said is None and on.gpu_software)
        gpu = {"adapter": adapter, "software": software, "precision": c.described.get("gpu_precision")}
    if gpu and gpu["software"]:  # the adapter is a CPU
        note = f"a software GPU ({adapter}): the GPU path's arithmetic, no latency"
        lat = gflops = eff = None
        c.load_ms = c.peak_rss_mb = None
    keys = ("partitions", "non_delegated_kernels", "non_delegated_ops", "nodes", "op_types", "ops")
    # the file's XNNPACK partitions: not what a GPU row ran
    delegation = {} if gpu else {k: c.extra[k] for k in keys if k in c.extra}
    placement = c.described.get("placement")
    memory = {}
    if c.native and c.runtime in FORMAT_OF:
        for said, key in BACKENDS[FORMAT_OF[c.runtime]].native_runner.memory_facts:
            if c.described.get(said) is not None:
                memory[key] = round(c.described[said] / 1e6, 3)
    return {
        "model": c.model,
        "role": c.role,
        "target": c.target.name if c.target else "local",
        "form": c.form,
        "runtime": c.runtime,
        "runner": "native" if c.native else "python",
        "precision": c.precision,
        **({"compute_units": c.variant["compute_units"]} if c.variant.get("compute_units") else {}),
        **({"placement": placement} if placement else {}),
        **({"gpu": gpu} if gpu else {}),
        "threads": c.threads,
        "params": c.extra.get("params"),
        "macs": c.extra.get("macs"),
        **({"source": c.extra["source"], "published": c.extra.get("published")} if c.role == "peer" else {}),
        "latency_ms": lat,
        "load_ms": round(c.load_ms, 1) if c.load_ms is not None else None,
        "peak_rss_mb": c.peak_rss_mb,
        **memory,
        "size_mb": c.size_mb,
        **({"weight_bytes": c.extra["weight_bytes"]} if c.extra.get("weight_bytes") else {}),
        "drift": drift,
        "accuracy": accuracy,
        "gflops_per_s": gflops,
        "efficiency": eff,
        **({"delegation": delegation} if delegation else {}),
        "note": note,
        "error": c.error,
    }
