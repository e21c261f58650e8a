"""The options objects: one per command, field names = flag names, and what was given kept apart from defaults."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from cloformer_deploy.formats import BACKENDS
from cloformer_deploy.inputs import InputError
from cloformer_deploy.options import flag_of
from cloformer_deploy.pipeline.options import ExportOptions, ValidateOptions, export_checked
from cloformer_deploy.runtime_bench.options import BenchOptions
from cloformer_deploy.targets.options import CheckOptions, ListOptions, SetupOptions, TargetOptions

COMMANDS = [ExportOptions, ValidateOptions, BenchOptions, SetupOptions, ListOptions, CheckOptions]


def _parser(cls) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    cls.add_arguments(p)
    return p


@pytest.mark.parametrize("cls", COMMANDS, ids=lambda c: c.__name__)
def test_every_field_is_its_flag(cls):
    p = _parser(cls)
    flags = {s for a in p._actions for s in a.option_strings} | {a.dest for a in p._actions if not a.option_strings}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        assert (f.name if f.metadata.get("positional") else flag_of(f.name)) in flags, f.name
        assert f.metadata["help"], f"{f.name} has no help text"


def test_each_format_brings_its_own_options():
    names = {f.name for f in dataclasses.fields(ExportOptions)}
    for backend in BACKENDS.values():
        assert set(backend.options) <= names, backend.name


def test_only_typed_flags_are_given():
    args = _parser(BenchOptions).parse_args(["--bundle", "b", "--runs", "5"])
    opts = BenchOptions.from_args(args)
    assert opts.given() == {"bundle", "runs"}
    assert opts.img_size == 224 and not opts.was_given("img_size")  # the default, not a choice
    assert BenchOptions.of(bundle="b").given() == {"bundle"}


def test_cli_and_api_build_the_same_options():
    typed = ["--model", "fat-b0", "--format", "onnx,executorch", "--precision", "int8", "--no-validate", "--zip"]
    from_cli = ExportOptions.from_args(_parser(ExportOptions).parse_args(typed))
    from_api = ExportOptions.of(model="fat-b0", format="onnx,executorch", precision="int8", no_validate=True, zip=True)
    assert from_cli == from_api and from_cli.given() == from_api.given()
    checked, precisions = export_checked(from_api)
    assert checked.model == "fat_b0" and precisions == {"onnx": "int8", "executorch": "int8"}


def test_replacing_fields_keeps_what_was_given():
    base = BenchOptions.of(runs=3)
    more = BenchOptions.of(base, threads="1")
    assert more.runs == 3 and more.given() == {"runs", "threads"}


def test_unknown_keyword_names_the_options():
    with pytest.raises(InputError) as e:
        ExportOptions.of(formats="onnx")  # the bench's flag, not the export's
    assert "--formats is not an option" in e.value.cli_message and "--format" in e.value.cli_message
    with pytest.raises(InputError, match="expected ExportOptions"):
        ExportOptions.of(BenchOptions())


def test_target_options_are_shared_and_last_in_help():
    for cls in (ExportOptions, ValidateOptions, BenchOptions, CheckOptions):
        assert issubclass(cls, TargetOptions)
    help_text = _parser(ExportOptions).format_help()
    assert help_text.index("--model") < help_text.index("--format") < help_text.index("--target")


def test_built_directly_what_differs_from_the_default_is_given():
    assert BenchOptions(bundle="b", model="fat_b0").given() == {"bundle", "model"}
    assert dataclasses.replace(BenchOptions(), runs=3).given() == {"runs"}


def test_none_for_an_option_with_a_default_is_not_given():
    opts = BenchOptions.of(model=None, img_size=None, runs=5)
    assert opts.given() == {"runs"} and opts.model == "cloformer-xxs" and opts.img_size == 224


def test_a_format_option_at_its_default_is_no_choice():
    opts, precisions = export_checked(
        ExportOptions.of(format="coreml", opset=None, no_simplify=False, backend="xnnpack")
    )
    assert list(precisions) == ["coreml"]
    with pytest.raises(InputError, match="opset applies to onnx"):
        export_checked(ExportOptions.of(format="coreml", opset=18))
