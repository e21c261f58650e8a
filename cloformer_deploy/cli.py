"""Command-line entry points: argument parsing and display only; the work is in the Python API.

Parsing imports nothing heavy (``--help`` and bad input answer at once); the API is imported
after the arguments are read. Bad input of any kind is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from functools import wraps

from .inputs import InputError
from .models.registry import PROFILE_224, get_variant, list_models


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line and exit code 2, without the usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _command(prog: str):
    """Run a command's body: InputError -> one line and 2; Ctrl-C -> one line and 130, at any point."""
    def wrap(body):
        @wraps(body)
        def main(argv: list[str] | None = None) -> int:
            previous = signal.getsignal(signal.SIGTERM)
            if threading.current_thread() is threading.main_thread():
                # a terminated run cleans up as an interrupted one does (temporary folders, worker processes)
                signal.signal(signal.SIGTERM, _terminated)
            try:
                return body(_Parser(prog=prog, description=body.__doc__), argv)
            except InputError as e:
                print(f"{prog}: error: {e.cli_message}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print(f"\n{prog}: interrupted; nothing was written", file=sys.stderr)
                return 130
            finally:
                if threading.current_thread() is threading.main_thread():
                    signal.signal(signal.SIGTERM, previous)
        return main
    return wrap


def _terminated(signum, frame):
    raise KeyboardInterrupt


def _add_target_args(p: argparse.ArgumentParser, what: str) -> None:
    """The options that choose where artifacts also run: export, validate and bench share them."""
    p.add_argument("--target", default="local",
                   help=f"local (default); arm64: also {what} on emulated ARM64 (the phone's XNNPACK and ONNX "
                        "Runtime kernels under QEMU; numerics only, no latency; build it once with "
                        "cloformer-device setup arm64); or ssh://[user@]host[:port]: on a real device "
                        "(a board, a phone with Termux, a Mac; see cloformer-device check)")
    p.add_argument("--cpu", help="ARM64 CPU profile for --target arm64 (default cortex-a76; see cloformer-device list)")
    p.add_argument("--target-cache", help="folder of the ARM64 root (default: as cloformer-device setup)")
    _add_device_args(p)


def _add_device_args(p: argparse.ArgumentParser) -> None:
    """Options of an ssh:// device."""
    g = p.add_argument_group("ssh:// device options")
    g.add_argument("--remote-python", help="the device's Python command, prefix included (default python3; "
                                           "a phone: 'proot-distro login debian -- python3')")
    g.add_argument("--cores", help="pin the device's worker to these cores, e.g. 4-7 (the big cluster; "
                                   "cloformer-device check lists them)")
    g.add_argument("--ssh-key", help="private key for the device (default: ssh's own choice)")
    g.add_argument("--ssh-config", help="an ssh client config file (ssh -F)")
    g.add_argument("--remote-dir", help="work folder on the device (default ~/.cache/cloformer-deploy/device)")


def _device(args) -> dict:
    return {k: getattr(args, k) for k in ("remote_python", "cores", "ssh_key", "ssh_config", "remote_dir")}


def _argv(prog: str, argv) -> list[str]:
    return [prog, *(sys.argv[1:] if argv is None else argv)]


def _add_model_args(p: argparse.ArgumentParser, default_model: str | None = "cloformer-xxs") -> None:
    """The model-choosing options export and bench share."""
    p.add_argument("--model", default=default_model,
                   help=f"one of: {', '.join(list_models())} (default {default_model or 'cloformer-xxs'})")
    p.add_argument("--weights", help="checkpoint (.pth/.pt/.safetensors); without it the model is randomly "
                                     "initialised (seed 0)")
    p.add_argument("--img-size", default="224", help="224 or HxW such as 256x320; multiples of 32")


@_command("cloformer-models")
def models_main(p: _Parser, argv) -> int:
    """List the CloFormer and FAT variants with params and MACs."""
    p.add_argument("--img-size", default="224", help="224 or HxW (default 224)")
    args = p.parse_args(argv)
    from .inputs import image_size

    size = image_size("--img-size", args.img_size)
    if size == (224, 224) and set(list_models()) <= set(PROFILE_224):  # the verified table: no torch import
        rows = [(n, *PROFILE_224[n], get_variant(n).paper_gmacs) for n in list_models()]
    else:
        from .models import check_input_size, profile_model

        check_input_size(size)
        rows = [(r.name, r.params, r.macs, r.paper_gmacs) for r in (profile_model(n, size) for n in list_models())]
    h, w = size
    print(f"{'model':<22}{'params':>12}{'GMACs @' + f'{h}x{w}':>18}{'paper GMACs':>13}")
    for name, params, macs, paper in rows:
        print(f"{name:<22}{params:>12,}{macs / 1e9:>18.3f}{f'{paper:.1f}' if paper else '-':>13}")
    return 0


@_command("cloformer-export")
def export_main(p: _Parser, argv) -> int:
    """Export CloFormer/FAT to validated ONNX, Core ML and ExecuTorch artifacts, bundled with labels and a manifest."""
    from .formats.base import BACKENDS

    formats = ", ".join(f"{n} ({b.suffix}, {b.runtime}; {'/'.join(b.precisions)}, default {b.default_precision})"
                        for n, b in BACKENDS.items())
    _add_model_args(p)
    p.add_argument("--format", default="all", help=f"all, or a comma list of: {formats}")
    p.add_argument("--num-classes", type=int, help="classes of the head (default: the checkpoint's, else 1000)")
    p.add_argument("--batch", type=int, default=1, help="static batch size (default 1)")
    p.add_argument("--precision", help="fp32, fp16, int8 or w4; default: fp16 for coreml, fp32 for the others; "
                                       "int8: static int8 (ONNX, ExecuTorch) or 8-bit weights (Core ML); "
                                       "w4: 4-bit palettised weights (Core ML)")
    p.add_argument("--calibration-size", type=int, help="int8: images to calibrate with (default 32)")
    p.add_argument("--keep-float", type=int, default=0,
                   help="int8: leave the N layers whose quantisation moves the logits most in float")
    p.add_argument("--out", default="export", help="output folder (default export/); the bundle is "
                                                   "<out>/<model>-<H>x<W>/ and keeps artifacts exported earlier")
    p.add_argument("--labels", help="class names, one per line (default: ImageNet-1k names for 1000 classes)")
    p.add_argument("--opset", type=int, help="ONNX opset, 17 to 23 (default 20, native GELU; 17 uses the "
                                             "TorchScript exporter)")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    p.add_argument("--no-validate", action="store_true", help="skip running the artifacts against PyTorch")
    p.add_argument("--force", action="store_true", help="replace an artifact of the same format and precision, "
                                                        "or a bundle of other weights")
    p.add_argument("--zip", action="store_true", help="also write <bundle>.zip for an app")
    p.add_argument("--data", help="folder of images for validation (default: photographs bundled with scikit-image)")
    p.add_argument("--min-top1-agreement", type=float, help="also require this top-1 agreement (0..1)")
    p.add_argument("--coreml-input", default="image",
                   help="Core ML input: image (RGB, normalisation inside; default) or tensor (normalised float)")
    p.add_argument("--coreml-target", default="iOS16", help="minimum deployment target: iOS16 (default), iOS17, iOS18")
    p.add_argument("--backend", default="xnnpack",
                   help="ExecuTorch backend: xnnpack (default) or portable (runs about 100x slower)")
    _add_target_args(p, "validate every artifact that runs there")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the result")
    args = p.parse_args(argv)
    from .pipeline.api import export
    from .progress import Progress

    result = export(args.model, weights=args.weights, formats=args.format, img_size=args.img_size,
                    num_classes=args.num_classes, batch=args.batch, precision=args.precision, out=args.out,
                    labels=args.labels, opset=args.opset, simplify=not args.no_simplify,
                    validate_artifacts=not args.no_validate, force=args.force, zip_bundle=args.zip,
                    data=args.data, coreml_input=args.coreml_input, coreml_target=args.coreml_target,
                    et_backend=args.backend, min_top1_agreement=args.min_top1_agreement,
                    calibration_size=args.calibration_size, keep_float=args.keep_float, target=args.target,
                    cpu=args.cpu, target_cache=args.target_cache, device=_device(args),
                    progress=Progress(quiet=args.quiet),
                    argv=_argv(p.prog, argv))
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
        for name, t in ((v or {}).get("targets") or {}).items():
            print(f"{'':<12}{'  on ' + name:<44}{'':>9}  {_target_verdict(t)}")
    others = [e for e in result.manifest["artifacts"] if e["path"] not in {a.path.name for a in result.artifacts}]
    if others:
        print(f"kept in the bundle: {', '.join(e['path'] for e in others)}")
    print(f"\nbundle: {result.bundle}  ({result.seconds:.1f}s)")
    if result.zip_path:
        print(f"zip:    {result.zip_path}")
    if not result.passed:
        print(f"{p.prog}: validation FAILED; the bundle was left at {result.bundle} with the figures "
              "in manifest.json", file=sys.stderr)
        return 1
    print(f"next:   cloformer-validate {result.bundle}" + (f" --weights {args.weights}" if args.weights else ""))
    return 0


def _target_verdict(t: dict) -> str:
    """One line for an artifact's validation on another target: its figures and its difference from here."""
    if not t.get("ran"):
        return f"{'FAIL, ' if t.get('passed') is False else ''}not run: {t.get('note')}"
    if not t.get("figures"):
        return "FAIL: " + "; ".join(t.get("problems") or [])
    f, vs = t["figures"], t.get("vs_local") or {}
    here = ("bit-exact with this machine" if vs.get("bit_exact") else
            f"vs this machine max abs {vs['max_abs']:.1e}" if vs else "")
    return (f"{'PASS' if t['passed'] else 'FAIL'} max abs {f['max_abs']:.1e}, cosine {f['cosine']:.5f}, "
            f"top-1 {f['top1_agreement']:.0%}; {here}")


@_command("cloformer-validate")
def validate_main(p: _Parser, argv) -> int:
    """Re-run the validation of an exported bundle against PyTorch; exit 1 if any artifact fails."""
    p.add_argument("bundle", help="a folder written by cloformer-export")
    p.add_argument("--weights", help="the checkpoint the bundle was exported from (not needed for random weights)")
    p.add_argument("--data", help="folder of images (default: photographs bundled with scikit-image)")
    p.add_argument("--min-top1-agreement", type=float, help="also require this top-1 agreement (0..1)")
    _add_target_args(p, "validate every artifact that runs there, and record the figures in manifest.json")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    from .pipeline.api import validate_bundle
    from .progress import Progress

    ok, reports = validate_bundle(args.bundle, weights=args.weights, data=args.data,
                                  min_top1_agreement=args.min_top1_agreement, target=args.target, cpu=args.cpu,
                                  target_cache=args.target_cache, device=_device(args),
                                  progress=Progress(quiet=args.quiet))
    for r in reports:
        for name, t in (r.get("targets") or {}).items():
            print(f"{r['path']} on {name}: {_target_verdict(t)}")
    print(f"{'PASS' if ok else 'FAIL'}: {sum(r['passed'] for r in reports)}/{len(reports)} artifacts pass")
    return 0 if ok else 1


@_command("cloformer-bench")
def bench_main(p: _Parser, argv) -> int:
    """Latency, load time, peak memory, size and drift per runtime, precision and thread count; writes
    results.json/csv/md and plots."""
    from .runtime_bench.runtimes import RUNTIMES

    _add_model_args(p, default_model=None)
    p.add_argument("--formats", default="all", help=f"all, or a comma list of runtimes: {', '.join(RUNTIMES)}")
    p.add_argument("--threads", default="1,2", help="thread counts, comma separated (default 1,2)")
    p.add_argument("--precisions", default="default",
                   help="comma list: default (each format's), fp32, fp16, int8, w4 (default: default)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per row (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    p.add_argument("--compare-authors", action="store_true",
                   help="also run a naive export of the authors' form in the same runtimes")
    p.add_argument("--baselines", action="store_true",
                   help="also time, in the same rounds, 8 mobile backbones from timm (MobileNetV3/V4, EfficientFormerV2, "
                        "FastViT, RepViT, MobileOne, EfficientViT, MobileViTv2) and the other CloFormer/FAT sizes "
                        "on ONNX Runtime and XNNPACK; writes peers.md and pareto.png")
    p.add_argument("--peers", help="comma list of timm model names (or of this project's models) to time beside it")
    p.add_argument("--portable", action="store_true", help="also run ExecuTorch's portable kernels (slow)")
    p.add_argument("--profile", action="store_true",
                   help="also write profile.md: time per operator and per operator kind (ETDump for XNNPACK, "
                        "ONNX Runtime's profiler)")
    p.add_argument("--data", help="image folder: drift on it; top-1/top-5 if it has one subfolder per class")
    p.add_argument("--bundle", help="use the artifacts of an existing export bundle instead of exporting "
                                    "(with --weights of its checkpoint, as cloformer-validate)")
    p.add_argument("--out", default="runtime_bench", help="output folder (default runtime_bench/)")
    p.add_argument("--ablation", action="store_true",
                   help="instead: time the deploy form step by step (ONNX Runtime and XNNPACK, first thread count)")
    _add_target_args(p, "measure the drift of every artifact that runs there (rows without latency)")
    p.add_argument("--cooldown", type=float, default=0.0,
                   help="seconds of rest between timing rounds (a phone's clocks drop as it heats; default 0)")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    from .progress import Progress

    if args.ablation:
        from .inputs import InputError
        from .runtime_bench.ablation import ablation

        if args.baselines or args.peers or args.profile:
            raise InputError("--ablation times the deploy steps of one model; drop --baselines/--peers/--profile")
        if args.target != "local" or args.cpu or args.target_cache or any(_device(args).values()):
            raise InputError("--ablation times on this machine; drop --target and its options")

        res = ablation(args.model or "cloformer_xxs", weights=args.weights, img_size=args.img_size,
                       threads=args.threads, runs=args.runs, warmup=args.warmup, out=args.out,
                       progress=Progress(quiet=args.quiet))
        print(open(res["path"]).read())
        return 0
    from .runtime_bench.harness import bench
    from .runtime_bench.report import console_table

    result = bench(args.model, weights=args.weights, formats=args.formats, threads=args.threads, runs=args.runs,
                   warmup=args.warmup, img_size=args.img_size, compare_authors=args.compare_authors,
                   baselines=args.baselines, peers=args.peers, profile=args.profile, portable=args.portable,
                   data=args.data, out=args.out, bundle=args.bundle, target=args.target, cpu=args.cpu,
                   target_cache=args.target_cache, device=_device(args), cooldown=args.cooldown,
                   progress=Progress(quiet=args.quiet), precisions=args.precisions,
                   argv=_argv(p.prog, argv))
    console_table(result.results)
    extra = "".join(f", {f}" for f in ("peers.md", "pareto.png", "profile.md") if (result.out / f).exists())
    print(f"results: {result.out}/results.md (and .json, .csv, latency.png, latency_vs_drift.png{extra})")
    return 0


@_command("cloformer-device")
def device_main(p: _Parser, argv) -> int:
    """Targets the artifacts can run on: list them, build the emulated ARM64 one (once), or check an ssh:// device."""
    from .targets import TARGETS

    sub = p.add_subparsers(dest="action", metavar="{setup,list,check}", parser_class=_Parser)
    setup = sub.add_parser("setup", help="build a target once (arm64: a Debian arm64 root with the host's runtimes, "
                                         "run by QEMU; downloads about 3 GB, 5.8 GB on disk)")
    setup.add_argument("target", help="arm64")
    setup.add_argument("--cache", help="folder for the root (default: $CLOFORMER_DEPLOY_CACHE or "
                                       "~/.cache/cloformer-deploy)")
    setup.add_argument("--force", action="store_true", help="rebuild a root that is already ready")
    setup.add_argument("--keep-downloads", action="store_true", help="keep the downloaded wheels (about 3 GB) "
                                                                    "after the root is ready")
    setup.add_argument("-q", "--quiet", action="store_true")
    listing = sub.add_parser("list", help="targets, whether they are ready, and the ARM64 CPU profiles")
    listing.add_argument("--cache", help="folder of the roots (as for setup)")
    check = sub.add_parser("check", help="what an ssh:// device has and lacks (Python, numpy, runtimes against "
                                         "this machine's versions), its CPU cores, and the command that installs "
                                         "what is missing; installs nothing. Exit 1 if something is missing")
    check.add_argument("target", help="ssh://[user@]host[:port]")
    _add_device_args(check)
    args = p.parse_args(argv)
    if args.action is None:
        p.error("choose an action: setup arm64, list, or check ssh://[user@]host")
    if args.action == "check":
        return _check_device(args)
    from pathlib import Path

    from .progress import Progress
    from .targets.arm64 import CPU_PROFILES, DEFAULT_CPU, check_cpu, default_cache, qemu_binary
    from .targets.arm64_root import ROOT_DIR, ready_state, setup_arm64

    cache = Path(args.cache) if args.cache else default_cache()
    if args.action == "setup":
        if args.target != "arm64":
            raise InputError(f"setup {args.target!r}: only arm64 is built by setup ({', '.join(TARGETS)} exist; "
                             "local needs none)")
        record = setup_arm64(cache, force=args.force, keep_downloads=args.keep_downloads,
                             progress=Progress(quiet=args.quiet))
        print(f"arm64 root ready: {cache / ROOT_DIR} ({record['bytes'] / 1e9:.1f} GB; torch "
              f"{record['versions']['torch']}, executorch {record['versions']['executorch']}, onnxruntime "
              f"{record['versions']['onnxruntime']}; importing them under emulation took {record['import_seconds']}s)")
        print("next:   cloformer-validate BUNDLE --target arm64")
        return 0
    state = ready_state(cache)
    print(f"{'target':<8}{'status':<58}runs")
    print(f"{'local':<8}{'ready':<58}{TARGETS['local']}")
    status = (f"ready in {cache / ROOT_DIR} ({state['bytes'] / 1e9:.1f} GB)" if state
              else "not set up: cloformer-device setup arm64")
    print(f"{'arm64':<8}{status:<58}{TARGETS['arm64']}")
    print(f"{'ssh://':<8}{'cloformer-device check ssh://[user@]host[:port]':<58}"
          f"{TARGETS['ssh://[user@]host[:port]']}")
    qemu = qemu_binary()
    print(f"\nARM64 CPU profiles (--cpu; default {DEFAULT_CPU}){'' if qemu else '; QEMU is not installed'}:")
    for name, profile in CPU_PROFILES.items():
        try:
            check_cpu(name, qemu)
            mark = ""
        except InputError as e:
            mark = f"  [refused here: {e.cli_message.split(': ', 1)[1]}]"
        print(f"  {name:<12} {profile.about}{mark}")
    return 0


def _check_device(args) -> int:
    from .targets import TargetError
    from .targets.ssh import SshTarget, clusters_text, device_needs

    if not str(args.target).lower().startswith("ssh://"):
        raise TargetError(f"check {args.target!r}: give a device as ssh://[user@]host[:port] "
                          "(cloformer-device list shows local and arm64)")
    target = SshTarget(args.target, **{k: v for k, v in _device(args).items() if v is not None})
    info = target.probe()
    if info.get("too_old"):  # no pip command would help: another Python is the fix
        print(f"device   {target.name}: {info.get('platform')}, Python {info['python']}: too old, the worker needs "
              "3.10 or newer; pass --remote-python with a newer one")
        return 1
    if info.get("write_error"):
        print(f"device   {target.name}: cannot write the work folder: {info['write_error']}; free space there or "
              "pass --remote-dir")
        return 1
    if target.cores is not None and target.about:
        target.check_cores()
    needs = device_needs(target)
    about = target.about
    print(f"device   {target.name}: {info.get('platform')}" + (f", {clusters_text(about)}" if about else ""))
    if info.get("work"):
        free = info.get("free_bytes")
        print(f"work     {info['work']}" + (f" ({free / 1e9:.1f} GB free)" if free else ""))
    if about.get("affinity") is not None and about.get("clusters"):
        print("cores    --cores chooses among: " + "; ".join(f"{c['core']} {','.join(map(str, c['cpus']))}"
                                                         for c in about["clusters"]))
    print(f"\n{'package':<13}{'on the device':<16}{'this machine':<15}status")
    for r in needs["rows"]:
        print(f"{r['package']:<13}{r['device'] or '-':<16}{r['host'] or '-':<15}{r['status']}")
    print("\nformats: " + "; ".join(f"{k}: {v}" for k, v in needs["formats"].items()))
    if needs["command"]:
        print(f"\ninstall on the device (nothing was installed):\n  {needs['command']}")
        return 1
    print("\nready: every runtime this machine has is there, at the same versions")
    return 0


if __name__ == "__main__":
    sys.exit(export_main())
