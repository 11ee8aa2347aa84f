"""The queue transport over PostgreSQL: each call is one autocommitted statement,
``select … public.<function>(p_name => …)``, on a connection from the daemon's pool (or, for a
one-shot command, a connection of its own).

Driver errors are translated here, once: connection trouble and timeouts become
``DatabaseUnavailable`` (transient), anything else an ``OperatorError`` (a bug or a schema that
does not match), so no caller ever sees a psycopg exception.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb, set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from core.errors import DatabaseUnavailable, OperatorError, first_line
from listener.queue.calls import Arguments

#: gives a connection for one call and takes it back afterwards
ConnectionSource = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]
#: prepare_threshold=None keeps every connection usable behind PgBouncer/Supavisor in
#: transaction mode (server-side prepared statements do not survive a transaction there)
_CONNECTION_KWARGS: dict[str, Any] = {"autocommit": True, "prepare_threshold": None}


class UndecodableJson:
    """Stands in for a json/jsonb value that PostgreSQL stores but Python's json cannot load
    (nested deeper than the recursion limit, an integer longer than ``int()`` accepts).

    Only a row written around the validation trigger can hold one. Decoding it must not fail
    the whole claim, which would fail every job claimed with it; as a value that is no mapping
    it fails its own job's validation with a user-safe reason instead.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"<undecodable JSON: {self.reason}>"


def lenient_json_loads(data: str | bytes) -> Any:
    """``json.loads``, with :class:`UndecodableJson` for what Python cannot represent."""
    try:
        return json.loads(data)
    except RecursionError:
        return UndecodableJson("nested too deeply")
    except ValueError as exc:
        return UndecodableJson(type(exc).__name__)


def open_pool(conninfo: str, *, max_size: int, timeout: float) -> AsyncConnectionPool:
    """A small pool for the queue calls; not opened yet (``await pool.open()``)."""
    return AsyncConnectionPool(
        conninfo,
        min_size=1,
        max_size=max_size,
        timeout=timeout,
        open=False,
        kwargs={**_CONNECTION_KWARGS, "application_name": "image-listener:worker"},
        # No check on checkout: it cost a round trip (and a transaction) per call. A connection
        # broken by a restart fails its call once (DatabaseUnavailable, retried) and the pool
        # replaces it.
        name="image-listener",
    )


def connect_per_call(conninfo: str, *, connect_timeout: float) -> ConnectionSource:
    """A fresh connection for each call: for one-shot commands, where a pool would outlive
    its single use."""

    @asynccontextmanager
    async def connection() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        conn = await psycopg.AsyncConnection.connect(
            conninfo,
            connect_timeout=max(1, round(connect_timeout)),
            application_name="image-listener:command",
            **_CONNECTION_KWARGS,
        )
        async with conn:
            yield conn

    return connection


class SqlTransport:
    """Calls ``public`` functions with named arguments, one autocommitted statement each.

    Every call keeps the server's durable commit. Committing the claim asynchronously
    (``synchronous_commit`` off for its transaction) saved ~0.2 ms of wake-up, but a server
    crash within the WAL writer's delay forgets the claim while the call it started goes on:
    the request is then claimed and generated again, a second billed image (bench/FINDINGS.md).
    """

    def __init__(self, connection: ConnectionSource, *, call_timeout: float) -> None:
        self._connection = connection
        # Bounds every call, pool wait included: a half-open socket must not hang the worker.
        self._call_timeout = call_timeout
        self._last_ok: float | None = None

    @classmethod
    def over_pool(cls, pool: AsyncConnectionPool, *, call_timeout: float) -> SqlTransport:
        return cls(pool.connection, call_timeout=call_timeout)

    @property
    def last_ok(self) -> float | None:
        return self._last_ok

    async def rows(self, function: str, arguments: Arguments) -> Sequence[Mapping[str, Any]]:
        return await self._fetch(function, arguments, table=True)

    async def values(self, function: str, arguments: Arguments) -> list[Any]:
        return [row["value"] for row in await self._fetch(function, arguments, table=False)]

    async def value(self, function: str, arguments: Arguments) -> Any:
        rows = await self._fetch(function, arguments, table=False)
        return rows[0]["value"] if rows else None

    async def _fetch(
        self, function: str, arguments: Arguments, *, table: bool
    ) -> list[dict[str, Any]]:
        query = _statement(function, tuple(arguments), table)
        params = {name: _adapt(value) for name, value in arguments.items()}
        try:
            async with asyncio.timeout(self._call_timeout):
                async with self._connection() as conn:
                    async with conn.cursor(row_factory=dict_row) as cur:
                        set_json_loads(lenient_json_loads, cur)
                        await cur.execute(query, params)
                        rows = await cur.fetchall()
        except TimeoutError as exc:
            raise DatabaseUnavailable(
                f"database call {function} timed out after {self._call_timeout:g}s"
            ) from exc
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise DatabaseUnavailable(
                f"database call {function} failed: {first_line(exc)}"
            ) from exc
        except psycopg.Error as exc:
            raise OperatorError(f"database call {function} rejected: {first_line(exc)}") from exc
        self._last_ok = time.monotonic()
        return rows


@functools.cache
def _statement(function: str, names: tuple[str, ...], table: bool) -> str:
    """The statement for one function and set of argument names (built once, then reused)."""
    if not function.isidentifier() or not all(name.isidentifier() for name in names):
        raise OperatorError(f"not a queue function call: {function}({', '.join(names)})")
    arguments = ", ".join(f"{name} => %({name})s" for name in names)
    if table:
        return f"select * from public.{function}({arguments})"
    return f"select public.{function}({arguments}) as value"


def _adapt(value: object) -> object:
    """Mappings go to jsonb parameters; psycopg adapts everything else by its Python type."""
    if isinstance(value, Mapping):
        return Jsonb(dict(value))
    return value
