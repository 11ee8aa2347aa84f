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
from decimal import Decimal
from typing import Any, Protocol
from uuid import UUID

from core.budget import NextStart
from core.errors import OperatorError
from core.models import ClaimedJob, as_timestamp, as_uuid
from core.ports import Completion, JobStore, WriteResult

#: what the fenced writes return -> what the worker needs to know
WRITE_RESULTS = {
    "completed": WriteResult.DONE,
    "failed": WriteResult.DONE,
    "retrying": WriteResult.DONE,
    "released": WriteResult.DONE,
    "requeued": WriteResult.DONE,
    "previewed": WriteResult.DONE,
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
        self,
        worker: str,
        limit: int,
        lease_seconds: float,
        max_attempts: int,
        images_per_minute: float | None = None,
    ) -> list[ClaimedJob]:
        rows = await self._transport.rows(
            "image_jobs_claim_within_budget",
            {
                "p_worker": worker,
                "p_limit": limit,
                "p_lease_seconds": lease_seconds,
                "p_max_attempts": max_attempts,
                "p_images_per_minute": images_per_minute,
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
    ) -> Completion:
        rows = await self._transport.rows(
            "image_jobs_complete_priced",
            {
                "p_request_id": job.request_id,
                "p_worker": worker,
                "p_attempt": job.attempt,
                "p_image_url": image_url,
                "p_metadata": metadata,
            },
        )
        if len(rows) != 1:
            raise OperatorError(f"image_jobs_complete_priced answered {len(rows)} rows, not 1")
        cost = rows[0].get("cost_usd")
        return Completion(
            write=_known_result("image_jobs_complete_priced", rows[0].get("result")),
            cost_usd=None if cost is None else float(cost),
        )

    async def preview(
        self, job: ClaimedJob, worker: str, preview_url: str, index: int
    ) -> WriteResult:
        return _known_result(
            "image_jobs_preview",
            await self._transport.value(
                "image_jobs_preview",
                {
                    "p_request_id": job.request_id,
                    "p_worker": worker,
                    "p_attempt": job.attempt,
                    "p_preview_url": preview_url,
                    "p_index": index,
                },
            ),
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

    async def rate_limited(
        self, job: ClaimedJob, worker: str, *, retry_after: float | None, detail: str
    ) -> WriteResult:
        return await self._fenced_write(
            "image_jobs_rate_limited",
            {
                "p_request_id": job.request_id,
                "p_worker": worker,
                "p_attempt": job.attempt,
                "p_retry_after_seconds": retry_after,
                "p_detail": detail,
            },
        )

    async def image_of_reply(self, reply_id: UUID) -> Mapping[str, Any] | None:
        found = await self._transport.value("image_reply_image", {"p_reply_id": reply_id})
        return found if isinstance(found, dict) else None

    async def next_due(self) -> datetime | None:
        due = await self._transport.value("image_jobs_next_due", {})
        return None if due is None else as_timestamp(due)

    async def next_start(self) -> NextStart:
        rows = await self._transport.rows("image_jobs_next_start", {})
        if len(rows) != 1:
            raise OperatorError(f"image_jobs_next_start returned {len(rows)} rows, not one")
        return NextStart.from_row(rows[0])

    async def _fenced_write(self, function: str, arguments: Arguments) -> WriteResult:
        return _known_result(function, await self._transport.value(function, arguments))

    # -- the admin migration: a snapshot, and what operators may do ----------------------------

    async def status(self, failures: int = 0) -> dict[str, Any]:
        """The ``image_queue_status`` snapshot, with up to ``failures`` recent failures."""
        return _object(
            "image_queue_status",
            await self._transport.value("image_queue_status", {"p_failures": failures}),
        )

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

    # -- limits, usage and prices (the limits migration) ---------------------------------------

    async def quota_set(
        self, user: UUID | None, limits: Mapping[str, float | None]
    ) -> dict[str, Any]:
        """Change the default limits (``user`` None) or a user's override; a key set to None
        means unlimited, a key left out keeps its value. The new state, as ``quota_show``."""
        return _object(
            "image_quota_set",
            await self._transport.value("image_quota_set", {"p_user": user, "p_limits": limits}),
        )

    async def quota_remove(self, user: UUID) -> bool:
        """Drop a user's override; whether there was one."""
        return bool(await self._transport.value("image_quota_remove", {"p_user": user}))

    async def quota_show(self, user: UUID | None = None) -> dict[str, Any]:
        """The default limits, whether any limit is set, and for ``user`` their override and
        quota (limits, what is used, when the next request is possible)."""
        return _object(
            "image_quota_show", await self._transport.value("image_quota_show", {"p_user": user})
        )

    async def usage(self, since: datetime, user: UUID | None = None) -> list[dict[str, Any]]:
        """Images, tokens and USD of images completed since ``since``: by user, or for one user
        by day (UTC)."""
        rows = await self._transport.value("image_usage", {"p_since": since, "p_user": user})
        if not isinstance(rows, list):
            raise OperatorError("image_usage answered something that is not a list")
        return rows

    async def prices_set(
        self, model: str, *, input_text: Decimal, input_image: Decimal, output_image: Decimal
    ) -> dict[str, Any]:
        """Set a model's USD per 1M tokens; the stored row."""
        return _object(
            "image_prices_set",
            await self._transport.value(
                "image_prices_set",
                {
                    "p_model": model,
                    "p_input_text": input_text,
                    "p_input_image": input_image,
                    "p_output_image": output_image,
                },
            ),
        )

    async def provider_budget(self) -> dict[str, Any]:
        """The fleet's provider budget as it stands (``image_provider_budget``)."""
        return _object(
            "image_provider_budget", await self._transport.value("image_provider_budget", {})
        )

    async def provider_budget_set(
        self, images_per_minute: float | None, *, forget_learned: bool = False
    ) -> dict[str, Any]:
        """Set (None: clear) the operator's budget; optionally forget the learned rate."""
        return _object(
            "image_provider_budget_set",
            await self._transport.value(
                "image_provider_budget_set",
                {
                    "p_images_per_minute": images_per_minute,
                    "p_forget_learned": forget_learned,
                },
            ),
        )

    async def prices(self) -> list[dict[str, Any]]:
        """Every model's prices (USD per 1M tokens)."""
        rows = await self._transport.value("image_prices", {})
        if not isinstance(rows, list):
            raise OperatorError("image_prices answered something that is not a list")
        return rows


async def queue_snapshot(queue: JobStore, failures: int = 0) -> dict[str, Any]:
    """The ``image_queue_status`` snapshot with the fleet's provider budget under
    ``provider_budget``: what ``image-listener status`` prints and ``/metrics`` shows."""
    status = await queue.status(failures)
    return {**status, "provider_budget": await queue.provider_budget()}


def _known_result(function: str, result: object) -> WriteResult:
    try:
        return WRITE_RESULTS[str(result)]
    except KeyError:
        raise OperatorError(
            f"{function} answered {str(result)[:40]!r}, not a known result"
        ) from None


def _object(function: str, answer: object) -> dict[str, Any]:
    if not isinstance(answer, dict):
        raise OperatorError(f"{function} answered something that is not an object")
    return answer
