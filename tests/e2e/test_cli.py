"""The real CLI in subprocesses against the real database and the fake OpenAI server over HTTP:
what an operator and a frontend would see, including signals and crashes."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from core.png import read_png_size
from listener.migrate import discover
from tests.support.daemon_process import API_KEY, Daemon, cli, listener_env
from tests.support.fake_openai import FakeOpenAI
from tests.support.pg import PostgresServer
from tests.support.queue_helpers import insert_request, job_of, new_chat, reply_of

pytestmark = pytest.mark.e2e
Conn = psycopg.Connection[dict[str, Any]]


@pytest.fixture
def env(database_url: str, fake_openai: FakeOpenAI, tmp_path: Path) -> dict[str, str]:
    return listener_env(database_url, fake_openai.base_url, tmp_path / "images")


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Every daemon a test starts is killed at the end, whatever happened."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def start(daemons: list[Daemon], env: dict[str, str], *args: str) -> Daemon:
    daemon = Daemon(env, *args)
    daemons.append(daemon)
    daemon.wait_for_event("listening")
    return daemon


def wait_final(db: Conn, request_id: uuid.UUID, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = reply_of(db, request_id)
        if replies and replies[0]["status"] in ("complete", "failed"):
            assert len(replies) == 1
            return replies[0]
        time.sleep(0.05)
    raise AssertionError(
        f"request {request_id} not final after {timeout}s: {reply_of(db, request_id)}"
    )


def test_ask_gets_a_complete_reply_with_a_png_of_the_requested_size(
    env: dict[str, str], daemons: list[Daemon], tmp_path: Path
) -> None:
    daemon = start(daemons, env)
    started = time.monotonic()
    result = cli("ask", "a lighthouse at dawn", "--size", "1024x1536", "--timeout", "20", env=env)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    status, url = result.stdout.strip().split(" ", 1)
    assert status == "complete"
    path = Path(url.removeprefix("file://"))
    assert path.is_relative_to((tmp_path / "images").resolve())
    assert read_png_size(path.read_bytes()) == (1024, 1536)
    assert elapsed < 20
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    log = daemon.output()
    assert API_KEY not in log
    assert "lighthouse" not in log, "prompts are logged as length + hash by default"
    assert '"prompt_sha256"' in log


def test_rows_inserted_while_the_listener_was_down_are_served_on_start(
    env: dict[str, str], daemons: list[Daemon], db: Conn
) -> None:
    user, chat = new_chat(db)
    requests = [insert_request(db, user, chat, f"backlog {i}") for i in range(5)]
    start(daemons, env)
    for request in requests:
        assert wait_final(db, request)["status"] == "complete"


def test_sigterm_lets_in_flight_generation_finish_then_exits_zero(
    env: dict[str, str], daemons: list[Daemon], db: Conn, fake_openai: FakeOpenAI
) -> None:
    daemon = start(daemons, env)
    user, chat = new_chat(db)
    prompt = "slow one [fake:delay=1.5]"
    request = insert_request(db, user, chat, prompt)
    _wait_until(lambda: fake_openai.calls(prompt) == 1)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert wait_final(db, request, timeout=1)["status"] == "complete"
    assert job_of(db, request) is None


def test_sigterm_past_the_grace_period_releases_the_job_for_the_next_listener(
    env: dict[str, str], daemons: list[Daemon], db: Conn, fake_openai: FakeOpenAI
) -> None:
    short_grace = {**env, "IMAGE_LISTENER_SHUTDOWN_GRACE_SECONDS": "0.3"}
    daemon = start(daemons, short_grace)
    user, chat = new_chat(db)
    prompt = "very slow [fake:delay=3]"
    request = insert_request(db, user, chat, prompt)
    _wait_until(lambda: fake_openai.calls(prompt) == 1)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    job = job_of(db, request)
    assert job is not None
    assert job["state"] == "queued"
    assert job["attempts"] == 0
    start(daemons, env)
    reply = wait_final(db, request)
    assert reply["status"] == "complete"
    assert reply["metadata"]["attempt"] == 1


def test_kill_9_mid_generation_then_restart_gives_exactly_one_complete_reply(
    env: dict[str, str], daemons: list[Daemon], db: Conn, fake_openai: FakeOpenAI
) -> None:
    daemon = start(daemons, env)
    user, chat = new_chat(db)
    prompt = "doomed first try [fake:delay=2]"
    request = insert_request(db, user, chat, prompt)
    _wait_until(lambda: fake_openai.calls(prompt) == 1)
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    start(daemons, env)
    reply = wait_final(db, request, timeout=30)
    assert reply["status"] == "complete"
    assert reply["metadata"]["attempt"] == 2  # the crashed attempt counted
    assert len(reply_of(db, request)) == 1
    assert job_of(db, request) is None


def test_run_refuses_an_unmigrated_database_with_one_line(
    pg_server: PostgresServer, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    name = pg_server.empty()
    try:
        env = listener_env(pg_server.dsn(name), fake_openai.base_url, tmp_path)
        result = cli("run", env=env)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1
        assert "image-listener migrate" in result.stderr
        migrated = cli("migrate", env=env)
        assert migrated.returncode == 0, migrated.stderr
        assert f"{len(discover())} migration(s) applied" in migrated.stdout
        again = cli("migrate", env=env)
        assert again.returncode == 0
        assert "0 migration(s) applied" in again.stdout
    finally:
        pg_server.drop(name)


@pytest.mark.parametrize(
    ("change", "variable"),
    [
        ({"OPENAI_API_KEY": ""}, "OPENAI_API_KEY"),
        ({"IMAGE_LISTENER_CONCURRENCY": "many"}, "IMAGE_LISTENER_CONCURRENCY"),
        ({"IMAGE_LISTENER_LEASE_SECONDS": "-1"}, "IMAGE_LISTENER_LEASE_SECONDS"),
        ({"DATABASE_URL": ""}, "DATABASE_URL"),
    ],
)
def test_bad_settings_stop_start_up_naming_the_variable(
    env: dict[str, str], change: dict[str, str], variable: str
) -> None:
    result = cli("run", env={**env, **change})
    assert result.returncode == 1
    assert variable in result.stderr
    assert result.stderr.startswith("image-listener: error:")
    assert result.stderr.count("\n") == 1
    assert API_KEY not in result.stderr


def test_ask_reports_a_rejected_request_clearly(env: dict[str, str], daemons: list[Daemon]) -> None:
    result = cli("ask", "   ", env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == "image-listener: error: the image prompt is empty"


def _wait_until(condition: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_listen_connection_killed_is_rebuilt_and_wakeups_stay_fast(
    env: dict[str, str], daemons: list[Daemon], db: Conn
) -> None:
    """A broken LISTEN connection is noticed and rebuilt; wake-ups do not fall back to polling."""
    slow_poll = {
        **env,
        "IMAGE_LISTENER_POLL_SECONDS": "30",
        "IMAGE_LISTENER_LISTEN_PROBE_SECONDS": "1",
    }
    daemon = start(daemons, slow_poll)
    killed = db.execute(
        "select pg_terminate_backend(pid) as ok from pg_stat_activity"
        " where datname = current_database() and application_name = 'image-listener:listen'"
    ).fetchall()
    assert killed
    assert all(row["ok"] for row in killed)
    event = daemon.wait_for_event("listening", timeout=15)
    assert event["connects"] == 2
    user, chat = new_chat(db)
    request = insert_request(db, user, chat, "after the reconnect")
    # With a 30 s poll, only a working LISTEN answers within a few seconds.
    assert wait_final(db, request, timeout=5)["status"] == "complete"


def test_sigint_stops_the_daemon_cleanly(env: dict[str, str], daemons: list[Daemon]) -> None:
    daemon = start(daemons, env)
    daemon.signal(signal.SIGINT)
    assert daemon.wait() == 0
    assert '"shutdown_requested"' in daemon.output()


def test_lease_is_renewed_while_generating_and_while_draining(
    env: dict[str, str], daemons: list[Daemon], db: Conn, fake_openai: FakeOpenAI
) -> None:
    """A generation longer than the lease, then a SIGTERM: a second listener never takes it."""
    short_lease = {**env, "IMAGE_LISTENER_LEASE_SECONDS": "1.5"}
    first = start(daemons, short_lease)
    user, chat = new_chat(db)
    prompt = "longer than the lease [fake:delay=5]"
    request = insert_request(db, user, chat, prompt)
    _wait_until(lambda: fake_openai.calls(prompt) == 1)
    start(daemons, short_lease)
    time.sleep(2)  # past the first lease: only renewal keeps it
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    reply = wait_final(db, request, timeout=5)
    assert reply["status"] == "complete"
    assert reply["metadata"]["attempt"] == 1
    assert fake_openai.calls(prompt) == 1, "no second generation"


def test_doctor_reports_one_line_per_dependency(env: dict[str, str]) -> None:
    result = cli("doctor", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["ok", "database"],
        ["ok", "listen"],
        ["ok", "storage"],
        ["warn", "limits"],  # a fresh database limits nobody: a warning, exit status 0
        ["ok", "prices"],
        ["ok", "budget"],
        ["ok", "openai"],
    ]
    assert "image-listener quota set --default" in lines[3]
    assert "none set and no 429 seen" in lines[5]
    assert API_KEY not in result.stdout + result.stderr


def test_doctor_fails_with_a_reason_for_a_rejected_key_and_an_unknown_model(
    env: dict[str, str],
) -> None:
    rejected = cli("doctor", env={**env, "OPENAI_API_KEY": "sk-rejected-key-123"})
    assert rejected.returncode == 1
    assert "FAIL  openai" in rejected.stdout
    assert "status=401" in rejected.stdout
    assert "sk-rejected-key-123" not in rejected.stdout + rejected.stderr
    assert rejected.stderr.strip() == "image-listener: error: 1 of 7 checks failed: openai"
    unknown = cli("doctor", env={**env, "IMAGE_LISTENER_MODEL": "gpt-image-unknown"})
    assert unknown.returncode == 1
    assert "FAIL  openai" in unknown.stdout
    assert "status=404" in unknown.stdout


def test_a_wake_up_while_every_slot_is_busy_does_not_spin_the_loop(
    env: dict[str, str], daemons: list[Daemon], db: Conn, fake_openai: FakeOpenAI
) -> None:
    """A notification that arrives while all slots are busy waits for a free slot: the worker
    sleeps meanwhile instead of spinning on the wake-up (measured in CPU seconds)."""
    import psutil

    daemon = start(daemons, {**env, "IMAGE_LISTENER_CONCURRENCY": "1"})
    user, chat = new_chat(db)
    slow = "occupies the only slot [fake:delay=4]"
    first = insert_request(db, user, chat, slow)
    _wait_until(lambda: fake_openai.calls(slow) == 1)
    second = insert_request(db, user, chat, "waits for the slot")
    process = psutil.Process(daemon.proc.pid)
    before = sum(process.cpu_times()[:2])
    time.sleep(2)
    used = sum(process.cpu_times()[:2]) - before
    assert used < 0.5, f"{used:.2f} s of CPU in 2 s while waiting"
    assert wait_final(db, first)["status"] == "complete"
    assert wait_final(db, second)["status"] == "complete"


def test_ask_over_a_limit_says_why_in_one_line(env: dict[str, str]) -> None:
    limited = cli("quota", "set", "--default", "--per-day", "0", env=env)
    assert limited.returncode == 0, limited.stderr
    result = cli("ask", "a lighthouse", "--timeout", "5", env=env)
    assert result.returncode == 1
    assert result.stderr == (
        "image-listener: error: image generation is turned off for this account (per_day is 0)\n"
    )
