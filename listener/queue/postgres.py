"""The JobStore over a PostgreSQL connection pool: each method is one call of a queue function.

Driver errors are translated here, once: connection trouble and timeouts become
``DatabaseUnavailable`` (transient), anything else an ``OperatorError`` (a bug or a schema that
does not match), so the worker never sees a psycopg exception.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from core.errors import DatabaseUnavailable, OperatorError, first_line
from core.models import ClaimedJob
from core.ports import WriteResult

#: The claim keeps the server's durable commit. Committing it asynchronously
#: (``synchronous_commit`` off for that transaction) saved ~0.2 ms of wake-up, but a server
#: crash within the WAL writer's delay forgets the claim while the call it started goes on:
#: the request is then claimed and generated again, a second billed image (bench/FINDINGS.md).
_CLAIM = "select * from public.image_jobs_claim(%s, %s, %s, %s)"
_EXTEND = "select public.image_jobs_extend(%s, %s::uuid[], %s::integer[], %s) as request_id"
_COMPLETE = "select public.image_jobs_complete(%s, %s, %s, %s, %s::jsonb) as result"
_FAIL = "select public.image_jobs_fail(%s, %s, %s, %s, %s, %s, %s::jsonb) as result"
_RELEASE = "select public.image_jobs_release(%s, %s, %s) as result"
_NEXT_DUE = "select public.image_jobs_next_due() as due"
_STATUS = "select public.image_queue_status(p_failures => 0) as status"

#: what the queue functions return -> what the worker needs to know
WRITE_RESULTS = {
    "completed": WriteResult.DONE,
    "failed": WriteResult.DONE,
    "retrying": WriteResult.DONE,
    "released": WriteResult.DONE,
    "lease_lost": WriteResult.LEASE_LOST,
    "cancelled": WriteResult.CANCELLED,
}


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
        # prepare_threshold=None keeps us compatible with PgBouncer/Supavisor transaction mode.
        kwargs={
            "autocommit": True,
            "prepare_threshold": None,
            "application_name": "image-listener:worker",
        },
        # No check on checkout: it cost a round trip (and a transaction) per call. A connection
        # broken by a restart fails its call once (DatabaseUnavailable, retried) and the pool
        # replaces it.
        name="image-listener",
    )


class PgJobStore:
    """Calls the queue's SQL functions; every call is a single autocommitted statement."""

    def __init__(self, pool: AsyncConnectionPool, *, call_timeout: float) -> None:
        self._pool = pool
        # Bounds every call, pool wait included: a half-open socket must not hang the worker.
        self._call_timeout = call_timeout
        #: monotonic time of the last call that reached the database (readiness)
        self.last_ok: float | None = None

    async def _fetch(self, query: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        try:
            async with asyncio.timeout(self._call_timeout):
                async with self._pool.connection() as conn:
                    async with conn.cursor(row_factory=dict_row) as cur:
                        set_json_loads(lenient_json_loads, cur)
                        await cur.execute(query, params)
                        rows = await cur.fetchall()
            self.last_ok = time.monotonic()
            return rows
        except TimeoutError as exc:
            raise DatabaseUnavailable(
                f"database call timed out after {self._call_timeout:g}s"
            ) from exc
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise DatabaseUnavailable(f"database call failed: {first_line(exc)}") from exc
        except psycopg.Error as exc:
            raise OperatorError(f"database call rejected: {first_line(exc)}") from exc

    async def claim(
        self, worker: str, limit: int, lease_seconds: float, max_attempts: int
    ) -> list[ClaimedJob]:
        rows = await self._fetch(_CLAIM, (worker, limit, lease_seconds, max_attempts))
        return [ClaimedJob.from_row(row) for row in rows]

    async def extend(
        self, worker: str, held: Sequence[tuple[UUID, int]], lease_seconds: float
    ) -> set[UUID]:
        if not held:
            return set()
        ids = [request_id for request_id, _ in held]
        attempts = [attempt for _, attempt in held]
        rows = await self._fetch(_EXTEND, (worker, ids, attempts, lease_seconds))
        return {row["request_id"] for row in rows}

    async def complete(
        self, job: ClaimedJob, worker: str, image_url: str, metadata: Mapping[str, Any]
    ) -> WriteResult:
        rows = await self._fetch(
            _COMPLETE, (job.request_id, worker, job.attempt, image_url, json.dumps(metadata))
        )
        return WRITE_RESULTS[rows[0]["result"]]

    async def fail(
        self,
        job: ClaimedJob,
        worker: str,
        *,
        public_error: str,
        detail: str,
        retry_in_seconds: float | None,
        metadata: Mapping[str, Any],
    ) -> WriteResult:
        rows = await self._fetch(
            _FAIL,
            (
                job.request_id,
                worker,
                job.attempt,
                public_error,
                detail,
                retry_in_seconds,
                json.dumps(metadata),
            ),
        )
        return WRITE_RESULTS[rows[0]["result"]]

    async def release(self, job: ClaimedJob, worker: str) -> WriteResult:
        rows = await self._fetch(_RELEASE, (job.request_id, worker, job.attempt))
        return WRITE_RESULTS[rows[0]["result"]]

    async def status(self) -> dict[str, Any]:
        rows = await self._fetch(_STATUS, ())
        status: dict[str, Any] = rows[0]["status"]
        return status

    async def next_due(self) -> datetime | None:
        rows = await self._fetch(_NEXT_DUE, ())
        due = rows[0]["due"]
        return due if isinstance(due, datetime) else None
