"""The formats' registry: every format declares what the rest of the code asks of it, consistently."""

from __future__ import annotations

import pytest

from cloformer_deploy.formats import BACKENDS
from cloformer_deploy.formats.base import Backend

FORMATS = list(BACKENDS.values())


def test_registry_is_in_position_order_and_names_are_unique():
    positions = [b.position for b in FORMATS]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    runtimes = [r.name for b in FORMATS for r in b.bench_runtimes]
    aliases = [a for b in FORMATS for r in b.bench_runtimes for a in r.aliases]
    assert len(set(runtimes)) == len(runtimes) and not set(aliases) & set(runtimes)
    assert len({b.suffix for b in FORMATS}) == len(FORMATS)


@pytest.mark.parametrize("backend", FORMATS, ids=lambda b: b.name)
def test_a_format_declares_what_the_others_ask_of_it(backend):
    assert backend.label and backend.summary and backend.runtime and backend.suffix.startswith(".")
    assert backend.default_precision in backend.precisions
    assert set(backend.calibrated_precisions) <= set(backend.precisions)
    assert set(backend.calibration_recorded) <= set(backend.precisions)
    assert backend.bench_runtimes and backend.bench_runtimes[0].in_all  # its own artifacts run in --formats all
    assert all(r.label and r.short for r in backend.bench_runtimes)
    assert backend.runner_methods and backend.device_packages
    assert set(backend.manifest_required) <= set(backend.manifest_facts)
    for name, fact in backend.manifest_facts.items():
        assert fact.get("description"), f"{backend.name}: manifest fact {name} has no description"
    for name, spec in backend.options.items():
        assert spec.metadata.get("help"), f"{backend.name}: option {name} has no help"
    # a format that names a profiler has one
    assert (backend.profiler is not None) == (type(backend).profile is not Backend.profile)


@pytest.mark.parametrize("backend", FORMATS, ids=lambda b: b.name)
def test_options_at_their_defaults_pass_the_formats_own_check(backend):
    defaults = {name: spec.default for name, spec in backend.options.items()}
    assert backend.check_options(defaults) == defaults
