"""The README lists exactly the options each AWS-path program takes: the flags in the first
column of its table are the flags its `--help` shows, no more and no fewer."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import PYTHON, REPO

FLAG = re.compile(r"--[a-z][a-z-]*")


def table_after(heading: str) -> list[str]:
    """The rows of the first table after the line that starts with `heading`."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    assert rows, f"no table after {heading!r}"
    return rows


def flags_in_first_column(rows: list[str]) -> set[str]:
    return {flag for row in rows[2:] for flag in FLAG.findall(row.split("|")[1])}


def flags_in_help(command: list[str]) -> set[str]:
    completed = subprocess.run([*command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    return set(re.findall(r"(?m)^  (--[a-z][a-z-]*)", completed.stdout)) - {"--help"}


@pytest.mark.parametrize(("heading", "command"), [
    ("Options of `./setup.sh aws`", [PYTHON, "-m", "deploy.aws_setup"]),
    ("Options of `./deploy.sh aws`", [PYTHON, "-m", "deploy.aws"]),
    ("The scaler's settings, all of them", [PYTHON, "-m", "cron.scale"]),
])
def test_the_readme_lists_exactly_the_options(heading: str, command: list[str]) -> None:
    documented = flags_in_first_column(table_after(heading))
    taken = flags_in_help(command)
    assert documented == taken, f"README only: {sorted(documented - taken)}; --help only: {sorted(taken - documented)}"
