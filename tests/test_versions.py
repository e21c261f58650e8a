"""The pinned stack: what pyproject.toml pins is what is installed, and torch and executorch stay a pair."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import tomllib
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# each ExecuTorch release is built against one torch minor release; its Python runtime links that libtorch
PAIRED_TORCH = {"1.4": "2.13", "1.5": "2.14"}


def _pins() -> dict[str, str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]
    return {m.group(1).lower(): m.group(2) for s in specs if (m := re.match(r"^([A-Za-z0-9_.-]+)==([^;\s]+)", s))}


def test_torch_and_executorch_are_pinned_as_a_pair():
    pins = _pins()
    et_minor = ".".join(pins["executorch"].split(".")[:2])
    assert et_minor in PAIRED_TORCH, f"executorch {pins['executorch']}: add its torch release to PAIRED_TORCH"
    assert pins["torch"].startswith(PAIRED_TORCH[et_minor] + "."), (pins["torch"], pins["executorch"])


@pytest.mark.parametrize("package", ["torch", "executorch", "coremltools", "torchvision"])
def test_installed_versions_are_the_pinned_ones(package):
    pin = _pins()[package]
    try:
        installed = version(package)
    except PackageNotFoundError:
        if package == "torchvision":
            pytest.skip("torchvision comes with the 'peers' extra, which is not installed")
        raise
    assert Version(installed).public == Version(pin).public, (
        f"{package} {installed} is installed but pyproject.toml pins {pin}"
    )
