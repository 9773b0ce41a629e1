"""Options declared once: dataclass fields that carry their own flag, help, choices and parser.

An option dataclass (``PruneOptions``, ``CheckOptions``, a criterion's own options such as
``OBSPAOptions``) declares each field with :func:`option`: its default, written once, and a
:class:`Flag` in the field's metadata. From that one declaration

* :func:`add_flags` makes the argparse flags of ``spa prune`` / ``spa apply`` (and through the
  parser's actions, :mod:`spa.config`'s TOML keys, checked by the same parsers);
* :func:`from_args` turns parsed flags back into the dataclass;
* :func:`like` copies a field into another dataclass (``PruneOptions`` holds the OBSPA options
  flat), default and metadata included, so nothing is written twice.

Closed sets are enums: the flag's choices are the members' values, parsed back to members.
Ratios are checked by :func:`check_ratio`, the one place that says what a ratio may be.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from spa.errors import OptionError

_KEY = "spa"
_UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET"})()  # no const: a value


@dataclass(frozen=True)
class Flag:
    """How one option field appears on the command line.

    ``help`` and ``choices`` may be callables, read when the parser is built (registries).
    A bool field is a switch; with ``negate`` its flag (``--no-…``) turns a True default off;
    with ``off`` (a ``bool | None`` field) the flag sets True, ``off`` sets False and neither
    leaves None. ``append``: a repeatable flag collected into a tuple. ``const``: the flag may
    be given without a value (``nargs="?"``), which stands for ``const``; ``resolve`` then maps
    the parsed value and all parsed flags to the field's value.
    """

    help: str | Callable[[], str]
    name: str | None = None  # the long flag; default: --field-name
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None
    enum: type[Enum] | None = None
    negate: bool = False
    off: tuple[str, str] | None = None  # (flag, help) of a tri-state's False
    append: bool = False
    const: Any = _UNSET
    resolve: Callable[[Any, argparse.Namespace], Any] | None = None
    group: str | None = None

    def flag(self, field: dataclasses.Field) -> str:
        return self.name or "--" + field.name.replace("_", "-")

    @staticmethod
    def dest(flag: str) -> str:
        return flag.lstrip("-").replace("-", "_")


def option(default: Any, **flag: Any) -> Any:
    """A dataclass field with ``default`` and a :class:`Flag` (``flag=None``: no flag)."""
    meta = {} if flag.get("help") is None else {_KEY: Flag(**flag)}
    return dataclasses.field(default=default, metadata=meta)


def like(cls: type, name: str) -> Any:
    """A fresh field equal to ``cls``'s field ``name``: same default, same flag."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=f.default, metadata=f.metadata)


def flag_of(field: dataclasses.Field) -> Flag | None:
    return field.metadata.get(_KEY)


def enum_values(obj: Any) -> None:
    """Turn the enum options of a frozen dataclass given as their values (``"calibration"``
    from the Python API, as the CLI parses them) into the enum's members. A string left as it
    is would compare unequal to every member and silently choose none of them."""
    for field in dataclasses.fields(obj):
        spec = flag_of(field)
        value = getattr(obj, field.name)
        if spec is not None and spec.enum is not None and isinstance(value, str):
            object.__setattr__(obj, field.name, _member(field.name, spec.enum, value))


def _member(name: str, enum: type[Enum], value: Any) -> Enum:
    """``enum(value)``; an unknown value is an :class:`OptionError` listing the known ones."""
    try:
        return enum(value)
    except ValueError:
        raise OptionError(f"{name}: {value!r} is not one of "
                          f"{', '.join(str(e.value) for e in enum)}") from None


def check_ratio(value: float, what: str = "ratio") -> float:
    """A ratio of something to remove lies in [0, 1); the one check every front end uses."""
    if not 0.0 <= value < 1.0:
        raise OptionError(f"{what} must be in [0, 1), got {value}")
    return value


def parse_ratio(text: str) -> float:
    """Parser of a ratio flag."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    try:
        return check_ratio(value)
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive(text: str) -> int:
    """Parser of an integer flag that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def share(text: str) -> float:
    """Parser of a float flag that must be in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_bytes(text: str) -> int:
    """Parser of a memory size: ``2GiB``, ``512MiB``, ``1.5GB``, ``1000000``."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 512MiB or 2GiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_input_dim(text: str) -> tuple[str, int]:
    """Parser of ``NAME=SIZE`` (a symbolic input dim's size)."""
    name, _, value = text.partition("=")
    try:
        size = int(value)
    except ValueError:
        size = 0
    if not name or size < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE with SIZE ≥ 1, got {text!r}")
    return name, size


class FromConfig(list):
    """A list default that came from the config file: the first flag on the command line
    replaces it instead of appending to it (see :class:`AppendOverride`)."""


class AppendOverride(argparse._AppendAction):
    """``action="append"`` whose command-line values replace a config file's list."""

    def __call__(self, parser, namespace, values, option_string=None):
        if isinstance(getattr(namespace, self.dest, None), FromConfig):
            setattr(namespace, self.dest, [])
        super().__call__(parser, namespace, values, option_string)


def add_flags(parser: argparse.ArgumentParser, cls: type, *, only: Sequence[str] | None = None,
              skip: Sequence[str] = (), grouped: bool | None = None,
              groups: dict[str, Any] | None = None) -> None:
    """Add a flag for every field of ``cls`` that has one (``only``: these fields, in this
    order; ``skip``: not these; ``grouped``: only those in an argument group, or only those
    not); a flag the parser already has (two dataclasses sharing it) is added once.
    ``groups``: the argument groups made so far, by title."""
    groups = {} if groups is None else groups
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in only if only is not None else [n for n in fields if n not in skip]:
        f = fields[name]
        spec = flag_of(f)
        if spec is None or spec.flag(f) in parser._option_string_actions or (
                grouped is not None and grouped != (spec.group is not None)):
            continue
        where = parser
        if spec.group is not None:
            if spec.group not in groups:
                groups[spec.group] = parser.add_argument_group(spec.group)
            where = groups[spec.group]
        _add(where, f, spec)


def _add(where, f: dataclasses.Field, spec: Flag) -> None:
    flag = spec.flag(f)
    text = spec.help() if callable(spec.help) else spec.help
    kw: dict[str, Any] = {"dest": Flag.dest(flag), "help": text}
    if spec.off is not None:
        pair = where.add_mutually_exclusive_group()
        pair.add_argument(flag, action="store_true", **kw)
        pair.add_argument(spec.off[0], action="store_true", dest=Flag.dest(spec.off[0]),
                          help=spec.off[1])
        return
    if f.type in ("bool", bool) or spec.negate:
        where.add_argument(flag, action="store_true", **kw)
        return
    if spec.metavar is not None:
        kw["metavar"] = spec.metavar
    if spec.enum is not None:
        kw["choices"] = [e.value for e in spec.enum]
    elif spec.choices is not None:
        kw["choices"] = spec.choices() if callable(spec.choices) else list(spec.choices)
    if spec.parse is not None:
        kw["type"] = spec.parse
    if spec.append:
        where.add_argument(flag, action=AppendOverride, default=[], **kw)
        return
    if spec.const is not _UNSET:
        kw.update(nargs="?", const=spec.const)
    default = f.default.value if isinstance(f.default, Enum) else f.default
    where.add_argument(flag, default=False if spec.const is True else default, **kw)


def from_args(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """``cls`` from parsed flags: every field with a flag reads it; ``given`` wins."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        spec = flag_of(f)
        if f.name in given or spec is None:
            continue
        value = getattr(args, Flag.dest(spec.flag(f)))
        if spec.off is not None:
            value = True if value else False if getattr(args, Flag.dest(spec.off[0])) else None
        elif spec.negate:
            value = not value
        elif spec.append:
            value = tuple(value)
        elif spec.enum is not None and value is not None:
            value = spec.enum(value)
        if spec.resolve is not None:
            value = spec.resolve(value, args)
        values[f.name] = value
    return cls(**values, **given)


def replace_checked(options: Any, values: dict[str, Any]) -> Any:
    """``options`` with ``values`` (keywords of the Python API: enum members or their
    values, lists for tuples); an unknown name is an :class:`OptionError`."""
    fields = {f.name: f for f in dataclasses.fields(options)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise OptionError(f"unknown option(s) {', '.join(unknown)} for "
                          f"{type(options).__name__} (options: {', '.join(fields)})")
    out = {}
    for name, value in values.items():
        spec = flag_of(fields[name])
        if spec is not None and spec.enum is not None and not isinstance(value, Enum) \
                and value is not None:
            value = _member(name, spec.enum, value)
        elif isinstance(value, list):
            value = tuple(value)
        out[name] = value
    return dataclasses.replace(options, **out)
