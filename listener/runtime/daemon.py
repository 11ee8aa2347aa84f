"""Run the daemon from settings until SIGTERM/SIGINT (or, in drain mode, until the queue is
empty): open what the mode's plan needs (:mod:`listener.runtime.wiring`), assemble the worker
and its processor, and keep the side tasks (wake-up source, loop-lag watch, ops endpoints) alive
beside it. The worker is the same in every mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
import signal
import socket

import structlog

from core.ports import AsyncCloseable, ImageGenerator, WakeupSource
from core.retry import RetryPolicy
from listener.generators.retrying import RetryingGenerator
from listener.ops.http import ops_server
from listener.ops.metrics import Metrics, watch_loop_lag
from listener.runtime.processor import JobProcessor, ProcessorConfig
from listener.runtime.wiring import Plan, Transports, open_transports, plan_for
from listener.runtime.worker import Worker, WorkerConfig
from listener.settings import Settings

log = structlog.get_logger("listener.daemon")


def default_worker_id() -> str:
    """``<host>-<pid>-<random>``: unique even when a restarted container reuses a pid."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


async def run_daemon(
    settings: Settings,
    generator: ImageGenerator,
    *,
    drain: bool = False,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until stopped. Signals set ``stop``; in-flight work gets the grace period."""
    plan = plan_for(settings)
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
            transports = await open_transports(settings, plan, resources)
            freeze_startup_heap()
            await _run_worker(settings, plan, generator, transports, worker_id, drain, stop)
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


async def _run_worker(
    settings: Settings,
    plan: Plan,
    generator: ImageGenerator,
    transports: Transports,
    worker_id: str,
    drain: bool,
    stop: asyncio.Event,
) -> None:
    metrics = Metrics()
    policy = RetryPolicy(tries_per_attempt=settings.tries_per_attempt)
    processor = JobProcessor(
        store=transports.queue,
        generator=RetryingGenerator(generator, policy, metrics=metrics),
        storage=transports.images,
        inputs=transports.inputs,
        config=ProcessorConfig(
            worker_id=worker_id,
            model=settings.model,
            default_size=settings.default_size,
            max_attempts=settings.max_attempts,
            lease_seconds=settings.lease_seconds,
            log_prompts=settings.log_prompts,
            retry_policy=policy,
            default_partial_images=settings.partial_images,
        ),
        metrics=metrics,
    )
    worker = Worker(
        store=transports.queue,
        processor=processor,
        config=WorkerConfig(
            worker_id=worker_id,
            concurrency=settings.concurrency,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
            poll_seconds=settings.poll_only_seconds if plan.poll_only else settings.poll_seconds,
            shutdown_grace_seconds=settings.shutdown_grace_seconds,
            # polling every tick anyway: each idle tick costs exactly one query, the claim
            sleep_until_due=not plan.poll_only,
            images_per_minute=settings.provider_images_per_minute,
        ),
        metrics=metrics,
    )
    ops = ops_server(
        settings,
        queue=transports.queue,
        wakeups=transports.wakeups,
        in_flight=lambda: worker.in_flight,
        metrics=metrics,
    )
    log.info(
        "daemon_started",
        **{**settings.log_fields(), "worker_id": worker_id, "mode": plan.mode, "drain": drain},
    )
    side_tasks = [
        asyncio.create_task(_supervise(transports.wakeups, worker, stop), name="wakeups"),
        asyncio.create_task(watch_loop_lag(metrics), name="loop-lag"),
    ]
    try:
        if ops is not None and not await ops.start_unless_default_port_taken(
            port_explicit=settings.http_port_explicit
        ):
            ops = None
        await worker.run(stop, drain=drain)
    finally:
        for task in side_tasks:
            task.cancel()
        await asyncio.gather(*side_tasks, return_exceptions=True)
        if ops is not None:
            await ops.stop()
    log.info("daemon_stopped", claimed=worker.claimed_total)


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
