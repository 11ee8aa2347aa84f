"""The JobStore over PostgREST: the same queue functions as the PostgreSQL mode, called with
``supabase.rpc(...)`` and the service-role key. No queue logic is repeated here.

Retries: the supabase client retries only GET/HEAD, and these calls are POSTs, so it adds no
layer of its own. Our policy is the one the worker already applies in both modes: a failed
claim is retried after a backoff, a failed renewal at the next tick, a final write for up to
half a lease. Repeating any of them is safe: complete/fail/release/extend are fenced by
(worker, attempt); a claim whose answer was lost leaves jobs leased to us that nobody works
on, and those are taken over when the lease expires (their attempt counted).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import httpx
from postgrest.exceptions import APIError
from supabase import AsyncClient

from core.errors import DatabaseUnavailable, ImageListenerError, OperatorError
from core.models import ClaimedJob
from core.ports import WriteResult
from listener.queue.postgres import WRITE_RESULTS

#: PostgREST's own codes for "cannot reach / use the database right now"
_POSTGREST_TRANSIENT = frozenset({"PGRST000", "PGRST001", "PGRST002", "PGRST003"})
#: SQLSTATEs that another try may not repeat (timeouts, serialization, connections, shutdown)
_SQLSTATE_TRANSIENT_PREFIXES = ("08", "40", "53", "57")


def translate_api_error(exc: APIError) -> ImageListenerError:
    """PostgREST/gateway errors into the core tree: transient when a retry may help."""
    code = str(exc.code or "")
    detail = f"PostgREST call failed: code={code or '?'} message={exc.message!r}"
    if code in _POSTGREST_TRANSIENT:
        return DatabaseUnavailable(detail)
    if code.isdigit() and len(code) == 3:  # a bare HTTP status from a proxy or the gateway
        status = int(code)
        if status >= 500 or status in (408, 429):
            return DatabaseUnavailable(detail)
        return OperatorError(detail)
    if code.startswith(_SQLSTATE_TRANSIENT_PREFIXES):
        return DatabaseUnavailable(detail)
    # 42501 (no EXECUTE: not the service-role key), 42883 (function missing: not migrated), ...
    return OperatorError(detail)


class SupabaseJobStore:
    """Each method is one ``rpc`` call, bounded by ``call_timeout``."""

    def __init__(self, client: AsyncClient, *, call_timeout: float) -> None:
        self._client = client
        self._call_timeout = call_timeout
        #: monotonic time of the last call PostgREST answered (readiness)
        self.last_ok: float | None = None

    async def call(self, function: str, params: Mapping[str, Any]) -> Any:
        """One rpc; errors translated into the core tree (also used by the admin commands)."""
        try:
            async with asyncio.timeout(self._call_timeout):
                response = await self._client.rpc(function, dict(params)).execute()
        except TimeoutError as exc:
            raise DatabaseUnavailable(
                f"PostgREST call {function} timed out after {self._call_timeout:g}s"
            ) from exc
        except APIError as exc:
            raise translate_api_error(exc) from exc
        except httpx.HTTPError as exc:
            raise DatabaseUnavailable(
                f"PostgREST call {function} failed: {type(exc).__name__}"
            ) from exc
        except (RecursionError, ValueError) as exc:
            # postgrest-py's json decoding: nesting deeper than Python's recursion limit, or an
            # integer longer than int() accepts. Only a row written around the validation
            # trigger holds such options; failing the call beats killing the worker.
            raise OperatorError(
                f"PostgREST call {function}: the answer could not be decoded ({type(exc).__name__})"
            ) from exc
        self.last_ok = time.monotonic()
        return response.data

    async def claim(
        self, worker: str, limit: int, lease_seconds: float, max_attempts: int
    ) -> list[ClaimedJob]:
        rows = await self.call(
            "image_jobs_claim",
            {
                "p_worker": worker,
                "p_limit": limit,
                "p_lease_seconds": lease_seconds,
                "p_max_attempts": max_attempts,
            },
        )
        if not isinstance(rows, list):
            # postgrest-py hands back the raw text of an answer that is not JSON at all.
            raise OperatorError("PostgREST call image_jobs_claim: the answer could not be decoded")
        return [ClaimedJob.from_row(row) for row in rows]

    async def extend(
        self, worker: str, held: Sequence[tuple[UUID, int]], lease_seconds: float
    ) -> set[UUID]:
        if not held:
            return set()
        rows = await self.call(
            "image_jobs_extend",
            {
                "p_worker": worker,
                "p_request_ids": [str(request_id) for request_id, _ in held],
                "p_attempts": [attempt for _, attempt in held],
                "p_lease_seconds": lease_seconds,
            },
        )
        # A set-returning function of a scalar comes back as a list of bare values.
        return {UUID(str(value)) for value in rows or []}

    async def complete(
        self, job: ClaimedJob, worker: str, image_url: str, metadata: Mapping[str, Any]
    ) -> WriteResult:
        result = await self.call(
            "image_jobs_complete",
            {
                "p_request_id": str(job.request_id),
                "p_worker": worker,
                "p_attempt": job.attempt,
                "p_image_url": image_url,
                "p_metadata": _json_safe(metadata),
            },
        )
        return WRITE_RESULTS[str(result)]

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
        result = await self.call(
            "image_jobs_fail",
            {
                "p_request_id": str(job.request_id),
                "p_worker": worker,
                "p_attempt": job.attempt,
                "p_error": public_error,
                "p_detail": detail,
                "p_retry_in_seconds": retry_in_seconds,
                "p_metadata": _json_safe(metadata),
            },
        )
        return WRITE_RESULTS[str(result)]

    async def release(self, job: ClaimedJob, worker: str) -> WriteResult:
        result = await self.call(
            "image_jobs_release",
            {"p_request_id": str(job.request_id), "p_worker": worker, "p_attempt": job.attempt},
        )
        return WRITE_RESULTS[str(result)]

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = await self.call("image_queue_status", {"p_failures": 0})
        return status

    async def next_due(self) -> datetime | None:
        result = await self.call("image_jobs_next_due", {})
        return None if result is None else datetime.fromisoformat(str(result))


def _json_safe(value: Mapping[str, Any]) -> Any:
    """Metadata as plain JSON (UUIDs, datetimes become strings), as PostgREST needs."""
    return json.loads(json.dumps(value, default=str))
