"""The settings module is the one list of environment variables, and the README shows it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bentospec import settings
from tests.conftest import ROOT

GENERATED = re.compile(
    r"<!-- generated: python -m bentospec.settings -->\n(.*?)<!-- end generated -->", re.S
)


def test_readme_lists_the_declared_variables() -> None:
    """The README's table is the settings module's (``python -m bentospec.settings``)."""
    match = GENERATED.search((ROOT / "README.md").read_text(encoding="utf-8"))
    assert match is not None
    assert match.group(1) == settings.markdown_table()


def _sources() -> list[Path]:
    tracked = [ROOT / "service.py", ROOT / "Makefile", ROOT / "README.md"]
    return tracked + [
        path
        for folder in ("bentospec", "tests", "docs", "deploy")
        for path in sorted((ROOT / folder).rglob("*"))
        if path.suffix in {".py", ".md", ".yaml"}
    ]


def test_every_bentospec_variable_mentioned_is_declared() -> None:
    declared = {var.name for var in settings.VARIABLES}
    mentioned = {
        (path.relative_to(ROOT), name)
        for path in _sources()
        for name in re.findall(r"\bBENTOSPEC_[A-Z_]*[A-Z]\b", path.read_text(encoding="utf-8"))
    }
    assert {(path, name) for path, name in mentioned if name not in declared} == set()


@pytest.mark.parametrize(
    ("value", "expected"), [(None, False), ("", False), ("0", False), ("1", True)]
)
def test_unset_or_empty_is_the_default(value: str | None, expected: bool) -> None:
    environ = {} if value is None else {settings.ENFORCE_EAGER.name: value}
    assert settings.ENFORCE_EAGER.get(environ) is expected
    assert settings.CONFIG_DIR.get({}) == ROOT / "configs"
