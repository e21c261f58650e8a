"""Checks of user input, shared by the Python API and the CLI; imports nothing heavy.

Every public entry point checks all of its options and file arguments with these before
it builds or converts a model, so that bad input is one sentence that names the fix and
nothing is written. Messages name options as command-line flags (``--force``); the same
error read from the Python API names the keyword argument instead (``force=True``): an option's
keyword is its flag's name (see :mod:`cloformer_deploy.options`).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

# the flags that are switches (--force): the API spells them name=True; options.py adds every one it declares
SWITCHES: set[str] = set()
# a flag, and its value where one follows (a quoted string or a number)
_MODEL_FLAG = re.compile(r"--model ([a-z][\w.-]*)")  # a model's name, unquoted in the flag's form
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?: ('[^']*'|-?\d[\w.]*))?")


class InputError(ValueError):
    """Bad input: one line that names the fix. ``str()`` speaks of keyword arguments, ``cli_message`` of flags."""

    def __init__(self, message: str):
        super().__init__(message)
        self.cli_message = message

    def __str__(self) -> str:
        text = _MODEL_FLAG.sub(lambda m: f"model={m.group(1)!r}", self.cli_message)
        return _FLAG.sub(_keyword, text)


def _keyword(m: re.Match) -> str:
    flag, value = m.group(1), m.group(2)
    name = flag[2:].replace("-", "_")
    if value is None and flag in SWITCHES:
        return f"{name}=True"
    return f"{name}={value}" if value is not None else name


def spoken_list(words) -> str:
    """ "a", "a and b", "a, b and c": names in a message."""
    words = list(words)
    return " and ".join(filter(None, [", ".join(words[:-1]), *words[-1:]]))


def whole_number(flag: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise InputError(f"{flag} {value!r} is not a whole number; give one such as {max(minimum, 1)}")
    n = int(value)
    if n < minimum or (maximum is not None and n > maximum):
        span = f"from {minimum} to {maximum}" if maximum is not None else f"{minimum} or more"
        raise InputError(f"{flag} {n} is out of range; give a whole number {span}")
    return n


def fraction(flag: str, value) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{flag} {value!r} is not a number; give a share from 0 to 1, such as 0.9") from None
    if not 0.0 <= x <= 1.0:
        hint = f" ({x:g}% is {x / 100:g})" if 2 <= x <= 100 else ""
        raise InputError(f"{flag} {x:g} is not a share from 0 to 1{hint}; give one such as 0.9")
    return x


def seconds(flag: str, value, maximum: float = 3600.0) -> float:
    """A duration in seconds, 0 to ``maximum``."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{flag} {value!r} is not a number of seconds; give one such as 30") from None
    if not 0.0 <= x <= maximum:
        raise InputError(f"{flag} {x:g} is out of range; give seconds from 0 to {maximum:g}")
    return x


def existing_file(flag: str, path, what: str) -> Path:
    """A readable regular file, or one line saying what it is instead."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{flag} {str(p)!r} does not exist; pass the path of {what}")
    if p.is_dir():
        raise InputError(f"{flag} {str(p)!r} is a folder; pass the path of {what}")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as e:
        raise InputError(f"{flag} {str(p)!r} cannot be read ({e.strerror}); pass {what} you can read") from None
    return p


def existing_folder(flag: str, path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        state = "is a file" if p.exists() else "does not exist"
        raise InputError(f"{flag} {str(p)!r} {state}; pass {what}")
    return p


def writable_folder(flag: str, path) -> Path:
    """Fail early, writing nothing that stays, when ``path`` (existing or not) cannot be created and written."""
    out = Path(path)
    probe = out.absolute()
    while not probe.exists():
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise OSError
        tempfile.TemporaryDirectory(dir=probe).cleanup()  # root passes os.access everywhere; try for real
    except OSError:
        raise InputError(f"{flag} {str(out)!r} is not writable; choose a folder you can write to") from None
    return out


def image_size(flag: str, value) -> tuple[int, int]:
    """``224``, ``(256, 320)`` or ``"256x320"`` as positive (H, W); the multiple-of-32 rule is the model's."""
    parts = value.lower().split("x") if isinstance(value, str) else ([value] if isinstance(value, int) else list(value))
    try:
        if isinstance(value, bool) or not 1 <= len(parts) <= 2:
            raise ValueError
        h, w = (int(str(v).strip()) for v in (parts * 2)[:2])
    except (TypeError, ValueError):
        raise InputError(f"{flag} {value!r} is not a size; use 224 or HxW such as 256x320") from None
    if h <= 0 or w <= 0:
        raise InputError(f"{flag} {h}x{w}: sizes must be positive; use 224 or HxW such as 256x320")
    return h, w


def choice(flag: str, value, options) -> str:
    options = list(options)
    key = str(value).strip()
    for o in options:
        if key.lower() == o.lower():
            return o
    raise InputError(f"{flag} {value!r} is not offered; choose from {', '.join(options)}")


def default_umask_mode(mode: int = 0o777) -> int:
    """``mode`` as the user's umask would leave it (mkdtemp makes 0700 folders; a bundle should not be)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def comma_list(flag: str, value, example: str) -> list[str]:
    """``"a,b"`` or a list, as a list of non-empty stripped strings."""
    if value is None or isinstance(value, (int, float)):
        value = [] if value is None else [value]
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(v).strip() for v in items if str(v).strip()]
    if not items:
        raise InputError(f"{flag}: nothing given; give a comma list such as {example}")
    return items


def thread_counts(flag: str, value) -> list[int]:
    """``"1,2"`` or ``[1, 2]`` as sorted distinct positive counts."""
    return sorted({whole_number(flag, v, 1, 256) for v in comma_list(flag, value, "1,2")})
