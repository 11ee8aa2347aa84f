"""When a lease is certainly still ours without asking the database.

The database sets ``lease_expires_at = now() + lease`` when it grants or renews a lease; we
note our own monotonic clock *before* sending that request. So the lease cannot expire before
``confirmed_at + lease`` on our clock, whatever the two clocks read. Within a safety share of
that window no other worker can hold the job, and the fenced write before storing the image
can be skipped; past it (a slow attempt, a paused process, a renewal that failed) we ask.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

#: the share of the lease within which we trust our own clock (the rest absorbs clock drift)
TRUSTED_SHARE = 0.5


def lease_certainly_held(confirmed_at: float, now: float, lease_seconds: float) -> bool:
    """True while ``now`` is within the trusted share of the lease confirmed at ``confirmed_at``."""
    return 0.0 <= now - confirmed_at < lease_seconds * TRUSTED_SHARE


@dataclass
class Lease:
    """One claimed job's lease as its worker knows it. The worker moves ``confirmed_at`` on each
    renewal; the processor asks :meth:`certainly_held` before storing the image."""

    request_id: UUID
    attempt: int
    #: monotonic time just before the request that last granted or renewed the lease
    confirmed_at: float

    def certainly_held(self, now: float, lease_seconds: float) -> bool:
        return lease_certainly_held(self.confirmed_at, now, lease_seconds)
