"""Settings tables for the scaler and the AWS commands, in the pattern of endpoint/config.py:
each setting is a command-line flag with a DW_* environment fallback and a default, and
`--help` is generated from the table.

Every value is checked after parsing, all of them at once, so that one run names every bad
value; a bad one ends the command with its usage and status 2 before it does anything. The
deploy takes the scaler's own entries for the knobs it hands to the endpoint hosts, so a value
the deploy accepts is one the hosts' scalers accept.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    env: str  # the environment fallback ("" for none)
    default: str
    parse: Callable[[str], Any]  # raises ValueError with what is wrong
    help: str


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
        raw = environ.get(setting.env, default) if setting.env else default
        shown = [setting.env] if setting.env else []
        if "default" not in setting.help:  # else the help says it
            shown.append(f"default {default or 'none'}")
        metavar = getattr(setting.parse, "metavar", name.split("_")[-1].upper())
        help_text = setting.help + (f" [{', '.join(shown)}]" if shown else "")
        parser.add_argument(flag(name), dest=name, default=raw, metavar=metavar, help=help_text.replace("%", "%%"))


def check_settings(parser: argparse.ArgumentParser, table: Mapping[str, Setting], args: argparse.Namespace) -> None:
    """Replaces each raw value with its parsed one; every bad value is named, then usage and exit 2."""
    problems = []
    for name, setting in table.items():
        raw = getattr(args, name)
        try:
            setattr(args, name, setting.parse(raw))
        except ValueError as exc:
            source = f" (from {setting.env})" if setting.env and raw == os.environ.get(setting.env) else ""
            problems.append(f"{flag(name)} {exc}{source}")
    if problems:
        parser.error("; ".join(problems))


def environment_of(table: Mapping[str, Setting], args: argparse.Namespace, names: Iterable[str]) -> dict[str, str]:
    """The DW_* variables that give a program reading `table` these values of `args`."""
    return {table[name].env: format_value(getattr(args, name)) for name in names}


def format_value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
