"""Targets: the worker protocol on the local target, its failures and clean-up, the emulated ARM64 target's
checks and CPU views (no QEMU needed). The native runners' build and protocol are in test_native.py."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cloformer_deploy.formats import BACKENDS
from cloformer_deploy.images import load_images
from cloformer_deploy.targets import Target, TargetError, WorkerError, arm64, get_target
from cloformer_deploy.targets.local import LocalTarget
from cloformer_deploy.targets.worker import pack, unpack


class _says:
    """pytest.raises for an InputError, matched against its command-line message (the flags' spelling)."""

    def __init__(self, pattern: str):
        self.pattern = pattern

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        import re

        assert kind is not None and issubclass(kind, TargetError), f"no TargetError ({kind})"
        assert re.search(self.pattern, value.cli_message), value.cli_message
        return True


def _gone(pid: int, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _group_alive(pgid: int, seconds: float = 5.0) -> list[int]:
    """Live (not zombie) processes of a process group, after giving a killed group time to go."""
    end = time.monotonic() + seconds
    while True:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(stat.parent.name))
        if not alive or time.monotonic() > end:
            return alive
        time.sleep(0.1)


def _entry(bundle, fmt):
    return next(e for e in bundle.manifest["artifacts"] if e["format"] == fmt)


@pytest.fixture(scope="module")
def images(tiny_bundle):
    m = tiny_bundle.manifest["model"]
    return load_images(tuple(m["input_size"]), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), limit=3)


@pytest.mark.parametrize("fmt", ["onnx", "executorch"])
@pytest.mark.parametrize("native", [False, True], ids=["python-worker", "native-runner"])
def test_local_worker_runs_an_artifact_as_the_in_process_runner_does(fmt, native, tiny_bundle, images, request):
    """The worker (the Python one, or the format's native runner: one protocol) opens the artifact and gives the
    in-process runner's logits, bit for bit."""
    from cloformer_deploy.targets.base import WorkerRunner

    if native:
        request.getfixturevalue("native_runners")
    entry = _entry(tiny_bundle, fmt)
    path = tiny_bundle.bundle / entry["path"]
    spec = _spec(tiny_bundle)
    here = BACKENDS[fmt].open(path, spec, entry)
    target = LocalTarget()
    worker = target.start(timeout=300, fmt=fmt, native=native)
    try:
        runner = WorkerRunner(worker, target, fmt, path, spec, entry, threads=1)
        for one in images.batches(1):
            assert np.array_equal(runner.run(one), here.run(one))
        assert runner.describe()["target"] == "local" and runner.load_ms > 0
        times = worker.ask({"cmd": "time", "n": 3})["times_ms"]
        assert len(times) == 3 and all(t > 0 for t in times)
        about = worker.ask({"cmd": "about"})
        package = BACKENDS[fmt].native_runner.package if native else "numpy"
        assert about["machine"] == os.uname().machine and about["versions"][package]
        assert worker.ask({"cmd": "rss"})["peak_rss_mb"] > 0 and isinstance(
            worker.ask({"cmd": "thermal"})["zones"], dict
        )
    finally:
        worker.close()
    assert _gone(worker.proc.pid)


def _spec(bundle):
    from cloformer_deploy.formats.base import ModelSpec

    return ModelSpec.from_manifest(bundle.manifest["model"], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.mark.parametrize("native", [False, True], ids=["python-worker", "native-runner"])
def test_worker_error_answer_keeps_the_worker(native, tiny_bundle, tmp_path, request):
    """An artifact that cannot be opened is an error answer; the same worker then opens a good one."""
    if native:
        request.getfixturevalue("native_runners")
    worker = LocalTarget().start(timeout=300, fmt="onnx", native=native)
    try:
        with pytest.raises(WorkerError, match="No such file|does not exist|Failed|failed|NO_SUCHFILE|not found"):
            worker.ask(
                {
                    "cmd": "open",
                    "format": "onnx",
                    "path": str(tmp_path / "missing.onnx"),
                    "spec": _spec_message(tiny_bundle),
                    "info": {},
                    "threads": 1,
                }
            )
        entry = _entry(tiny_bundle, "onnx")
        opened = worker.ask(
            {
                "cmd": "open",
                "format": "onnx",
                "path": str(tiny_bundle.bundle / entry["path"]),
                "spec": _spec_message(tiny_bundle),
                "info": entry,
                "threads": 1,
            }
        )
        assert opened["problems"] == [] and opened["describe"]["method"] == "onnxruntime"
    finally:
        worker.close()


def _spec_message(bundle):
    return _spec(bundle).to_dict()


class _Scripted(LocalTarget):
    """A target whose 'worker' is a given shell command: for timeouts, deaths and clean-up."""

    def __init__(self, script: str):
        super().__init__()
        self.script = script

    def worker_command(self):
        return ["sh", "-c", self.script], None, []


@pytest.mark.e2e
def test_a_silent_worker_times_out_and_its_whole_process_group_is_ended():
    target = _Scripted("sleep 60 & echo $! > /dev/stderr; sleep 60")
    worker = target.start(timeout=1)
    t = time.monotonic()
    with pytest.raises(WorkerError, match="no answer to 'about' within 1s; the worker was stopped"):
        worker.ask({"cmd": "about"})
    assert time.monotonic() - t < 15
    assert _gone(worker.proc.pid)
    # the grandchild (a process the worker started) is gone too: the group was killed
    assert _group_alive(worker.proc.pid) == []


def test_a_worker_that_dies_says_why():
    worker = _Scripted("read line; echo 'ImportError: libtorch.so: cannot open shared object file' >&2; exit 3").start(
        timeout=30
    )
    with pytest.raises(WorkerError, match=r"exited with code 3: ImportError: libtorch.so"):
        worker.ask({"cmd": "about"})
    worker.close()


def test_pack_round_trip():
    for a in (np.arange(12, dtype=np.float16).reshape(3, 4), np.zeros((1, 2, 2, 3), np.uint8)):
        b = unpack(json.loads(json.dumps(pack(a))))
        assert b.dtype == a.dtype and np.array_equal(a, b)


# ------------------------------------------------------------------ the emulated ARM64 target's checks


def test_target_names_and_cpu_choices_are_checked():
    with _says("--target 'mars' is not a target; choose local, arm64, ssh://.* or adb://"):
        get_target("mars")
    with _says("--remote-python applies to an ssh:// or adb:// device"):
        get_target("local", device={"remote_python": "python3"})
    with _says("--cpu belongs to --target arm64; drop it for a device"):
        get_target("ssh://pi@pi5", cpu="cortex-a76")
    with _says("--ssh-key applies to an ssh:// device; drop it for adb://"):
        get_target("adb://", device={"ssh_key": "k"})
    with _says("--cpu chooses the emulated CPU of --target arm64"):
        get_target("local", cpu="cortex-a76")
    assert get_target("local").measures_latency


def test_arm64_without_qemu_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(arm64, "qemu_binary", lambda: None)
    with _says("apt-get install qemu-user-static"):
        get_target("arm64", cache=tmp_path)


def test_arm64_not_set_up_names_the_setup_command(monkeypatch, tmp_path):
    monkeypatch.setattr(arm64, "qemu_binary", lambda: "/usr/bin/qemu-aarch64-static")
    monkeypatch.setattr(arm64, "qemu_version", lambda b: (7, 2, 22))
    with _says(
        f"--target arm64 is not set up in {tmp_path}; set it up once with: cloformer-device setup arm64 --cache {tmp_path}"
    ):
        get_target("arm64", cache=tmp_path)
    arm64.write_cpu_views(tmp_path)  # views but no runners: the runner is named
    with _says(
        f"the native .* runner for linux-aarch64 is not built .*cloformer-device setup arm64 --cache {tmp_path}"
    ):
        get_target("arm64", cache=tmp_path)
    with _says("--cpu 'pentium' is not a profile; choose from cortex-a76"):
        get_target("arm64", cpu="pentium", cache=tmp_path)


def test_a_cpu_known_to_compute_wrongly_on_this_qemu_is_refused(monkeypatch):
    monkeypatch.setattr(arm64, "qemu_version", lambda b: (7, 2, 22))
    with _says("QEMU 7.2.22 computes XNNPACK's int8 kernels wrongly.*use --cpu armv9-i8mm"):
        arm64.check_cpu("max", "/usr/bin/qemu-aarch64-static")
    monkeypatch.setattr(arm64, "qemu_version", lambda b: (10, 1))
    assert arm64.check_cpu("max", "/usr/bin/qemu-aarch64-static").qemu_cpu == "max"


@pytest.mark.parametrize("name", list(arm64.CPU_PROFILES))
def test_cpu_view_reports_the_profile_midr(name, tmp_path):
    """/proc/cpuinfo and the sysfs MIDR say the same core, and the view holds nothing else (QEMU finds every other
    path on the host)."""
    profile = arm64.CPU_PROFILES[name]
    view = tmp_path / "view"
    arm64.write_cpu_view(view, profile, cores=2)
    assert sorted(p.name for p in view.iterdir()) == ["proc", "sys"]
    fields = {}
    for line in (view / "proc" / "cpuinfo").read_text().split("\n\n")[1].splitlines():
        k, _, v = line.partition(":")
        fields[k.strip()] = v.strip()
    m = profile.midr
    assert int(fields["CPU implementer"], 16) == m >> 24 and int(fields["CPU variant"], 16) == (m >> 20) & 0xF
    assert int(fields["CPU part"], 16) == (m >> 4) & 0xFFF and int(fields["CPU revision"]) == m & 0xF
    assert ("fphp" in fields["Features"].split()) == profile.fp16
    sysfs = view / "sys" / "devices" / "system" / "cpu"
    assert (sysfs / "possible").read_text().strip() == "0-1"
    assert int((sysfs / "cpu1" / "regs" / "identification" / "midr_el1").read_text(), 16) == m


def test_device_list_shows_targets_and_profiles(monkeypatch, tmp_path, capsys):
    from cloformer_deploy.cli import device_main

    monkeypatch.setattr(arm64, "qemu_binary", lambda: "/usr/bin/qemu-aarch64-static")
    monkeypatch.setattr(arm64, "qemu_version", lambda b: (7, 2, 22))
    assert device_main(["list", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^arm64 +cloformer-device setup arm64 ", out, re.M), out
    assert re.search(r"^adb:// +cloformer-device check adb://", out, re.M), out
    for name in arm64.CPU_PROFILES:
        assert f"  {name} " in out
    assert "[refused here: QEMU 7.2.22 computes" in out


# ------------------------------------------------------------------ export, validate and bench on another target


class _OtherMachine(LocalTarget):
    """Stands in for a remote or emulated target: an aarch64 platform, no latency, workers in subprocesses
    of this machine (so its outputs must equal this machine's bit for bit)."""

    name = "fake-arm64"
    kind = "fake"
    measures_latency = False

    def __init__(self, fail_open: bool = False):
        super().__init__()
        self.platform = "linux-aarch64"
        self.fail_open = fail_open

    def can_run(self, backend):
        return self.platform in backend.platforms

    def worker_command(self):
        if self.fail_open:  # answers every command as XNNPACK does on a core without fp16 arithmetic
            script = (
                "import sys, json\nfor line in sys.stdin:\n"
                "    print(json.dumps({'error': 'RuntimeError: xnn_status_unsupported_hardware'}), flush=True)\n"
            )
            return [sys.executable, "-c", script], None, []
        return super().worker_command()

    runner = Target.runner  # through a worker, as a remote target does (LocalTarget's runs in this process)

    def native_bundle(self, backend):  # a device with a Python worker only (a Mac's kind of target)
        return None


def _on_other_machine(monkeypatch, target):
    import cloformer_deploy.targets

    def pick(name="local", cpu=None, cache=None, device=None, for_setup=False):  # exports still ask for "local"
        return target if name == "fake" else get_target(name, cpu, cache, device, for_setup)

    monkeypatch.setattr(cloformer_deploy.targets, "get_target", pick)  # what every command's options open


@pytest.mark.e2e
def test_export_on_another_target_records_its_figures_beside_these(
    tiny_variant, tiny_checkpoint, tmp_path, monkeypatch
):
    from cloformer_deploy.pipeline import export

    target = _OtherMachine()
    _on_other_machine(monkeypatch, target)
    result = export(
        tiny_variant, weights=tiny_checkpoint, format="onnx,coreml", img_size=64, out=tmp_path, target="fake"
    )
    assert result.passed
    by = {e["format"]: e for e in result.manifest["artifacts"]}
    onnx = by["onnx"]["validation"]["targets"]["fake-arm64"]
    assert onnx["ran"] and onnx["passed"] and onnx["vs_local"]["bit_exact"]
    assert onnx["figures"] == by["onnx"]["validation"]["figures"] and onnx["target"]["platform"] == "linux-aarch64"
    coreml = by["coreml"]["validation"]["targets"]["fake-arm64"]
    assert coreml == {"ran": False, "passed": None, "note": "Core ML (macOS/iOS) does not run on linux-aarch64"}
    assert getattr(target, "_validation_worker", None) is None  # closed: nothing left running


@pytest.mark.e2e
def test_an_artifact_the_target_refuses_fails_validation_with_the_reason(
    tiny_bundle, tiny_checkpoint, tmp_path, monkeypatch
):
    import shutil

    from cloformer_deploy.pipeline import validate_bundle

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle.bundle, bundle)
    _on_other_machine(monkeypatch, _OtherMachine(fail_open=True))
    ok, reports = validate_bundle(bundle=bundle, weights=tiny_checkpoint, target="fake")
    assert not ok
    by = {r["format"]: r for r in reports}
    on = by["executorch"]["targets"]["fake-arm64"]
    assert on["passed"] is False and "xnn_status_unsupported_hardware" in on["problems"][0]
    assert by["coreml"]["targets"]["fake-arm64"]["ran"] is False and by["coreml"]["passed"]
    manifest = json.loads((bundle / "manifest.json").read_text())  # recorded in the bundle
    recorded = {e["format"]: e["validation"]["targets"]["fake-arm64"] for e in manifest["artifacts"]}
    assert recorded["executorch"]["passed"] is False and recorded["coreml"]["ran"] is False


@pytest.mark.e2e
def test_bench_on_another_target_adds_drift_rows_without_latency(tiny_variant, tiny_checkpoint, tmp_path, monkeypatch):
    from cloformer_deploy.runtime_bench.harness import bench
    from cloformer_deploy.runtime_bench.report import plot_latency

    _on_other_machine(monkeypatch, _OtherMachine())
    res = bench(
        tiny_variant,
        weights=tiny_checkpoint,
        formats="onnx",
        threads="1",
        runs=2,
        warmup=0,
        img_size=64,
        out=tmp_path,
        target="fake",
    )
    rows = {r["target"]: r for r in res.rows}
    assert set(rows) == {"local", "fake-arm64"}
    here, there = rows["local"], rows["fake-arm64"]
    assert here["latency_ms"]["median"] > 0 and there["latency_ms"] is None and there["load_ms"] is None
    assert there["drift"] == here["drift"] and there["vs_local"]["bit_exact"] and there["peak_rss_mb"] is None
    assert "no latency" in there["note"] and res.results["targets"]["fake-arm64"]["measures_latency"] is False
    md = (res.out / "results.md").read_text()
    assert "## Drift on fake-arm64" in md and "| deploy | onnxruntime | fp32 |" in md and "| bit-exact |" in md
    plot = plot_latency(tmp_path / "latency.png", res.results)
    assert all("fake-arm64" not in label for label, _, _ in plot.drawn)
    assert any("ORT (Python) fp32 on fake-arm64" in line for line in plot.left_out)  # a worker, not a native runner
