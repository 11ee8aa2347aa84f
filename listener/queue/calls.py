"""Every call of the queue's SQL functions, each written once: its name, its named parameters and
what its answer means. The daemon (through :class:`~core.ports.JobStore`) and the admin commands
use this one class, over either transport:

==================  ==============================================  =======================
transport           carries a call as                               used by
==================  ==============================================  =======================
``SqlTransport``    ``select … public.f(p_x => …)`` over psycopg    postgres, hybrid modes
``RpcTransport``    ``POST /rest/v1/rpc/f`` with the service key     supabase mode
==================  ==============================================  =======================

The functions themselves (and every rule of the queue) live in ``migrations/``; a transport only
carries values there and back, and translates its own errors into the core tree. The answers of
the two transports differ only in how values arrive (a ``UUID`` or its text, a ``datetime`` or
ISO text), which is evened out here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from core.errors import OperatorError
from core.models import ClaimedJob, as_timestamp, as_uuid
from core.ports import WriteResult

#: what the fenced writes return -> what the worker needs to know
WRITE_RESULTS = {
    "completed": WriteResult.DONE,
    "failed": WriteResult.DONE,
    "retrying": WriteResult.DONE,
    "released": WriteResult.DONE,
    "lease_lost": WriteResult.LEASE_LOST,
    "cancelled": WriteResult.CANCELLED,
}

#: a call's arguments by parameter name; values are plain Python (str, int, float, None, UUID,
#: datetime, lists of those, and mappings for jsonb parameters)
Arguments = Mapping[str, object]


class QueueTransport(Protocol):
    """Carries one call of a ``public`` queue function and brings back its answer.

    Errors come out as :mod:`core.errors`: ``DatabaseUnavailable`` when another try may
    succeed, ``OperatorError`` otherwise (missing function, no permission, undecodable answer).
    """

    @property
    def last_ok(self) -> float | None:
        """Monotonic time of the last call that got an answer (readiness)."""
        ...

    async def rows(self, function: str, arguments: Arguments) -> Sequence[Mapping[str, Any]]:
        """Call a function that returns a table; its rows."""
        ...

    async def values(self, function: str, arguments: Arguments) -> list[Any]:
        """Call a function that returns a set of scalars; the scalars."""
        ...

    async def value(self, function: str, arguments: Arguments) -> Any:
        """Call a function that returns one value (jsonb comes back decoded)."""
        ...


class QueueCalls:
    """The queue's functions as methods: a :class:`~core.ports.JobStore` for the worker, plus
    the snapshot and the operator actions of the admin migration."""

    def __init__(self, transport: QueueTransport) -> None:
        self._transport = transport

    @property
    def last_ok(self) -> float | None:
        return self._transport.last_ok

    # -- the worker's calls (JobStore); every write is fenced by (worker, attempt) -----------

    async def claim(
        self, worker: str, limit: int, lease_seconds: float, max_attempts: int
    ) -> list[ClaimedJob]:
        rows = await self._transport.rows(
            "image_jobs_claim",
            {
                "p_worker": worker,
                "p_limit": limit,
                "p_lease_seconds": lease_seconds,
                "p_max_attempts": max_attempts,
            },
        )
        return [ClaimedJob.from_row(row) for row in rows]

    async def extend(
        self, worker: str, held: Sequence[tuple[UUID, int]], lease_seconds: float
    ) -> set[UUID]:
        if not held:
            return set()
        values = await self._transport.values(
            "image_jobs_extend",
            {
                "p_worker": worker,
                "p_request_ids": [request_id for request_id, _ in held],
                "p_attempts": [attempt for _, attempt in held],
                "p_lease_seconds": lease_seconds,
            },
        )
        return {as_uuid(value) for value in values}

    async def complete(
        self, job: ClaimedJob, worker: str, image_url: str, metadata: Mapping[str, Any]
    ) -> WriteResult:
        return await self._fenced_write(
            "image_jobs_complete",
            {
                "p_request_id": job.request_id,
                "p_worker": worker,
                "p_attempt": job.attempt,
                "p_image_url": image_url,
                "p_metadata": metadata,
            },
        )

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
        return await self._fenced_write(
            "image_jobs_fail",
            {
                "p_request_id": job.request_id,
                "p_worker": worker,
                "p_attempt": job.attempt,
                "p_error": public_error,
                "p_detail": detail,
                "p_retry_in_seconds": retry_in_seconds,
                "p_metadata": metadata,
            },
        )

    async def release(self, job: ClaimedJob, worker: str) -> WriteResult:
        return await self._fenced_write(
            "image_jobs_release",
            {"p_request_id": job.request_id, "p_worker": worker, "p_attempt": job.attempt},
        )

    async def next_due(self) -> datetime | None:
        due = await self._transport.value("image_jobs_next_due", {})
        return None if due is None else as_timestamp(due)

    async def _fenced_write(self, function: str, arguments: Arguments) -> WriteResult:
        result = await self._transport.value(function, arguments)
        try:
            return WRITE_RESULTS[str(result)]
        except KeyError:
            raise OperatorError(
                f"{function} answered {str(result)[:40]!r}, not a known result"
            ) from None

    # -- the admin migration: a snapshot, and what operators may do ----------------------------

    async def status(self, failures: int = 0) -> dict[str, Any]:
        """The ``image_queue_status`` snapshot, with up to ``failures`` recent failures."""
        snapshot = await self._transport.value("image_queue_status", {"p_failures": failures})
        if not isinstance(snapshot, dict):
            raise OperatorError("image_queue_status answered something that is not an object")
        return snapshot

    async def retry(self, request_id: UUID) -> str:
        """``retried``, or why not: ``not_found``, ``in_progress``, ``not_failed``."""
        return str(await self._transport.value("image_jobs_retry", {"p_request_id": request_id}))

    async def retry_failed(self, since: datetime) -> int:
        """Retry every request that failed since ``since``; how many."""
        return int(await self._transport.value("image_jobs_retry_failed", {"p_since": since}))

    async def cancel(self, request_id: UUID, reason: str | None) -> str:
        """``cancelled``, or why not: ``not_found``, ``not_queued``."""
        result = await self._transport.value(
            "image_jobs_cancel", {"p_request_id": request_id, "p_reason": reason}
        )
        return str(result)

    async def requeue_stuck(self) -> int:
        """Put every job with an expired lease back in the queue now; how many."""
        return int(await self._transport.value("image_jobs_requeue_stuck", {}))
