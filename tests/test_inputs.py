"""Bad input across every command and the Python API: one line naming the fix, exit 2, no traceback,
nothing written, before any model is built or converted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cloformer_deploy.cli import bench_main, device_main, export_main, models_main, validate_main
from cloformer_deploy.inputs import InputError

COMMANDS = {
    "export": export_main,
    "validate": validate_main,
    "bench": bench_main,
    "models": models_main,
    "device": device_main,
}


@pytest.fixture(scope="module")
def inputs(tiny_bundle, tiny_checkpoint, tiny_variant, tmp_path_factory):
    """A folder of good and broken inputs: bundles with each kind of damage, files that are not what they claim."""
    root = tmp_path_factory.mktemp("inputs")
    good = tiny_bundle.bundle
    (root / "emptydir").mkdir()
    (root / "file.txt").write_text("x")
    (root / "labels2.txt").write_text("cat\ndog\n")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 10)
    (root / "photos_none").mkdir()
    (root / "photos_none" / "notes.txt").write_text("no images here")
    (root / "truncated.pth").write_bytes(tiny_checkpoint.read_bytes()[:500])
    torch.save(
        __import__("cloformer_deploy").create_model(tiny_variant, num_classes=10).state_dict(), root / "other.pth"
    )
    torch.save(__import__("cloformer_deploy").create_model("cloformer_xs").state_dict(), root / "xs.pth")

    def broken(name, damage):
        folder = root / name
        shutil.copytree(good, folder)
        damage(folder)

    def set_manifest(text):
        return lambda f: (f / "manifest.json").write_text(text)

    def edit_manifest(fn):
        def damage(folder):
            m = json.loads((folder / "manifest.json").read_text())
            fn(m)
            (folder / "manifest.json").write_text(json.dumps(m))

        return damage

    broken("b_empty", set_manifest(""))
    broken("b_badjson", set_manifest('{"model": '))
    broken("b_list", set_manifest("[1, 2]"))
    broken("b_nomodel", edit_manifest(lambda m: m.pop("model")))
    broken("b_noname", edit_manifest(lambda m: m["model"].pop("name")))
    broken("b_noartifacts", edit_manifest(lambda m: m.update(artifacts=[])))
    broken("b_unknownmodel", edit_manifest(lambda m: m["model"].update(name="resnet50")))
    broken("b_unknownformat", edit_manifest(lambda m: m["artifacts"][0].update(format="tensorrt")))
    broken("b_missing", lambda f: (f / json.loads((f / "manifest.json").read_text())["artifacts"][0]["path"]).unlink())
    broken("b_nolabels", lambda f: (f / "labels.txt").unlink())
    broken("b_notflite", lambda f: next(f.glob("*.tflite")).unlink())

    def tamper(folder):
        onnx_file = next(folder.glob("*.onnx"))
        data = bytearray(onnx_file.read_bytes())
        data[-100] ^= 0xFF
        onnx_file.write_bytes(bytes(data))

    broken("b_changed", tamper)
    return {"root": root, "good": good, "ckpt": tiny_checkpoint, "model": tiny_variant}


# (command, arguments, what the one line must say); {root} {good} {ckpt} {model} are filled in
CASES = [
    # cloformer-export: options
    ("export", ["--model", "resnet50"], "unknown model 'resnet50'; choose one of"),
    (
        "export",
        ["--format", "tensorrt"],
        "unknown format 'tensorrt'; choose from: onnx, coreml, executorch, tflite, all",
    ),
    ("export", ["--format", ","], "no format given"),
    ("export", ["--img-size", "230"], "use 224x224"),
    ("export", ["--img-size", "abc"], "is not a size; use 224 or HxW"),
    ("export", ["--img-size", "0"], "sizes must be positive"),
    ("export", ["--img-size", "-32"], "sizes must be positive"),
    ("export", ["--img-size", "224x"], "is not a size"),
    ("export", ["--num-classes", "0"], "--num-classes 0 is out of range"),
    ("export", ["--num-classes", "-5"], "--num-classes -5 is out of range"),
    ("export", ["--num-classes", "ten"], "is not a whole number"),
    ("export", ["--batch", "0"], "--batch 0 is out of range"),
    ("export", ["--precision", "fp8"], "--precision 'fp8' is not offered"),
    ("export", ["--format", "coreml", "--precision", "int4"], "--precision 'int4' is not offered"),
    ("export", ["--format", "onnx", "--precision", "w4"], "not offered for onnx"),
    ("export", ["--format", "tflite", "--precision", "w4"], "not offered for tflite"),
    ("export", ["--format", "tflite", "--precision", "int8", "--keep-float", "2"], "--keep-float applies to int8 ONNX"),
    ("export", ["--keep-float", "-3", "--precision", "int8"], "--keep-float -3 is out of range"),
    ("export", ["--keep-float", "3"], "--keep-float applies to int8"),
    ("export", ["--format", "coreml", "--precision", "int8", "--keep-float", "2"], "--keep-float applies to int8 ONNX"),
    (
        "export",
        ["--model", "{model}", "--format", "onnx", "--precision", "int8", "--keep-float", "500"],
        "more than the model's",
    ),
    ("export", ["--calibration-size", "0", "--precision", "int8"], "--calibration-size 0 is out of range"),
    (
        "export",
        ["--calibration-size", "8"],
        "--calibration-size applies to --precision int8 (and fp16 ExecuTorch) only",
    ),
    ("export", ["--min-top1-agreement", "5"], "not a share from 0 to 1 (5% is 0.05)"),
    ("export", ["--min-top1-agreement", "-0.1"], "not a share from 0 to 1"),
    ("export", ["--opset", "10"], "--opset 10 is out of range; give a whole number from 17 to 23"),
    ("export", ["--opset", "99"], "--opset 99 is out of range"),
    ("export", ["--coreml-target", "iOS12"], "--coreml-target 'iOS12' is not offered; choose from iOS16, iOS17, iOS18"),
    ("export", ["--coreml-input", "png"], "--coreml-input 'png' is not offered"),
    ("export", ["--backend", "tensorrt"], "--backend 'tensorrt' is not offered"),
    ("export", ["--unknown-flag"], "unrecognized arguments"),
    # cloformer-export: files
    ("export", ["--weights", "{root}/nope.pth"], "does not exist; pass the path of a .pth/.pt/.safetensors"),
    ("export", ["--weights", "{root}/emptydir"], "is a folder; pass the path of a .pth"),
    ("export", ["--weights", "{root}/truncated.pth"], "is not a readable PyTorch checkpoint"),
    ("export", ["--weights", "{root}/xs.pth"], "not cloformer_xxs; use --model cloformer-xs"),
    ("export", ["--model", "{model}", "--weights", "{ckpt}", "--num-classes", "5"], "pass --num-classes 10"),
    ("export", ["--labels", "{root}/emptydir"], "is a folder"),
    ("export", ["--labels", "{root}/nope.txt"], "does not exist"),
    ("export", ["--labels", "{root}/labels2.txt"], "has 2 names but the model has 1000 classes"),
    ("export", ["--labels", "{root}/binary.txt"], "is not text"),
    ("export", ["--data", "{root}/nope"], "does not exist; pass a folder of .jpg/.png"),
    ("export", ["--data", "{root}/file.txt"], "is a file; pass a folder"),
    ("export", ["--data", "{root}/photos_none"], "holds no .jpg/.png images"),
    ("export", ["--out", "{root}/file.txt/out"], "not writable"),
    (
        "export",
        [
            "--model",
            "{model}",
            "--weights",
            "{ckpt}",
            "--img-size",
            "64x96",
            "--format",
            "onnx",
            "--out",
            "{good_parent}",
        ],
        "already holds onnx fp32; pass --force",
    ),
    (
        "export",
        [
            "--model",
            "{model}",
            "--weights",
            "{root}/other.pth",
            "--img-size",
            "64x96",
            "--format",
            "onnx",
            "--out",
            "{good_parent}",
        ],
        "holds artifacts that differ in weights",
    ),
    (
        "export",
        [
            "--model",
            "{model}",
            "--weights",
            "{ckpt}",
            "--img-size",
            "64x96",
            "--batch",
            "2",
            "--format",
            "onnx",
            "--out",
            "{good_parent}",
        ],
        "holds artifacts that differ in batch",
    ),
    # cloformer-validate
    ("validate", ["{root}/nope"], "does not exist; pass a folder written by cloformer-export"),
    ("validate", ["{root}/file.txt"], "is a file"),
    ("validate", ["{root}/emptydir"], "is not a bundle (no manifest.json)"),
    ("validate", ["{root}/b_empty"], "cannot be read: it is empty"),
    ("validate", ["{root}/b_badjson"], "is not valid JSON"),
    ("validate", ["{root}/b_list"], "has no 'model' section"),
    ("validate", ["{root}/b_nomodel"], "has no 'model' section"),
    ("validate", ["{root}/b_noname"], "model.name is missing"),
    ("validate", ["{root}/b_noartifacts"], "lists no artifacts"),
    ("validate", ["{root}/b_unknownmodel", "--weights", "{ckpt}"], "unknown model 'resnet50'"),
    (
        "validate",
        ["{root}/b_unknownformat", "--weights", "{ckpt}"],
        "format 'tensorrt', which this version does not know",
    ),
    ("validate", ["{root}/b_missing", "--weights", "{ckpt}"], "is listed in manifest.json but missing"),
    ("validate", ["{root}/b_changed", "--weights", "{ckpt}"], "changed since export (sha256 differs"),
    ("validate", ["{root}/b_notflite", "--weights", "{ckpt}"], "fp32.tflite is listed in manifest.json but missing"),
    ("validate", ["{root}/b_nolabels", "--weights", "{ckpt}"], "has no labels.txt"),
    ("validate", ["{good}"], "the bundle was exported from tiny.pth; pass --weights"),
    ("validate", ["{good}", "--weights", "{root}/nope.pth"], "'{root}/nope.pth' does not exist"),
    ("validate", ["{good}", "--weights", "{root}/emptydir"], "is a folder"),
    ("validate", ["{good}", "--weights", "{root}/other.pth"], "is not the checkpoint this bundle was exported from"),
    ("validate", ["{good}", "--weights", "{ckpt}", "--min-top1-agreement", "5"], "not a share from 0 to 1"),
    ("validate", ["{good}", "--weights", "{ckpt}", "--data", "{root}/file.txt"], "is a file"),
    ("validate", [], "the following arguments are required: bundle"),
    # cloformer-bench
    ("bench", ["--threads", "0"], "--threads 0 is out of range"),
    ("bench", ["--threads", "a"], "--threads 'a' is not a whole number"),
    ("bench", ["--threads", ","], "--threads: nothing given"),
    ("bench", ["--runs", "0"], "--runs 0 is out of range"),
    ("bench", ["--warmup", "-1"], "--warmup -1 is out of range"),
    ("bench", ["--precisions", "fp8"], "unknown precision 'fp8'"),
    ("bench", ["--formats", "tensorrt"], "unknown runtime 'tensorrt'"),
    ("bench", ["--model", "vgg"], "unknown model 'vgg'"),
    ("bench", ["--img-size", "100"], "multiple of 32"),
    ("bench", ["--img-size", "0"], "sizes must be positive"),
    ("bench", ["--weights", "{root}/emptydir"], "is a folder"),
    ("bench", ["--data", "{root}/photos_none"], "holds no .jpg/.png images"),
    ("bench", ["--out", "{root}/file.txt/x"], "not writable"),
    ("bench", ["--bundle", "{root}/b_badjson"], "is not valid JSON"),
    ("bench", ["--bundle", "{root}/b_missing", "--weights", "{ckpt}"], "is listed in manifest.json but missing"),
    (
        "bench",
        ["--bundle", "{root}/b_notflite", "--weights", "{ckpt}"],
        ".tflite is listed in manifest.json but missing",
    ),
    ("bench", ["--bundle", "{good}"], "the bundle was exported from tiny.pth; pass --weights"),
    ("bench", ["--bundle", "{good}", "--weights", "{root}/other.pth"], "is not the checkpoint this bundle"),
    ("bench", ["--bundle", "{good}", "--weights", "{ckpt}", "--model", "fat-b0"], "--bundle holds cloformer_tiny_test"),
    ("bench", ["--bundle", "{good}", "--weights", "{ckpt}", "--img-size", "224"], "--bundle is for 64x96 images"),
    ("bench", ["--peers", "nosuchmodel_x"], "'nosuchmodel_x' is neither a timm model nor a model of this project"),
    ("bench", ["--peers", "mobilenetv3_large_10"], "did you mean mobilenetv3_large_100"),
    ("bench", ["--peers", ","], "--peers: nothing given"),
    (
        "bench",
        ["--baselines", "--formats", "torch"],
        "--baselines/--peers are timed on onnxruntime, executorch-xnnpack and litert; add one",
    ),
    (
        "bench",
        ["--profile", "--formats", "torch"],
        "--profile reads the profilers of onnxruntime, executorch-xnnpack and litert; add one",
    ),
    ("bench", ["--ablation", "--baselines"], "--ablation times the deploy steps of one model; drop --baselines"),
    ("bench", ["--ablation", "--threads", "0"], "--threads 0 is out of range"),
    ("bench", ["--ablation", "--model", "vgg"], "unknown model 'vgg'"),
    ("bench", ["--ablation", "--target", "arm64"], "--ablation times on this machine; drop --target"),
    # what the machine cannot hold, found before any model is built (a shape-only pass on the meta device)
    ("export", ["--format", "onnx", "--img-size", "100000"], "--img-size 100000x100000 at --batch 1 needs about"),
    ("export", ["--img-size", "4096", "--batch", "64"], "but this machine has"),
    ("export", ["--num-classes", "1000000000"], "--num-classes 1000000000 is out of range"),
    ("bench", ["--img-size", "100000x100000"], "--img-size 100000x100000 needs about"),
    ("bench", ["--runs", "1000000000"], "--runs 1000000000 is out of range"),
    ("bench", ["--ablation", "--img-size", "65536"], "--img-size 65536x65536 needs about"),
    # a format's own options, given without any of its formats
    ("export", ["--format", "coreml", "--opset", "18"], "--opset applies to onnx; drop it or add --format onnx"),
    ("export", ["--format", "onnx", "--backend", "portable"], "--backend applies to executorch"),
    # targets (the ARM64 target's own checks, which depend on the host's QEMU, are in test_targets.py)
    ("export", ["--target", "mars"], "--target 'mars' is not a target; choose local, arm64, ssh://"),
    ("export", ["--cpu", "cortex-a76"], "--cpu chooses the emulated CPU of --target arm64"),
    ("validate", ["{good}", "--weights", "{ckpt}", "--target", "phone"], "--target 'phone' is not a target"),
    ("bench", ["--target", "x86"], "--target 'x86' is not a target"),
    ("bench", ["--cpu", "max"], "--cpu chooses the emulated CPU of --target arm64; drop it"),
    ("bench", ["--target", "ssh://pi@"], "'ssh://pi@' is not an SSH address; write ssh://[user@]host[:port]"),
    ("bench", ["--target", "ssh://pi@pi5:99999"], "is not an SSH address"),
    ("bench", ["--remote-python", "python3"], "--remote-python applies to an ssh:// or adb:// device"),
    ("bench", ["--cores", "4-7"], "--cores applies to an ssh:// or adb:// device"),
    ("bench", ["--cooldown", "-1"], "--cooldown -1 is out of range; give seconds from 0 to 3600"),
    ("bench", ["--runner", "fast"], "--runner 'fast' is not offered; choose from auto, native, python, both"),
    ("bench", ["--target", "adb://a b"], "is not an adb address; write adb://SERIAL"),
    ("bench", ["--ablation", "--cores", "4-7"], "--ablation times on this machine; drop --target"),
    ("bench", ["--target", "ssh://127.0.0.1:1"], "nothing listens there"),
    ("validate", ["{good}", "--weights", "{ckpt}", "--target", "ssh://127.0.0.1:1"], "cannot reach"),
    ("export", ["--target", "ssh://pi5", "--cpu", "cortex-a76"], "--cpu belongs to --target arm64"),
    ("export", ["--target", "ssh://pi5", "--remote-dir", "/tmp/my dir"], "--remote-dir '/tmp/my dir' has spaces"),
    # cloformer-device
    ("device", [], "choose an action: setup local|gpu|arm64|DEVICE, list, or check DEVICE"),
    ("device", ["check", "arm64"], "check 'arm64': give a device as ssh://"),
    ("device", ["check", "ssh://127.0.0.1:1"], "cannot reach ssh://127.0.0.1:1"),
    ("device", ["check", "ssh://127.0.0.1:1", "--cores", "x"], "cannot reach"),
    ("device", ["setup"], "the following arguments are required: target"),
    ("device", ["setup", "arm65"], "setup 'arm65': choose local, gpu, arm64, ssh://"),
    ("device", ["remove"], "invalid choice: 'remove'"),
    # cloformer-models
    ("models", ["--img-size", "100"], "not a multiple of 32"),
    ("models", ["--img-size", "0"], "sizes must be positive"),
]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("command, args, message", CASES, ids=[f"{c}:{' '.join(a)[:60]}" for c, a, _ in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(command, args, message, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default --out folders land here, where nothing may appear
    fill = {
        "root": str(inputs["root"]),
        "good": str(inputs["good"]),
        "ckpt": str(inputs["ckpt"]),
        "model": inputs["model"],
        "good_parent": str(inputs["good"].parent),
    }
    argv = [a.format(**fill) for a in args]
    if command in ("export", "bench") and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    watched = [inputs["root"], inputs["good"].parent]
    before = [_tree(w) for w in watched]
    try:
        rc = COMMANDS[command](argv + (["-q"] if command not in ("models", "device") else []))
    except SystemExit as e:  # argparse's own errors exit directly
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert message.format(**fill) in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"cloformer-{command}") and ": error: " in err.split("\n")[0]  # or "cloformer-device setup"
    assert list(tmp_path.iterdir()) == [] and [_tree(w) for w in watched] == before


def test_api_errors_name_keyword_arguments(tiny_bundle, tiny_variant, tiny_checkpoint):
    """The same check from Python speaks of keyword arguments, not flags."""
    from cloformer_deploy.pipeline import export

    with pytest.raises(InputError) as e:
        export(tiny_variant, weights=tiny_checkpoint, format="onnx", img_size=(64, 96), out=tiny_bundle.bundle.parent)
    assert "pass force=True" in str(e.value) and "--" not in str(e.value)
    assert "--force" in e.value.cli_message
    with pytest.raises(InputError, match=r"min_top1_agreement=5 is not a share"):
        export("cloformer_xxs", min_top1_agreement=5)
    with pytest.raises(InputError, match=r"img_size=0x0: sizes must be positive"):
        export("cloformer_xxs", img_size=0)


def test_interrupt_anywhere_is_one_line_and_leaves_no_folder(tiny_variant, tmp_path, capsys, monkeypatch):
    """Ctrl-C while a converter imports or exports: exit 130, one line, and no --out folder left behind."""
    from cloformer_deploy.formats import BACKENDS

    def interrupted(job, path, log):
        path.write_bytes(b"half a program")
        raise KeyboardInterrupt

    monkeypatch.setattr(BACKENDS["onnx"], "export", interrupted)
    out = tmp_path / "new" / "deeper"
    rc = export_main(
        [
            "--model",
            tiny_variant,
            "--format",
            "onnx",
            "--img-size",
            "64",
            "--num-classes",
            "10",
            "--no-validate",
            "--out",
            str(out),
            "-q",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 130 and err.endswith("interrupted; nothing was written") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []

    import cloformer_deploy.pipeline.exporter as api

    def interrupted_import(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "export", interrupted_import)
    assert export_main(["--out", str(out), "-q"]) == 130 and list(tmp_path.iterdir()) == []


def test_help_and_listing_import_no_torch():
    """--help, bad input and cloformer-models answer without importing torch or a converter."""
    code = (
        "import sys\nfrom cloformer_deploy.cli import models_main, export_main\nmodels_main([])\n"
        "try:\n    export_main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'coremltools', 'onnx', 'executorch') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "100"}
    ).stdout
    assert "HEAVY []" in out and "cloformer_xxs" in out and "4,166,728" in out and "--coreml-target" in out


@pytest.mark.parametrize(
    "command, args",
    [
        ("export", ["--img-size", "230"]),
        ("export", ["--format", "coreml", "--opset", "18"]),
        ("validate", ["/no/such/bundle"]),
        ("bench", ["--runs", "x"]),
        ("bench", ["--bundle", "/no/such/bundle"]),
        ("bench", ["--ablation", "--baselines"]),
    ],
)
def test_bad_input_imports_no_torch(command, args):
    """A bad option is answered before the pipeline (and torch with it) is imported."""
    code = (
        f"import sys\nfrom cloformer_deploy.cli import {command}_main\nrc = {command}_main({args!r})\n"
        "heavy = [m for m in ('torch', 'coremltools', 'onnx', 'executorch') if m in sys.modules]\n"
        "print('RC', rc, 'HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "RC 2 HEAVY []" in out, out


def test_listed_profiles_are_the_counted_ones():
    from cloformer_deploy.models import list_models, profile_model
    from cloformer_deploy.models.registry import PROFILE_224

    from helpers import TINY

    assert set(PROFILE_224) == set(list_models()) - {TINY}
    for name in PROFILE_224:
        p = profile_model(name, (224, 224))
        assert PROFILE_224[name] == (p.params, p.macs), name


def test_profile_at_another_size(capsys):
    assert models_main(["--img-size", "256x320"]) == 0
    out = capsys.readouterr().out
    assert "GMACs @256x320" in out and "cloformer_xxs" in out
