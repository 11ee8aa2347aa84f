"""Wake-ups from Supabase Realtime (``postgres_changes`` INSERTs on ``public.messages``).

Realtime is at-most-once with no replay, so an event is only a hint: the worker claims through
the SQL functions on every hint, after every (re)subscription, when the server reports that it
streams ("Subscribed to PostgreSQL"), and on its own timer. This module's job is to keep the
hints coming despite the traps of realtime 2.34, each handled here:

* a callback that raises kills the client's listen task for good while the channel still says
  "joined": our callbacks only note the time and call ``wake()``, inside a try/except, and the
  watchdog also checks that the listen task is alive;
* ``async def`` callbacks are never awaited: ours are plain functions;
* after its retry budget the client gives up for good inside a background task: the watchdog
  sees it disconnected and builds a new client;
* heartbeat replies are not checked, so a half-open socket goes unnoticed for ~40 s: the
  watchdog sends a WebSocket ping and rebuilds when no pong comes within ``probe_timeout``;
* ``phx_close`` removes the channel with no rejoin: the watchdog sees it gone and rebuilds;
* ``SUBSCRIBED`` may arrive before the server streams: the system "ok" message triggers one
  more catch-up claim, and the timer covers the rest;
* a ``postgres_changes`` filter takes one condition, and ``message_type=eq.image`` also matches
  the assistant reply each claim inserts: the callback reads ``role`` from the event's record
  and wakes only for user requests (one wake-up per request, not two).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import realtime
import structlog
from realtime import (
    AsyncRealtimeChannel,
    AsyncRealtimeClient,
    RealtimePostgresChangesListenEvent,
    RealtimeSubscribeStates,
)

log = structlog.get_logger("listener.realtime")

CHANNEL_NAME = "image-listener-requests"
REQUEST_FILTER = "message_type=eq.image"


class RealtimeLost(Exception):
    """The session must be rebuilt (says why)."""


class RealtimeWakeupSource:
    """Runs until ``stop`` is set; ``healthy`` is True while subscribed and answering pings."""

    def __init__(
        self,
        supabase_url: str,
        api_key: str,
        *,
        probe_seconds: float,
        probe_timeout: float,
        join_timeout: float = 15.0,
        errored_grace_seconds: float | None = None,
        client_max_retries: int = 3,
    ) -> None:
        self._url = supabase_url.rstrip("/") + "/realtime/v1"
        self._api_key = api_key
        self._probe_seconds = probe_seconds
        self._probe_timeout = probe_timeout
        self._join_timeout = join_timeout
        # the client's own reconnect gets this long before we build a new client
        self._errored_grace = errored_grace_seconds or 2 * probe_seconds
        self._client_max_retries = client_max_retries
        self._wake: Callable[[], None] = lambda: None
        self.healthy = False
        self.sessions = 0
        self.subscriptions = 0
        #: INSERT events received; ``hints`` of them were image requests and woke the worker
        self.events = 0
        self.hints = 0
        self.last_event_at: float | None = None

    @property
    def reconnects(self) -> int:
        return max(0, self.subscriptions - 1)

    async def run(self, wake: Callable[[], None], stop: asyncio.Event) -> None:
        """Keep a subscription alive, rebuilding with backoff, until ``stop`` is set."""
        self._wake = wake
        backoff = 0.5
        while not stop.is_set():
            client = AsyncRealtimeClient(
                self._url,
                token=self._api_key,
                max_retries=self._client_max_retries,
                initial_backoff=0.5,
                hb_interval=15,
                timeout=int(max(1, self._join_timeout)),
            )
            self.sessions += 1
            try:
                await self._session(client, stop)
                backoff = 0.5
            except RealtimeLost as exc:
                log.warning("realtime_rebuild", reason=str(exc), retry_in_s=backoff)
            except Exception as exc:  # connect failures and anything the client raises
                log.warning(
                    "realtime_rebuild",
                    reason=f"{type(exc).__name__}: {exc}"[:300],
                    retry_in_s=backoff,
                )
            finally:
                self.healthy = False
                await _close_quietly(client)
            if stop.is_set():
                break
            # Whatever was inserted while we were deaf is claimed now, not at the next poll.
            wake()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=backoff)
            backoff = min(backoff * 2, 30.0)

    async def _session(self, client: AsyncRealtimeClient, stop: asyncio.Event) -> None:
        channel = client.channel(CHANNEL_NAME)
        channel.on_postgres_changes(
            RealtimePostgresChangesListenEvent.Insert,
            schema="public",
            table="messages",
            filter=REQUEST_FILTER,
            callback=self._on_change,
        )
        channel.on_system(self._on_system)
        async with asyncio.timeout(self._join_timeout):
            await channel.subscribe(self._on_state)
        if not channel.is_joined:
            raise RealtimeLost(f"join did not succeed (channel {channel.state.value})")
        errored_since: float | None = None
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._probe_seconds)
            if stop.is_set():
                return
            problem = _session_problem(client, channel)
            if problem is None:
                errored_since = None
                await self._ping(client)
                continue
            # Give the client's own reconnect a chance before replacing it.
            errored_since = errored_since or time.monotonic()
            self.healthy = False
            if problem.startswith("fatal:") or (
                time.monotonic() - errored_since >= self._errored_grace
            ):
                raise RealtimeLost(problem.removeprefix("fatal: "))

    async def _ping(self, client: AsyncRealtimeClient) -> None:
        connection = client._ws_connection  # the only way to see a half-open socket
        if connection is None:
            return
        try:
            async with asyncio.timeout(self._probe_timeout):
                pong = await connection.ping()
                await pong
        except TimeoutError as exc:
            raise RealtimeLost(f"no pong within {self._probe_timeout:g}s (half-open?)") from exc
        except Exception as exc:
            raise RealtimeLost(f"ping failed: {type(exc).__name__}") from exc
        self.healthy = True

    # Callbacks run inside the client's listen task: they must be plain functions that never
    # raise, and must not block.

    def _on_change(self, payload: Any) -> None:
        try:
            self.events += 1
            self.last_event_at = time.monotonic()
            if is_image_request(payload):
                self.hints += 1
                self._wake()
        except Exception:
            log.exception("realtime_callback_failed")

    def _on_state(self, status: RealtimeSubscribeStates, error: Exception | None) -> None:
        try:
            if status == RealtimeSubscribeStates.SUBSCRIBED:
                self.subscriptions += 1
                self.healthy = True
                log.info("realtime_subscribed", subscriptions=self.subscriptions)
                self._wake()
            else:
                self.healthy = False
                log.warning(
                    "realtime_subscription_state",
                    state=status.value,
                    reason=None if error is None else str(error)[:200],
                )
        except Exception:
            log.exception("realtime_callback_failed")

    def _on_system(self, payload: Any) -> None:
        try:
            if getattr(payload, "extension", None) == "postgres_changes":
                self._wake()  # the server now streams: catch up on the gap before this
        except Exception:
            log.exception("realtime_callback_failed")


def is_image_request(payload: Any) -> bool:
    """Whether an INSERT event (already filtered on ``message_type = 'image'``) is a user's
    request rather than an assistant reply. An event without the role (a record over Realtime's
    1 MB limit keeps only short fields; ``role`` is short, but be safe) counts as a request:
    a spare claim is cheap, a missed one waits for the timer."""
    data = payload.get("data") if isinstance(payload, dict) else None
    record = data.get("record") if isinstance(data, dict) else None
    if not isinstance(record, dict) or "role" not in record:
        return True
    return bool(record["role"] == "user")


def _session_problem(client: AsyncRealtimeClient, channel: AsyncRealtimeChannel) -> str | None:
    """Why this session cannot deliver events, or None; ``fatal:`` means no self-repair."""
    if client.channels.get(channel.topic) is not channel:
        return "fatal: channel closed by the server (phx_close)"
    if channel.is_closed:
        return "fatal: channel closed"
    listen_task = client._listen_task
    if client.is_connected and listen_task is not None and listen_task.done():
        return "fatal: the client's listen task died"
    if not client.is_connected:
        return "socket disconnected"
    if not channel.is_joined:
        return f"channel {channel.state.value}"
    return None


async def _close_quietly(client: AsyncRealtimeClient) -> None:
    """Close a client we are giving up on, without waiting on a dead server."""
    tasks = [t for t in (client._listen_task, client._heartbeat_task) if t is not None]
    try:
        async with asyncio.timeout(2.0):
            await client.close()
    except Exception as exc:
        log.debug("realtime_close_failed", reason=type(exc).__name__)
        connection = client._ws_connection
        if connection is not None:
            connection.transport.abort()
    # close() leaves push timeouts and rejoin timers of the old client running; finish them so
    # they cannot act on (or log about) a client we have replaced.
    tasks += [task for task in asyncio.all_tasks() if _is_realtime_task(task)]
    for task in tasks:
        if not task.done():
            task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


_REALTIME_PACKAGE = str(Path(realtime.__file__).resolve().parent)


def _is_realtime_task(task: asyncio.Task[Any]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and str(Path(code.co_filename).resolve()).startswith(_REALTIME_PACKAGE)
