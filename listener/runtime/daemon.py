"""Assemble the daemon from settings and run it until SIGTERM/SIGINT (or, in drain mode, until
the queue is empty). The mode decides the transports; the worker is the same in all of them:

==========  ==========================  =======================  ========================
mode        queue calls                 wake-ups                 images
==========  ==========================  =======================  ========================
postgres    SQL over DATABASE_URL       LISTEN/NOTIFY            local directory
supabase    PostgREST rpc (service key) Supabase Realtime        Supabase Storage
hybrid      SQL over DATABASE_URL       LISTEN/NOTIFY            Supabase Storage
==========  ==========================  =======================  ========================
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import psycopg
import structlog
from supabase import AsyncClient

from core.errors import DatabaseUnavailable, ImageListenerError, OperatorError, first_line
from core.ports import AsyncCloseable, ImageGenerator, ImageStorage, JobStore
from core.retry import RetryPolicy
from listener import migrate
from listener.generators.retrying import RetryingGenerator
from listener.ops.http import OpsServer, Response
from listener.ops.metrics import LiveState, Metrics
from listener.queue.postgres import PgJobStore, open_pool
from listener.queue.postgrest import SupabaseJobStore
from listener.runtime.processor import JobProcessor, ProcessorConfig
from listener.runtime.worker import Worker, WorkerConfig
from listener.settings import Settings
from listener.storage.local import LocalDirectoryStorage
from listener.storage.supabase import SupabaseStorage
from listener.supabase_client import supabase_client
from listener.wakeups.listen import PgNotificationSource
from listener.wakeups.realtime import RealtimeWakeupSource

log = structlog.get_logger("listener.daemon")

#: bound on any single queue call of the worker (claim, renew, complete, fail)
DB_CALL_TIMEOUT_SECONDS = 10.0


class WakeupSource(Protocol):
    """Tells the worker something may be claimable: a hint, never the work itself."""

    healthy: bool

    @property
    def reconnects(self) -> int:
        """How often the source had to reconnect or rebuild (for /metrics)."""
        ...

    async def run(self, wake: Callable[[], None], stop: asyncio.Event) -> None:
        """Call ``wake()`` on every hint and after every reconnect, until ``stop`` is set."""
        ...


class PollingOnly:
    """IMAGE_LISTENER_WAKEUP=poll: no push channel; the worker's own timer does the claiming."""

    healthy = True
    reconnects = 0

    async def run(self, wake: Callable[[], None], stop: asyncio.Event) -> None:
        await stop.wait()


@dataclass
class Transports:
    """The I/O one mode uses."""

    store: JobStore
    wakeups: WakeupSource
    storage: ImageStorage


def default_worker_id() -> str:
    """``<host>-<pid>-<random>``: unique even when a restarted container reuses a pid."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


async def check_migrated(conninfo: str) -> None:
    """Refuse to start against a database that lacks the contract (or is behind this release)."""

    def _pending() -> list[migrate.Migration]:
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
            "run `image-listener migrate` (or `supabase db push`) first"
        )


async def check_rpc_ready(store: SupabaseJobStore) -> None:
    """Over PostgREST: the queue functions exist and this key may execute them."""
    try:
        await store.next_due()
    except OperatorError as exc:
        raise OperatorError(
            f"{exc.detail}: are the migrations applied (`supabase db push`) and is "
            "SUPABASE_SERVICE_ROLE_KEY the service-role key?"
        ) from exc


async def run_daemon(
    settings: Settings,
    generator: ImageGenerator,
    *,
    drain: bool = False,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until stopped. Signals set ``stop``; in-flight work gets the grace period."""
    mode = settings.mode()
    stop = stop or asyncio.Event()
    worker_id = settings.worker_id or default_worker_id()
    structlog.contextvars.bind_contextvars(worker=worker_id)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, stop, signum)
    try:
        async with contextlib.AsyncExitStack() as resources:
            if isinstance(generator, AsyncCloseable):
                resources.push_async_callback(generator.aclose)
            supabase: AsyncClient | None = None
            if mode in ("supabase", "hybrid"):
                url, key = settings.require_supabase()
                supabase = await resources.enter_async_context(
                    supabase_client(url, key, http_timeout=DB_CALL_TIMEOUT_SECONDS * 6)
                )
            transports = await _transports(settings, mode, supabase, resources)
            freeze_startup_heap()
            await _run_worker(settings, generator, transports, worker_id, mode, drain, stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def freeze_startup_heap() -> None:
    """Exempt everything built at startup (modules, the SDK's and pydantic's type machinery,
    clients) from the cyclic garbage collector: a full collection walked all of it, stalling
    the event loop for 26-61 ms in the middle of 500 requests; afterwards it walks only what
    requests create."""
    gc.collect()
    gc.freeze()


async def _transports(
    settings: Settings,
    mode: str,
    supabase: AsyncClient | None,
    resources: contextlib.AsyncExitStack,
) -> Transports:
    probe_timeout = min(5.0, settings.listen_probe_seconds)
    store: JobStore
    wakeups: WakeupSource
    storage: ImageStorage
    if mode in ("postgres", "hybrid"):
        conninfo = settings.require_database_url()
        await check_migrated(conninfo)
        pool = open_pool(conninfo, max_size=min(settings.concurrency + 2, 10), timeout=10)
        try:
            await pool.open(wait=True, timeout=30)
        except Exception as exc:
            raise DatabaseUnavailable(f"cannot open the database pool: {exc}") from exc
        resources.push_async_callback(pool.close)
        store = PgJobStore(pool, call_timeout=DB_CALL_TIMEOUT_SECONDS)
        wakeups = PgNotificationSource(
            conninfo,
            probe_seconds=settings.listen_probe_seconds,
            probe_timeout=probe_timeout,
            fallback_poll_seconds=settings.poll_only_seconds,
        )
    else:
        assert supabase is not None
        url, key = settings.require_supabase()
        rpc_store = SupabaseJobStore(supabase, call_timeout=DB_CALL_TIMEOUT_SECONDS)
        await check_rpc_ready(rpc_store)
        store = rpc_store
        wakeups = RealtimeWakeupSource(
            url, key, probe_seconds=settings.listen_probe_seconds, probe_timeout=probe_timeout
        )
    if settings.wakeup == "poll":
        wakeups = PollingOnly()
    if supabase is not None:
        storage = SupabaseStorage(
            supabase,
            bucket=settings.storage_bucket,
            signed_url_seconds=settings.signed_url_seconds,
        )
    else:
        storage = LocalDirectoryStorage(settings.image_dir, settings.image_base_url)
    return Transports(store=store, wakeups=wakeups, storage=storage)


async def _run_worker(
    settings: Settings,
    generator: ImageGenerator,
    transports: Transports,
    worker_id: str,
    mode: str,
    drain: bool,
    stop: asyncio.Event,
) -> None:
    polling_only = settings.wakeup == "poll"
    metrics = Metrics(settings.prices)
    policy = RetryPolicy(tries_per_attempt=settings.tries_per_attempt)

    def on_retry(error: BaseException, retry_number: int, delay: float) -> None:
        code = error.code if isinstance(error, ImageListenerError) else type(error).__name__
        metrics.observe_provider_retry(code)
        log.info("provider_retry", retry=retry_number, delay_s=round(delay, 3), error_code=code)

    processor = JobProcessor(
        store=transports.store,
        generator=RetryingGenerator(generator, policy, on_retry=on_retry),
        storage=transports.storage,
        config=ProcessorConfig(
            worker_id=worker_id,
            model=settings.model,
            default_size=settings.default_size,
            max_attempts=settings.max_attempts,
            lease_seconds=settings.lease_seconds,
            log_prompts=settings.log_prompts,
            retry_policy=policy,
        ),
        metrics=metrics,
    )
    worker = Worker(
        store=transports.store,
        processor=processor,
        config=WorkerConfig(
            worker_id=worker_id,
            concurrency=settings.concurrency,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
            poll_seconds=settings.poll_only_seconds if polling_only else settings.poll_seconds,
            shutdown_grace_seconds=settings.shutdown_grace_seconds,
            sleep_until_due=not polling_only,
        ),
        metrics=metrics,
    )
    ops = _ops_server(settings, transports, worker, metrics)
    log.info(
        "daemon_started",
        **{**settings.log_fields(), "worker_id": worker_id, "mode": mode, "drain": drain},
    )
    side_tasks = [
        asyncio.create_task(_supervise(transports.wakeups, worker, stop), name="wakeups"),
        asyncio.create_task(_watch_loop_lag(metrics), name="loop-lag"),
    ]
    try:
        if ops is not None:
            await ops.start()
        await worker.run(stop, drain=drain)
    finally:
        for task in side_tasks:
            task.cancel()
        await asyncio.gather(*side_tasks, return_exceptions=True)
        if ops is not None:
            await ops.stop()
    log.info("daemon_stopped", claimed=worker.claimed_total)


def _ops_server(
    settings: Settings, transports: Transports, worker: Worker, metrics: Metrics
) -> OpsServer | None:
    """/healthz, /readyz and /metrics, unless IMAGE_LISTENER_HTTP_PORT is 0."""
    if settings.http_port == 0:
        return None
    store, wakeups = transports.store, transports.wakeups
    metrics.in_flight.set_function(lambda: worker.in_flight)
    live = LiveState(
        queue_status=store.status,
        wakeup_state=lambda: {
            "healthy": float(wakeups.healthy),
            "reconnects": float(wakeups.reconnects),
        },
    )
    metrics.add_live_collector(live)
    # The database must have answered recently: the worker calls it at least every poll
    # interval when idle and every third of a lease when busy.
    stale_after = max(30.0, settings.poll_seconds * 3, settings.lease_seconds * 0.7)

    async def healthz() -> Response:
        return Response.json(
            200, {"status": "ok", "loop_lag_max_ms": round(metrics.loop_lag_max * 1000, 1)}
        )

    async def readyz() -> Response:
        problems = []
        last_ok = store.last_ok
        if last_ok is None or time.monotonic() - last_ok > stale_after:
            problems.append("database not reached recently")
        if not wakeups.healthy:
            problems.append("wake-up source not connected (polling covers it)")
        status = 200 if not problems else 503
        return Response.json(status, {"ready": not problems, "problems": problems})

    async def metrics_endpoint() -> Response:
        try:
            await live.refresh()
        except ImageListenerError as exc:
            log.warning("queue_snapshot_failed", reason=exc.detail)
        return Response(200, metrics.render(), "text/plain; version=0.0.4; charset=utf-8")

    return OpsServer(
        settings.http_host,
        settings.http_port,
        {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics_endpoint},
    )


async def _watch_loop_lag(metrics: Metrics, interval: float = 0.05) -> None:
    """Measure how late the loop runs a short timer: stalls from CPU work show up here."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval)
        metrics.observe_loop_lag(max(0.0, loop.time() - started - interval))


async def _supervise(source: WakeupSource, worker: Worker, stop: asyncio.Event) -> None:
    """Keep the wake-up source alive: if it ever dies of a bug, say so and restart it."""
    while not stop.is_set():
        try:
            await source.run(worker.wake, stop)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("wakeup_source_crashed")
            worker.wake()  # polling covers the gap; claim now in case something was missed
            await asyncio.sleep(1.0)


def _on_signal(stop: asyncio.Event, signum: int) -> None:
    if stop.is_set():
        return
    log.info("shutdown_requested", signal=signal.Signals(signum).name)
    stop.set()
