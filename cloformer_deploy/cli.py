"""Command-line entry points: argument parsing and display only; the work is in the Python API."""
from __future__ import annotations

import argparse
import sys

from .models import InputSizeError, UnknownModelError, list_models, profile_model


def _size(text: str) -> tuple[int, int]:
    """``224`` or ``256x320`` (height x width)."""
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"invalid size {text!r}; use 224 or HxW such as 256x320")


def _quiet_libraries() -> None:
    """Keep the terminal to our stages: converters' progress bars and warnings go, errors stay."""
    import logging
    import warnings
    from functools import partialmethod

    try:  # coremltools' pass-by-pass progress bars; our stages report progress instead
        from tqdm import tqdm

        tqdm.__init__ = partialmethod(tqdm.__init__, disable=True)
    except ImportError:
        pass
    warnings.filterwarnings("ignore")
    for name in ("torch", "torch.onnx", "torch._export", "torchao", "coremltools", "executorch", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line and exit code 2, without the usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The model-choosing options export and bench share."""
    p.add_argument("--model", default="cloformer-xxs", help=f"one of: {', '.join(list_models())} (default cloformer-xxs)")
    p.add_argument("--weights", help="checkpoint (.pth/.pt/.safetensors); without it the model is randomly initialised")
    p.add_argument("--img-size", type=_size, default=(224, 224), help="224 or HxW such as 256x320; multiples of 32")


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def models_main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="cloformer-models", description="List the CloFormer and FAT variants with params and MACs.")
    p.add_argument("--img-size", type=_size, default=(224, 224), help="224 or HxW (default 224)")
    args = p.parse_args(argv)
    try:
        rows = [profile_model(n, args.img_size) for n in list_models()]
    except (InputSizeError, UnknownModelError) as e:
        return _fail(p.prog, str(e))
    h, w = args.img_size
    print(f"{'model':<22}{'params':>12}{'GMACs @' + f'{h}x{w}':>18}{'paper GMACs':>13}")
    for r in rows:
        paper = f"{r.paper_gmacs:.1f}" if r.paper_gmacs else "-"
        print(f"{r.name:<22}{r.params:>12,}{r.macs / 1e9:>18.3f}{paper:>13}")
    return 0


def export_main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    from .export import BACKENDS, ExportInputError, export
    from .export.progress import Progress

    formats = ", ".join(f"{n} ({b.suffix}, {b.runtime}; {'/'.join(b.precisions)}, default {b.default_precision})"
                        for n, b in BACKENDS.items())
    p = _Parser(prog="cloformer-export",
                description="Export CloFormer/FAT to validated ONNX, Core ML and ExecuTorch artifacts, "
                            "bundled with labels and a manifest.")
    _add_model_args(p)
    p.add_argument("--format", default="all", help=f"all, or a comma list of: {formats}")
    p.add_argument("--num-classes", type=int, help="classes of the head (default: the checkpoint's, else 1000)")
    p.add_argument("--batch", type=int, default=1, help="static batch size (default 1)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8", "w4"],
                   help="default: fp16 for coreml, fp32 for the others; int8: static int8 (ONNX, ExecuTorch) or "
                        "8-bit weights (Core ML); w4: 4-bit palettised weights (Core ML)")
    p.add_argument("--calibration-size", type=int, default=32, help="images to calibrate int8 with (default 32)")
    p.add_argument("--keep-float", type=int, default=0,
                   help="int8: leave the N layers whose quantisation moves the logits most in float")
    p.add_argument("--out", default="export", help="output folder (default export/)")
    p.add_argument("--labels", help="class names, one per line (default: ImageNet-1k names for 1000 classes)")
    p.add_argument("--opset", type=int, help="ONNX opset (default 20, native GELU; 17 uses the TorchScript exporter)")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    p.add_argument("--no-validate", action="store_true", help="skip running the artifacts against PyTorch")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("--zip", action="store_true", help="also write <bundle>.zip for an app")
    p.add_argument("--data", help="folder of images for validation (default: photographs bundled with scikit-image)")
    p.add_argument("--min-top1-agreement", type=float, help="also require this top-1 agreement (0..1)")
    p.add_argument("--coreml-input", choices=["image", "tensor"], default="image",
                   help="Core ML input: RGB image with normalisation inside (default) or a normalised float tensor")
    p.add_argument("--coreml-target", default="iOS16", help="minimum deployment target: iOS16 (default), iOS17, iOS18")
    p.add_argument("--backend", choices=["xnnpack", "portable"], default="xnnpack",
                   help="ExecuTorch backend (portable runs about 100x slower)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the result")
    args = p.parse_args(argv)
    progress = Progress(quiet=args.quiet)
    try:
        result = export(args.model, weights=args.weights, formats=args.format, img_size=args.img_size,
                        num_classes=args.num_classes, batch=args.batch, precision=args.precision, out=args.out,
                        labels=args.labels, opset=args.opset, simplify=not args.no_simplify,
                        validate_artifacts=not args.no_validate, force=args.force, zip_bundle=args.zip,
                        data=args.data, coreml_input=args.coreml_input, coreml_target=args.coreml_target,
                        et_backend=args.backend, min_top1_agreement=args.min_top1_agreement,
                        calibration_size=args.calibration_size, keep_float=args.keep_float, progress=progress,
                        argv=["cloformer-export", *(sys.argv[1:] if argv is None else argv)])
    except ExportInputError as e:
        return _fail(p.prog, str(e))
    except KeyboardInterrupt:
        print(f"{p.prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"\n{'format':<12}{'file':<44}{'size MB':>9}  validation")
    for a in result.artifacts:
        v = a.entry.get("validation")
        if v is None:
            verdict = "not validated"
        elif v.get("figures"):
            f = v["figures"]
            verdict = (f"{'PASS' if v['passed'] else 'FAIL'} ({v['method']}) max abs {f['max_abs']:.1e}, "
                       f"cosine {f['cosine']:.5f}, top-1 {f['top1_agreement']:.0%}")
        else:
            verdict = f"{'PASS' if v['passed'] else 'FAIL'} ({v['method']})"
        print(f"{a.format:<12}{a.path.name:<44}{a.entry['size_bytes'] / 1e6:>9.2f}  {verdict}")
    print(f"\nbundle: {result.bundle}  ({result.seconds:.1f}s)")
    if result.zip_path:
        print(f"zip:    {result.zip_path}")
    if not result.passed:
        print(f"{p.prog}: validation FAILED; the bundle was left at {result.bundle} with the figures "
              "in manifest.json", file=sys.stderr)
        return 1
    if args.weights:
        print(f"next:   cloformer-validate {result.bundle} --weights {args.weights}")
    return 0


def validate_main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    from .export import ExportInputError, validate_bundle
    from .export.progress import Progress

    p = _Parser(prog="cloformer-validate",
                description="Re-run the validation of an exported bundle against PyTorch; exit 1 if any fails.")
    p.add_argument("bundle", help="a folder written by cloformer-export")
    p.add_argument("--weights", help="the checkpoint the bundle was exported from")
    p.add_argument("--data", help="folder of images (default: photographs bundled with scikit-image)")
    p.add_argument("--min-top1-agreement", type=float, help="also require this top-1 agreement (0..1)")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        ok, reports = validate_bundle(args.bundle, weights=args.weights, data=args.data,
                                      min_top1_agreement=args.min_top1_agreement,
                                      progress=Progress(quiet=args.quiet))
    except ExportInputError as e:
        return _fail(p.prog, str(e))
    print(f"{'PASS' if ok else 'FAIL'}: {sum(r['passed'] for r in reports)}/{len(reports)} artifacts pass")
    return 0 if ok else 1


def bench_main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    from .export.progress import Progress
    from .runtime_bench.harness import RUNTIMES, BenchInputError, bench
    from .runtime_bench.report import console_table

    p = _Parser(prog="cloformer-bench",
                description="Latency, load time, peak memory, size and drift per runtime, precision and thread "
                            "count; writes results.json/csv/md and plots.")
    _add_model_args(p)
    p.add_argument("--formats", default="all", help=f"all, or a comma list of runtimes: {', '.join(RUNTIMES)}")
    p.add_argument("--threads", default="1,2", help="thread counts, comma separated (default 1,2)")
    p.add_argument("--precisions", default="default",
                   help="comma list: default (each format's), fp32, fp16, int8, w4 (default: default)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per row (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    p.add_argument("--compare-authors", action="store_true",
                   help="also run a naive export of the authors' form in the same runtimes")
    p.add_argument("--baselines", action="store_true", help="also run timm baselines (needs timm + torchvision)")
    p.add_argument("--portable", action="store_true", help="also run ExecuTorch's portable kernels (slow)")
    p.add_argument("--data", help="image folder: drift on it; top-1/top-5 if it has one subfolder per class")
    p.add_argument("--bundle", help="use the artifacts of an existing export bundle instead of exporting")
    p.add_argument("--out", default="runtime_bench", help="output folder (default runtime_bench/)")
    p.add_argument("--ablation", action="store_true",
                   help="instead: time the deploy form step by step (ONNX Runtime and XNNPACK, first thread count)")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        threads = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        return _fail(p.prog, f"--threads {args.threads!r}: give counts such as 1,2")
    if args.ablation:
        from .export.api import ExportInputError
        from .models import InputSizeError
        from .runtime_bench.ablation import ablation

        try:
            res = ablation(args.model, weights=args.weights, img_size=args.img_size, threads=threads[0],
                           runs=args.runs, warmup=args.warmup, out=args.out, progress=Progress(quiet=args.quiet))
        except (ExportInputError, InputSizeError) as e:
            return _fail(p.prog, str(e))
        print(open(res["path"]).read())
        return 0
    try:
        result = bench(args.model, weights=args.weights, formats=args.formats, threads=threads, runs=args.runs,
                       warmup=args.warmup, img_size=args.img_size, compare_authors=args.compare_authors,
                       baselines=args.baselines, portable=args.portable, data=args.data, out=args.out,
                       bundle=args.bundle, progress=Progress(quiet=args.quiet),
                       precisions=[x.strip() for x in args.precisions.split(",") if x.strip()],
                       argv=["cloformer-bench", *(sys.argv[1:] if argv is None else argv)])
    except BenchInputError as e:
        return _fail(p.prog, str(e))
    console_table(result.results)
    print(f"results: {result.out}/results.md (and .json, .csv, latency.png, latency_vs_drift.png)")
    return 0


if __name__ == "__main__":
    sys.exit(export_main())
