"""``--config FILE.toml``: every option of a subcommand, read from a TOML file.

Keys are the long option names, with dashes or underscores (``round-to``, ``round_to``,
``no-validate``). They sit at the top level or in a table named after the subcommand
(``[prune]``, ``[apply]``, ``[analyze]``); the table wins over the top level. Flags given on the
command line win over the file.

Each value is checked by the option's own argparse action: its ``type`` function runs on the
value and its ``choices`` apply, so ``ratio = 1.5`` is refused with the same message as
``--ratio 1.5``. Unknown keys, positional arguments and wrong types raise one
:class:`~spa.errors.OptionError` naming the file and the key. Checked values become the
subparser's defaults, so the second parse lets the command line override them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spa.errors import OptionError
from spa.options import AppendOverride, FromConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

if TYPE_CHECKING:
    from collections.abc import Sequence

COMMAND_TABLES = ("analyze", "prune", "apply", "recover")
_NOT_IN_FILE = {"help", "config", "version"}
__all__ = ["AppendOverride", "FromConfig", "config_defaults", "find_config"]


def find_config(argv: Sequence[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (``--config F`` or ``--config=F``), if any."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(list(argv))
    return known.config


def load_toml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise OptionError(f"--config {path}: no such file")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise OptionError(f"--config {path}: not valid TOML ({exc})") from exc


def config_defaults(path: str, command: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Checked ``{dest: value}`` for ``command``'s subparser from the TOML file at ``path``."""
    body = load_toml(path)
    options = {k: v for k, v in body.items() if k not in COMMAND_TABLES}
    table = body.get(command, {})
    if not isinstance(table, dict):
        raise OptionError(f"--config {path}: '{command}' must be a table ([{command}])")
    options.update(table)  # other commands' tables are for those commands
    by_name = _long_options(parser)
    defaults: dict[str, Any] = {}
    for key, value in options.items():
        name = key.replace("_", "-")
        action = by_name.get(name)
        if action is None or name in _NOT_IN_FILE:
            raise OptionError(f"--config {path}: unknown key '{key}' for spa {command} "
                              "(keys are the long option names; see spa "
                              f"{command} --help)")
        where = f"--config {path}: key '{key}'"
        defaults[action.dest] = _checked(action, value, where)
    return defaults


def _long_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    out = {}
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                out[opt[2:]] = action
    return out


def _checked(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` as the command line would have produced it, or an OptionError."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise OptionError(f"{where}: expected true or false, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, argparse._AppendAction):
        if isinstance(value, dict):  # input-dim = {height = 224}
            value = [f"{k}={v}" for k, v in value.items()]
        items = value if isinstance(value, list) else [value]
        return FromConfig(_scalar(action, v, where) for v in items)
    if action.nargs == "?" and isinstance(value, bool):  # --hidden [R]: true = the flag alone
        return action.const if value else action.default
    if isinstance(value, (list, dict)):
        raise OptionError(f"{where}: expected a single value, got {value!r}")
    return _scalar(action, value, where)


def _scalar(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise OptionError(f"{where}: expected a {'number' if action.type else 'string'}, "
                          f"got {value!r}")
    if action.type is None and not isinstance(value, str):
        raise OptionError(f"{where}: expected a string, got {value!r}")
    try:
        converted = action.type(str(value)) if callable(action.type) else value
    except argparse.ArgumentTypeError as exc:
        raise OptionError(f"{where}: {exc}") from None
    except (ValueError, TypeError):
        raise OptionError(f"{where}: invalid value {value!r}") from None
    if action.choices is not None and converted not in action.choices:
        raise OptionError(f"{where}: {converted!r} is not one of "
                          f"{', '.join(map(str, action.choices))}")
    return converted
