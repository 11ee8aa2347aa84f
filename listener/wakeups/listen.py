"""Wake-ups from PostgreSQL LISTEN/NOTIFY on a dedicated connection, with liveness and reconnect.

A notification is only a hint (the job table is the truth), so this source never hands over
work: it calls ``wake()`` and the worker claims. It also wakes the worker after every
(re)connect, because notifications sent while the connection was down are gone for good.
Liveness: when no notification arrived for ``probe_seconds``, a ``select 1`` must answer within
``probe_timeout``; otherwise the connection is dropped and rebuilt with backoff.

Poolers: through PgBouncer or Supavisor in transaction mode LISTEN is accepted but no NOTIFY
from another session is ever delivered. Every new LISTEN connection therefore first gets a
NOTIFY from a second, short-lived connection; when it does not arrive the source says so (once,
as an operator error) and turns into a fast poller, so the daemon keeps working, only with one
cheap claim query per tick instead of push wake-ups.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

import psycopg
import structlog

from core.errors import DatabaseUnavailable, first_line

#: the channel the queue's SQL sends on (``enqueue_image_request``, ``image_jobs_release``,
#: ``image_jobs_retry``, ``image_jobs_requeue_stuck``): rename it in both places or in neither
CHANNEL = "image_requests"
#: visible in pg_stat_activity, so operators (and tests) can find the LISTEN connection
APPLICATION_NAME = "image-listener:listen"
log = structlog.get_logger("listener.notifications")


class ListenUnsupported(Exception):
    """LISTEN was accepted but a NOTIFY from another session never arrived (a transaction
    pooler)."""


class PgNotificationSource:
    """Runs until ``stop`` is set; ``healthy`` tells whether wake-ups are in place (LISTEN, or
    the polling fallback when LISTEN cannot work on this connection)."""

    def __init__(
        self,
        conninfo: str,
        *,
        probe_seconds: float,
        probe_timeout: float,
        fallback_poll_seconds: float = 0.5,
        reconnect_max_seconds: float = 10.0,
        relisten_after_seconds: float = 300.0,
    ) -> None:
        self._conninfo = conninfo
        self._probe_seconds = probe_seconds
        self._probe_timeout = probe_timeout
        self._fallback_poll = fallback_poll_seconds
        self._reconnect_max = reconnect_max_seconds
        self._relisten_after = relisten_after_seconds
        self.healthy = False
        self.connects = 0
        #: notifications that woke the worker (one per request enqueued, retried or released)
        self.hints = 0
        self.polling = False

    @property
    def reconnects(self) -> int:
        return max(0, self.connects - 1)

    async def run(self, wake: Callable[[], None], stop: asyncio.Event) -> None:
        """Listen, reconnecting forever with backoff until ``stop`` is set."""
        backoff = 0.2
        while not stop.is_set():
            connects = self.connects
            try:
                await self._listen_once(wake, stop)
                backoff = 0.2
            except ListenUnsupported:
                log.error(
                    "listen_unsupported",
                    advice="LISTEN/NOTIFY does not work through this connection (a pooler in "
                    "transaction mode?): use a direct or session-mode DATABASE_URL, or set "
                    "IMAGE_LISTENER_WAKEUP=poll; polling every "
                    f"{self._fallback_poll:g}s meanwhile",
                )
                # Poll for a while, then try LISTEN again: the connection may change (a
                # failover to a direct endpoint, a pooler reconfigured).
                await self._poll(wake, stop, self._relisten_after)
                backoff = 0.2
            except DatabaseUnavailable as exc:
                self.healthy = False
                if self.connects > connects:
                    backoff = 0.2  # it was listening: a new outage, not more of the last one
                log.warning("listen_connection_lost", reason=exc.detail, retry_in_s=backoff)
                await _sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, self._reconnect_max)
        self.healthy = False

    async def _listen_once(self, wake: Callable[[], None], stop: asyncio.Event) -> None:
        try:
            async with asyncio.timeout(self._probe_timeout):
                conn = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, application_name=APPLICATION_NAME
                )
        except (TimeoutError, psycopg.Error) as exc:
            raise DatabaseUnavailable(f"cannot open LISTEN connection: {first_line(exc)}") from exc
        try:
            async with conn:
                # No notify handler on this connection: notifications that arrive while the
                # probe runs wait in psycopg's backlog for the next notifies() (and psycopg
                # warns when a connection uses both mechanisms).
                wait = max(2.0, self._probe_timeout)
                # Bounded as a whole: a stalled connection is an outage (reconnect with
                # backoff), not a pooler; only a responsive session that never hears its
                # NOTIFY is.
                async with asyncio.timeout(wait + 2 * self._probe_timeout):
                    await conn.execute(f"listen {CHANNEL}")
                    heard = await listen_round_trip(conn, self._conninfo, wait_seconds=wait)
                if not heard:
                    raise ListenUnsupported("a NOTIFY from another session never arrived")
                self.healthy = True
                self.connects += 1
                log.info("listening", channel=CHANNEL, connects=self.connects)
                wake()  # catch up on whatever was inserted while we were not listening
                while not stop.is_set():
                    got_any = False
                    async for _ in conn.notifies(timeout=self._probe_seconds):
                        got_any = True
                        self.hints += 1
                        wake()
                        if stop.is_set():
                            break
                    if not got_any and not stop.is_set():
                        await self._probe(conn)
        except (TimeoutError, psycopg.Error) as exc:
            raise DatabaseUnavailable(f"LISTEN connection failed: {first_line(exc)}") from exc

    async def _poll(self, wake: Callable[[], None], stop: asyncio.Event, seconds: float) -> None:
        """Wake the worker every ``fallback_poll_seconds`` for ``seconds`` (or until stopped)."""
        self.polling = True
        self.healthy = True
        deadline = time.monotonic() + seconds
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                wake()
                await _sleep_or_stop(stop, self._fallback_poll)
        finally:
            self.polling = False
            self.healthy = False

    async def _probe(self, conn: psycopg.AsyncConnection[object]) -> None:
        async with asyncio.timeout(self._probe_timeout):
            await conn.execute("select 1")


async def listen_round_trip(
    conn: psycopg.AsyncConnection[Any], conninfo: str, *, wait_seconds: float
) -> bool:
    """Does a NOTIFY sent from a second connection to ``conninfo`` reach LISTEN on ``conn``?

    False behind a pooler in transaction mode. It must come from another session, as real
    wake-ups do: such a pooler drops those, yet round-trips a NOTIFY sent on ``conn`` itself
    (same transaction, same server session), which would pass the test falsely.
    """
    channel = f"image_listener_selftest_{os.getpid()}_{secrets.token_hex(3)}"
    arrived = asyncio.Event()

    def on_note(note: psycopg.Notify) -> None:
        if note.channel == channel:
            arrived.set()

    # Handlers only, never notifies(): psycopg warns when a connection uses both. Each command
    # on ``conn`` reads whatever arrived meanwhile and hands it to the handlers.
    conn.add_notify_handler(on_note)
    try:
        await conn.execute(f"listen {channel}")
        async with await psycopg.AsyncConnection.connect(
            conninfo, autocommit=True, connect_timeout=max(2, round(wait_seconds))
        ) as sender:
            await sender.execute(f"notify {channel}")
        deadline = time.monotonic() + wait_seconds
        while not arrived.is_set() and time.monotonic() < deadline:
            await conn.execute("select 1")
            if not arrived.is_set():
                await asyncio.sleep(0.05)
        await conn.execute(f"unlisten {channel}")
    finally:
        conn.remove_notify_handler(on_note)
    return arrived.is_set()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass
