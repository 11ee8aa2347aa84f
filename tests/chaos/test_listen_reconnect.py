"""The LISTEN connection, cut again and again through the chaos proxy: every cut is noticed and
repaired quickly, not after a backoff inherited from earlier, already repaired outages."""

from __future__ import annotations

import asyncio
import time

import pytest
from psycopg.conninfo import conninfo_to_dict

from listener.wakeups.listen import PgNotificationSource
from tests.chaos.proxy import TcpToUnixProxy
from tests.support.pg import PostgresServer

pytestmark = pytest.mark.chaos


def _socket_path(pg_server: PostgresServer, database_url: str) -> str:
    params = conninfo_to_dict(database_url)
    host = str(params.get("host") or "")
    if not host.startswith("/"):
        pytest.skip("needs the embedded PostgreSQL's unix socket (DATABASE_URL is set)")
    return f"{host}/.s.PGSQL.{params.get('port') or 5432}"


async def test_each_new_outage_starts_the_reconnect_backoff_over(
    pg_server: PostgresServer, database_url: str
) -> None:
    """Five cuts, each after the previous one was repaired: each is repaired within a second.

    The backoff grows while one outage lasts (0.2 s, 0.4 s, ...); a connection that came back
    ends that outage, so the next cut starts again at 0.2 s instead of 3.2 s, 6.4 s, 10 s.
    """
    dbname = str(conninfo_to_dict(database_url)["dbname"])
    with TcpToUnixProxy(_socket_path(pg_server, database_url)) as proxy:
        source = PgNotificationSource(proxy.dsn(dbname), probe_seconds=1.0, probe_timeout=1.0)
        stop, woken = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(source.run(woken.set, stop))
        try:
            await _connects_reach(source, task, woken, 1, within=10)
            for cut in range(1, 6):
                await asyncio.to_thread(proxy.drop)
                cut_at = time.monotonic()
                await _connects_reach(source, task, woken, cut + 1, within=15)
                assert time.monotonic() - cut_at < 1.0, f"cut {cut} took too long to repair"
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=10)


async def _connects_reach(
    source: PgNotificationSource,
    task: asyncio.Task[None],
    woken: asyncio.Event,
    count: int,
    *,
    within: float,
) -> None:
    """Wait until LISTEN was established ``count`` times (each connect calls ``wake``); if the
    source's task ends instead, its exception is the failure."""
    async with asyncio.timeout(within):
        while source.connects < count:
            woken.clear()
            waiter = asyncio.create_task(woken.wait())
            await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if task.done():
                task.result()  # raises what ended the source
                raise AssertionError("the LISTEN source returned while not stopped")
