"""What a chaos scenario found: each request's outcome as the database tells it, the verdict on
it, and the figures of the whole run (one row of the runner's table).

The verdict, per request:

* **lost**: no final reply (complete or failed) by the deadline;
* **duplicated**: more than one reply row (the unique index forbids it), more provider calls
  than the policy allows (``MAX_ATTEMPTS * TRIES_PER_ATTEMPT``), or more images generated than
  the request had claims (each claim may generate once; a second image in one claim, or an image
  no claim asked for, is a duplicate generation);
* **stuck**: a job row left behind, or a reply still ``generating``;
* **wrong**: a final state other than the scenario injected (its ``expect`` says why), or a
  ``complete`` reply whose image is not in the image directory;

plus the time to final state (reply ``updated_at`` minus request ``created_at``, both from the
database clock).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from tests.support.pg import connect

FINAL = ("complete", "failed")


@dataclass(frozen=True)
class RequestOutcome:
    """One request as the database tells it at the end of a scenario."""

    request_id: uuid.UUID
    prompt: str
    created_at: datetime
    replies: int
    status: str | None
    error: str | None
    metadata: dict[str, Any]
    final_at: datetime | None
    has_job: bool

    @property
    def is_final(self) -> bool:
        return self.replies == 1 and self.status in FINAL

    @property
    def claims(self) -> int:
        """How many times the request was claimed (what the reply's metadata recorded)."""
        value = self.metadata.get("attempts", self.metadata.get("attempt", 0))
        return int(value) if isinstance(value, int | float) else 0

    @property
    def time_to_final(self) -> float | None:
        if not self.is_final or self.final_at is None:
            return None
        return (self.final_at - self.created_at).total_seconds()


#: A scenario's expectation for one request: None if its final state is right, else why not.
Expectation = Callable[[RequestOutcome], str | None]


def expect_complete(outcome: RequestOutcome) -> str | None:
    if outcome.status != "complete":
        return f"expected complete, got {outcome.status} ({outcome.error})"
    return None


@dataclass
class ScenarioResult:
    """The figures of one scenario run, one row of the runner's table."""

    name: str
    scale: str
    requests: int = 0
    kills: int = 0
    restarts: int = 0
    faults: int = 0
    lost: int = 0
    duplicated: int = 0
    stuck: int = 0
    wrong: int = 0
    p50_s: float | None = None
    p99_s: float | None = None
    max_s: float | None = None
    wall_s: float = 0.0
    #: scenario-specific expectations that failed, in words
    problems: list[str] = field(default_factory=list)
    #: extra figures worth printing (fault kinds, reconnects, the time bound checked, ...)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.stuck or self.wrong or self.problems)

    def report(self) -> str:
        """A multi-line account for an assertion message."""
        lines = [
            f"{self.name} ({self.scale}): requests={self.requests} lost={self.lost} "
            f"duplicated={self.duplicated} stuck={self.stuck} wrong={self.wrong} "
            f"kills={self.kills} restarts={self.restarts} faults={self.faults} "
            f"p50={_fmt(self.p50_s)} p99={_fmt(self.p99_s)} max={_fmt(self.max_s)} "
            f"wall={self.wall_s:.1f}s",
            *(f"  problem: {problem}" for problem in self.problems[:20]),
            *(f"  {key}: {value}" for key, value in self.notes.items()),
        ]
        return "\n".join(lines)


def _fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}s"


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


_PENDING = """
select
  (select count(*) from public.messages q
   where q.role = 'user' and q.message_type = 'image'
     and not exists (select 1 from public.messages r
                     where r.reply_to = q.id and r.status in ('complete', 'failed'))) as pending,
  (select count(*) from image_queue.jobs) as jobs
"""

_OUTCOMES = """
select q.id, q.content, q.created_at, r.status, r.error, r.metadata, r.updated_at,
       (select count(*) from public.messages d where d.reply_to = q.id) as replies,
       exists (select 1 from image_queue.jobs j where j.request_id = q.id) as has_job
from public.messages q
left join lateral (
  select * from public.messages r where r.reply_to = q.id order by r.created_at limit 1
) r on true
where q.role = 'user' and q.message_type = 'image'
order by q.created_at
"""


def settled(conn: psycopg.Connection[dict[str, Any]]) -> bool:
    """Every request has a final reply and no job is left."""
    row = conn.execute(_PENDING).fetchone()
    return row is not None and row["pending"] == 0 and row["jobs"] == 0


def wait_until_settled(dsn: str, timeout: float) -> bool:
    """Wait until every request has a final reply and no job is left; False on timeout."""
    deadline = time.monotonic() + timeout
    conn: psycopg.Connection[dict[str, Any]] | None = None
    try:
        while time.monotonic() < deadline:
            try:
                if conn is None or conn.closed:
                    conn = connect(dsn)
                if settled(conn):
                    return True
            except psycopg.OperationalError:
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(0.25)
        return False
    finally:
        if conn is not None:
            conn.close()


def collect_outcomes(dsn: str) -> list[RequestOutcome]:
    with connect(dsn) as conn:
        rows = conn.execute(_OUTCOMES).fetchall()
    return [
        RequestOutcome(
            request_id=row["id"],
            prompt=row["content"],
            created_at=row["created_at"],
            replies=int(row["replies"]),
            status=row["status"],
            error=row["error"],
            metadata=row["metadata"] or {},
            final_at=row["updated_at"],
            has_job=bool(row["has_job"]),
        )
        for row in rows
    ]


@dataclass
class Verdict:
    duplicated: bool = False
    wrong: bool = False
    texts: list[str] = field(default_factory=list)


def judge(
    outcome: RequestOutcome,
    calls: Mapping[str, int],
    successes: Mapping[str, int],
    max_calls: int,
    expect: Expectation,
) -> Verdict:
    verdict = Verdict()
    if not outcome.is_final:
        verdict.texts.append(f"not final: {outcome.replies} replies, status {outcome.status}")
        return verdict
    made, images = calls.get(outcome.prompt, 0), successes.get(outcome.prompt, 0)
    if outcome.replies > 1:
        verdict.duplicated = True
        verdict.texts.append(f"{outcome.replies} replies")
    if made > max_calls:
        verdict.duplicated = True
        verdict.texts.append(f"{made} provider calls, the policy allows {max_calls}")
    if images > outcome.claims:
        verdict.duplicated = True
        verdict.texts.append(f"{images} images generated in {outcome.claims} claims")
    why = expect(outcome)
    if why is not None:
        verdict.wrong = True
        verdict.texts.append(why)
    return verdict
