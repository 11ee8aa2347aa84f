"""Operator commands (status, retry, cancel, requeue-stuck) over either transport.

Each is one SQL function of the admin migration; this module only calls it, over
DATABASE_URL when set (postgres and hybrid modes) or PostgREST rpc with the service-role key
(supabase mode), and formats the answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from core.errors import DatabaseUnavailable, OperatorError, first_line
from listener.settings import Settings

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


async def call(settings: Settings, function: str, params: Mapping[str, Any]) -> Any:
    """Call ``public.<function>`` with named parameters and return its (JSON-decoded) result."""
    if settings.mode() in ("postgres", "hybrid"):
        return await _call_sql(settings.require_database_url(), function, params)
    return await _call_rpc(settings, function, params)


async def _call_sql(conninfo: str, function: str, params: Mapping[str, Any]) -> Any:
    arguments = ", ".join(f"{name} => %({name})s" for name in params)
    query = f"select public.{function}({arguments}) as result"
    try:
        async with await psycopg.AsyncConnection.connect(
            conninfo, autocommit=True, connect_timeout=10
        ) as conn:
            row = await (await conn.execute(query, dict(params))).fetchone()
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot reach the database: {first_line(exc)}") from exc
    except psycopg.Error as exc:
        raise OperatorError(f"{function} failed: {first_line(exc)}") from exc
    return None if row is None else row[0]


async def _call_rpc(settings: Settings, function: str, params: Mapping[str, Any]) -> Any:
    from listener.queue.postgrest import SupabaseJobStore
    from listener.supabase_client import supabase_client

    url, key = settings.require_supabase()
    async with supabase_client(url, key, http_timeout=30) as client:
        store = SupabaseJobStore(client, call_timeout=30)
        return await store.call(function, {k: _jsonable(v) for k, v in params.items()})


def _jsonable(value: Any) -> Any:
    """PostgREST takes JSON: times as ISO strings, ids as strings."""
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, (int, float, str)):
        return value
    return str(value)


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """``2026-11-27T08:00:00Z`` or a duration back from now (``90m``, ``2h``, ``1d``)."""
    now = now or datetime.now(UTC)
    match = _DURATION.fullmatch(text.strip())
    if match:
        return now - timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise OperatorError(
            f"--failed-since {text!r}: give an ISO time or a duration like 30m, 2h, 1d"
        ) from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def render_status(status: Mapping[str, Any]) -> str:
    """The status snapshot as a readable report."""
    jobs = status["jobs"]
    oldest = status.get("oldest_queued_seconds")
    lines = [
        "queue",
        f"  queued   {jobs['queued']:>8}",
        f"  waiting  {jobs['waiting']:>8}   (retries not yet due)",
        f"  running  {jobs['running']:>8}   ({jobs['expired_leases']} with an expired lease)",
        f"  oldest unfinished request: {_age(oldest)}",
        "",
        "leases by worker",
    ]
    leases = status.get("leases") or []
    if not leases:
        lines.append("  (none)")
    for lease in leases:
        lines.append(
            f"  {lease['worker']:<40} {lease['jobs']:>5} job(s), earliest expiry "
            f"{lease['earliest_expiry']}"
        )
    lines += ["", "recent failures"]
    failures = status.get("recent_failures") or []
    if not failures:
        lines.append("  (none)")
    for failure in failures:
        lines.append(
            f"  {failure['failed_at']}  {failure['request_id']}  "
            f"[{failure.get('error_code') or '?'}] {failure['error']}"
        )
    return "\n".join(lines)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def as_json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)
