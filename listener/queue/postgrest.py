"""The queue transport over PostgREST: the same queue functions as the SQL transport, called
with ``supabase.rpc(...)`` and the service-role key. No queue logic is repeated here.

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
from decimal import Decimal
from typing import Any

import httpx
from postgrest.exceptions import APIError
from supabase import AsyncClient

from core.errors import DatabaseUnavailable, ImageListenerError, OperatorError
from listener.queue.calls import Arguments

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


class RpcTransport:
    """Each call is one ``rpc``, bounded by ``call_timeout``; arguments travel as JSON."""

    def __init__(self, client: AsyncClient, *, call_timeout: float) -> None:
        self._client = client
        self._call_timeout = call_timeout
        self._last_ok: float | None = None

    @property
    def last_ok(self) -> float | None:
        return self._last_ok

    async def rows(self, function: str, arguments: Arguments) -> Sequence[Mapping[str, Any]]:
        rows = await self._call(function, arguments)
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            # postgrest-py hands back the raw text of an answer that is not JSON at all.
            raise OperatorError(f"PostgREST call {function}: the answer could not be decoded")
        return rows

    async def values(self, function: str, arguments: Arguments) -> list[Any]:
        # A set-returning function of a scalar comes back as a list of bare values.
        values = await self._call(function, arguments)
        if values is None:
            return []
        if not isinstance(values, list):
            raise OperatorError(f"PostgREST call {function}: the answer could not be decoded")
        return values

    async def value(self, function: str, arguments: Arguments) -> Any:
        return await self._call(function, arguments)

    async def _call(self, function: str, arguments: Arguments) -> Any:
        params = {name: _json_value(value) for name, value in arguments.items()}
        try:
            async with asyncio.timeout(self._call_timeout):
                response = await self._client.rpc(function, params).execute()
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
        self._last_ok = time.monotonic()
        return response.data


def _json_value(value: object) -> Any:
    """An argument as JSON: ids and times as text, mappings and lists element by element."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return json.loads(json.dumps(value, default=str))
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value]
    return str(value)
