"""The ssh:// target against a real OpenSSH server on 127.0.0.1 (the device is this machine, the transport real).

A Linux device runs the native runners (built here by ``cloformer-device setup local``, the
``native_runners`` fixture); its Python worker is tested where a device would use it (a Mac, or
``--runner python``). Every test starts from keys it makes; nothing outside tmp folders is touched
except sshd's privilege separation folder when run as root. Where sshd is not installed the tests
skip with the command that installs it, and fail under CI (which installs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from cloformer_deploy.targets import TargetError, WorkerError, get_target
from cloformer_deploy.targets.ssh import SshTarget, device_needs

import loopback_sshd
from helpers import bundle_with_formats, live_processes

SITE = Path(find_spec("numpy").submodule_search_locations[0]).parent  # this venv's site-packages
BASE_PYTHON = str(Path(sys.base_prefix) / "bin" / "python3")  # with -S: a Python with no packages at all


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    why = loopback_sshd.available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must test the ssh:// target: {why}")
        pytest.skip(why)
    server = loopback_sshd.start(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture
def device(sshd, tmp_path, native_runners):
    """The options of the loopback device: its client config, this venv's Python, a fresh work folder."""
    return {"ssh_config": str(sshd.config), "remote_python": sys.executable, "remote_dir": str(tmp_path / "device")}


def test_a_linux_device_is_probed_by_its_shell_and_needs_no_python(sshd, device):
    target = get_target(sshd.address, device=device)
    d = target.describe()
    assert d["kind"] == "ssh" and d["measures_latency"] and d["platform"] == f"linux-{os.uname().machine}"
    assert d["cores"] == os.cpu_count() and d["clusters"] and d["label"].startswith(os.uname().machine)
    assert set(d["runners"]) == {"onnx", "executorch", "tflite"} and "python" not in d
    assert not (Path(device["remote_dir"]) / "code").exists()  # its Python was never asked for


def test_the_python_worker_copies_the_code_once(sshd, device):
    target = get_target(sshd.address, device=device)
    target.check_python()
    d = target.describe()
    assert d["python"] == ".".join(map(str, sys.version_info[:3])) and d["versions"]["onnxruntime"]
    codes = list((Path(device["remote_dir"]) / "code").iterdir())
    assert len(codes) == 1 and (codes[0] / "run.py").is_file()
    get_target(sshd.address, device=device).check_python()  # a second contact: the same code folder
    assert list((Path(device["remote_dir"]) / "code").iterdir()) == codes


@pytest.mark.e2e
def test_bench_times_the_device_in_the_same_rounds_and_matches_this_machine(
    sshd, device, tiny_bundle, tiny_checkpoint, tmp_path
):
    from cloformer_deploy.runtime_bench.harness import bench

    res = bench(
        bundle=tiny_bundle.bundle,
        weights=tiny_checkpoint,
        formats="onnxruntime,executorch-xnnpack",
        threads="1",
        runs=4,
        warmup=1,
        out=tmp_path / "bench",
        target=sshd.address,
        **device,
        cooldown=0.1,
    )
    rows = {(r["runtime"], r["target"]): r for r in res.rows}
    for rt in ("onnxruntime", "executorch-xnnpack"):
        here, there = rows[(rt, "local")], rows[(rt, sshd.address)]
        assert there["error"] is None, there["error"]
        assert here["runner"] == there["runner"] == "native"
        assert there["latency_ms"]["runs"] == 4 and there["latency_ms"]["median"] > 0
        # the runner's own memory: no Python, no torch (a Python worker holds hundreds of MB)
        assert there["load_ms"] > 0 and 0 < there["peak_rss_mb"] < 150 and there["efficiency"] is None
        assert there["vs_local"]["bit_exact"] and there["drift"] == here["drift"]  # same machine, same runtime
    assert rows[("executorch-xnnpack", sshd.address)]["planned_arena_mb"] > 0
    about = res.results["targets"][sshd.address]
    assert about["kind"] == "ssh" and about["label"] and res.results["config"]["cooldown_s"] == 0.1
    # each artifact went over once, by its hash
    files = sorted(p.name for p in (Path(device["remote_dir"]) / "files").rglob("*") if p.is_file())
    benched = ("onnx", "executorch")  # the formats of --formats
    assert files == sorted(e["path"] for e in tiny_bundle.manifest["artifacts"] if e["format"] in benched)
    assert f"on {sshd.address}" in (res.out / "results.md").read_text()


@pytest.mark.e2e
def test_validate_through_ssh_records_the_device_in_the_manifest(sshd, device, tiny_bundle, tiny_checkpoint, tmp_path):
    from cloformer_deploy.pipeline import validate_bundle

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle.bundle, bundle)
    ok, reports = validate_bundle(bundle=bundle, weights=tiny_checkpoint, target=sshd.address, **device)
    assert ok
    by = {r["format"]: r["targets"][sshd.address] for r in reports}
    assert by["onnx"]["passed"] and by["onnx"]["vs_local"]["bit_exact"]
    assert by["executorch"]["passed"] and by["executorch"]["vs_local"]["bit_exact"]
    # LiteRT in its native runner too (the C API of the same wheel): the same bits as this machine's interpreter
    assert by["tflite"]["passed"] and by["tflite"]["vs_local"]["bit_exact"], by["tflite"]
    assert {by[f]["runner"] for f in ("onnx", "executorch", "tflite")} == {"native"}
    assert by["coreml"] == {
        "ran": False,
        "passed": None,
        "note": f"Core ML (macOS/iOS) does not run on linux-{os.uname().machine}",
    }
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert all(sshd.address in e["validation"]["targets"] for e in manifest["artifacts"])
    assert not live_processes(device["remote_dir"])  # the validation worker ended with the run


def test_no_ssh_client_here_is_one_line(monkeypatch):
    from cloformer_deploy.targets import ssh

    monkeypatch.setattr(ssh.shutil, "which", lambda name: None)
    with pytest.raises(TargetError, match="apt-get install openssh-client"):
        get_target("ssh://pi@pi5")


def test_unreachable_port_is_one_line_naming_the_fix(sshd, device):
    with pytest.raises(TargetError, match="cannot reach .*Connection refused; nothing listens there"):
        get_target(f"ssh://127.0.0.1:{loopback_sshd._free_port()}", device=device)


def test_a_key_the_device_refuses_is_one_line(sshd, device):
    refused = {**device, "ssh_key": str(sshd.folder / "other_key")}
    with pytest.raises(
        TargetError, match=r"Permission denied \(publickey\); the device refused the key: copy it there"
    ):
        get_target(sshd.address, device={**refused, "ssh_config": str(_config_without_key(sshd))})


def _config_without_key(sshd) -> Path:
    path = sshd.folder / "ssh_config_no_key"
    path.write_text(f"Host *\n  UserKnownHostsFile {sshd.folder / 'known_hosts'}\n  StrictHostKeyChecking yes\n")
    return path


def test_an_unknown_host_key_is_refused_not_accepted(sshd, device, tmp_path):
    config = tmp_path / "config"
    config.write_text(
        f"Host *\n  IdentityFile {sshd.folder / 'client_key'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {tmp_path / 'empty_known_hosts'}\n  StrictHostKeyChecking yes\n"
    )
    with pytest.raises(TargetError, match="host key is not known"):
        get_target(sshd.address, device={**device, "ssh_config": str(config)})


def test_a_device_without_that_python_or_without_numpy(sshd, device):
    """Where its Python worker is wanted (a Mac, --runner python)."""
    with pytest.raises(TargetError, match="has no 'python3.99' .*install Python 3.10 or newer there"):
        SshTarget(sshd.address, **{**device, "remote_python": "python3.99"}).check_python()
    if subprocess.run([BASE_PYTHON, "-S", "-c", "import numpy"], capture_output=True).returncode == 0:
        pytest.fail(f"{BASE_PYTHON} has numpy: this test needs a Python without it")
    with pytest.raises(TargetError, match=r"its Python has no numpy, .*install it with: .* -m pip install numpy=="):
        SshTarget(sshd.address, **{**device, "remote_python": f"{BASE_PYTHON} -S"}).check_python()


@pytest.fixture
def onnx_only_device(device, tmp_path):
    """A Python on the device with numpy and onnxruntime only (no torch, no executorch)."""
    site = tmp_path / "site"
    site.mkdir()
    for entry in SITE.iterdir():
        if entry.name.split("-")[0].split(".")[0] in ("numpy", "onnxruntime"):
            (site / entry.name).symlink_to(entry)
    return {**device, "remote_python": f"env PYTHONPATH={site} {BASE_PYTHON} -S"}


@pytest.mark.e2e
def test_a_missing_runtime_is_an_error_row_and_the_others_run(
    sshd, onnx_only_device, tiny_bundle, tiny_checkpoint, tmp_path, capsys
):
    from cloformer_deploy.cli import device_main
    from cloformer_deploy.runtime_bench.harness import bench

    target = SshTarget(sshd.address, **onnx_only_device)
    target.check()
    target.check_python()
    needs = device_needs(target)
    assert not needs["ok"] and "executorch" in needs["command"] and "download.pytorch.org/whl/cpu" in needs["command"]
    assert {r["package"]: r["status"] for r in needs["rows"]}["onnxruntime"] == "ok"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in onnx_only_device.items()]
    assert device_main(["check", sshd.address, *flags]) == 0  # a Linux device: its native runners are built here
    out = capsys.readouterr().out
    assert re.search(r"^ExecuTorch +executorch \S+ +ready", out, re.M) and "no Python is needed" in out

    res = bench(
        bundle=tiny_bundle.bundle,
        weights=tiny_checkpoint,
        formats="onnxruntime,executorch-xnnpack",
        threads="1",
        runs=2,
        warmup=0,
        out=tmp_path / "bench",
        target=sshd.address,
        runner="python",
        **onnx_only_device,
    )
    rows = {(r["runtime"], r["target"]): r for r in res.rows}
    assert rows[("onnxruntime", sshd.address)]["latency_ms"]["runs"] == 2
    err = rows[("executorch-xnnpack", sshd.address)]["error"]
    assert err.startswith(f"executorch and torch are not installed on {sshd.address}; install with:") and "pip" in err
    assert rows[("executorch-xnnpack", "local")]["error"] is None


@pytest.mark.e2e
def test_a_worker_that_hangs_is_stopped_and_nothing_is_left_on_the_device(sshd, device, tiny_bundle):
    target = get_target(sshd.address, device=device)
    onnx = next(e for e in tiny_bundle.manifest["artifacts"] if e["format"] == "onnx")
    runner = target.runner("onnx", tiny_bundle.bundle / onnx["path"], _spec(tiny_bundle), onnx)
    worker = runner.worker
    worker.run_batch(["x"], *_images(tiny_bundle))
    assert runner.description["runner"] == "native"
    assert live_processes(device["remote_dir"], seconds=0)  # the runner runs on the device
    with pytest.raises(WorkerError, match="no answer to 'time' within 2s; the worker was stopped"):
        worker.ask({"cmd": "time", "n": 10**7}, timeout=2)  # busy for hours
    assert not live_processes(device["remote_dir"])  # its input closed: it ended mid-step
    target.close()


def test_a_worker_that_dies_mid_run_is_a_one_line_error(sshd, device, tiny_bundle):
    target = get_target(sshd.address, device=device)
    onnx = next(e for e in tiny_bundle.manifest["artifacts"] if e["format"] == "onnx")
    worker = target.runner("onnx", tiny_bundle.bundle / onnx["path"], _spec(tiny_bundle), onnx).worker
    pids = []  # the runner on the device, not the local ssh client that started it nor the shell between
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        words = cmdline.read_bytes().split(b"\0")
        if words and words[0].endswith(b"ld-linux-x86-64.so.2") and device["remote_dir"].encode() in words[0]:
            pids.append(int(cmdline.parent.name))
    assert len(pids) == 1
    for pid in pids:
        os.kill(pid, 9)
    with pytest.raises(WorkerError, match="the worker exited with code"):
        worker.run_batch(["x"], *_images(tiny_bundle))
    target.close()


def test_a_full_disk_on_the_device_fails_the_copy_and_keeps_nothing(sshd, device, tiny_bundle, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem (a full disk) needs root")
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs (a full disk)")
    try:
        target = get_target(sshd.address, device={**device, "remote_dir": str(disk / "device")})
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - 8192))  # the code is in; the artifact will not fit
        onnx = next(e for e in tiny_bundle.manifest["artifacts"] if e["format"] == "onnx")
        with pytest.raises(WorkerError, match="copying .* failed: .*No space left on device"):
            target.ship(tiny_bundle.bundle / onnx["path"])
        assert not [p for p in (disk / "device" / "files").rglob("*") if p.is_file()]  # nothing half-written kept
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_cores_pin_the_worker_and_are_checked_against_the_device(sshd, device):
    target = get_target(sshd.address, device={**device, "cores": "0"})
    worker = target.start(fmt="onnx", native=True)
    try:
        assert worker.ask({"cmd": "about"})["affinity"] == [0]
    finally:
        worker.close()
    with pytest.raises(TargetError, match=f"0-{os.cpu_count()}: .* offers cores 0-{os.cpu_count() - 1}"):
        get_target(sshd.address, device={**device, "cores": f"0-{os.cpu_count()}"})
    with pytest.raises(TargetError, match="'7-4' runs backwards"):
        get_target(sshd.address, device={**device, "cores": "7-4"})


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _spec(bundle):
    from cloformer_deploy.formats.base import ModelSpec

    return ModelSpec.from_manifest(bundle.manifest["model"], MEAN, STD)


def _images(bundle):
    from cloformer_deploy.images import load_images

    batch = load_images(tuple(bundle.manifest["model"]["input_size"]), MEAN, STD)
    return batch.images[:1], batch.tensor[:1]


# ---- the parts of a device's report that need no device

BIG_LITTLE = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 38.40\nCPU implementer\t: 0x41\nCPU part\t: {part}\n\n"
    for i, part in enumerate(["0xd05"] * 4 + ["0xd0b"] * 3 + ["0xd44"])
)


def test_cpu_clusters_name_the_core_kinds_of_a_phone():
    from cloformer_deploy.targets.ssh import clusters_text
    from cloformer_deploy.targets.worker import cpu_clusters

    clusters = cpu_clusters(BIG_LITTLE)
    assert [(c["core"], c["cpus"]) for c in clusters] == [
        ("Cortex-A55", [0, 1, 2, 3]),
        ("Cortex-A76", [4, 5, 6]),
        ("Cortex-X1", [7]),
    ]
    assert clusters_text({"clusters": clusters}) == (
        "4x Cortex-A55 (cores 0-3) + 3x Cortex-A76 (cores 4-6) + 1x Cortex-X1 (cores 7)"
    )


def test_core_lists_parse_as_taskset_writes_them():
    from cloformer_deploy.targets.worker import parse_cores

    assert parse_cores("4-7") == {4, 5, 6, 7} and parse_cores("0,2,4-5") == {0, 2, 4, 5}
    for bad in ("", "a", "4-", "7-4", "1,,2"):
        with pytest.raises(ValueError):
            parse_cores(bad)


@pytest.mark.parametrize(
    "text, why",
    [
        ("ssh://", "no host"),
        ("ssh://a b", "a space"),
        ("pi@pi5", "no scheme"),
        ("ssh://pi@pi5:0", "port 0"),
        ("ssh://pi@pi5/path", "a path"),
    ],
)
def test_bad_ssh_addresses_are_refused(text, why):
    from cloformer_deploy.targets.ssh import parse_address

    with pytest.raises(TargetError, match="is not an SSH address"):
        parse_address(text)


def test_ssh_addresses_parse_to_ssh_arguments():
    from cloformer_deploy.targets.ssh import parse_address

    a = parse_address("ssh://u0_a123@192.168.1.20:8022")
    assert (a.user, a.host, a.port, a.destination, str(a)) == (
        "u0_a123",
        "192.168.1.20",
        8022,
        "u0_a123@192.168.1.20",
        "ssh://u0_a123@192.168.1.20:8022",
    )
    t = SshTarget("ssh://[::1]:2222", remote_python="proot-distro login debian -- python3", ssh_key="/k")
    argv = t.ssh_argv()
    assert argv[-2:] == ["--", "::1"] and ["-p", "2222"] == argv[argv.index("-p") : argv.index("-p") + 2]
    assert "BatchMode=yes" in argv and "/k" in argv  # never a password prompt that would hang
    t.code = "/home/u/.cache/cloformer-deploy/device/code/abc"
    assert (
        t.remote_command([f"{t.code}/run.py", "worker"])
        == "proot-distro login debian -- python3 /home/u/.cache/cloformer-deploy/device/code/abc/run.py worker"
    )
    venv = SshTarget("ssh://pi@pi5", remote_python="~/cd/bin/python 'a b'")  # the device's home, not ours
    assert venv.remote_command(["-"]) == "~/cd/bin/python 'a b' -"


def test_core_ml_placement_counts_neural_engine_ops_and_fallbacks():
    from cloformer_deploy.formats.coreml_placement import summarise_placement

    ops = [
        ("const", None, ()),
        ("conv", "NE", ("CPU", "GPU", "NE")),
        ("conv", "NE", ("CPU", "GPU", "NE")),
        ("layer_norm", "GPU", ("CPU", "GPU")),
        ("gelu", "CPU", ("CPU", "GPU", "NE")),
        ("softmax", None, ()),
    ]
    s = summarise_placement(ops, "CPU_AND_NE")
    assert s["ops"] == 4 and s["by_device"] == {"NE": 2, "GPU": 1, "CPU": 1} and s["unplaced"] == 1
    assert s["share_on_neural_engine"] == 0.5
    assert s["fallback_ops"] == {"layer_norm (on GPU, no NE kernel)": 1, "gelu (on CPU)": 1}
    assert summarise_placement(ops, "CPU_ONLY")["fallback_ops"] == {}  # the CPU is all it may use


def test_core_ml_is_a_row_per_compute_unit_on_a_mac_and_one_untimed_row_elsewhere(tiny_bundle):
    from cloformer_deploy.formats import BACKENDS
    from cloformer_deploy.runtime_bench.harness import _artifact_combos

    coreml = BACKENDS["coreml"]
    assert [v["compute_units"] for v in coreml.row_variants("darwin-arm64")] == [
        "CPU_ONLY",
        "CPU_AND_GPU",
        "CPU_AND_NE",
        "ALL",
    ]
    assert coreml.row_variants("linux-aarch64") == [{}] and not coreml.uses_threads

    class _Mac(SshTarget):  # as a probe of a Mac with coremltools and no onnxruntime leaves it
        def __init__(self):
            super().__init__("ssh://me@mac.local")
            self.platform, self.versions = "darwin-arm64", {"numpy": "2", "coremltools": "9.0", "pillow": "11"}
            self.has_python = True  # no native runners for macOS: its Python worker runs everything

    from cloformer_deploy.targets.local import LocalTarget

    here_ = LocalTarget()
    art = {"precision": "fp16", "path": "m.mlpackage", "size_mb": 1.0, "extra": {}}
    combos = _artifact_combos("m", "deploy", "coreml", art, [1, 2], here_, _Mac())
    here = [c for c in combos if c.target is None]
    there = [c for c in combos if c.target is not None]
    assert len(here) == 1 and not here[0].timed and here[0].threads is None  # the interpreter, on this Linux
    assert [c.variant["compute_units"] for c in there] == ["CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL"]
    assert all(c.timed and c.threads is None and c.error is None for c in there)
    alone = _artifact_combos("m", "deploy", "onnxruntime", {**art, "path": "m.onnx"}, [1, 2], here_, None)
    assert [(c.target, c.threads, c.timed) for c in alone] == [(None, 1, True), (None, 2, True)]  # no target: here only
    onnx = _artifact_combos("m", "deploy", "onnxruntime", {**art, "path": "m.onnx"}, [1, 2], here_, _Mac())
    missing = [c for c in onnx if c.target is not None]
    assert [c.threads for c in missing] == [1, 2] and all("onnxruntime is not installed on" in c.error for c in missing)


def test_core_ml_open_checks_the_compute_unit(tiny_bundle):
    from cloformer_deploy.formats import BACKENDS
    from cloformer_deploy.inputs import InputError

    entry = next(e for e in tiny_bundle.manifest["artifacts"] if e["format"] == "coreml")
    with pytest.raises(InputError, match="'NPU' is not offered; choose from CPU_ONLY, CPU_AND_GPU, CPU_AND_NE, ALL"):
        BACKENDS["coreml"].open(tiny_bundle.bundle / entry["path"], _spec(tiny_bundle), {"compute_units": "NPU"})
    runner = BACKENDS["coreml"].open(
        tiny_bundle.bundle / entry["path"], _spec(tiny_bundle), {"compute_units": "cpu_and_ne"}
    )
    assert runner.compute_units == "CPU_AND_NE" and runner.method == "emulated" and runner.placement is None


def test_a_folder_goes_over_as_itself_once(sshd, device, tiny_bundle):
    """A .mlpackage is a folder: it travels as a tar made the same every time, and is unpacked in place."""
    target = get_target(sshd.address, device=device)
    package = next(tiny_bundle.bundle / e["path"] for e in tiny_bundle.manifest["artifacts"] if e["format"] == "coreml")
    there = Path(target.ship(package))
    assert there.name == package.name and there.is_dir()

    def tree(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert tree(there) == tree(package)
    again = get_target(sshd.address, device=device)  # a new run: the same hash, so the same folder, not a copy
    assert again.ship(package) == str(there)
    assert len(list((Path(device["remote_dir"]) / "files").iterdir())) == 1


OLD_PYTHON = (
    next(
        (
            str(p)
            for v in ("3.9", "3.8")
            for p in Path("/root/.pyenv/versions").glob(f"{v}*/bin/python{v}")
            if p.exists()
        ),
        None,
    )
    if Path("/root/.pyenv/versions").is_dir()
    else shutil.which("python3.9")
)


@pytest.mark.skipif(OLD_PYTHON is None, reason="no Python older than 3.10 on this machine to play the old device")
def test_a_device_python_too_old_is_named(sshd, device):
    with pytest.raises(TargetError, match=r"its Python is 3\.[89]\.\d+; the worker needs 3\.10 or newer"):
        SshTarget(sshd.address, **{**device, "remote_python": OLD_PYTHON}).check_python()


def test_a_banner_the_device_shell_prints_is_not_taken_for_an_answer(sshd, device):
    """A .bashrc or a proot login that writes to stdout before Python starts: its lines are set aside."""
    chatty = f'sh -c \'echo Welcome to Termux; exec "$0" "$@"\' {sys.executable}'
    target = get_target(sshd.address, device={**device, "remote_python": chatty})
    target.check_python()
    worker = target.start()
    try:
        assert worker.ask({"cmd": "about"})["machine"] == os.uname().machine
        assert worker.noise == ["Welcome to Termux"]
    finally:
        worker.close()


def test_each_compute_unit_keeps_its_own_outputs():
    """Core ML on a Mac: the four units of one package compute differently, so none reuses another's logits."""
    import numpy as np

    from cloformer_deploy.images import ImageBatch
    from cloformer_deploy.runtime_bench.harness import Combo, _outputs

    class _Unit:  # a worker whose logits say which unit computed them
        def __init__(self, value):
            self.value = value

        def run_batch(self, names, images, tensor):
            from cloformer_deploy.targets.worker import pack

            return {"logits": pack(np.full((1, 3), self.value, np.float32)), "ms": 1.0}

        def ask(self, cmd, timeout=None):
            return {"peak_rss_mb": 1.0}

        def close(self):
            pass

    class _Stage:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, text):
            pass

    class _Progress:
        def stage(self, text):
            return _Stage()

    combos = [
        Combo("m", "deploy", "coreml", "fp16", None, "m.mlpackage", variant={"compute_units": u}, timed=True)
        for u in ("CPU_ONLY", "CPU_AND_NE")
    ]
    for value, c in enumerate(combos):
        c.worker = _Unit(float(value))
    images = ImageBatch(["a"], np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 3, 8, 8), np.float32))
    _outputs(combos, images, {}, _Progress(), "test")
    assert combos[0].outputs[0, 0] == 0.0 and combos[1].outputs[0, 0] == 1.0


def test_thermal_zones_are_read_in_degrees_and_unreadable_ones_left_out(tmp_path):
    from cloformer_deploy.targets.worker import thermal

    for i, (kind, milli) in enumerate([("cpu-big0", "61250"), ("battery", "31000"), ("gpu", "asleep")]):
        zone = tmp_path / f"thermal_zone{i}"
        zone.mkdir()
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(milli + "\n")
    (tmp_path / "thermal_zone10").mkdir()  # no files: a zone the kernel guards
    assert thermal(str(tmp_path)) == {"thermal_zone0 cpu-big0": 61.25, "thermal_zone1 battery": 31.0}


def test_results_md_shows_a_device_beside_this_machine_with_its_temperatures():
    from cloformer_deploy.runtime_bench.report import target_markdown

    def row(target, median, threads=4):
        return {
            "model": "m",
            "role": "subject",
            "target": target,
            "form": "deploy",
            "runtime": "onnxruntime",
            "precision": "fp32",
            "threads": threads,
            "latency_ms": {"median": median},
            "load_ms": 120.0,
            "drift": {"max_abs": 2e-6, "cosine": 1.0, "top1_agreement": 1.0},
            "error": None,
            **({"vs_local": {"bit_exact": False, "max_abs": 1e-6, "cosine": 1.0}} if target != "local" else {}),
        }

    results = {
        "config": {"model": "m"},
        "rows": [row("local", 10.0), row("ssh://pi@pi5", 25.0)],
        "targets": {"ssh://pi@pi5": {"measures_latency": True, "label": "aarch64 Linux, 4x Cortex-A76"}},
        "thermal": {
            "ssh://pi@pi5": [
                {"threads": 4, "before_c": {"thermal_zone0 cpu": 48.5}, "after_c": {"thermal_zone0 cpu": 71.0}}
            ]
        },
    }
    md = "\n".join(target_markdown(results))
    assert "## On ssh://pi@pi5" in md and "aarch64 Linux, 4x Cortex-A76" in md
    assert "before thermal_zone0 cpu 48.5 C; after thermal_zone0 cpu 71.0 C" in md
    assert "| deploy | onnxruntime | fp32 | 4 | 10.00 | 25.00 | 2.500 | 120 | 2.0e-06 | max abs 1.0e-06" in md


# ------------------------------------------------------------------ a device with a shell and nothing else


@pytest.fixture(scope="module")
def bare_device(tmp_path_factory, native_runners):
    """An ssh:// device whose world is a static busybox: no Python, no libc, no /usr (sshd's ChrootDirectory)."""
    why = loopback_sshd.bare_device_available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must test a device without Python: {why}")
        pytest.skip(why)
    # sshd wants the chroot and its parents root's and not writable by others: not under /tmp
    parent = Path.home() / ".cache" / "cloformer-deploy-tests"
    parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    root = parent / f"bare-{os.getpid()}"
    loopback_sshd.remove_bare_root(root)
    loopback_sshd.make_bare_root(root)
    server = loopback_sshd.start(tmp_path_factory.mktemp("bare-sshd"), chroot=root)
    yield server, root
    server.stop()
    loopback_sshd.remove_bare_root(root)


@pytest.mark.e2e
def test_bench_and_validate_on_a_device_with_no_python_and_no_libc(bare_device, tiny_bundle, tiny_checkpoint, tmp_path):
    from cloformer_deploy.pipeline import validate_bundle
    from cloformer_deploy.runtime_bench.harness import bench

    server, root = bare_device
    device = {"ssh_config": str(server.config), "remote_dir": "/work"}
    files = [f for d in root.iterdir() if d.name != "proc" for f in d.rglob("*")]  # /proc is this machine's
    assert not (root / "usr").exists() and not [f for f in files if f.name.startswith(("python", "libc.so"))]
    target = get_target(server.address, device=device)
    assert target.about["has_python"] is False and target.about["clusters"]
    res = bench(
        bundle=tiny_bundle.bundle,
        weights=tiny_checkpoint,
        formats="onnxruntime,executorch-xnnpack,litert",
        threads="1",
        runs=3,
        warmup=1,
        out=tmp_path / "bench",
        target=server.address,
        **device,
    )
    rows = {(r["runtime"], r["target"]): r for r in res.rows}
    for rt in ("onnxruntime", "executorch-xnnpack", "litert"):
        there = rows[(rt, server.address)]
        assert there["error"] is None and there["runner"] == "native", there["error"]
        assert there["latency_ms"]["runs"] == 3 and 0 < there["peak_rss_mb"] < 150 and there["vs_local"]["bit_exact"]
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle.bundle, bundle)
    ok, reports = validate_bundle(bundle=bundle, weights=tiny_checkpoint, target=server.address, **device)
    by = {r["format"]: r["targets"][server.address] for r in reports}
    # LiteRT too, in its native runner: a device with no Python runs every Android format
    assert ok and all(by[f]["vs_local"]["bit_exact"] for f in ("onnx", "executorch", "tflite")), by
    assert not live_processes("/work/native/")  # nothing left running on the device (its runners are gone)


def test_setup_copies_the_runners_to_the_device_and_starts_them_there(sshd, device, capsys):
    from cloformer_deploy.cli import device_main

    flags = ["--ssh-config", device["ssh_config"], "--remote-dir", device["remote_dir"]]
    assert device_main(["setup", sshd.address, *flags]) == 0
    out = capsys.readouterr().out
    assert f"{sshd.address}: ready in" in out and "executorch-runner" in out
    installed = sorted(p.parent.name.split("-")[0] for p in Path(device["remote_dir"]).glob("native/*/build.json"))
    assert installed == ["executorch", "onnx", "tflite"]
    assert not live_processes(device["remote_dir"])  # the smoke tests' runners ended


@pytest.mark.e2e
def test_a_device_without_a_vulkan_driver_gives_gpu_error_rows_and_the_rest_runs(
    sshd, device, tiny_bundle, tiny_checkpoint, tmp_path
):
    """The loopback device has no Vulkan loader: its GPU rows are errors that say so, its CPU row runs."""
    from cloformer_deploy.runtime_bench.harness import bench

    res = bench(
        bundle=tiny_bundle.bundle,
        weights=tiny_checkpoint,
        formats="litert,litert-gpu",
        threads="1",
        runs=3,
        warmup=1,
        out=tmp_path / "bench",
        target=sshd.address,
        **device,
    )
    rows = {(r["runtime"], r["target"]): r for r in res.rows}
    cpu, gpu = rows[("litert", sshd.address)], rows[("litert-gpu", sshd.address)]
    assert cpu["error"] is None and cpu["latency_ms"]["runs"] == 3 and cpu["runner"] == "native"
    assert "no Vulkan device reached" in gpu["error"] and gpu["latency_ms"] is None, gpu["error"]
    assert not live_processes(device["remote_dir"])


@pytest.mark.e2e
def test_drift_by_block_on_the_device(sshd, device, tiny_bundle, tiny_checkpoint, tmp_path):
    """--by-block --target ssh://: the device's native runners return every block, the same bits as here."""
    from cloformer_deploy.pipeline import drift_by_block

    bundle = bundle_with_formats(tiny_bundle.bundle, tmp_path / "b", ("onnx", "tflite"))
    found = drift_by_block(
        bundle=str(bundle), weights=str(tiny_checkpoint), target=sshd.address, out=str(tmp_path / "o"), **device
    )
    rows = found.document["artifacts"]
    assert {r["target"] for r in rows} == {"local", sshd.address}
    for fmt in ("onnx", "tflite"):
        here = next(r for r in rows if r["format"] == fmt and r["target"] == "local")
        there = next(r for r in rows if r["format"] == fmt and r["target"] == sshd.address)
        assert "error" not in there and there["final_vs_shipped"]["bit_exact"], there
        assert [b["rel_err"] for b in there["blocks"]] == [b["rel_err"] for b in here["blocks"]]
    assert not live_processes(device["remote_dir"])
