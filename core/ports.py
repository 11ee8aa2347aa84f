"""The I/O the pipeline needs, as small Protocols; the real implementations live in listener/."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from uuid import UUID

from core.budget import NextStart
from core.models import (
    ClaimedJob,
    EditInputs,
    GeneratedImage,
    GenerationParams,
    PartialImage,
    StoredImage,
)

if TYPE_CHECKING:  # core does no asyncio; the event is only named in a signature
    import asyncio


#: receives each partial image as it arrives; whatever it raises stops the generation
PartialSink = Callable[[PartialImage], Awaitable[None]]


class ImageGenerator(Protocol):
    """Turns parameters into image bytes; raises only errors from :mod:`core.errors` (and
    whatever ``on_partial`` raises, unchanged)."""

    async def generate(
        self,
        params: GenerationParams,
        on_partial: PartialSink | None = None,
        inputs: EditInputs | None = None,
    ) -> GeneratedImage:
        """Run one generation call (no retries: the caller owns the retry policy). With
        ``params.partial_images`` and ``on_partial``, the previews are handed over as they
        come; a generator that cannot stream ignores them. With ``inputs`` it is an edit."""
        ...


@runtime_checkable
class AsyncCloseable(Protocol):
    """Holds connections that must be closed when the daemon stops (an HTTP client's)."""

    async def aclose(self) -> None: ...


class ImageStorage(Protocol):
    """Keeps generated images; ``store`` overwrites the same path, so a retry never duplicates."""

    async def store(self, path: str, image: GeneratedImage) -> StoredImage:
        """Write ``image`` at ``path`` (built by :func:`core.models.object_path`)."""
        ...

    async def remove(self, location: str) -> None:
        """Delete a stored image; removing one that is already gone is not an error."""
        ...

    async def read(self, location: str) -> bytes:
        """The bytes stored at ``location``; :class:`~core.errors.StoredObjectMissing` when
        there is nothing there."""
        ...


class WriteResult(StrEnum):
    """What a fenced write did: only ``DONE`` means the row changed."""

    DONE = "done"
    LEASE_LOST = "lease_lost"
    CANCELLED = "cancelled"


class WakeupSource(Protocol):
    """Tells the worker something may be claimable: a hint, never the work itself."""

    @property
    def healthy(self) -> bool:
        """Whether wake-ups are in place now (for /readyz and /metrics)."""
        ...

    @property
    def reconnects(self) -> int:
        """How often the source had to reconnect or rebuild (for /metrics)."""
        ...

    @property
    def hints(self) -> int:
        """How many hints it passed on: one per request it heard of (for /metrics)."""
        ...

    async def run(self, wake: Callable[[], None], stop: asyncio.Event) -> None:
        """Call ``wake()`` on every hint and after every reconnect, until ``stop`` is set."""
        ...


@dataclass(frozen=True)
class Completion:
    """What ``complete`` did, and what the image cost by the database's prices (None for a
    model without a price, and when the write did not land)."""

    write: WriteResult
    cost_usd: float | None = None


class JobStore(Protocol):
    """The queue's SQL functions. Every write presents (worker, attempt) as its fencing token."""

    @property
    def last_ok(self) -> float | None:
        """Monotonic time of the last call that reached the database, None before the first."""
        ...

    async def claim(
        self,
        worker: str,
        limit: int,
        lease_seconds: float,
        max_attempts: int,
        images_per_minute: float | None = None,
    ) -> list[ClaimedJob]:
        """Lease up to ``limit`` due jobs to ``worker``, no more than the fleet's provider budget
        allows now (``images_per_minute``: this listener's setting, None for none)."""
        ...

    async def extend(
        self, worker: str, held: Sequence[tuple[UUID, int]], lease_seconds: float
    ) -> set[UUID]:
        """Renew leases; returns the request ids still held."""
        ...

    async def complete(
        self, job: ClaimedJob, worker: str, image_url: str, metadata: Mapping[str, Any]
    ) -> Completion:
        """Mark the reply complete with its image (priced by the database)."""
        ...

    async def preview(
        self, job: ClaimedJob, worker: str, preview_url: str, index: int
    ) -> WriteResult:
        """Show a partial image on the reply (fenced like the other writes)."""
        ...

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
        """Schedule another attempt (``retry_in_seconds``) or give up with a failed reply."""
        ...

    async def release(self, job: ClaimedJob, worker: str) -> WriteResult:
        """Hand the job back without counting the attempt."""
        ...

    async def rate_limited(
        self, job: ClaimedJob, worker: str, *, retry_after: float | None, detail: str
    ) -> WriteResult:
        """The provider answered a rate-limit 429: hand the job back without counting the
        attempt and pause the fleet until ``retry_after`` (a backoff when None)."""
        ...

    async def image_of_reply(self, reply_id: UUID) -> Mapping[str, Any] | None:
        """Where a complete image reply's image is stored (``metadata.storage``), or None."""
        ...

    async def next_due(self) -> datetime | None:
        """When the earliest job becomes claimable, or None for an empty queue."""
        ...

    async def next_start(self) -> NextStart:
        """When the earliest job may start, within the fleet's provider budget."""
        ...

    async def provider_budget(self) -> dict[str, Any]:
        """The fleet's provider budget as it stands (``image_provider_budget``)."""
        ...

    async def status(self, failures: int = 0) -> dict[str, Any]:
        """The queue snapshot of ``image_queue_status`` (counts by state, oldest age, leases,
        and up to ``failures`` recent failures)."""
        ...
