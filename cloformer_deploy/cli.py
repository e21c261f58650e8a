"""Command-line entry points: argument parsing and display only; the work is in the Python API.

Parsing imports nothing heavy (``--help`` and bad input answer at once); the API is imported
after the arguments are read. Bad input of any kind is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import io
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


def _table(columns: list[str], rows: list[list], right: tuple[str, ...] = ()) -> None:
    """A table on stdout, drawn by rich (plain characters, as wide as its cells: logs and pipes keep it whole)."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left", overflow="fold")
    for row in rows:
        table.add_row(*[escape("-" if v is None else str(v)) for v in row])
    drawn = io.StringIO()
    Console(file=drawn, width=240, highlight=False, soft_wrap=True).print(table)
    print("\n".join(line.rstrip() for line in drawn.getvalue().splitlines()))


def _argv(prog: str, argv) -> list[str]:
    return [prog, *(sys.argv[1:] if argv is None else argv)]


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
    gmacs = f"GMACs @{h}x{w}"
    _table(
        ["model", "params", gmacs, "paper GMACs"],
        [
            [name, f"{params:,}", f"{macs / 1e9:.3f}", f"{paper:.1f}" if paper else "-"]
            for name, params, macs, paper in rows
        ],
        right=("params", gmacs, "paper GMACs"),
    )
    return 0


@_command("cloformer-export")
def export_main(p: _Parser, argv) -> int:
    """Export CloFormer/FAT to validated artifacts (one per format), bundled with labels and a manifest."""
    from .pipeline.options import ExportOptions

    ExportOptions.add_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print only the result")
    args = p.parse_args(argv)
    from .pipeline.options import export_checked

    opts, _ = export_checked(ExportOptions.from_args(args))  # bad input answered before torch is imported
    from .pipeline.exporter import export
    from .progress import Progress

    result = export(opts, progress=Progress(quiet=args.quiet), argv=_argv(p.prog, argv))
    rows = []
    for a in result.artifacts:
        v = a.entry.get("validation")
        if v is None:
            verdict = "not validated"
        elif v.get("figures"):
            f = v["figures"]
            verdict = (
                f"{'PASS' if v['passed'] else 'FAIL'} ({v['method']}) max abs {f['max_abs']:.1e}, "
                f"cosine {f['cosine']:.5f}, top-1 {f['top1_agreement']:.0%}"
            )
        else:
            verdict = f"{'PASS' if v['passed'] else 'FAIL'} ({v['method']})"
        rows.append([a.format, a.path.name, f"{a.entry['size_bytes'] / 1e6:.2f}", verdict])
        rows += [["", f"  on {name}", "", _target_verdict(t)] for name, t in ((v or {}).get("targets") or {}).items()]
    print()
    _table(["format", "file", "size MB", "validation"], rows, right=("size MB",))
    others = [e for e in result.manifest["artifacts"] if e["path"] not in {a.path.name for a in result.artifacts}]
    if others:
        print(f"kept in the bundle: {', '.join(e['path'] for e in others)}")
    print(f"\nbundle: {result.bundle}  ({result.seconds:.1f}s)")
    if result.zip_path:
        print(f"zip:    {result.zip_path}")
    if not result.passed:
        print(
            f"{p.prog}: validation FAILED; the bundle was left at {result.bundle} with the figures in manifest.json",
            file=sys.stderr,
        )
        return 1
    weights = f" --weights {opts.weights}" if opts.weights else ""
    print(f"next:   cloformer-validate {result.bundle}{weights} --data VALIDATION_SET/  (accuracy of every artifact)")
    return 0


def _target_verdict(t: dict) -> str:
    """One line for an artifact's validation on another target: its figures and its difference from here."""
    if not t.get("ran"):
        return f"{'FAIL, ' if t.get('passed') is False else ''}not run: {t.get('note')}"
    if not t.get("figures"):
        return "FAIL: " + "; ".join(t.get("problems") or [])
    f, vs = t["figures"], t.get("vs_local") or {}
    here = (
        "bit-exact with this machine"
        if vs.get("bit_exact")
        else f"vs this machine max abs {vs['max_abs']:.1e}"
        if vs
        else ""
    )
    return (
        f"{'PASS' if t['passed'] else 'FAIL'} max abs {f['max_abs']:.1e}, cosine {f['cosine']:.5f}, "
        f"top-1 {f['top1_agreement']:.0%}; {here}"
    )


@_command("cloformer-validate")
def validate_main(p: _Parser, argv) -> int:
    """Re-run the validation of an exported bundle against PyTorch; exit 1 if any artifact fails."""
    from .pipeline.options import ValidateOptions

    ValidateOptions.add_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    opts = ValidateOptions.from_args(args).checked()  # bad input answered before torch is imported
    from .pipeline.options import evaluation_checked
    from .progress import Progress

    evaluation_checked(opts)
    if opts.data is not None:
        return _evaluation(opts, Progress(quiet=args.quiet))
    if opts.by_block:
        return _by_block(opts, Progress(quiet=args.quiet))
    from .pipeline.revalidate import validate_bundle

    ok, reports = validate_bundle(opts, progress=Progress(quiet=args.quiet))
    for r in reports:
        if r.get("problems") and r.get("figures") and not r["passed"]:  # this machine's verdict, with where it starts
            print(f"{r['path']}: FAIL -- {'; '.join(r['problems'])}")
        for name, t in (r.get("targets") or {}).items():
            print(f"{r['path']} on {name}: {_target_verdict(t)}")
    print(f"{'PASS' if ok else 'FAIL'}: {sum(r['passed'] for r in reports)}/{len(reports)} artifacts pass")
    return 0 if ok else 1


def _by_block(opts, progress) -> int:
    """``cloformer-validate --by-block``: each artifact's first departing block, and where the reports are."""
    from .pipeline.by_block import JSON_NAME, MD_NAME, PNG_NAME, drift_by_block

    found = drift_by_block(opts, progress=progress)
    rows = [["artifact", "target", "probe", "final vs shipped", "first departure"]]
    for a in found.document["artifacts"]:
        where = a["target"] if a["runtime"] is None else f"{a['target']} {a['runtime']}"
        if "error" in a or "note" in a:
            rows.append([a["file"], where, "", "", f"not run: {(a.get('error') or a['note'])[:70]}"])
            continue
        vs = a["final_vs_shipped"]
        same = "bit-exact" if vs["bit_exact"] else f"{vs['max_abs']:.2g}"
        rows.append([a["file"], where, "yes" if a["probe"] else "no", same, a["first_departure"] or "none"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"reports: {found.out / JSON_NAME}, {found.out / MD_NAME}, {found.out / PNG_NAME}")
    return 0 if all("error" not in a for a in found.document["artifacts"]) else 1


def _evaluation(opts, progress) -> int:
    """``cloformer-validate --data``: the evaluation's table, and where its reports are."""
    from .pipeline.evaluate import evaluate_bundle

    try:
        ev = evaluate_bundle(opts, progress=progress)
    except KeyboardInterrupt:
        print(
            "\ncloformer-validate: interrupted; the finished shards are kept: the same command continues from them",
            file=sys.stderr,
        )
        return 130
    doc = ev.document
    ref = doc["reference"]

    def pct(x):
        return "-" if x is None else f"{x:.2%}"

    rows = [["PyTorch fp32", "reference", pct(ref["top1"]), pct(ref["top5"]), "", "", "", "", str(ref["images"])]]
    for r in doc["rows"]:
        if "error" in r:
            rows.append([r["label"], "FAIL", "", "", "", "", "", r["error"][:60], ""])
            continue
        ci = r["top1_delta_ci95"]
        rows.append(
            [
                r["label"],
                "PASS" if r["passed"] else "FAIL",
                pct(r["top1"]),
                pct(r["top5"]),
                "-" if r["top1_delta"] is None else f"{r['top1_delta'] * 100:+.2f}",
                "-" if ci is None else f"{ci[0] * 100:+.2f} to {ci[1] * 100:+.2f}",
                pct(r["agreement"]),
                f"{r['drift']['cosine_min']:.6f}",
                str(r["images"]),
            ]
        )
    _table(
        ["artifact", "verdict", "top-1", "top-5", "change (pts)", "95% CI (pts)", "agreement", "cosine min", "images"],
        rows,
        right=("top-1", "top-5", "change (pts)", "agreement", "cosine min", "images"),
    )
    for s in doc["skipped"]:
        print(f"{s['file']}: not run on {doc['target']['name']} ({s['reason']})")
    if doc["unreadable"]:
        print(f"{len(doc['unreadable'])} unreadable image(s), left out of every figure (listed in accuracy.md)")
    print(f"wrote accuracy.json, accuracy.md, accuracy.png and flipped.csv in {ev.folder}")
    passed = sum(r["passed"] for r in doc["rows"])
    print(f"{'PASS' if ev.passed else 'FAIL'}: {passed}/{len(doc['rows'])} artifacts pass on {ref['images']} images")
    return 0 if ev.passed else 1


@_command("cloformer-bench")
def bench_main(p: _Parser, argv) -> int:
    """Latency, load time, peak memory, size and drift per runtime, precision and thread count; writes
    results.json/csv/md and plots."""
    from .runtime_bench.options import BenchOptions

    BenchOptions.add_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    from .progress import Progress

    opts = BenchOptions.from_args(args)
    if opts.ablation:
        from .runtime_bench.options import ablation_checked

        opts = ablation_checked(opts)  # bad input answered before torch is imported
        from .runtime_bench.ablation import ablation

        res = ablation(opts, progress=Progress(quiet=args.quiet))
        print(open(res["path"]).read())
        return 0
    opts = opts.checked()  # bad input answered before torch is imported
    from .runtime_bench.harness import bench
    from .runtime_bench.report import console_table

    result = bench(opts, progress=Progress(quiet=args.quiet), argv=_argv(p.prog, argv))
    console_table(result.results)
    extra = "".join(f", {f}" for f in ("peers.md", "pareto.png", "profile.md") if (result.out / f).exists())
    print(f"results: {result.out}/results.md (and .json, .csv, latency.png, latency_vs_drift.png{extra})")
    return 0


@_command("cloformer-device")
def device_main(p: _Parser, argv) -> int:
    """Targets the artifacts can run on: build their native runners (once), list them, or check a device."""
    from .targets import TARGETS
    from .targets.options import CheckOptions, ListOptions, SetupOptions

    sub = p.add_subparsers(dest="action", metavar="{setup,list,check}", parser_class=_Parser)
    setup = sub.add_parser(
        "setup",
        help="build the native runners a target runs, once: local (this machine), gpu (this machine's runners and "
        "a software Vulkan device for LiteRT's GPU rows: Mesa's lavapipe, about 60 MB from Debian), arm64 (aarch64 "
        "runners for QEMU; fetches about 60 MB of wheels), or a device (built for its CPU and copied to it)",
    )
    SetupOptions.add_arguments(setup, skip=("cpu", "target_cache"))
    setup.add_argument("-q", "--quiet", action="store_true")
    listing = sub.add_parser("list", help="targets, whether their runners are built, and the ARM64 CPU profiles")
    ListOptions.add_arguments(listing)
    check = sub.add_parser(
        "check",
        help="what a device (ssh:// or adb://) is and has: its CPU cores, the native runners for it, and (a Mac) "
        "its Python's runtimes against this machine's versions; installs nothing. Exit 1 if something is missing",
    )
    CheckOptions.add_arguments(check, skip=("cpu", "target_cache"))
    args = p.parse_args(argv)
    if args.action is None:
        p.error("choose an action: setup local|gpu|arm64|DEVICE, list, or check DEVICE")
    if args.action == "check":
        return _check_device(CheckOptions.from_args(args))
    from pathlib import Path

    from .progress import Progress
    from .targets.arm64 import CPU_PROFILES, DEFAULT_CPU, PLATFORM, check_cpu, qemu_binary
    from .targets.native import default_cache, host_platform, native_backends, ready_bundle

    if args.action == "setup":
        from .targets.setup import setup_target

        opts = SetupOptions.from_args(args)
        record = setup_target(
            opts.target, opts.cache, force=opts.force, device=opts.device(), progress=Progress(quiet=args.quiet)
        )
        _table(
            ["runner", "platform", "version", "size", "gzipped", "built in"],
            [
                [
                    f"{b['runner']}",
                    b["platform"],
                    f"{b['package']} {b['version']}",
                    f"{b['bytes'] / 1e6:.1f} MB",
                    f"{b['archive_bytes'] / 1e6:.1f} MB",
                    f"{b['build_seconds']} s",
                ]
                for b in record["bundles"].values()
            ],
        )
        if record.get("removed_bytes"):
            print(f"removed what older releases set up for ARM64 ({record['removed_bytes'] / 1e6:.0f} MB)")
        if record.get("gpu"):
            g = record["gpu"]
            print(f"software GPU: Mesa {g['mesa']} lavapipe ({g['bytes'] / 1e6:.0f} MB) in {g['folder']}")
        if record.get("python"):
            wheels = ", ".join(f"{k} {v}" for k, v in record["python"]["wheels"].items())
            print(f"emulated Python {record['python']['python']} for LiteRT, with {wheels}")
        print(
            f"{record['target']}: ready in {record['seconds']} s (runners in {record['cache']}/native/{record['platform']})"
        )
        if record.get("gpu"):
            from .runtime_bench.runtimes import BUNDLE_RUNTIMES, FORMAT_OF, GPU_RUNTIMES

            formats = ",".join(dict.fromkeys(r for g in GPU_RUNTIMES for r in BUNDLE_RUNTIMES[FORMAT_OF[g]]))
            print(f"next:   cloformer-bench --bundle BUNDLE --formats {formats}")
        else:
            print(f"next:   cloformer-bench --bundle BUNDLE --target {record['target']}")
        return 0
    opts = ListOptions.from_args(args)
    cache = Path(opts.cache) if opts.cache else default_cache()

    def status(plat: str, name: str) -> str:
        built = [b.label for b in native_backends() if ready_bundle(cache, plat, b) is not None]
        missing = [b.label for b in native_backends() if b.label not in built]
        if not missing:
            return f"runners built ({', '.join(built)})"
        return f"{'only ' + ', '.join(built) + '; ' if built else ''}cloformer-device setup {name}"

    views = (cache / "arm64" / "cpus" / DEFAULT_CPU / "proc" / "cpuinfo").exists()
    _table(
        ["target", "status", "runs"],
        [
            ["local", "ready; " + status(host_platform(), "local"), TARGETS["local"]],
            ["arm64", status(PLATFORM, "arm64") if views else "cloformer-device setup arm64", TARGETS["arm64"]],
            ["ssh://", "cloformer-device check ssh://[user@]host[:port]", TARGETS["ssh://[user@]host[:port]"]],
            ["adb://", "cloformer-device check adb://[SERIAL]", TARGETS["adb://[SERIAL]"]],
        ],
    )
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


def _check_device(opts) -> int:
    from .targets import TargetError, get_target
    from .targets.native import TRIPLES, native_backends
    from .targets.shell import clusters_text

    if not str(opts.target).lower().startswith(("ssh://", "adb://")):
        raise TargetError(
            f"check {opts.target!r}: give a device as ssh://[user@]host[:port] or adb://[SERIAL] "
            "(cloformer-device list shows local and arm64)"
        )
    target = get_target(opts.target, cache=opts.target_cache, device=opts.device(), for_setup=True)
    about = target.about
    print(f"device   {target.name}: {target.platform}" + (f", {clusters_text(about)}" if about.get("clusters") else ""))
    if target.work:
        free = about.get("free_bytes")
        print(f"work     {target.work}" + (f" ({free / 1e9:.1f} GB free)" if free else ""))
    if about.get("affinity") is not None and about.get("clusters"):
        print(
            "cores    --cores chooses among: "
            + "; ".join(f"{c['core']} {','.join(map(str, c['cpus']))}" for c in about["clusters"])
        )
    ok = True
    if target.platform in TRIPLES:
        target.find_bundles(required=False)
        print()
        rows = []
        for b in native_backends():
            bundle = target.bundles.get(b.name)
            rows.append(
                [
                    b.label,
                    f"{bundle.record['package']} {bundle.record['version']}" if bundle else "not built",
                    "ready" if bundle else f"cloformer-device setup {target.name}",
                ]
            )
            ok = ok and bundle is not None
        _table(["format", "native runner built here", "status"], rows)
        print("\nno Python is needed on the device: the runners carry their libraries")
    else:
        from .targets.ssh import device_needs

        target.check_python()
        needs = device_needs(target)
        print()
        _table(
            ["package", "on the device", "this machine", "status"],
            [[r["package"], r["device"], r["host"], r["status"]] for r in needs["rows"]],
        )
        print("\nformats: " + "; ".join(f"{k}: {v}" for k, v in needs["formats"].items()))
        if needs["command"]:
            print(f"\ninstall on the device (nothing was installed):\n  {needs['command']}")
        ok = needs["ok"]
    target.close()
    if ok:
        print("\nready")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(export_main())
