"""The newcomer's first hour: ``dev`` in one terminal, then the commands it suggests and the
admin commands in a second terminal that has no DATABASE_URL and no virtual environment on its
PATH, in the same checkout (here: a fresh directory, the default ``--data-dir``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.png import read_png_size, read_png_text, solid_png
from tests.support.daemon_process import cli

pytestmark = pytest.mark.e2e
HINT = "try it from another terminal here: "
EMBEDDED = "using the embedded database of `dev`"


def fresh_terminal_env() -> dict[str, str]:
    """A new shell's environment: no database or OpenAI settings, and the PATH without this
    virtual environment's bin (nobody activated it)."""
    venv_bin = str(Path(sys.executable).parent)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("IMAGE_LISTENER_", "OPENAI_", "SUPABASE_", "DATABASE_URL"))
        and k != "VIRTUAL_ENV"
    }
    env["PATH"] = os.pathsep.join(
        part for part in env.get("PATH", "").split(os.pathsep) if part and part != venv_bin
    )
    env["IMAGE_LISTENER_LOG_FORMAT"] = "json"
    env["IMAGE_LISTENER_HTTP_PORT"] = "0"  # the developer's own 8080 may be taken
    return env


@dataclass(frozen=True)
class DevSession:
    checkout: Path
    env: dict[str, str]
    hint: str


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevSession]:
    """``image-listener dev --offline`` running in a fresh directory, as `make dev OFFLINE=1`."""
    checkout = tmp_path_factory.mktemp("checkout")
    env = fresh_terminal_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "listener", "dev", "--offline"],
        cwd=checkout,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        hint = ""
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(HINT):
                hint = line.removeprefix(HINT).strip()
            if '"listening"' in line:
                break
        assert hint, "".join(seen)
        yield DevSession(checkout, env, hint)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_dev_suggests_an_ask_command_that_works_as_printed(dev: DevSession) -> None:
    """Pasted into a second terminal (no venv on the PATH), the suggestion runs and completes."""
    result = subprocess.run(
        ["bash", "-c", dev.hint],
        cwd=dev.checkout,
        env=dev.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (dev.hint, result.stderr)
    assert result.stdout.startswith("complete file://"), result.stdout
    png = Path(result.stdout.split(" ", 1)[1].strip().removeprefix("file://")).read_bytes()
    assert read_png_size(png) == (1024, 1024)
    assert "offline placeholder" in read_png_text(png)["Description"]


def test_dev_without_a_key_says_how_to_run_offline(tmp_path: Path) -> None:
    refused = cli("dev", "--data-dir", str(tmp_path / "d"), env=fresh_terminal_env())
    assert refused.returncode == 1
    assert "OPENAI_API_KEY" in refused.stderr
    assert "--offline" in refused.stderr


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (["status"], 0, "recent failures"),
        (["status", "--json"], 0, '"jobs"'),
        (["requeue-stuck"], 0, "requeued 0 job(s)"),
        (["migrate"], 0, "0 migration(s) applied"),
        (["doctor", "--offline"], 0, "database"),
        (["retry", str(uuid.UUID(int=1))], 1, "no such image request"),
        (["cancel", str(uuid.UUID(int=1))], 1, "no such request"),
    ],
)
def test_every_database_command_finds_the_database_of_dev(
    dev: DevSession, args: list[str], status: int, says: str
) -> None:
    """With no DATABASE_URL, each command uses the embedded database that `dev` started (and
    says so on stderr) instead of failing for want of a database."""
    result = cli(*args, env=dev.env, cwd=dev.checkout)
    assert result.returncode == status, result.stderr
    assert says in result.stdout + result.stderr
    assert EMBEDDED in result.stderr


def test_with_no_database_anywhere_the_error_names_both_ways_to_get_one(tmp_path: Path) -> None:
    result = cli("status", env=fresh_terminal_env(), cwd=tmp_path)
    assert result.returncode == 1
    assert "DATABASE_URL" in result.stderr
    assert "image-listener dev" in result.stderr
    assert result.stderr.count("\n") == 1


def test_generate_then_edit_from_the_terminal(dev: DevSession, tmp_path: Path) -> None:
    """The two-step session of the README: ask, then ask again with --edit-of the reply it
    printed, a reference picture and a mask (copied into the user's folder of the inputs)."""
    first = cli("ask", "a lighthouse at dawn", env=dev.env, cwd=dev.checkout)
    assert first.returncode == 0, first.stderr
    reply_id = next(
        line.split()[1] for line in first.stderr.splitlines() if line.startswith("reply ")
    )
    reference, mask = tmp_path / "boat.png", tmp_path / "mask.png"
    reference.write_bytes(solid_png(64, 64))
    mask.write_bytes(solid_png(1024, 1024))
    second = cli(
        "ask",
        "make it night",
        "--edit-of",
        reply_id,
        "--reference",
        str(reference),
        "--mask",
        str(mask),
        env=dev.env,
        cwd=dev.checkout,
    )
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("complete file://")
    uploaded = list((dev.checkout / ".image-listener" / "inputs").rglob("*.png"))
    assert sorted(path.name for path in uploaded) == ["boat.png", "mask.png"]
    wrong = cli("ask", "again", "--edit-of", str(uuid.uuid4()), env=dev.env, cwd=dev.checkout)
    assert wrong.returncode == 1
    assert "there is no image reply" in wrong.stderr
