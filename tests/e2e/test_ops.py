"""The operations endpoints over real HTTP, and the poll-only wake-up, on the real daemon."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.support.daemon_process import Daemon, cli, listener_env
from tests.support.fake_openai import FakeOpenAI
from tests.support.modes import Conn
from tests.support.ops_http import free_port, metric, port_is_free
from tests.support.pg import PostgresServer
from tests.support.queue_helpers import insert_request, new_chat, reply_of

pytestmark = pytest.mark.e2e


@pytest.fixture
def env(database_url: str, fake_openai: FakeOpenAI, tmp_path: Path) -> dict[str, str]:
    return listener_env(
        database_url,
        fake_openai.base_url,
        tmp_path / "images",
        IMAGE_LISTENER_HTTP_PORT=str(free_port()),
        IMAGE_LISTENER_HTTP_HOST="127.0.0.1",
    )


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def start(daemons: list[Daemon], env: dict[str, str], ready: str = "listening") -> str:
    daemon = Daemon(env)
    daemons.append(daemon)
    daemon.wait_for_event(ready)
    return f"http://127.0.0.1:{env['IMAGE_LISTENER_HTTP_PORT']}"


def wait_complete(db: Conn, request: object, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = reply_of(db, request)  # type: ignore[arg-type]
        if replies and replies[0]["status"] == "complete":
            return
        time.sleep(0.05)
    raise AssertionError("not complete in time")


def test_healthz_readyz_and_metrics_answer_over_http(
    env: dict[str, str], daemons: list[Daemon], db: Conn
) -> None:
    base = start(daemons, env)
    health = httpx.get(f"{base}/healthz", timeout=5)
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    ready = httpx.get(f"{base}/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    user, chat = new_chat(db)
    request = insert_request(db, user, chat, "count me", {"quality": "low"})
    wait_complete(db, request)
    insert_request(db, user, chat, "still queued [fake:delay=5]")
    time.sleep(0.3)
    text = httpx.get(f"{base}/metrics", timeout=5).text
    assert metric(text, "image_listener_requests_claimed_total") == 2
    assert metric(text, 'image_listener_attempts_finished_total{outcome="complete"}') == 1
    assert metric(text, "image_listener_end_to_end_seconds_count") == 1
    assert metric(text, "image_listener_in_flight") == 1
    assert metric(text, 'image_listener_queue_depth{state="running"}') == 1
    assert (
        metric(text, 'image_listener_tokens_total{kind="output",model="gpt-image-2.6-flare"}') > 0
    )
    assert metric(text, 'image_listener_cost_usd_total{model="gpt-image-2.6-flare"}') > 0
    assert metric(text, "image_listener_wakeup_healthy") == 1
    assert "image_listener_event_loop_lag_seconds_bucket" in text
    assert httpx.get(f"{base}/nope", timeout=5).status_code == 404
    assert httpx.post(f"{base}/metrics", timeout=5).status_code == 405


def test_readyz_fails_while_the_database_is_unreachable_and_recovers(
    env: dict[str, str], daemons: list[Daemon], database_url: str, pg_server: PostgresServer
) -> None:
    base = start(daemons, {**env, "IMAGE_LISTENER_LISTEN_PROBE_SECONDS": "0.5"})
    name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as admin:
        admin.execute(f'alter database "{name}" with allow_connections false')
        try:
            admin.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where datname = %s",
                (name,),
            )
            deadline = time.monotonic() + 10
            while httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                assert time.monotonic() < deadline, "readiness never dropped"
                time.sleep(0.1)
            answer = httpx.get(f"{base}/readyz", timeout=5).json()
            assert answer["ready"] is False
            assert any("wake-up" in problem for problem in answer["problems"])
            assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        finally:
            admin.execute(f'alter database "{name}" with allow_connections true')
    deadline = time.monotonic() + 20
    while httpx.get(f"{base}/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "readiness never came back"
        time.sleep(0.2)


def test_poll_only_wakeup_serves_requests_without_listen(
    env: dict[str, str], daemons: list[Daemon], db: Conn
) -> None:
    polling = {
        **env,
        "IMAGE_LISTENER_WAKEUP": "poll",
        "IMAGE_LISTENER_POLL_ONLY_SECONDS": "0.2",
        "IMAGE_LISTENER_POLL_SECONDS": "30",
    }
    start(daemons, polling, ready="daemon_started")
    user, chat = new_chat(db)
    request = insert_request(db, user, chat, "polled")
    started = time.monotonic()
    wait_complete(db, request, timeout=5)
    assert time.monotonic() - started < 2
    listening = db.execute(
        "select count(*) as n from pg_stat_activity"
        " where datname = current_database() and application_name = 'image-listener:listen'"
    ).fetchone()
    assert listening == {"n": 0}
    assert '"listening"' not in daemons[0].output()


def test_a_port_in_use_stops_start_up_with_one_line(env: dict[str, str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli("run", env={**env, "IMAGE_LISTENER_HTTP_PORT": str(port)})
    assert result.returncode == 1
    assert "IMAGE_LISTENER_HTTP_PORT" in result.stderr
    assert result.stderr.count("\n") == 1


DEFAULT_PORT = 8080


def test_two_listeners_on_one_host_both_run_when_the_default_port_is_taken(
    database_url: str, fake_openai: FakeOpenAI, tmp_path: Path, db: Conn, daemons: list[Daemon]
) -> None:
    """With IMAGE_LISTENER_HTTP_PORT unset, the second listener on a host finds 8080 taken: it
    logs one warning naming the setting and serves requests without endpoints. Set explicitly,
    a taken port still stops start-up with the one-line error."""
    env = listener_env(database_url, fake_openai.base_url, tmp_path / "images")
    del env["IMAGE_LISTENER_HTTP_PORT"]
    default_was_free = port_is_free(DEFAULT_PORT)
    first = Daemon(env)
    daemons.append(first)
    first.wait_for_event("ops_server_listening" if default_was_free else "ops_server_port_taken")
    first.wait_for_event("listening")
    second = Daemon(env)
    daemons.append(second)
    second.wait_for_event("listening")
    taken = [d for d in (first, second) if '"ops_server_port_taken"' in d.output()]
    if default_was_free:  # else something else on this host holds 8080: both must carry on
        assert taken == [second], first.output() + second.output()
        assert httpx.get(f"http://127.0.0.1:{DEFAULT_PORT}/healthz", timeout=5).status_code == 200
    assert second in taken
    warning = next(line for line in second.lines if "ops_server_port_taken" in line)
    assert "IMAGE_LISTENER_HTTP_PORT" in warning

    user, chat = new_chat(db)
    requests = [insert_request(db, user, chat, f"busy host {i} [fake:delay=1]") for i in range(8)]
    for request in requests:
        wait_complete(db, request, timeout=20)
    for daemon in (first, second):
        assert daemon.output().count('"request_finished"') >= 1, "both listeners work"
    explicit = cli("run", env={**env, "IMAGE_LISTENER_HTTP_PORT": str(DEFAULT_PORT)})
    assert explicit.returncode == 1
    assert "IMAGE_LISTENER_HTTP_PORT" in explicit.stderr
    assert explicit.stderr.count("\n") == 1
