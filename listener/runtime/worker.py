"""The worker loop: claim what is due, run it with bounded concurrency, keep leases alive,
and shut down without losing anything.

Wake-ups come from three places, so nothing depends on a single one: ``wake()`` (called by the
notification source on NOTIFY and after every reconnect), a slot freeing up, and a timer that
fires at the earlier of the poll interval and the next job's due time (a retry's run_at or an
expiring lease), which is how crashed workers' jobs are taken over without any sweeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

import structlog

from core.errors import DatabaseUnavailable, ImageListenerError
from core.lease import Lease
from core.models import ClaimedJob
from core.ports import JobStore, WriteResult
from listener.ops.metrics import Metrics
from listener.runtime.processor import JobProcessor

log = structlog.get_logger("listener.worker")


@dataclass(frozen=True)
class WorkerConfig:
    """How much to take on and how long to hold it."""

    worker_id: str
    concurrency: int
    lease_seconds: float
    max_attempts: int
    poll_seconds: float
    shutdown_grace_seconds: float
    #: a release on shutdown must not hang the exit
    release_timeout_seconds: float = 5.0
    #: ask the queue when the next job is due before sleeping (off when polling every tick
    #: anyway: then each idle tick costs exactly one query, the claim)
    sleep_until_due: bool = True
    #: this listener's share of the fleet's provider budget (None: no setting; see
    #: migrations/20261205160000_provider_budget.sql for how the fleet agrees on one)
    images_per_minute: float | None = None


class Worker:
    """One process's share of the queue. ``run`` returns after ``stop`` is set and work is safe."""

    def __init__(
        self,
        *,
        store: JobStore,
        processor: JobProcessor,
        config: WorkerConfig,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._processor = processor
        self._config = config
        self._wake = asyncio.Event()
        self._running: dict[UUID, tuple[ClaimedJob, asyncio.Task[str]]] = {}
        #: the lease of each running job, renewed in place and read by its processor
        self._leases: dict[UUID, Lease] = {}
        self.claimed_total = 0
        self.last_claim_ok: datetime | None = None

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def wake(self) -> None:
        """Something may be claimable now (a notification, a reconnect, a freed slot)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event, *, drain: bool = False) -> None:
        """Claim and process until ``stop`` is set (with ``drain``: until the queue is empty)."""
        renewer = asyncio.create_task(self._renew_leases(), name="lease-renewer")
        # ``stop`` also wakes the claim loop, so an idle wait needs only the one event.
        stopper = asyncio.create_task(_set_when(stop, self._wake), name="stop-wakes-worker")
        try:
            await self._claim_loop(stop, drain)
        finally:
            stopper.cancel()
            try:
                # Leases stay renewed through the grace period, or a peer could take over
                # (and generate again) work that is about to finish here.
                await self._shutdown()
            finally:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewer

    async def _claim_loop(self, stop: asyncio.Event, drain: bool) -> None:
        failures = 0
        while not stop.is_set():
            free = self._config.concurrency - len(self._running)
            claimed: list[ClaimedJob] = []
            if free > 0:
                self._wake.clear()
                asked_at = time.monotonic()
                try:
                    claimed = await self._store.claim(
                        self._config.worker_id,
                        free,
                        self._config.lease_seconds,
                        self._config.max_attempts,
                        self._config.images_per_minute,
                    )
                except ImageListenerError as exc:
                    failures += 1
                    delay = min(0.25 * 2**failures, self._config.poll_seconds)
                    log.warning("claim_failed", reason=exc.detail, retry_in_s=delay)
                    await _wait(self._wake, seconds=delay)
                    continue
                failures = 0
                self.last_claim_ok = datetime.now(UTC)
                if self._metrics is not None and claimed:
                    self._metrics.observe_claimed(len(claimed))
                for job in claimed:
                    self._start(job, asked_at)
                    # Each new job's first step (request building, connecting) runs before
                    # the next starts: a batch of 500 must not hold the loop for its length.
                    await asyncio.sleep(0)
                if len(claimed) == free:
                    continue  # there may be more waiting
            if drain and not claimed and not self._running:
                if await self._queue_is_idle():
                    return
            if free <= 0:
                # Every slot is busy: a wake-up now can only be acted on once a slot frees,
                # and a freed slot sets it again. Without this the loop would spin on it.
                self._wake.clear()
                if len(self._running) < self._config.concurrency:
                    continue  # a slot freed meanwhile (no await since the count above)
            await self._idle_wait(stop, at_capacity=free <= 0 or len(claimed) == free)

    async def _queue_is_idle(self) -> bool:
        """In drain mode: nothing due now, nothing in flight anywhere that could come back."""
        try:
            return await self._store.next_due() is None
        except ImageListenerError:
            return False

    async def _idle_wait(self, stop: asyncio.Event, *, at_capacity: bool) -> None:
        timeout = self._config.poll_seconds
        if not at_capacity and self._config.sleep_until_due:
            # Within the fleet's budget: the next token or the end of a pause, when either is
            # later than the queue's own next due time.
            try:
                ahead = await self._store.next_start()
            except ImageListenerError:
                ahead = None
            if ahead is not None and self._metrics is not None:
                self._metrics.observe_next_start(ahead)
            if ahead is not None and ahead.wait_seconds is not None:
                # By the database's clock. A token is due exactly then (waking late costs the
                # fleet that much of its rate); a retry or an expiring lease may wait 10 ms more.
                margin = 0.001 if ahead.held_by is not None else 0.01
                timeout = max(0.0, min(timeout, ahead.wait_seconds + margin))
        await _wait(self._wake, seconds=timeout)

    def _start(self, job: ClaimedJob, confirmed_at: float) -> None:
        self.claimed_total += 1
        lease = Lease(job.request_id, job.attempt, confirmed_at)
        self._leases[job.request_id] = lease
        task = asyncio.create_task(
            self._processor.process(job, lease), name=f"job-{job.request_id}"
        )
        self._running[job.request_id] = (job, task)
        task.add_done_callback(functools.partial(self._finished, job.request_id))

    def _finished(self, request_id: UUID, task: asyncio.Task[str]) -> None:
        entry = self._running.get(request_id)
        if entry is not None and entry[1] is task:
            del self._running[request_id]
            self._leases.pop(request_id, None)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            # The final write could not reach the database: the lease will expire and the job
            # is taken again (its attempt was counted at claim time).
            log.error(
                "request_write_failed",
                request_id=str(request_id),
                reason=exc.detail if isinstance(exc, ImageListenerError) else repr(exc),
            )
        self._wake.set()

    async def _renew_leases(self) -> None:
        interval = self._config.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            held = [(job.request_id, job.attempt) for job, _ in self._running.values()]
            if not held:
                continue
            asked_at = time.monotonic()
            try:
                still_held = await self._store.extend(
                    self._config.worker_id, held, self._config.lease_seconds
                )
            except DatabaseUnavailable as exc:
                log.warning("lease_renewal_failed", reason=exc.detail, jobs=len(held))
                continue
            for request_id in still_held:
                if (lease := self._leases.get(request_id)) is not None:
                    lease.confirmed_at = asked_at
            for request_id, _attempt in held:
                if request_id not in still_held and request_id in self._running:
                    _job, task = self._running[request_id]
                    log.warning("lease_lost", request_id=str(request_id))
                    task.cancel()

    async def _shutdown(self) -> None:
        """Let in-flight work finish within the grace period, then release what is left."""
        if not self._running:
            return
        tasks = [task for _, task in self._running.values()]
        log.info("draining", in_flight=len(tasks), grace_s=self._config.shutdown_grace_seconds)
        _done, pending = await asyncio.wait(tasks, timeout=self._config.shutdown_grace_seconds)
        leftovers = [(job, task) for job, task in list(self._running.values()) if task in pending]
        for _job, task in leftovers:
            task.cancel()
        await asyncio.gather(*(task for _, task in leftovers), return_exceptions=True)
        for job, _task in leftovers:
            await self._release(job)

    async def _release(self, job: ClaimedJob) -> None:
        try:
            async with asyncio.timeout(self._config.release_timeout_seconds):
                result = await self._store.release(job, self._config.worker_id)
        except (TimeoutError, ImageListenerError) as exc:
            # Not released: its lease simply expires and another worker takes it over.
            log.warning("release_failed", request_id=str(job.request_id), reason=repr(exc))
            return
        log.info(
            "request_released",
            request_id=str(job.request_id),
            attempt=job.attempt,
            released=result is WriteResult.DONE,
        )


async def _set_when(trigger: asyncio.Event, target: asyncio.Event) -> None:
    await trigger.wait()
    target.set()


async def _wait(wake: asyncio.Event, *, seconds: float) -> None:
    """Sleep until ``wake`` is set (a notification, a freed slot, or stop) or ``seconds`` pass.

    One event and no helper tasks: this runs before every claim, on the wake-up path."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await wake.wait()
