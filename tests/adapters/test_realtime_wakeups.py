"""RealtimeWakeupSource against the real realtime client and the local Realtime stand-in: each
known trap of realtime 2.34 is injected and the source must keep (or restore) its wake-ups."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from listener.wakeups.realtime import RealtimeWakeupSource, is_image_request
from tests.support.modes import Conn
from tests.support.queue_helpers import insert_request, new_chat
from tests.support.supabase_stack import SupabaseStack, anon_key, new_jwt_secret, service_role_key
from tests.support.supabase_stack.realtime import FakeRealtime, install_trigger_sql


@dataclass
class Running:
    source: RealtimeWakeupSource
    stack: SupabaseStack
    realtime: FakeRealtime
    wakes: list[float]
    db: Conn

    async def insert(self) -> None:
        user, chat = await asyncio.to_thread(new_chat, self.db)
        await asyncio.to_thread(insert_request, self.db, user, chat)

    def fault(self, name: str) -> Any:
        return self.stack.run_coroutine(getattr(self.realtime, name)())


async def eventually(predicate: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def running(database_url: str, db: Conn, make_supabase_stack: Any) -> AsyncIterator[Running]:
    secret = new_jwt_secret()
    db.execute(install_trigger_sql())
    realtime = FakeRealtime(database_url, api_keys={anon_key(secret), service_role_key(secret)})
    stack = await asyncio.to_thread(make_supabase_stack, realtime=realtime, jwt_secret=secret)
    source = RealtimeWakeupSource(
        stack.url, stack.service_role_key, probe_seconds=0.5, probe_timeout=0.5, join_timeout=3
    )
    wakes: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(lambda: wakes.append(time.monotonic()), stop))
    try:
        await eventually(lambda: source.subscriptions >= 1)
        yield Running(source, stack, realtime, wakes, db)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def test_subscription_wakes_and_each_insert_wakes(running: Running) -> None:
    assert running.source.healthy
    assert running.wakes, "SUBSCRIBED triggers a catch-up claim"
    await running.insert()
    await eventually(lambda: running.source.hints == 1)


async def test_the_reply_inserted_with_the_request_does_not_wake_again(running: Running) -> None:
    """The filter ``message_type=eq.image`` also matches the request's reply (inserted 'queued'
    in the same transaction); only the user's request may wake the worker: one request, one
    wake-up per listener. The claim then updates that reply: no further insert, no event."""
    await running.insert()
    await eventually(lambda: running.source.events == 2)
    assert running.source.hints == 1
    claimed = await asyncio.to_thread(
        lambda: running.db.execute(
            "select * from public.image_jobs_claim('w', 1, 60, 3)"
        ).fetchall()
    )
    assert len(claimed) == 1
    await asyncio.sleep(0.3)
    assert (running.source.events, running.source.hints) == (2, 1)


def test_only_user_rows_and_rows_without_a_role_count_as_requests() -> None:
    def event(record: object) -> dict[str, object]:
        return {"ids": [1], "data": {"type": "INSERT", "record": record}}

    assert is_image_request(event({"role": "user", "message_type": "image"}))
    assert not is_image_request(event({"role": "assistant", "message_type": "image"}))
    assert is_image_request(event({"message_type": "image"}))  # fields cut by the 1 MB limit
    assert is_image_request({"ids": [1]})


async def test_a_wake_callback_that_raises_does_not_kill_the_listen_task(
    running: Running,
) -> None:
    """In realtime 2.34 an exception in a callback ends the client's listen task for good."""

    def broken() -> None:
        raise RuntimeError("boom")

    running.source._wake = broken
    await running.insert()
    await eventually(lambda: running.source.hints == 1)
    running.source._wake = lambda: running.wakes.append(time.monotonic())
    await running.insert()
    await eventually(lambda: running.source.hints == 2)
    assert running.source.sessions == 1, "no rebuild was needed: the task survived"


def test_callbacks_are_plain_functions_because_async_ones_are_never_awaited() -> None:
    for callback in ("_on_change", "_on_state", "_on_system"):
        assert not asyncio.iscoroutinefunction(getattr(RealtimeWakeupSource, callback))


async def test_dropped_socket_resubscribes_and_events_flow_again(running: Running) -> None:
    running.fault("drop_connections")
    await eventually(lambda: running.source.subscriptions >= 2)
    await running.insert()
    await eventually(lambda: running.source.hints == 1)


async def test_phx_close_is_noticed_and_a_new_channel_is_built(running: Running) -> None:
    """phx_close removes the channel and realtime-py never rejoins: the watchdog must."""
    running.fault("close_channels")
    await eventually(lambda: running.source.sessions >= 2 and running.source.subscriptions >= 2)
    await running.insert()
    await eventually(lambda: running.source.hints == 1)


async def test_half_open_socket_is_detected_by_ping_well_before_40_seconds(
    running: Running,
) -> None:
    running.fault("go_silent")
    started = time.monotonic()
    await eventually(lambda: running.source.sessions >= 2, within=8)
    detected_after = time.monotonic() - started
    assert detected_after < 5
    running.fault("resume")
    await eventually(lambda: running.source.healthy)
    await running.insert()
    await eventually(lambda: running.source.hints >= 1)


async def test_server_away_past_the_clients_retry_budget_is_recovered(running: Running) -> None:
    """realtime-py gives up for good after max_retries inside a background task; we do not."""
    running.fault("stop")
    await eventually(lambda: not running.source.healthy)
    wakes_before = len(running.wakes)
    await asyncio.sleep(4)  # longer than the client's own retry budget (3 tries, 0.5 s backoff)
    assert len(running.wakes) > wakes_before, "each rebuild attempt still triggers a claim"
    running.fault("start")
    await eventually(lambda: running.source.healthy, within=40)
    await running.insert()
    await eventually(lambda: running.source.hints >= 1)
