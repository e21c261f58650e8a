"""Which versions of Python distributions are installed, read the same way on the host and on a device.

Standard library only: a device's first-contact probe imports it before it knows that numpy (or
anything else) is there.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version


def installed_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Each distribution's installed version, None for one that is not installed."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
