"""The README documents every setting with its real default, so docs cannot drift from code."""

from __future__ import annotations

import shlex
import tomllib
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


def _quick_start_commands() -> list[str]:
    """The shell lines of the README's first section (up to the next ``##``), comments cut."""
    text = README.read_text("utf-8")
    section = text.split("\n## ", 2)[1]
    commands = []
    for block in section.split("```sh\n")[1:]:
        for line in block.split("```", 1)[0].splitlines():
            command = line.split(" #", 1)[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_quick_start_commands_work_in_a_fresh_terminal_of_the_checkout() -> None:
    """No activated virtual environment: each line is a `make` target the Makefile has, or a
    program of .venv/bin that the install puts there (a console script of pyproject.toml)."""
    root = README.parent
    makefile = (root / "Makefile").read_text("utf-8")
    scripts = tomllib.loads((root / "pyproject.toml").read_text("utf-8"))["project"]["scripts"]
    commands = _quick_start_commands()
    assert len(commands) >= 4, commands
    for command in commands:
        program, *args = shlex.split(command)
        if program == "make":
            target = next(arg for arg in args if "=" not in arg)
            assert f"\n{target}:" in makefile, command
        else:
            assert program.startswith(".venv/bin/"), f"needs an activated venv: {command}"
            assert program.removeprefix(".venv/bin/") in {*scripts, "python", "pip"}, command
