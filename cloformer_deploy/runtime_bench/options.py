"""The options of ``cloformer-bench`` / :func:`~cloformer_deploy.runtime_bench.bench`."""

from __future__ import annotations

from dataclasses import dataclass

from ..inputs import InputError, choice, comma_list, seconds, thread_counts, whole_number
from ..options import option
from ..pipeline.options import PRECISIONS, ModelChoice, check_bundle, check_data
from .runtimes import ALIASES, IN_ALL, RUNTIMES

MAX_RUNS = 100_000
MAX_WARMUP = 10_000


class BenchInputError(InputError):
    pass


def check_precisions(flag: str, value) -> list[str]:
    precisions = comma_list(flag, value, "default,int8")
    bad = [p for p in precisions if p not in ("default", *PRECISIONS)]
    if bad:
        raise BenchInputError(f"{flag}: unknown precision {bad[0]!r}; choose from default, {', '.join(PRECISIONS)}")
    return precisions


def check_runtimes(flag: str, value) -> list[str]:
    names = [n.lower() for n in comma_list(flag, value, "onnxruntime,executorch-xnnpack")]
    # "all" is every runtime but those named only (the GPU's); "all,litert-gpu" adds them
    chosen = [*(IN_ALL if "all" in names else ()), *(ALIASES.get(n, n) for n in names if n != "all")]
    unknown = [n for n in chosen if n not in RUNTIMES]
    if unknown:
        raise BenchInputError(f"{flag}: unknown runtime {unknown[0]!r}; choose from: {', '.join(RUNTIMES)}, all")
    return [r for r in RUNTIMES if r in chosen]


RUNNERS = ("auto", "native", "python", "both")


@dataclass
class BenchOptions(ModelChoice):
    formats: object = option("all", f"all, or a comma list of runtimes: {', '.join(RUNTIMES)}", check=check_runtimes)
    threads: object = option(
        "1,2", "thread counts, comma separated (default 1,2)", check=lambda flag, v: thread_counts(flag, v)
    )
    precisions: object = option(
        "default",
        "comma list: default (each format's), fp32, fp16, int8, w4 (default: default)",
        check=check_precisions,
    )
    runs: int = option(50, "timed runs per row (default 50)", check=lambda flag, v: whole_number(flag, v, 1, MAX_RUNS))
    warmup: int = option(
        10, "untimed runs first (default 10)", check=lambda flag, v: whole_number(flag, v, 0, MAX_WARMUP)
    )
    runner: str = option(
        "auto",
        "how ExecuTorch, ONNX Runtime and LiteRT rows run: native (the C++ runners cloformer-device setup builds: the "
        "latency, load and memory an app sees), python (the runtimes' Python APIs), both (a row each, in the "
        "same rounds), or auto (native where built, else python; default)",
        check=lambda flag, v: choice(flag, v, RUNNERS),
    )
    compare_authors: bool = option(False, "also run a naive export of the authors' form in the same runtimes")
    baselines: bool = option(
        False,
        "also time, in the same rounds, 8 mobile backbones from timm (MobileNetV3/V4, "
        "EfficientFormerV2, FastViT, RepViT, MobileOne, EfficientViT, MobileViTv2) and "
        "the other CloFormer/FAT sizes; writes peers.md and pareto.png",
    )
    peers: str | None = option(None, "comma list of timm model names (or of this project's models) to time beside it")
    portable: bool = option(False, "also run ExecuTorch's portable kernels (slow)")
    profile: bool = option(
        False, "also write profile.md: time per operator and per operator kind, by each runtime's own profiler"
    )
    data: str | None = option(
        None, "image folder: drift on it; top-1/top-5 if it has one subfolder per class", check=check_data
    )
    bundle: str | None = option(
        None,
        "use the artifacts of an existing export bundle instead of exporting (with "
        "--weights of its checkpoint, as cloformer-validate)",
        check=check_bundle,
    )
    out: str = option("runtime_bench", "output folder (default runtime_bench/)")
    ablation: bool = option(False, "instead: time the deploy form step by step (the first thread count)")
    cooldown: float = option(
        0.0,
        "seconds of rest between timing rounds (a phone's clocks drop as it heats; default 0)",
        check=lambda flag, v: seconds(flag, v),
    )
    timeout: float = option(
        900.0,
        "seconds a runtime process may take to load or answer",
        cli=False,
        check=lambda flag, v: seconds(flag, v, 86_400.0),
    )


def ablation_checked(opts: BenchOptions) -> BenchOptions:
    """The options of an ablation run checked (they import no runtime): it times one model's deploy steps,
    here."""
    opts = opts.checked()
    if opts.baselines or opts.peers or opts.profile:
        raise BenchInputError("--ablation times the deploy steps of one model; drop --baselines/--peers/--profile")
    if str(opts.target).strip().lower() != "local" or opts.cpu or opts.target_cache or opts.device():
        raise BenchInputError("--ablation times on this machine; drop --target and its options")
    return opts
