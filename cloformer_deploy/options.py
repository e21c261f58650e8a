"""Options objects: one dataclass per command, shared by the CLI and the Python API.

A field's name is its flag's name (``img_size`` is ``--img-size``, ``no_validate`` is ``--no-validate``);
its default, help text and the check of its value live beside it, in one place. The CLI builds the
object from the flags actually typed and the API from the keyword arguments actually passed, so each
object knows which fields were *given* and which hold a default (:meth:`Options.given`): a default is
never taken for a choice. Every check runs from :meth:`Options.checked` before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .inputs import SWITCHES, InputError

_GIVEN = "_given"
_CHECKED = "_checked"


def option(
    default: Any = None,
    help: str = "",
    *,
    check: Callable[[str, Any], Any] | None = None,
    positional: bool = False,
    metavar: str | None = None,
    cli: bool = True,
    short: str | None = None,
):
    """A field of an options object: its default, its help text, and ``check(flag, value) -> value``.

    A bool field is a switch that is off by default (``--force``; ``--no-validate``). ``cli=False``: a field
    of the Python API only (an object a program passes, such as the options of a device).
    """
    return field(
        default=default,
        metadata={
            "help": help,
            "check": check,
            "positional": positional,
            "metavar": metavar,
            "cli": cli,
            "short": short,
        },
    )


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class Options:
    """The base of every command's options; subclasses add fields made with :func:`option`."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, value in vars(cls).items():  # the switches, so that API messages say name=True
            if isinstance(value, dataclasses.Field) and isinstance(value.default, bool):
                SWITCHES.add(flag_of(name))

    def __post_init__(self):
        # built directly (Options(...), dataclasses.replace): what differs from its default was given
        if not hasattr(self, _GIVEN):
            changed = frozenset(f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default)
            object.__setattr__(self, _GIVEN, changed)

    # ---- construction
    @classmethod
    def of(cls, options: Options | None = None, **kwargs):
        """From the API's keyword arguments (the fields given), or an options object with some fields replaced."""
        names = cls.names()
        unknown = [k for k in kwargs if k not in names]
        # None for an option that has a value by default means "not given" (the API's old defaults were None)
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in kwargs.items() if not (v is None and defaults.get(k) is not None)}
        if unknown:
            raise InputError(
                f"{flag_of(unknown[0])} is not an option of this command; choose from "
                f"{', '.join(flag_of(n) for n in sorted(names))}"
            )
        if options is not None and not kwargs and isinstance(options, cls):
            return options  # as it is, checked or not
        if options is not None:
            if not isinstance(options, cls):
                raise InputError(
                    f"expected {cls.__name__}, got {type(options).__name__}; pass {cls.__name__}(...) "
                    "or keyword arguments"
                )
            made = dataclasses.replace(options, **kwargs)
            given = options.given() | frozenset(kwargs)
        else:
            made = cls(**kwargs)
            given = frozenset(kwargs)
        object.__setattr__(made, _GIVEN, given)
        return made

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def given(self) -> frozenset[str]:
        """The fields the user set (a flag typed, a keyword passed); the others hold their defaults."""
        return getattr(self, _GIVEN, frozenset())

    def was_given(self, name: str) -> bool:
        return name in self.given()

    # ---- the command line
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        """One argument per field: the flag, its help with the default, nothing set unless typed.

        Fields of a class that says ``fields_last`` (where the artifacts run, say) come after the command's own.
        """
        last = {
            f.name
            for base in cls.__mro__
            if vars(base).get("fields_last") and dataclasses.is_dataclass(base)
            for f in dataclasses.fields(base)
        }
        ordered = sorted(dataclasses.fields(cls), key=lambda f: f.name in last)
        for f in ordered:
            meta = f.metadata
            if not meta.get("cli", True) or f.name in skip:
                continue
            text = meta.get("help", "")
            if meta.get("positional"):
                parser.add_argument(f.name, help=text, metavar=meta.get("metavar"))
                continue
            names = [flag_of(f.name)] + ([meta["short"]] if meta.get("short") else [])
            if f.type in ("bool", bool) or isinstance(f.default, bool):
                parser.add_argument(*names, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=text)
            else:
                parser.add_argument(
                    *names, dest=f.name, default=argparse.SUPPRESS, metavar=meta.get("metavar"), help=text
                )

    @classmethod
    def from_args(cls, namespace: argparse.Namespace, **extra):
        """From parsed flags: only the flags typed are given (argparse sets nothing else)."""
        names = set(cls.names())
        given = {k: v for k, v in vars(namespace).items() if k in names}
        return cls.of(**given, **extra)

    # ---- checks
    def checked(self):
        """A copy with every field's value checked and normalised (InputError, one line, otherwise); an object
        this returned is not checked again (the CLI checks before importing the pipeline, the API after)."""
        if getattr(self, _CHECKED, False):
            return self
        values = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            check = f.metadata.get("check")
            values[f.name] = check(flag_of(f.name), value) if check is not None and value is not None else value
        out = dataclasses.replace(self, **values)
        object.__setattr__(out, _GIVEN, self.given())
        object.__setattr__(out, _CHECKED, True)
        return out

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
