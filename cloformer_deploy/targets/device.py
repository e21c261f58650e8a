"""The device side of an SSH target: what ``run.py`` in the device's work folder does when the host calls it.

The host copies this package into ``<work>/code/<hash>/`` (see :mod:`.ssh`) with a ``run.py``
that calls :func:`main`. Every call takes only plain words as arguments (hashes, relative paths,
core lists), so it survives any wrapper that re-parses the command (``proot-distro login ... --``).

- ``worker [--cores 4-7]``: the worker of :mod:`.worker`, pinned to those cores.
- ``have REL``: prints ``yes`` if ``<work>/REL`` exists.
- ``receive REL SHA256 SIZE [--tar]``: the file on stdin, checked against its hash and size, stored
  at ``<work>/REL`` (a tar is unpacked there); nothing is left half-written.

Only the standard library is imported here, except by ``worker``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
from pathlib import Path

CHUNK = 1 << 20


def _fail(message: str, code: int = 3) -> None:
    print(f"cloformer-device: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def receive(work: Path, rel: str, sha: str, size: int, is_tar: bool) -> None:
    dest = work / rel
    if dest.exists():
        return
    partial = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    digest, got = hashlib.sha256(), 0
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as f:
            while True:
                block = sys.stdin.buffer.read(CHUNK)
                if not block:
                    break
                digest.update(block)
                got += len(block)
                f.write(block)
        if got != size:
            _fail(f"{rel} arrived incomplete ({got} of {size} bytes); nothing was kept")
        if digest.hexdigest() != sha:
            _fail(f"{rel} arrived damaged (its SHA-256 differs); nothing was kept")
        if is_tar:
            unpacked = dest.parent / f".{dest.name}.unpacked-{os.getpid()}"
            with tarfile.open(partial) as tar:
                for member in tar.getmembers():  # our own tar: plain files and folders under one name
                    if member.name.startswith(("/", "..")) or ".." in Path(member.name).parts:
                        _fail(f"{rel}: unsafe path {member.name!r} in the archive")
                # the "data" filter where this Python has it (3.11.4+): no links out, no device files
                tar.extractall(unpacked, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            os.replace(unpacked / dest.name, dest)
            shutil.rmtree(unpacked, ignore_errors=True)
            partial.unlink()
        else:
            os.replace(partial, dest)
    except OSError as e:
        free = f" ({shutil.disk_usage(work).free / 1e6:.0f} MB free there)" if work.exists() else ""
        _fail(f"could not store {rel} in {work}: {e.strerror or e}{free}")
    finally:
        for leftover in dest.parent.glob(f".{dest.name}.*-{os.getpid()}") if dest.parent.exists() else []:
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def main(argv: list[str], work: Path) -> None:
    op, args = (argv[0], argv[1:]) if argv else ("", [])
    if op == "worker":
        from .worker import main as worker_main

        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        worker_main(args)
    elif op == "have":
        print("yes" if (work / args[0]).exists() else "no", flush=True)
    elif op == "receive":
        receive(work, args[0], args[1], int(args[2]), "--tar" in args[3:])
    else:
        _fail(f"unknown call {op!r}", 2)
