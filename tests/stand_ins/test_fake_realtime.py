"""The fake Supabase Realtime (tests/support/supabase_stack/realtime.py) against the real
realtime-py client over a real socket and real inserts in the real database: that it speaks the
protocol well enough for realtime-py, and that each injected fault looks to realtime-py as it
should."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
import realtime
import websockets
from aiohttp import web
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates

from tests.support.pg import as_user
from tests.support.queue_helpers import insert_request, new_chat
from tests.support.supabase_stack import realtime as fake_realtime_module
from tests.support.supabase_stack.realtime import (
    PAYLOAD_TOO_LARGE,
    FakeRealtime,
    RowFilter,
    install_trigger,
)

# realtime-py 2.34.1 logs `e.code` / `e.reason` of websockets' ConnectionClosedError, which
# websockets 15 deprecates; under filterwarnings=error that warning is raised inside realtime-py's
# listen task, which then dies silently: no CHANNEL_ERROR, no reconnect. Production does not turn
# warnings into errors, so ignore exactly this one.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:ConnectionClosed\.(code|reason) is deprecated:DeprecationWarning"
)

KEY = "test-service-role-key"
Conn = psycopg.Connection[dict[str, Any]]
SUBSCRIBED = RealtimeSubscribeStates.SUBSCRIBED
CHANNEL_ERROR = RealtimeSubscribeStates.CHANNEL_ERROR
CLOSED = RealtimeSubscribeStates.CLOSED
REALTIME_PACKAGE = str(Path(realtime.__file__).parent)
FAKE_MODULE = fake_realtime_module.__file__


@dataclass
class Stack:
    fake: FakeRealtime
    url: str  # what AsyncRealtimeClient takes: it appends /websocket?apikey=...&vsn=1.0.0


@pytest.fixture
async def stack(database_url: str) -> AsyncIterator[Stack]:
    """The fake mounted where the gateway mounts it, in a tiny app of our own."""
    await install_trigger(database_url)
    fake = FakeRealtime(database_url, api_keys={KEY})
    await fake.start()
    app = web.Application()
    app.router.add_get("/realtime/v1/websocket", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        yield Stack(fake, f"ws://127.0.0.1:{port}/realtime/v1")
    finally:
        await fake.stop()
        await runner.cleanup()
    assert not tasks_from(FAKE_MODULE), "FakeRealtime.stop() left tasks behind"


@dataclass
class Subscriber:
    client: AsyncRealtimeClient
    states: list[RealtimeSubscribeStates] = field(default_factory=list)
    changes: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    system: list[str] = field(default_factory=list)

    async def next_record(self) -> dict[str, Any]:
        payload = await asyncio.wait_for(self.changes.get(), 5)
        return payload["data"]["record"]


Subscribe = Callable[..., Awaitable[Subscriber]]


@pytest.fixture
async def subscribe(stack: Stack) -> AsyncIterator[Subscribe]:
    """Subscribes a fresh real client the way the daemon does; closes them all at the end."""
    clients: list[AsyncRealtimeClient] = []

    async def make(
        key: str = KEY,
        event: str = "INSERT",
        filter: str | None = "message_type=eq.image",
        access_token: str | None = None,
        **options: Any,
    ) -> Subscriber:
        client = AsyncRealtimeClient(stack.url, token=key, **options)
        clients.append(client)
        if access_token is not None:
            await client.set_auth(access_token)  # the join then carries it instead of the key
        sub = Subscriber(client)
        channel = client.channel("messages-image")
        channel.on_postgres_changes(
            event,  # type: ignore[arg-type]  # a str enum; plain strings work
            schema="public",
            table="messages",
            filter=filter,
            callback=sub.changes.put_nowait,
        )
        channel.on_system(lambda payload: sub.system.append(payload.message))
        await channel.subscribe(lambda state, _err: sub.states.append(state))
        return sub

    yield make
    for client in clients:
        await close_client(client)


async def close_client(client: AsyncRealtimeClient) -> None:
    """close() cancels realtime-py's own tasks without awaiting them and leaves push timeouts
    and rejoin timers running: finish them all so nothing outlives the test's loop."""
    await client.close()
    leftovers = tasks_from(REALTIME_PACKAGE)
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)


def tasks_from(source: str) -> list[asyncio.Task[Any]]:
    """Pending tasks whose coroutine is defined under ``source`` (a file or a directory)."""
    found = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if not task.done() and code is not None and code.co_filename.startswith(source):
            found.append(task)
    return found


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.02)


async def insert_image(db: Conn, user_id: uuid.UUID, chat_id: uuid.UUID, prompt: str) -> uuid.UUID:
    return await asyncio.to_thread(insert_request, db, user_id, chat_id, prompt)


def _insert_text(db: Conn, user_id: uuid.UUID, chat_id: uuid.UUID, content: str) -> uuid.UUID:
    with as_user(db, user_id):
        row = db.execute(
            "insert into public.messages (chat_id, role, content) values (%s, 'user', %s)"
            " returning id",
            (chat_id, content),
        ).fetchone()
    assert row is not None
    return row["id"]  # type: ignore[no-any-return]


async def insert_text(db: Conn, user_id: uuid.UUID, chat_id: uuid.UUID, content: str) -> uuid.UUID:
    return await asyncio.to_thread(_insert_text, db, user_id, chat_id, content)


async def quiet_after(stack: Stack, notifications: int, sub: Subscriber) -> None:
    """The fake has handled the change(s), and a moment later still nothing reached the client."""
    await eventually(lambda: stack.fake.notifications >= notifications)
    await asyncio.sleep(0.2)
    assert sub.changes.empty()


async def test_subscribed_then_an_image_request_arrives_with_its_record_and_text_does_not(
    stack: Stack, subscribe: Subscribe, db: Conn
) -> None:
    """The join reply satisfies realtime-py (SUBSCRIBED, the 'Subscribed to PostgreSQL' system
    message), an image request arrives as a real-shaped payload, and the filter keeps text out."""
    sub = await subscribe()
    assert sub.states == [SUBSCRIBED]
    await eventually(lambda: sub.system == ["Subscribed to PostgreSQL"])
    assert [b["filter"] for b in stack.fake.last_bindings] == ["message_type=eq.image"]
    assert stack.fake.joins == 1

    user_id, chat_id = await asyncio.to_thread(new_chat, db)
    await insert_text(db, user_id, chat_id, "hello")
    request_id = await insert_image(db, user_id, chat_id, "a red fox")

    payload = await asyncio.wait_for(sub.changes.get(), 5)  # the first one is the image request
    assert payload["ids"] == [stack.fake.last_bindings[0]["id"]]
    data = payload["data"]
    assert (data["schema"], data["table"], data["type"], data["errors"]) == (
        "public",
        "messages",
        "INSERT",
        None,
    )
    assert data["commit_timestamp"].endswith("Z")
    assert {"name": "id", "type": "uuid"} in data["columns"]
    record = data["record"]
    assert record["id"] == str(request_id)
    assert (record["content"], record["message_type"], record["options"]) == (
        "a red fox",
        "image",
        {},
    )
    # the request's reply exists from its insert (status 'queued'): an image message too
    reply = await sub.next_record()
    assert (reply["role"], reply["status"], reply["reply_to"]) == (
        "assistant",
        "queued",
        str(request_id),
    )
    await quiet_after(stack, 3, sub)
    assert stack.fake.events_sent == 2


async def test_after_a_dropped_connection_the_client_reconnects_rejoins_and_events_flow(
    stack: Stack, subscribe: Subscribe, db: Conn
) -> None:
    """drop_connections() is an abrupt 1006: realtime-py reports CHANNEL_ERROR, reconnects at
    once, rejoins (a second join, with new binding ids) and receives events again."""
    sub = await subscribe()
    first_ids = [b["id"] for b in stack.fake.last_bindings]
    assert await stack.fake.drop_connections() == 1

    await eventually(lambda: sub.states == [SUBSCRIBED, CHANNEL_ERROR, SUBSCRIBED])
    assert stack.fake.joins == 2
    assert stack.fake.connections == 1
    assert [b["id"] for b in stack.fake.last_bindings] != first_ids

    user_id, chat_id = await asyncio.to_thread(new_chat, db)
    request_id = await insert_image(db, user_id, chat_id, "after the drop")
    assert (await sub.next_record())["id"] == str(request_id)


async def test_after_phx_close_the_channel_is_closed_for_good_and_gets_nothing(
    stack: Stack, subscribe: Subscribe, db: Conn
) -> None:
    """The trap: on phx_close realtime-py marks the channel CLOSED, removes it from the client and
    never rejoins, while the socket stays connected; a daemon must notice and subscribe anew."""
    sub = await subscribe()
    assert await stack.fake.close_channels() == 1

    await eventually(lambda: sub.states == [SUBSCRIBED, CLOSED])
    assert sub.client.channels == {}
    assert sub.client.is_connected
    assert stack.fake.joined_channels == 0

    user_id, chat_id = await asyncio.to_thread(new_chat, db)
    await insert_image(db, user_id, chat_id, "nobody hears this")
    await quiet_after(stack, 1, sub)
    assert stack.fake.joins == 1  # no rejoin was attempted


async def test_a_silent_server_answers_no_heartbeat_and_relays_nothing_but_keeps_the_socket(
    stack: Stack, subscribe: Subscribe, db: Conn
) -> None:
    """go_silent() is a half-open server: no heartbeat reply and no events, yet nothing tells
    the client (still connected and joined); after resume() the held heartbeat is answered and
    later events flow. (realtime-py itself would notice only by websockets' ping timeout, ~40 s.)"""
    sub = await subscribe()
    user_id, chat_id = await asyncio.to_thread(new_chat, db)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{stack.url}/websocket?apikey={KEY}&vsn=1.0.0") as raw,
    ):
        heartbeat = {"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "hb"}
        await raw.send_json(heartbeat)
        reply = await raw.receive_json(timeout=2)
        assert (reply["ref"], reply["payload"]["status"]) == ("hb", "ok")

        await stack.fake.go_silent()
        try:
            await raw.send_json(heartbeat)
            with pytest.raises(TimeoutError):
                await raw.receive(timeout=0.5)
            await insert_image(db, user_id, chat_id, "lost in the silence")
            await quiet_after(stack, 2, sub)  # the request and its queued reply
            assert stack.fake.events_dropped == 2
            assert not raw.closed
            assert sub.client.is_connected
            assert sub.states == [SUBSCRIBED]
            assert stack.fake.connections == 2
        finally:
            await stack.fake.resume()

        reply = await raw.receive_json(timeout=2)
        assert reply["ref"] == "hb"
    request_id = await insert_image(db, user_id, chat_id, "heard again")
    assert (await sub.next_record())["id"] == str(request_id)


async def test_a_wrong_api_key_is_refused_with_401(stack: Stack) -> None:
    """The socket upgrade itself is refused; realtime-py raises after its retries (here one)."""
    client = AsyncRealtimeClient(stack.url, token="wrong-key", max_retries=1)
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        await client.connect()
    assert refused.value.response.status_code == 401
    assert stack.fake.connections == 0
    await close_client(client)


async def test_a_join_with_a_wrong_access_token_is_answered_with_an_error(
    stack: Stack, subscribe: Subscribe
) -> None:
    """A good apikey but a bad access_token in the join: phx_reply status error, which
    realtime-py reports as CHANNEL_ERROR (and then keeps retrying the join on a timer)."""
    sub = await subscribe(access_token="not-a-key")
    assert sub.states == [CHANNEL_ERROR]
    assert (stack.fake.rejected_joins, stack.fake.joins) == (1, 0)


async def test_refreshing_to_a_bad_token_ends_the_channel_like_an_expired_jwt(
    stack: Stack, subscribe: Subscribe
) -> None:
    """An access_token push with a bad token: a system error, then phx_close, so realtime-py
    reports CHANNEL_ERROR, then CLOSED, and does not rejoin."""
    sub = await subscribe()
    await sub.client.set_auth("not-a-key")
    await eventually(lambda: sub.states == [SUBSCRIBED, CHANNEL_ERROR, CLOSED])
    assert sub.client.channels == {}
    assert stack.fake.joined_channels == 0


async def test_a_channel_error_makes_realtime_py_rejoin_after_a_second(
    stack: Stack, subscribe: Subscribe, db: Conn
) -> None:
    """phx_error: CHANNEL_ERROR, then realtime-py's rejoin timer (1 s) joins again."""
    sub = await subscribe()
    assert await stack.fake.send_channel_error() == 1
    await eventually(lambda: sub.states == [SUBSCRIBED, CHANNEL_ERROR, SUBSCRIBED])
    assert stack.fake.joins == 2
    user_id, chat_id = await asyncio.to_thread(new_chat, db)
    request_id = await insert_image(db, user_id, chat_id, "after the error")
    assert (await sub.next_record())["id"] == str(request_id)


async def test_a_paused_relay_loses_changes_without_any_sign_to_the_client(
    stack: Stack, subscribe: Subscribe, db: Conn
) -> None:
    """pause_relay(): the change is gone for good (no replay), the client sees nothing at all."""
    sub = await subscribe()
    user_id, chat_id = await asyncio.to_thread(new_chat, db)
    await stack.fake.pause_relay()
    await insert_image(db, user_id, chat_id, "dropped")
    await quiet_after(stack, 2, sub)  # the request and its queued reply
    await stack.fake.resume_relay()
    request_id = await insert_image(db, user_id, chat_id, "relayed")
    assert (await sub.next_record())["id"] == str(request_id)
    assert (await sub.next_record())["reply_to"] == str(request_id)
    assert (stack.fake.events_dropped, stack.fake.events_sent, sub.states) == (2, 2, [SUBSCRIBED])


async def test_delay_subscribed_makes_subscribe_wait(stack: Stack, subscribe: Subscribe) -> None:
    """subscribe() in realtime-py 2.34.1 awaits the join reply, so a slow reply delays it."""
    await stack.fake.delay_subscribed(0.5)
    started = time.monotonic()
    sub = await subscribe()
    assert time.monotonic() - started >= 0.5
    assert sub.states == [SUBSCRIBED]


async def test_a_record_over_the_notify_limit_arrives_truncated_like_realtime_does(
    stack: Stack, subscribe: Subscribe, db: Conn
) -> None:
    """Above the size limit the record keeps only fields of <= 64 bytes and errors says 413
    (here the limit is NOTIFY's 8 KB; on Supabase 1,024 KB): re-read the row by id."""
    sub = await subscribe()
    user_id, chat_id = await asyncio.to_thread(new_chat, db)
    request_id = await insert_image(db, user_id, chat_id, "a fox " * 1500)
    payload = await asyncio.wait_for(sub.changes.get(), 5)
    assert payload["data"]["errors"] == [PAYLOAD_TOO_LARGE]
    record = payload["data"]["record"]
    assert record["id"] == str(request_id)
    assert "content" not in record
    assert all(len(json.dumps(value)) <= 64 for value in record.values())


async def test_leaving_is_acknowledged_and_closes_the_channel(
    stack: Stack, subscribe: Subscribe
) -> None:
    """phx_leave is answered ok: realtime-py reports CLOSED and the server forgets the channel."""
    sub = await subscribe()
    (channel,) = sub.client.channels.values()
    await channel.unsubscribe()
    await eventually(lambda: sub.states == [SUBSCRIBED, CLOSED])
    assert stack.fake.joined_channels == 0


async def test_a_filter_realtime_cannot_parse_is_a_channel_error_after_the_join(
    stack: Stack, subscribe: Subscribe
) -> None:
    """The join succeeds, then a system error follows: realtime-py reports CHANNEL_ERROR."""
    sub = await subscribe(filter="message_type=match.^im")
    await eventually(lambda: sub.states[:2] == [SUBSCRIBED, CHANNEL_ERROR])
    assert sub.system == []  # error system messages do not reach on_system callbacks


async def test_updates_and_deletes_carry_the_old_primary_key_when_the_trigger_covers_them(
    stack: Stack, subscribe: Subscribe, db: Conn, database_url: str
) -> None:
    """With UPDATE and DELETE installed, an event '*' binding without filter gets all three,
    old_record holding the primary key only (REPLICA IDENTITY DEFAULT)."""
    await install_trigger(database_url, operations=("INSERT", "UPDATE", "DELETE"))
    sub = await subscribe(event="*", filter=None)
    user_id, chat_id = await asyncio.to_thread(new_chat, db)
    message_id = await insert_text(db, user_id, chat_id, "v1")
    await asyncio.to_thread(
        db.execute, "update public.messages set content = 'v2' where id = %s", (message_id,)
    )
    await asyncio.to_thread(db.execute, "delete from public.messages where id = %s", (message_id,))
    kinds = []
    for _ in range(3):
        data = (await asyncio.wait_for(sub.changes.get(), 5))["data"]
        kinds.append((data["type"], data.get("record", {}).get("content"), data.get("old_record")))
    old = {"id": str(message_id)}
    assert kinds == [("INSERT", "v1", None), ("UPDATE", "v2", old), ("DELETE", None, old)]


async def test_stop_is_prompt_even_with_a_silent_server_and_a_connected_client(
    stack: Stack, subscribe: Subscribe
) -> None:
    """stop() closes every socket and the LISTEN connection within its bounds."""
    await subscribe()
    await stack.fake.go_silent()
    started = time.monotonic()
    await stack.fake.stop()
    assert time.monotonic() - started < 3
    assert stack.fake.connections == 0


@pytest.mark.parametrize(
    ("text", "row", "expected"),
    [
        ("message_type=eq.image", {"message_type": "image"}, True),
        ("message_type=eq.image", {"message_type": "text"}, False),
        ("message_type=eq.image", {"message_type": None}, False),
        ("message_type=neq.image", {"message_type": "text"}, True),
        ("message_type=neq.image", {}, False),
        ("n=in.(1,2,3)", {"n": 2}, True),
        ("n=in.(1,2,3)", {"n": 4}, False),
        ("n=not.in.(1,2)", {"n": 4}, True),
        ("n=gt.9", {"n": 10}, True),  # numerically, not as text
        ("n=lte.9", {"n": 10}, False),
        ("reply_to=is.null", {"reply_to": None}, True),
        ("reply_to=not.is.null", {"reply_to": None}, False),
        ("content=ilike.%FOX%", {"content": "a red fox"}, True),
        ("role=eq.user,message_type=eq.image", {"role": "user", "message_type": "text"}, False),
    ],
)
def test_filters_follow_realtimes_operators(text: str, row: dict[str, Any], expected: bool) -> None:
    """The filter syntax realtime-py documents, evaluated on the record."""
    assert RowFilter.parse(text).matches(row) is expected


def test_uuid_filters_ignore_case() -> None:
    """The real server casts to uuid, so case does not matter; neither does it here."""
    value = str(uuid.uuid4())
    assert RowFilter.parse(f"chat_id=eq.{value.upper()}").matches(
        {"chat_id": value}, {"chat_id": "uuid"}
    )


@pytest.mark.parametrize("text", ["message_type", "message_type=like", "n=between.1", "n=in.1,2"])
def test_malformed_filters_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="filter"):
        RowFilter.parse(text)
