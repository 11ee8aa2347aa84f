"""Assemble the daemon from settings and run it until SIGTERM/SIGINT (or, in drain mode, until
the queue is empty): pool, job store, notifications, generator, storage, worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket

import structlog

from core.errors import DatabaseUnavailable, OperatorError, first_line
from core.ports import ImageGenerator
from core.retry import RetryPolicy
from listener import migrate
from listener.job_store import PgJobStore, open_pool
from listener.local_storage import LocalDirectoryStorage
from listener.notifications import PgNotificationSource
from listener.processor import JobProcessor, ProcessorConfig
from listener.retrying import RetryingGenerator
from listener.settings import Settings
from listener.worker import Worker, WorkerConfig

log = structlog.get_logger("listener.daemon")

#: bound on any single database call of the worker (claim, renew, complete, fail)
DB_CALL_TIMEOUT_SECONDS = 10.0


def default_worker_id() -> str:
    """``<host>-<pid>-<random>``: unique even when a restarted container reuses a pid."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


async def check_migrated(conninfo: str) -> None:
    """Refuse to start against a database that lacks the contract (or is behind this release)."""

    def _pending() -> list[migrate.Migration]:
        import psycopg

        try:
            with psycopg.connect(conninfo, connect_timeout=10) as conn:
                return migrate.pending(conn)
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"cannot reach the database: {first_line(exc)}") from exc

    missing = await asyncio.to_thread(_pending)
    if missing:
        names = ", ".join(f"{m.version}_{m.name}" for m in missing)
        raise OperatorError(
            f"the database is missing {len(missing)} migration(s) ({names}): "
            "run `image-listener migrate` first"
        )


async def run_daemon(
    settings: Settings,
    generator: ImageGenerator,
    *,
    drain: bool = False,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until stopped. Signals set ``stop``; in-flight work gets the grace period."""
    conninfo = settings.require_database_url()
    stop = stop or asyncio.Event()
    worker_id = settings.worker_id or default_worker_id()
    structlog.contextvars.bind_contextvars(worker=worker_id)
    await check_migrated(conninfo)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, stop, signum)

    pool = open_pool(conninfo, max_size=min(settings.concurrency + 2, 10), timeout=10)
    try:
        await pool.open(wait=True, timeout=30)
    except Exception as exc:
        raise DatabaseUnavailable(f"cannot open the database pool: {exc}") from exc
    try:
        store = PgJobStore(pool, call_timeout=DB_CALL_TIMEOUT_SECONDS)
        policy = RetryPolicy(tries_per_attempt=settings.tries_per_attempt)
        processor = JobProcessor(
            store=store,
            generator=RetryingGenerator(generator, policy, on_retry=_log_retry),
            storage=LocalDirectoryStorage(settings.image_dir, settings.image_base_url),
            config=ProcessorConfig(
                worker_id=worker_id,
                model=settings.model,
                default_size=settings.default_size,
                max_attempts=settings.max_attempts,
                lease_seconds=settings.lease_seconds,
                log_prompts=settings.log_prompts,
                retry_policy=policy,
            ),
        )
        worker = Worker(
            store=store,
            processor=processor,
            config=WorkerConfig(
                worker_id=worker_id,
                concurrency=settings.concurrency,
                lease_seconds=settings.lease_seconds,
                max_attempts=settings.max_attempts,
                poll_seconds=settings.poll_seconds,
                shutdown_grace_seconds=settings.shutdown_grace_seconds,
            ),
        )
        notifications = PgNotificationSource(
            conninfo,
            probe_seconds=settings.listen_probe_seconds,
            probe_timeout=min(5.0, settings.listen_probe_seconds),
        )
        log.info("daemon_started", **{**settings.log_fields(), "worker_id": worker_id}, drain=drain)
        listen_task = asyncio.create_task(
            _supervise(notifications, worker, stop), name="notifications"
        )
        try:
            await worker.run(stop, drain=drain)
        finally:
            listen_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listen_task
        log.info("daemon_stopped", claimed=worker.claimed_total)
    finally:
        await pool.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _supervise(source: PgNotificationSource, worker: Worker, stop: asyncio.Event) -> None:
    """Keep the notification source alive: if it ever dies of a bug, say so and restart it."""
    while not stop.is_set():
        try:
            await source.run(worker.wake, stop)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("notification_source_crashed")
            worker.wake()  # polling covers the gap; claim now in case something was missed
            await asyncio.sleep(1.0)


def _on_signal(stop: asyncio.Event, signum: int) -> None:
    if stop.is_set():
        return
    log.info("shutdown_requested", signal=signal.Signals(signum).name)
    stop.set()


def _log_retry(error: BaseException, retry_number: int, delay: float) -> None:
    log.info(
        "provider_retry",
        retry=retry_number,
        delay_s=round(delay, 3),
        error_code=getattr(error, "code", type(error).__name__),
    )
