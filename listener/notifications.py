"""Wake-ups from PostgreSQL LISTEN/NOTIFY on a dedicated connection, with liveness and reconnect.

A notification is only a hint (the job table is the truth), so this source never hands over
work: it calls ``wake()`` and the worker claims. It also wakes the worker after every
(re)connect, because notifications sent while the connection was down are gone for good.
Liveness: when no notification arrived for ``probe_seconds``, a ``select 1`` must answer within
``probe_timeout``; otherwise the connection is dropped and rebuilt with backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import psycopg
import structlog

from core.errors import DatabaseUnavailable, first_line

CHANNEL = "image_requests"
log = structlog.get_logger("listener.notifications")


class PgNotificationSource:
    """Runs until ``stop`` is set; ``healthy`` tells whether LISTEN is currently in place."""

    def __init__(
        self,
        conninfo: str,
        *,
        probe_seconds: float,
        probe_timeout: float,
        reconnect_max_seconds: float = 10.0,
    ) -> None:
        self._conninfo = conninfo
        self._probe_seconds = probe_seconds
        self._probe_timeout = probe_timeout
        self._reconnect_max = reconnect_max_seconds
        self.healthy = False
        self.connects = 0

    async def run(self, wake: Callable[[], None], stop: asyncio.Event) -> None:
        """Listen, reconnecting forever with backoff until ``stop`` is set."""
        backoff = 0.2
        while not stop.is_set():
            try:
                await self._listen_once(wake, stop)
                backoff = 0.2
            except DatabaseUnavailable as exc:
                self.healthy = False
                log.warning("listen_connection_lost", reason=exc.detail, retry_in_s=backoff)
                await _sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, self._reconnect_max)
        self.healthy = False

    async def _listen_once(self, wake: Callable[[], None], stop: asyncio.Event) -> None:
        try:
            async with asyncio.timeout(self._probe_timeout):
                conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        except (TimeoutError, psycopg.Error) as exc:
            raise DatabaseUnavailable(f"cannot open LISTEN connection: {first_line(exc)}") from exc
        try:
            async with conn:
                await conn.execute(f"listen {CHANNEL}")
                self.healthy = True
                self.connects += 1
                log.info("listening", channel=CHANNEL, connects=self.connects)
                wake()  # catch up on whatever was inserted while we were not listening
                while not stop.is_set():
                    got_any = False
                    async for _ in conn.notifies(timeout=self._probe_seconds):
                        got_any = True
                        wake()
                        if stop.is_set():
                            break
                    if not got_any and not stop.is_set():
                        await self._probe(conn)
        except (TimeoutError, psycopg.Error) as exc:
            raise DatabaseUnavailable(f"LISTEN connection failed: {first_line(exc)}") from exc

    async def _probe(self, conn: psycopg.AsyncConnection[object]) -> None:
        async with asyncio.timeout(self._probe_timeout):
            await conn.execute("select 1")


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass
