"""The device side of an SSH target's Python worker: what ``run.py`` in the device's work folder does.

The host copies this package into ``<work>/code/<hash>/`` (see :mod:`.ssh`) with a ``run.py`` that calls
:func:`main`. Every call takes only plain words as arguments (core lists), so it survives any wrapper that
re-parses the command (``proot-distro login ... --``).

- ``worker [--cores 4-7]``: the worker of :mod:`.worker`, pinned to those cores.

Files reach the device through its shell (:mod:`.shell`), not through this module.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str], work: Path) -> None:
    op, args = (argv[0], argv[1:]) if argv else ("", [])
    if op != "worker":
        print(f"cloformer-device: unknown call {op!r}", file=sys.stderr, flush=True)
        sys.exit(2)
    from .worker import main as worker_main

    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    worker_main(args)
