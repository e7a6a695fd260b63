"""Every program's settings in one pattern: a table of flags with DW_* environment fallbacks.

Each entry of a program's table (endpoint/config.py, worker/config.py, cron/config.py, the
deploy's) is a command-line flag with an environment variable as its fallback and a default;
`--help` is generated from the table. Every value is checked after parsing, all of them at
once, so that one run names every bad value; a bad one ends the program with its usage and
status 2 before it does anything.

A program that starts another one on a host hands it its settings as environment variables:
`environment(table, values)` gives them, named by the receiving program's own table, so that
the DW_* names are written once, in that table (an unknown setting is a KeyError, not a
variable nobody reads).

Standard library only, and Python 3.9 like the worker, which reads its settings with it:
provisioning copies this package (cli/) to the worker hosts beside worker/.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    env: str  # the environment fallback ("" for none)
    default: str
    parse: Callable[[str], Any]  # raises ValueError with what is wrong
    help: str
    many: bool = False  # a list: the flag given once per value (or comma-separated), the variable comma-separated


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_of(name: str, setting: Setting) -> str:
    """A list's name is plural, its flag (given once per value) singular: endpoints, --endpoint."""
    return flag(name[:-1] if setting.many and name.endswith("s") else name)


def text(value: str) -> str:
    return value.strip()


def whole(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    return number_of(int, "a whole number", "N", minimum, True, maximum)


def seconds(minimum: float = 0.0, inclusive: bool = False, maximum: float | None = None) -> Callable[[str], float]:
    """A finite number of seconds above `minimum` (or from it, with `inclusive`)."""
    return number_of(float, "a number of seconds", "S", minimum, inclusive, maximum)


def number_of(convert: Callable[[str], Any], noun: str, metavar: str, minimum: float, inclusive: bool,
              maximum: float | None) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        try:
            number = convert(value)
        except ValueError:
            raise ValueError(f"must be {noun}, not {value!r}") from None
        return in_range(number, minimum, inclusive, maximum)

    parse.metavar = metavar  # type: ignore[attr-defined]
    return parse


def in_range(number: Any, minimum: float, inclusive: bool, maximum: float | None) -> Any:
    below = number < minimum or (number == minimum and not inclusive)
    above = number > maximum if maximum is not None else number == math.inf
    if below or above or number != number:  # the last: nan, which compares false to everything
        wanted = f"{'at least' if inclusive else 'more than'} {minimum:g}"
        wanted += f" and at most {maximum:g}" if maximum is not None else ""
        raise ValueError(f"must be {wanted}, not {number}")
    return number


def choice(*names: str, fold: Callable[[str], str] = str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        folded = fold(value.strip())
        if folded not in names:
            raise ValueError(f"must be one of {', '.join(names)}, not {value!r}")
        return folded

    parse.metavar = "{" + ",".join(names) + "}"  # type: ignore[attr-defined]
    return parse


def add_settings(parser: argparse.ArgumentParser, table: Mapping[str, Setting],
                 defaults: Mapping[str, str] | None = None, environ: Mapping[str, str] = os.environ) -> None:
    """One flag per entry; the environment variable, else the (overridden) default, is the raw default."""
    for name, setting in table.items():
        default = (defaults or {}).get(name, setting.default)
        shown = [setting.env + (", comma-separated" if setting.many else "")] if setting.env else []
        if "default" not in setting.help and not (setting.many and not default):  # else the help says it
            shown.append(f"default {default or 'none'}")
        metavar = getattr(setting.parse, "metavar", flag_of(name, setting).split("-")[-1].upper())
        help_text = (setting.help + (f" [{', '.join(shown)}]" if shown else "")).replace("%", "%%")
        if setting.many:  # no flag given: None, and check_settings takes the variable or the default
            # The plural flag too (--instance-types a,b), as a list is often written.
            flags = dict.fromkeys((flag_of(name, setting), flag(name)))
            parser.add_argument(*flags, dest=name, action="append", metavar=metavar, help=help_text)
        else:
            raw = environ.get(setting.env, default) if setting.env else default
            parser.add_argument(flag(name), dest=name, default=raw, metavar=metavar, help=help_text)


def check_settings(parser: argparse.ArgumentParser, table: Mapping[str, Setting], args: argparse.Namespace,
                   defaults: Mapping[str, str] | None = None, environ: Mapping[str, str] = os.environ) -> None:
    """Replaces each raw value with its parsed one; every bad value is named, then usage and exit 2."""
    problems = []
    for name, setting in table.items():
        raw = getattr(args, name)
        if setting.many and raw is None:
            default = (defaults or {}).get(name, setting.default)
            raw = environ.get(setting.env, default) if setting.env else default
        try:
            setattr(args, name, parsed(setting, raw))
        except ValueError as exc:
            source = f" (from {setting.env})" if setting.env and raw == environ.get(setting.env) else ""
            problems.append(f"{flag_of(name, setting)} {exc}{source}")
    if problems:
        parser.error("; ".join(problems))


def parse_settings(parser: argparse.ArgumentParser, table: Mapping[str, Setting], argv: list[str] | None = None,
                   defaults: Mapping[str, str] | None = None,
                   environ: Mapping[str, str] = os.environ) -> argparse.Namespace:
    """The table's flags (and whatever the parser has besides), parsed and checked."""
    add_settings(parser, table, defaults, environ)
    args = parser.parse_args(argv)
    check_settings(parser, table, args, defaults, environ)
    return args


def read_environment(table: Mapping[str, Setting], environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Every setting from its variable, else its default, parsed: for a process that is handed its
    settings in its environment only. ValueError names every bad value."""
    values, problems = {}, []
    for name, setting in table.items():
        raw = environ.get(setting.env, setting.default) if setting.env else setting.default
        try:
            values[name] = parsed(setting, raw)
        except ValueError as exc:
            problems.append(f"{setting.env or flag(name)} {exc}")
    if problems:
        raise ValueError("; ".join(problems))
    return values


def parsed(setting: Setting, raw: str | list[str]) -> Any:
    if not setting.many:
        return setting.parse(raw)  # type: ignore[arg-type]
    items = [part for item in ([raw] if isinstance(raw, str) else raw) for part in item.split(",")]
    return [setting.parse(item) for item in items if item.strip()]


def environment(table: Mapping[str, Setting], values: Mapping[str, Any]) -> dict[str, str]:
    """The variables that give a program reading `table` these values (by setting name)."""
    variables = {}
    for name, value in values.items():
        setting = table[name]
        if not setting.env:
            raise ValueError(f"{flag_of(name, setting)} has no environment variable to hand it over in")
        variables[setting.env] = ",".join(map(format_value, value)) if setting.many else format_value(value)
    return variables


def format_value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
