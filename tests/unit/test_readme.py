"""The README documents every setting with its real default, so docs cannot drift from code."""

from __future__ import annotations

from pathlib import Path

from listener.settings import settings_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_table_matches_the_code() -> None:
    text = README.read_text("utf-8")
    for variable, default, description in settings_table():
        assert f"| `{variable}` | {default} | {description} |" in text, variable


def test_readme_names_the_test_command_that_ci_runs() -> None:
    ci = (README.parent / ".ci" / "run").read_text("utf-8")
    assert "make test" in ci
    assert "make test" in README.read_text("utf-8")
