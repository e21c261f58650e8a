"""The published schemas: every manifest the project writes conforms to manifest.schema.json, a manifest that
breaks it is refused in one line by cloformer-validate and cloformer-bench, the reference results.json files
conform to results.schema.json, and docs/ shows the schemas as they are."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cloformer_deploy.cli import bench_main, export_main, validate_main
from cloformer_deploy.pipeline import bundle as bundle_io
from cloformer_deploy.pipeline import schema

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_RESULTS = sorted((ROOT / "runtime_bench" / "reference").glob("*/results.json"))


def _conforms(manifest: dict) -> None:
    assert schema.problem("manifest", manifest) is None, schema.problem("manifest", manifest)


def _loopback_sshd():
    """tests/loopback_sshd.py, imported by its path (the tests run with --import-mode=importlib)."""
    import importlib.util

    if "loopback_sshd" not in sys.modules:
        spec = importlib.util.spec_from_file_location("loopback_sshd", Path(__file__).with_name("loopback_sshd.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["loopback_sshd"] = module
        spec.loader.exec_module(module)
    return sys.modules["loopback_sshd"]


def _random_onnx_bundle(model: str, out: Path) -> Path:
    """The tiny model with random weights, ONNX fp32 at 64x64, exported with --no-validate (seconds)."""
    assert (
        export_main(
            [
                "--model",
                model,
                "--num-classes",
                "10",
                "--format",
                "onnx",
                "--img-size",
                "64",
                "--no-validate",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    return out / f"{model}-64x64"


@pytest.fixture(scope="module")
def exported(tiny_variant, tiny_checkpoint, tmp_path_factory):
    """The tiny model at 64x64 from a checkpoint: ONNX fp32, Core ML fp16 and ExecuTorch fp32 in one export, then
    ONNX int8 added by a second export (which reads the first's manifest and keeps its artifacts)."""
    out = tmp_path_factory.mktemp("schema")
    common = ["--model", tiny_variant, "--weights", str(tiny_checkpoint), "--img-size", "64", "--out", str(out), "-q"]
    assert export_main(common + ["--format", "onnx,coreml,executorch"]) == 0
    folder = out / f"{tiny_variant}-64x64"
    first = json.loads((folder / "manifest.json").read_text())
    assert export_main(common + ["--format", "onnx", "--precision", "int8"]) == 0
    return {
        "folder": folder,
        "first": first,
        "final": json.loads((folder / "manifest.json").read_text()),
        "ckpt": tiny_checkpoint,
    }


@pytest.mark.e2e
def test_every_manifest_the_exports_write_conforms(exported):
    for manifest in (exported["first"], exported["final"]):
        _conforms(manifest)
        assert manifest["schema_version"] == bundle_io.SCHEMA_VERSION
    kinds = sorted((a["format"], a["precision"]) for a in exported["final"]["artifacts"])
    assert kinds == [("coreml", "fp16"), ("executorch", "fp32"), ("onnx", "fp32"), ("onnx", "int8")]
    int8 = next(a for a in exported["final"]["artifacts"] if a["precision"] == "int8")
    assert int8["calibration"]["images"] > 0 and int8["quantization"]["format"] == "QDQ"
    assert bundle_io.read_manifest(exported["folder"]) == exported["final"]


@pytest.mark.e2e
def test_random_weights_exported_without_validation_conform(tiny_variant, tmp_path):
    """No checkpoint (random_seed recorded) and --no-validate (validation_images null, no validation)."""
    manifest = json.loads((_random_onnx_bundle(tiny_variant, tmp_path / "out") / "manifest.json").read_text())
    _conforms(manifest)
    assert manifest["model"]["random_init"] and "random_seed" in manifest["model"]
    assert manifest["validation_images"] is None and "validation" not in manifest["artifacts"][0]


@pytest.mark.slow
def test_a_manifest_validated_on_a_device_conforms(tiny_variant, tmp_path, native_runners):
    """cloformer-validate --target ssh:// rewrites the manifest with what the device measured; on a bundle exported
    with --no-validate that is ``validation.targets`` alone. The device is this machine over a loopback sshd."""
    loopback_sshd = _loopback_sshd()
    why = loopback_sshd.available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must validate on the ssh:// target: {why}")
        pytest.skip(why)
    folder = _random_onnx_bundle(tiny_variant, tmp_path / "out")
    server = loopback_sshd.start(tmp_path / "sshd")
    try:
        assert (
            validate_main(
                [
                    str(folder),
                    "--target",
                    server.address,
                    "--ssh-config",
                    str(server.config),
                    "--remote-python",
                    sys.executable,
                    "--remote-dir",
                    str(tmp_path / "device"),
                    "-q",
                ]
            )
            == 0
        )
    finally:
        server.stop()
    manifest = json.loads((folder / "manifest.json").read_text())
    _conforms(manifest)
    on_device = manifest["artifacts"][0]["validation"]["targets"][server.address]
    assert on_device["ran"] and on_device["passed"] and on_device["target"]["kind"] == "ssh"


# ---- a manifest that breaks the schema: one line, exit 2, from both commands that read bundles -----------------

DAMAGE = {
    "missing key": (
        lambda m: m["artifacts"][0].pop("sha256"),
        "manifest.json: artifacts[0].sha256 is missing; export the bundle again",
    ),
    "wrong type": (
        lambda m: m["model"].update(batch="1"),
        "manifest.json: model.batch is '1' (a string), not an integer; export the bundle again",
    ),
    "old schema": (
        lambda m: m.update(schema_version=0),
        "manifest.json was written by an older version of cloformer-deploy (schema 0; this one reads "
        "schema 1); export it again",
    ),
    "wrong enum": (
        lambda m: m["artifacts"][1].update(precision="fp8"),
        "artifacts[1] has precision 'fp8', which is not offered when format is coreml",
    ),
}


def _damaged(exported, tmp_path, damage) -> Path:
    folder = tmp_path / exported["folder"].name
    shutil.copytree(exported["folder"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    damage(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["validate", "bench"])
@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_manifest_that_breaks_the_schema_is_refused_in_one_line(exported, tmp_path, capsys, case, command):
    damage, message = DAMAGE[case]
    folder = _damaged(exported, tmp_path, damage)
    if command == "validate":
        rc = validate_main([str(folder), "--weights", str(exported["ckpt"]), "-q"])
    else:
        rc = bench_main(
            [
                "--bundle",
                str(folder),
                "--weights",
                str(exported["ckpt"]),
                "--formats",
                "onnxruntime",
                "--out",
                str(tmp_path / "bench"),
                "-q",
            ]
        )
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and message in err, err
    assert err.startswith(f"cloformer-{command}: error: ")
    assert not (tmp_path / "bench").exists()


@pytest.mark.e2e
def test_an_old_bundle_is_refused_by_the_installed_command_without_traceback(exported, tmp_path):
    folder = _damaged(exported, tmp_path, DAMAGE["old schema"][0])
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from cloformer_deploy.cli import validate_main; sys.exit(validate_main(sys.argv[1:]))",
            str(folder),
            "--weights",
            str(exported["ckpt"]),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"cloformer-validate: error: {folder / 'manifest.json'} was written by "
        "an older version of cloformer-deploy (schema 0; this one reads "
        "schema 1); export it again"
    ]


@pytest.mark.e2e
def test_newer_and_missing_schema_versions_say_which(exported):
    for version, words in ((2, "a newer version of cloformer-deploy (schema 2;"), (None, "(no schema_version;")):
        manifest = copy.deepcopy(exported["final"])
        manifest.pop("schema_version") if version is None else manifest.update(schema_version=version)
        with pytest.raises(bundle_io.BundleError, match=r"^manifest.json was written by .*") as e:
            bundle_io.check_manifest(manifest)
        assert words in str(e.value) and "\n" not in str(e.value)


# ---- results.json ----------------------------------------------------------------------------------------------


def test_reference_results_conform():
    assert REFERENCE_RESULTS, "runtime_bench/reference/*/results.json: no reference runs found"
    for path in REFERENCE_RESULTS:
        schema.check("results", json.loads(path.read_text()))  # raises SchemaError with one line otherwise


def test_results_that_break_the_schema_are_refused_in_one_line():
    results = json.loads(REFERENCE_RESULTS[0].read_text())
    cases = [
        (lambda r: r["rows"][2].pop("latency_ms"), "results.json: rows[2].latency_ms is missing"),
        (lambda r: r["config"].update(threads="1,2"), "results.json: config.threads is '1,2' (a string), not an array"),
        (
            lambda r: r["rows"][0].update(runtime="tensorrt"),
            "results.json: rows[0] has runtime 'tensorrt', which this version does not know",
        ),
        (lambda r: r.update(schema_version=2), "results.json: schema_version is 2 (an integer), not 1"),
    ]
    for damage, message in cases:
        broken = copy.deepcopy(results)
        damage(broken)
        with pytest.raises(schema.SchemaError) as e:
            schema.check("results", broken)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


# ---- the schemas themselves --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(schema.SCHEMAS))
def test_schema_ships_in_the_package_and_is_a_valid_2020_12_schema(name):
    from jsonschema import Draft202012Validator

    assert schema.schema_file(name).is_file()  # read through importlib.resources, as an installed wheel is
    Draft202012Validator.check_schema(schema.load(name))


def test_schema_versions_agree_with_the_code():
    assert schema.load("manifest")["properties"]["schema_version"]["const"] == bundle_io.SCHEMA_VERSION
    assert schema.load("results")["properties"]["schema_version"]["const"] == schema.RESULTS_SCHEMA_VERSION


def test_closed_lists_in_the_schemas_match_the_registries():
    """The schemas' closed lists are the registries' (formats, precisions and runtimes are assembled from them)."""
    from cloformer_deploy.formats import BACKENDS
    from cloformer_deploy.formats.coreml import TARGETS
    from cloformer_deploy.formats.coreml_placement import COMPUTE_UNITS
    from cloformer_deploy.models.registry import VARIANTS
    from cloformer_deploy.runtime_bench.runtimes import RUNTIMES

    m, r = schema.load("manifest")["$defs"], schema.load("results")["$defs"]
    fix = "; edit the schema under cloformer_deploy/ and regenerate docs/ (python -m cloformer_deploy.pipeline.schema NAME)"
    art = m["artifact"]["properties"]
    assert art["format"]["enum"] == list(BACKENDS), "artifact.format" + fix
    offered = [p for p in art["precision"]["enum"] if any(p in b.precisions for b in BACKENDS.values())]
    assert offered == art["precision"]["enum"] and set(offered) == {p for b in BACKENDS.values() for p in b.precisions}
    for rule in m["artifact"]["allOf"]:  # the precisions a format offers, where it offers fewer than all
        fmt = rule["if"]["properties"].get("format", {}).get("const")
        if fmt and "precision" in rule["then"].get("properties", {}):
            assert set(rule["then"]["properties"]["precision"]["enum"]) == set(BACKENDS[fmt].precisions), fmt + fix
    assert art["minimum_deployment_target"]["enum"] == list(TARGETS), "minimum_deployment_target" + fix
    assert m["validation"]["properties"]["compute_units"]["enum"] == list(COMPUTE_UNITS)
    assert set(m["model"]["properties"]["family"]["enum"]) == {v.family for v in VARIANTS.values()}, "family" + fix
    assert r["row"]["properties"]["runtime"]["enum"] == list(RUNTIMES), "results row.runtime" + fix
    assert r["row"]["properties"]["precision"]["enum"] == art["precision"]["enum"]


def test_definitions_shared_by_both_schemas_are_the_same():
    m, r = schema.load("manifest")["$defs"], schema.load("results")["$defs"]
    for name in ("sha256", "timestamp", "command", "versions", "target", "vs_local", "placement"):
        assert m[name] == r[name], f"$defs/{name} differs between the manifest and results schemas"


@pytest.mark.parametrize("name", list(schema.SCHEMAS))
def test_docs_show_the_current_schema(name):
    page = ROOT / schema.SCHEMAS[name][3]
    command = f"python -m cloformer_deploy.pipeline.schema {name} > {schema.SCHEMAS[name][3]}"
    assert page.is_file(), f"{page.relative_to(ROOT)} is missing; write it: {command}"
    assert page.read_text() == schema.render(name), f"{page.relative_to(ROOT)} is stale; regenerate it: {command}"


def test_module_entry_renders_and_refuses_an_unknown_name(capsys):
    assert schema.main(["manifest"]) == 0
    assert capsys.readouterr().out == schema.render("manifest")
    assert schema.main(["nope"]) == 2
    assert "usage: python -m cloformer_deploy.pipeline.schema" in capsys.readouterr().err


def test_a_fact_two_formats_record_keeps_both_descriptions_and_refuses_a_conflict():
    from cloformer_deploy.pipeline.schema import _merged_fact

    a = {"type": "object", "description": "A.", "properties": {"w": {"type": "string", "description": "wa."}}}
    b = {"type": "object", "description": "B.", "properties": {"w": {"type": "string", "description": "wb."}}}
    merged = _merged_fact("q", a, b)
    assert merged["description"] == "A. B." and merged["properties"]["w"]["description"] == "wa. wb."
    with pytest.raises(ValueError, match="different schemas"):
        _merged_fact("q", a, {**b, "type": "string"})
    with pytest.raises(ValueError, match="q.w"):
        _merged_fact("q", a, {**b, "properties": {"w": {"type": "integer", "description": "x"}}})
