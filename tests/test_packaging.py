"""Every file the packages read at run time ships in the wheel: a non-Python file under engine/,
studies/ or tui/ must be declared in pyproject.toml's package-data (a user's `pip install .` copies
nothing else; the app's stylesheet was missing from the wheel until this test)."""
from __future__ import annotations

import fnmatch
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_data_file_of_the_packages_is_declared_package_data():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = [p for top in ("engine", "studies", "tui") for p in (ROOT / top).rglob("*")
             if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert files  # the stylesheet and the refusals at least
    missing = []
    for path in files:
        package, name = ".".join(path.parent.relative_to(ROOT).parts), path.name
        if not any(fnmatch.fnmatch(name, pattern) for pattern in declared.get(package, [])):
            missing.append(str(path.relative_to(ROOT)))
    assert missing == []
