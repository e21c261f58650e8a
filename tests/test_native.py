"""The native runners: bit-exact with the Python runtimes, the worker protocol's edge cases, a bundle that uses no
library of the machine it runs on, an Android app's seccomp policy, and the build's failures (one line each).

Needs g++ and readelf (the ``native_runners`` fixture builds this machine's runners once, as ``cloformer-device
setup local`` does); skipped without them, a failure under CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cloformer_deploy.formats import BACKENDS
from cloformer_deploy.formats.base import ModelSpec
from cloformer_deploy.images import load_images
from cloformer_deploy.targets import TargetError, native
from cloformer_deploy.targets.base import WorkerRunner
from cloformer_deploy.targets.local import LocalTarget
from cloformer_deploy.targets.worker import KEPT_BATCHES, pack

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _spec(bundle_manifest) -> ModelSpec:
    return ModelSpec.from_manifest(bundle_manifest["model"], MEAN, STD)


def _images(manifest, limit=3):
    return load_images(tuple(manifest["model"]["input_size"]), MEAN, STD, limit=limit)


@pytest.fixture(scope="module")
def precisions_bundle(tiny_variant, tiny_checkpoint, tmp_path_factory):
    """The tiny model's ExecuTorch, ONNX and LiteRT programs in fp32, fp16 and int8, in one bundle."""
    from cloformer_deploy.pipeline import export

    out = tmp_path_factory.mktemp("native")
    for precision in ("fp32", "fp16", "int8"):
        result = export(
            tiny_variant,
            weights=tiny_checkpoint,
            format="onnx,executorch,tflite",
            precision=precision,
            img_size=64,
            out=out,
        )
        assert result.passed
    return result.bundle, json.loads((result.bundle / "manifest.json").read_text())


@pytest.mark.e2e
@pytest.mark.parametrize(
    "fmt,precision",
    [
        ("executorch", "fp32"),
        ("executorch", "fp16"),
        ("executorch", "int8"),
        ("onnx", "fp32"),
        ("onnx", "int8"),
        ("tflite", "fp32"),
        ("tflite", "fp16"),
        ("tflite", "int8"),
    ],
)
def test_the_native_runner_is_bit_exact_with_the_python_runtime(fmt, precision, precisions_bundle, native_runners):
    bundle, manifest = precisions_bundle
    entry = next(e for e in manifest["artifacts"] if e["format"] == fmt and e["precision"] == precision)
    path, spec = bundle / entry["path"], _spec(manifest)
    target = LocalTarget()
    for threads in (1, 2):
        python = BACKENDS[fmt].open(path, spec, entry, threads=threads)
        worker = target.start(timeout=300, fmt=fmt, native=True)
        try:
            runner = WorkerRunner(worker, target, fmt, path, spec, entry, threads=threads)
            assert runner.description["runner"] == "native" and runner.problems == []
            for one in _images(manifest).batches(1):
                assert np.array_equal(runner.run(one), python.run(one))
        finally:
            worker.close()
    worker = target.start(timeout=300, fmt=fmt, native=True)
    try:
        runner = WorkerRunner(worker, target, fmt, path, spec, entry, threads=1)
        runner.run(next(iter(_images(manifest).batches(1))))
        peak = worker.ask({"cmd": "rss"})["peak_rss_mb"]
        assert 0 < peak < 100  # the runner alone: no interpreter, no torch
        if fmt == "executorch":
            assert runner.description["planned_arena_bytes"] > 0
            assert runner.description["input_dtype"] == ("float16" if precision == "fp16" else "float32")
    finally:
        worker.close()


def _runner(native_runners, fmt="executorch", *args):
    bundle = native.ready_bundle(native.default_cache(), native.host_platform(), BACKENDS[fmt])
    return subprocess.Popen(
        bundle.words(None, *args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _ask(proc, message: dict) -> dict:
    proc.stdin.write(json.dumps(message) + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def _open_message(tiny_bundle, fmt="executorch", threads=1):
    entry = next(e for e in tiny_bundle.manifest["artifacts"] if e["format"] == fmt)
    return {
        "cmd": "open",
        "format": fmt,
        "path": str(tiny_bundle.bundle / entry["path"]),
        "spec": _spec(tiny_bundle.manifest).to_dict(),
        "info": entry,
        "threads": threads,
    }


def test_the_protocol_answers_errors_and_goes_on(native_runners, tiny_bundle, tmp_path):
    """Errors are answers (the process lives on); batches kept by key as the host counts them; a spec the
    program does not match is a problem it reports."""
    proc = _runner(native_runners, "executorch", "--keep", "2")
    try:
        assert "error" in _ask(proc, {"cmd": "run", "key": "a"})  # nothing open yet
        assert _ask(proc, {"cmd": "frobnicate"})["error"] == "unknown command 'frobnicate'"
        missing = {**_open_message(tiny_bundle), "path": str(tmp_path / "missing.pte")}
        assert "opening the program failed" in _ask(proc, missing)["error"]
        proc.stdin.write("{not json\n")
        proc.stdin.flush()
        assert "bad message" in json.loads(proc.stdout.readline())["error"]
        wrong = {
            **_open_message(tiny_bundle),
            "spec": {**_spec(tiny_bundle.manifest).to_dict(), "input_size": [32, 32]},
        }
        assert _ask(proc, wrong)["problems"] == ["forward's input is not 1x3x32x32"]
        opened = _ask(proc, _open_message(tiny_bundle))
        assert opened["problems"] == [] and opened["load_ms"] > 0
        images = _images(tiny_bundle.manifest)
        for key, i in (("a", 0), ("b", 1), ("c", 2)):  # keeps 2: "a" is forgotten, oldest first
            x = images.tensor[i : i + 1]
            assert _ask(proc, {"cmd": "run", "key": key, "tensor": pack(x)})["logits"]["shape"] == [1, 10]
        assert "no batch a" in _ask(proc, {"cmd": "run", "key": "a"})["error"]
        assert "logits" in _ask(proc, {"cmd": "run", "key": "c"})
        bad = pack(np.zeros((1, 3, 8, 8), np.float32))
        assert "shape" in _ask(proc, {"cmd": "run", "key": "d", "tensor": bad})["error"]
        assert len(_ask(proc, {"cmd": "time", "n": 3})["times_ms"]) == 3
        about = _ask(proc, {"cmd": "about"})
        assert about["machine"] == os.uname().machine and about["versions"]["executorch"] and about["cpuinfo"]
        assert isinstance(_ask(proc, {"cmd": "thermal"})["zones"], dict)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_the_host_and_the_runner_keep_the_same_number_of_batches(native_runners):
    assert LocalTarget().native_args()[-2:] == ["--keep", str(KEPT_BATCHES)]


def test_a_runner_whose_caller_is_gone_ends_mid_step(native_runners, tiny_bundle):
    proc = _runner(native_runners)
    _ask(proc, _open_message(tiny_bundle))
    x = _images(tiny_bundle.manifest).tensor[:1]
    _ask(proc, {"cmd": "run", "key": "k", "tensor": pack(x)})
    proc.stdin.write(json.dumps({"cmd": "time", "n": 10**8}) + "\n")  # hours of work
    proc.stdin.flush()
    time.sleep(0.5)
    proc.stdin.close()  # the ssh link dropped, the host timed out
    t = time.monotonic()
    proc.wait(timeout=30)
    assert time.monotonic() - t < 15


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_the_bundle_maps_no_library_of_this_machine(fmt, native_runners, tiny_bundle):
    """Started through its own loader: every shared object it maps comes from the bundle (as on a phone)."""
    bundle = native.ready_bundle(native.default_cache(), native.host_platform(), BACKENDS[fmt])
    proc = subprocess.Popen(
        bundle.words(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={"PATH": "/nonexistent"}
    )
    try:
        assert _ask(proc, _open_message(tiny_bundle, fmt))["problems"] == []
        maps = Path(f"/proc/{proc.pid}/maps").read_text().splitlines()
        objects = {line.split()[-1] for line in maps if ".so" in line.split()[-1]}
        assert objects and all(o.startswith(str(bundle.folder.resolve())) for o in objects), objects
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


# An Android app's seccomp policy, as Termux runs under it: clone3 answered with SIGSYS (SECCOMP_RET_TRAP).
SECCOMP_LAUNCHER = r"""
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>
int main(int argc, char** argv) {
  struct sock_filter f[] = {
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 435, 0, 1),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRAP),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  struct sock_fprog prog = {sizeof f / sizeof f[0], f};
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
    perror("seccomp");
    return 125;
  }
  execv(argv[1], argv + 1);
  perror("execv");
  return 126;
}
"""


@pytest.fixture(scope="module")
def clone3_trap(tmp_path_factory):
    if os.uname().machine != "x86_64" or shutil.which("gcc") is None:
        pytest.skip("the seccomp launcher is written for x86_64 and built with gcc")
    folder = tmp_path_factory.mktemp("seccomp")
    (folder / "trap.c").write_text(SECCOMP_LAUNCHER)
    subprocess.run(["gcc", "-O2", "-o", str(folder / "trap"), str(folder / "trap.c")], check=True)
    return str(folder / "trap")


def test_the_policy_kills_a_plain_glibc_program_that_starts_a_thread(clone3_trap):
    """The trap is real: this machine's Python (glibc 2.34+) dies of SIGSYS when it starts a thread."""
    script = "import threading; t = threading.Thread(target=print); t.start(); t.join(); print('survived')"
    proc = subprocess.run([clone3_trap, sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -31 and "survived" not in proc.stdout, (proc.returncode, proc.stderr[-300:])


@pytest.mark.parametrize("fmt", ["executorch", "onnx", "tflite"])
def test_the_runner_starts_its_threads_under_the_policy(fmt, clone3_trap, native_runners, tiny_bundle):
    """The bundle's glibc answers clone3 with ENOSYS without asking the kernel, and starts the threads with clone,
    which the policy allows (a handler cannot catch the trap: pthread_create blocks every signal around it)."""
    bundle = native.ready_bundle(native.default_cache(), native.host_platform(), BACKENDS[fmt])
    assert bundle.record["clone3"] == "patched"
    proc = subprocess.Popen(
        [clone3_trap, *bundle.words()], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert _ask(proc, _open_message(tiny_bundle, fmt, threads=2))["problems"] == []
        x = _images(tiny_bundle.manifest).tensor[:1]
        assert _ask(proc, {"cmd": "run", "key": "k", "tensor": pack(x)})["logits"]["shape"] == [1, 10]
        assert len(_ask(proc, {"cmd": "time", "n": 5})["times_ms"]) == 5
        threads = int(
            next(
                ln for ln in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if ln.startswith("Threads:")
            ).split()[1]
        )
        assert threads >= 2  # its pool's threads did start
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read()[-300:]


# ------------------------------------------------------------------ building


def test_the_clone3_answer_is_patched_once_or_found_absent(tmp_path):
    call, answer = native.CLONE3["linux-x86_64"]
    libc = tmp_path / "libc.so.6"
    libc.write_bytes(b"\x90" * 64 + call + b"\x90" * 64)
    assert native.without_clone3(libc, "linux-x86_64") == "patched"
    assert libc.read_bytes() == b"\x90" * 64 + answer + b"\x90" * 64 and len(call) == len(answer)
    libc.write_bytes(b"\x90" * 64)
    assert native.without_clone3(libc, "linux-x86_64") == "absent"
    libc.write_bytes(call * 2)  # not the one wrapper expected: left alone, said so
    assert native.without_clone3(libc, "linux-x86_64") == "unknown" and libc.read_bytes() == call * 2


def test_no_cross_compiler_is_one_line_naming_the_package_and_writes_nothing(monkeypatch, tmp_path):
    from cloformer_deploy.targets import setup

    monkeypatch.setattr(native, "compiler", lambda plat: None)
    monkeypatch.setattr(setup, "qemu_binary", lambda: "/usr/bin/qemu-aarch64-static")
    cache = tmp_path / "cache"
    with pytest.raises(
        TargetError, match="needs a C\\+\\+ compiler; install it with: apt-get install g\\+\\+-aarch64-linux-gnu"
    ):
        setup.setup_target("arm64", cache)
    with pytest.raises(TargetError, match="install it with: apt-get install g\\+\\+$"):
        setup.setup_target("local", cache)
    assert not cache.exists()


def test_setup_of_an_unknown_target_is_one_line(tmp_path):
    from cloformer_deploy.targets.setup import setup_target

    with pytest.raises(TargetError, match="setup 'mars': choose local, gpu, arm64, ssh://"):
        setup_target("mars", tmp_path)


def test_a_build_is_atomic_kept_when_current_and_not_ready_for_another_version(native_runners, monkeypatch, tmp_path):
    """A compile that fails leaves nothing ready; a built bundle is reused without compiling; a bundle built for
    another version of its wheel is not ready, and the target names the setup command."""
    backend = BACKENDS["executorch"]
    plat = native.host_platform()
    real_run = native._run
    calls = []

    def failing(argv, what, timeout, cwd=None):
        calls.append(what)
        if what.startswith("compiling"):
            raise TargetError(f"setup: {what} failed: error: boom")
        return real_run(argv, what, timeout, cwd)

    monkeypatch.setattr(native, "_run", failing)
    with pytest.raises(TargetError, match="boom"):
        native.build_bundle(backend, plat, tmp_path)
    assert native.ready_bundle(tmp_path, plat, backend) is None
    monkeypatch.setattr(native, "_run", lambda *a, **k: (calls.append(a[1]), real_run(*a, **k))[1])
    built = native.build_bundle(backend, plat, tmp_path)
    assert built.record["version"] == native.host_version("executorch") and (built.folder / "bin").is_dir()
    assert not list(tmp_path.rglob("*.partial"))
    n = len(calls)
    assert native.build_bundle(backend, plat, tmp_path).key == built.key and len(calls) == n  # nothing compiled
    record = json.loads((built.folder / "build.json").read_text())
    (built.folder / "build.json").write_text(json.dumps({**record, "version": "0.0.1"}))
    assert native.ready_bundle(tmp_path, plat, backend) is None
    with pytest.raises(TargetError, match=f"runner for {plat} is not built .*setup local.*{tmp_path}"):
        native.check_bundle(tmp_path, plat, backend, "local", native.default_cache())


def test_a_setup_step_that_hangs_is_stopped(tmp_path):
    t = time.monotonic()
    with pytest.raises(TargetError, match="setup: sleeping gave no result within 1s and was stopped"):
        native._run(["sh", "-c", "sleep 30 & sleep 30"], "sleeping", timeout=1)
    assert time.monotonic() - t < 10


def test_bench_without_built_runners_says_so_and_runs_python_rows(tiny_variant, tiny_checkpoint, tmp_path):
    """--runner auto on a machine where setup never ran: Python rows, a warning naming the setup command;
    --runner native refuses before any work."""
    from cloformer_deploy.progress import Progress
    from cloformer_deploy.runtime_bench.harness import bench
    from cloformer_deploy.runtime_bench.options import BenchInputError

    with pytest.raises(BenchInputError, match="runner native: the native .* runner is not built here"):
        bench(
            tiny_variant, weights=tiny_checkpoint, formats="onnx", runner="native", target_cache=str(tmp_path / "none")
        )
    log = tmp_path / "log.txt"
    with open(log, "w") as stream:
        res = bench(
            tiny_variant,
            weights=tiny_checkpoint,
            formats="onnx",
            threads="1",
            runs=2,
            warmup=0,
            img_size=64,
            out=tmp_path / "out",
            target_cache=str(tmp_path / "none"),
            progress=Progress(stream=stream),
        )
    assert [r["runner"] for r in res.rows] == ["python"]
    assert "cloformer-device setup local" in log.read_text()
