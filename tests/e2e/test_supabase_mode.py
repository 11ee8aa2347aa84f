"""Supabase mode end to end: the daemon given only SUPABASE_URL and the service-role key, while
the Realtime stand-in drops sockets, closes channels or goes silent, and PostgREST fails.
The poll interval is 30 s here, so a request answered within seconds was woken by Realtime (or
by the watchdog's catch-up claim after it rebuilt the subscription), never by the timer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.daemon_process import Daemon, cli
from tests.support.fake_openai import FakeOpenAI
from tests.support.modes import Conn, ModeRig, build_rig
from tests.support.ops_http import free_port, metric
from tests.support.queue_helpers import insert_request, new_chat

pytestmark = pytest.mark.e2e
SLOW_POLL = {"IMAGE_LISTENER_POLL_SECONDS": "30"}


@pytest.fixture
def rig(
    database_url: str,
    db: Conn,
    fake_openai: FakeOpenAI,
    tmp_path: Path,
    make_supabase_stack: Any,
) -> Iterator[ModeRig]:
    yield from build_rig(
        "supabase",
        database_url=database_url,
        db=db,
        fake=fake_openai,
        image_dir=tmp_path / "images",
        make_stack=make_supabase_stack,
    )


def fault(rig: ModeRig, name: str) -> None:
    assert rig.stack is not None
    assert rig.realtime is not None
    rig.stack.run_coroutine(getattr(rig.realtime, name)())


def test_realtime_wakes_the_listener_within_a_second(rig: ModeRig) -> None:
    rig.start(**SLOW_POLL)
    user, chat = new_chat(rig.db)
    time.sleep(0.5)
    started = time.monotonic()
    request = rig.insert_request(user, chat, "quick")
    rig.wait_final(request, timeout=10)
    assert time.monotonic() - started < 1.5


def test_one_request_wakes_each_listener_once(rig: ModeRig) -> None:
    """Realtime also sends the reply each claim inserts (it is an image message too): each of
    two listeners counts one wake-up hint for one request, not two."""
    ports = [free_port(), free_port()]
    for port in ports:
        rig.start(
            **SLOW_POLL, IMAGE_LISTENER_HTTP_PORT=str(port), IMAGE_LISTENER_HTTP_HOST="127.0.0.1"
        )
    user, chat = new_chat(rig.db)
    request = rig.insert_request(user, chat, "one request")
    assert rig.wait_final(request, timeout=10)["status"] == "complete"
    time.sleep(1.0)  # the reply's own events, had they woken anyone, have arrived by now
    for port in ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert metric(text, "image_listener_wakeup_hints") == 1.0


@pytest.mark.parametrize("injected", ["drop_connections", "close_channels", "go_silent"])
def test_every_request_gets_one_reply_while_realtime_misbehaves(
    rig: ModeRig, injected: str
) -> None:
    daemon = rig.start(**SLOW_POLL)
    user, chat = new_chat(rig.db)
    requests = [rig.insert_request(user, chat, f"before {i}") for i in range(3)]
    fault(rig, injected)
    requests += [rig.insert_request(user, chat, f"during {i}") for i in range(3)]
    if injected == "go_silent":
        event = daemon.wait_for_event("realtime_rebuild", timeout=10)
        assert "pong" in event["reason"]
        fault(rig, "resume")
    time.sleep(0.5)
    requests += [rig.insert_request(user, chat, f"after {i}") for i in range(3)]
    for request in requests:
        reply = rig.wait_final(request, timeout=15)
        assert reply["status"] == "complete"
    assert rig.fake.total_calls == len(requests), "no request generated twice"


def test_postgrest_errors_are_retried_and_nothing_is_lost(rig: ModeRig) -> None:
    assert rig.stack is not None
    rig.start()
    user, chat = new_chat(rig.db)
    rig.stack.rest_fail_next(6, status=503)
    # Inserted straight into the database: the gateway's failures are for the listener only.
    requests = [insert_request(rig.db, user, chat, f"through 503s {i}") for i in range(3)]
    for request in requests:
        assert rig.wait_final(request, timeout=20)["status"] == "complete"
    failed = [call for call in rig.stack.rest_calls if call.status == 503]
    assert len(failed) == 6
    assert all("/rpc/image_jobs_" in call.path for call in failed)


def test_doctor_checks_postgrest_realtime_storage_and_openai(rig: ModeRig) -> None:
    result = cli("doctor", env=rig.env)
    assert result.returncode == 0, result.stdout + result.stderr
    names = [line.split()[:2] for line in result.stdout.strip().splitlines()]
    assert names == [
        ["ok", "postgrest"],
        ["ok", "realtime"],
        ["ok", "storage"],
        ["warn", "limits"],  # over PostgREST too: a fresh database limits nobody
        ["ok", "prices"],
        ["ok", "budget"],  # over PostgREST too
        ["ok", "openai"],
    ]
    assert rig.env["SUPABASE_SERVICE_ROLE_KEY"] not in result.stdout + result.stderr


def test_doctor_and_run_refuse_a_key_that_is_not_the_service_role(rig: ModeRig) -> None:
    assert rig.stack is not None
    env = {**rig.env, "SUPABASE_SERVICE_ROLE_KEY": rig.stack.anon_key}
    doctor = cli("doctor", "--offline", env=env)
    assert doctor.returncode == 1
    assert "FAIL  postgrest" in doctor.stdout
    run = cli("run", env=env)
    assert run.returncode == 1
    assert "service-role key" in run.stderr
    assert rig.stack.anon_key not in run.stderr + doctor.stdout


@pytest.mark.parametrize(
    ("drop", "missing"),
    [("SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_SERVICE_ROLE_KEY"), ("SUPABASE_URL", "SUPABASE_URL")],
)
def test_half_configured_supabase_stops_start_up_naming_the_variable(
    rig: ModeRig, drop: str, missing: str
) -> None:
    env = {k: v for k, v in rig.env.items() if k != drop}
    result = cli("run", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith(f"image-listener: error: {missing}:")


def test_hybrid_mode_queues_over_the_database_and_stores_in_supabase(
    rig: ModeRig, database_url: str
) -> None:
    """Both set: queue calls and LISTEN over DATABASE_URL, images in Supabase Storage."""
    assert rig.stack is not None
    daemon = Daemon({**rig.env, "DATABASE_URL": database_url})
    rig.daemons.append(daemon)
    assert daemon.wait_for_event("daemon_started")["mode"] == "hybrid"
    daemon.wait_for_event("listening")
    user, chat = new_chat(rig.db)
    request = insert_request(rig.db, user, chat, "hybrid")
    reply = rig.wait_final(request)
    assert reply["status"] == "complete"
    assert reply["image_url"].startswith(f"{rig.stack.url}/storage/v1/object/sign/")
    assert reply["metadata"]["storage"]["bucket"] == "generated-images"
    assert rig.fetch_image(reply["image_url"]).startswith(b"\x89PNG")
    assert not [call for call in rig.stack.rest_calls if "/rpc/" in call.path]


def test_inserts_between_subscribed_and_streaming_are_still_served(rig: ModeRig) -> None:
    """SUBSCRIBED can precede the server's streaming: rows inserted in that window produce no
    event, and only the catch-up claim on "Subscribed to PostgreSQL" finds them in time."""
    assert rig.stack is not None
    assert rig.realtime is not None
    rig.stack.run_coroutine(rig.realtime.delay_streaming(4))
    daemon = Daemon({**rig.env, **SLOW_POLL})
    rig.daemons.append(daemon)
    daemon.wait_for_event("realtime_subscribed")
    time.sleep(1)  # the claim that SUBSCRIBED triggered is over: it cannot find these rows
    user, chat = new_chat(rig.db)
    requests = [insert_request(rig.db, user, chat, f"in the gap {i}") for i in range(3)]
    for request in requests:
        assert rig.wait_final(request, timeout=8)["status"] == "complete"
    assert rig.realtime.events_dropped >= 3, "the window really swallowed the events"
