"""The fleet's provider budget as one listener sees it: when it may start its next call.

The budget itself (a token bucket, the fleet-wide pause after a 429, the rate learned from
429s) lives in the database, in ``migrations/20261205160000_provider_budget.sql``; a listener
only takes it in the claim and reads this answer when it has nothing to start.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core.models import as_timestamp

#: why the next start is later than the queue alone would allow
HELD_BY = ("budget", "pause")


@dataclass(frozen=True)
class NextStart:
    """The answer of ``image_jobs_next_start``: when to claim next, and the budget as it stands."""

    #: when a job may be claimed (None: the queue is empty) ...
    due_at: datetime | None
    #: ... and how long from now that is, by the database's clock
    wait_seconds: float | None
    #: ``budget`` (waiting for a token), ``pause`` (the fleet paused after a 429), or None
    held_by: str | None
    #: the rate in force (None: no budget and nothing learned) and where it comes from:
    #: ``operator``, ``listeners``, ``learned`` or ``none``
    per_minute: float | None
    source: str
    tokens: float | None
    paused_until: datetime | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> NextStart:
        held_by = row.get("held_by")
        if held_by is not None and held_by not in HELD_BY:
            raise ValueError(f"unknown held_by {held_by!r}")
        return cls(
            due_at=_timestamp(row.get("due_at")),
            wait_seconds=_number(row.get("wait_seconds")),
            held_by=held_by,
            per_minute=_number(row.get("per_minute")),
            source=str(row.get("source") or "none"),
            tokens=_number(row.get("tokens")),
            paused_until=_timestamp(row.get("paused_until")),
        )


def _timestamp(value: object) -> datetime | None:
    return None if value is None else as_timestamp(value)


def _number(value: object) -> float | None:
    return None if value is None else float(str(value))
