"""One room per role: what each folder of project code may import of the others (README, Layout).

The worker and cli/ are copied alone to the worker hosts, so they import nothing else of the
project; the scaler runs on the endpoint hosts, which get no deploy/; the deploy takes only the
settings tables of the programs it installs. Every module opens with a docstring.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("endpoint", "worker", "cron", "deploy", "cloud", "cli")
# package -> what of the other packages it may import (a package, or one module of it)
ALLOWED = {
    "cli": set(),
    "cloud": {"cli"},
    "worker": {"cli"},
    "endpoint": {"cli"},
    "cron": {"cli", "cloud", "endpoint.secret", "worker.config"},  # the endpoint's file: never (one writer)
    "deploy": {"cli", "cloud", "cron.config", "endpoint.config"},
}


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """The project modules `path` imports, as dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return {name for name in names if name.split(".")[0] in PACKAGES}


def allowed(package: str, name: str) -> bool:
    if name.split(".")[0] == package:
        return True
    return any(name == rule or name.startswith(rule + ".") for rule in ALLOWED[package])


@pytest.mark.parametrize("package", PACKAGES)
def test_each_folder_imports_only_what_its_room_allows(package: str) -> None:
    wrong = {f"{path.relative_to(REPO)}: {name}" for path in modules(package) for name in imported(path)
             if not allowed(package, name)}
    assert not wrong, sorted(wrong)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_opens_with_a_docstring(package: str) -> None:
    missing = [str(path.relative_to(REPO)) for path in modules(package)
               if not ast.get_docstring(ast.parse(path.read_text()))]
    assert not missing
