"""Operator commands (status, retry, cancel, requeue-stuck): each is one SQL function of the
admin migration, called through :class:`listener.queue.calls.QueueCalls` over the mode's
transport (:func:`listener.runtime.wiring.command_queue`); this module runs the call and
formats its answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from core.errors import OperatorError
from listener.commands.budget import render_budget
from listener.queue.calls import QueueCalls
from listener.runtime.wiring import command_queue
from listener.settings import Settings

T = TypeVar("T")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


async def run(settings: Settings, action: Callable[[QueueCalls], Awaitable[T]]) -> T:
    """Run one queue call (``lambda queue: queue.status(10)``) over the mode's transport."""
    async with command_queue(settings) as queue:
        return await action(queue)


def parse_since(
    text: str, *, option: str = "--failed-since", now: datetime | None = None
) -> datetime:
    """``2026-11-27T08:00:00Z`` or a duration back from now (``90m``, ``2h``, ``1d``); errors
    name ``option``."""
    now = now or datetime.now(UTC)
    match = _DURATION.fullmatch(text.strip())
    if match:
        return now - timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise OperatorError(
            f"{option} {text!r}: give an ISO time or a duration like 30m, 2h, 1d"
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
    if status.get("provider_budget") is not None:
        lines += ["", render_budget(status["provider_budget"])]
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
