"""Prometheus metrics of one listener process, on a registry of its own.

Counters and histograms are fed by the processor (one call per finished attempt), the retry
hook and the event-loop lag monitor; queue depth and the wake-up source's state are read when
Prometheus scrapes (the queue snapshot is cached a few seconds, so scrapes stay cheap).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from core.budget import NextStart
from core.models import ClaimedJob, TokenUsage

log = structlog.get_logger("listener.metrics")

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 240, 600)
_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    """Everything /metrics shows; ``observe_*`` methods are what the daemon calls."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._unpriced_models: set[str] = set()
        r = self.registry
        self.claimed = Counter(
            "image_listener_requests_claimed", "Requests claimed (attempts started)", registry=r
        )
        self.finished = Counter(
            "image_listener_attempts_finished",
            "Attempts finished, by outcome (complete, failed, retrying, cancelled, lease_lost)",
            ["outcome"],
            registry=r,
        )
        self.failures = Counter(
            "image_listener_attempt_failures",
            "Failed attempts by error code (retried or final)",
            ["reason"],
            registry=r,
        )
        self.provider_retries = Counter(
            "image_listener_provider_retries",
            "Provider calls repeated within an attempt, by error code",
            ["reason"],
            registry=r,
        )
        self.rate_limited = Counter(
            "image_listener_provider_rate_limited",
            "Provider answers of 429 (rate limits: the request went back to the queue and the "
            "fleet paused)",
            registry=r,
        )
        self.budget_waits = Counter(
            "image_listener_provider_budget_waits",
            "Times this listener had requests to start and waited instead, by what held it "
            "(budget: the next token; pause: the fleet's pause after a 429)",
            ["held_by"],
            registry=r,
        )
        self.generation_seconds = Histogram(
            "image_listener_generation_seconds",
            "Time of one attempt from claim to its final write",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "image_listener_end_to_end_seconds",
            "From the user's insert to the complete reply",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "image_listener_in_flight", "Attempts running in this process", registry=r
        )
        self.tokens = Counter(
            "image_listener_tokens",
            "Tokens reported by the provider",
            ["model", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "image_listener_cost_usd",
            "Provider cost of complete images, as the database priced them (metadata.cost_usd)",
            ["model"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "image_listener_event_loop_lag_seconds",
            "How late the event loop ran a 50 ms timer",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.loop_lag_max = 0.0

    def observe_claimed(self, count: int) -> None:
        self.claimed.inc(count)

    def observe_attempt(
        self,
        job: ClaimedJob,
        *,
        outcome: str,
        error_code: str | None,
        duration_seconds: float,
        model: str,
        usage: TokenUsage | None,
        cost_usd: float | None = None,
    ) -> None:
        """One finished attempt (called by the processor); ``cost_usd`` is the database's price
        of a complete image, the number its reply shows."""
        self.finished.labels(outcome=outcome).inc()
        self.generation_seconds.observe(duration_seconds)
        if error_code is not None:
            self.failures.labels(reason=error_code).inc()
        if outcome == "complete" and job.requested_at is not None:
            waited = (datetime.now(UTC) - job.requested_at).total_seconds()
            self.end_to_end_seconds.observe(max(0.0, waited))
        if usage is not None:
            self.tokens.labels(model=model, kind="input").inc(usage.input_tokens or 0)
            self.tokens.labels(model=model, kind="output").inc(usage.output_tokens or 0)
        if outcome != "complete":
            return
        if cost_usd is not None:
            self.cost.labels(model=model).inc(cost_usd)
        elif model not in self._unpriced_models:
            self._unpriced_models.add(model)
            log.warning(
                "model_without_price",
                model=model,
                advice="its images are not counted against usd_per_month limits: "
                "`image-listener prices set` it",
            )

    def observe_provider_retry(self, reason: str) -> None:
        self.provider_retries.labels(reason=reason).inc()

    def observe_rate_limited(self) -> None:
        self.rate_limited.inc()

    def observe_next_start(self, ahead: NextStart) -> None:
        """An idle wait: counted when the budget or a pause, not the queue, set its length."""
        if ahead.held_by is not None:
            self.budget_waits.labels(held_by=ahead.held_by).inc()

    def observe_loop_lag(self, seconds: float) -> None:
        self.loop_lag.observe(seconds)
        self.loop_lag_max = max(self.loop_lag_max, seconds)

    def add_live_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LiveState(Collector):
    """Gauges read at scrape time: queue depth (cached), wake-up source state, in flight."""

    def __init__(
        self,
        *,
        queue_status: Callable[[], Awaitable[Mapping[str, Any]]],
        wakeup_state: Callable[[], Mapping[str, float]],
        cache_seconds: float = 5.0,
    ) -> None:
        self._queue_status = queue_status
        self._wakeup_state = wakeup_state
        self._cache_seconds = cache_seconds
        self._snapshot: Mapping[str, Any] | None = None
        self._taken_at = 0.0

    async def refresh(self) -> None:
        """Take a new queue snapshot if the cached one is older than the cache period."""
        if self._snapshot is None or time.monotonic() - self._taken_at >= self._cache_seconds:
            self._snapshot = await self._queue_status()
            self._taken_at = time.monotonic()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "image_listener_queue_depth", "Unfinished requests by state", labels=["state"]
        )
        oldest = GaugeMetricFamily(
            "image_listener_oldest_unfinished_seconds", "Age of the oldest unfinished request"
        )
        if self._snapshot is not None:
            for state, count in self._snapshot["jobs"].items():
                depth.add_metric([state], float(count))
            oldest.add_metric([], float(self._snapshot.get("oldest_queued_seconds") or 0.0))
        yield depth
        yield oldest
        yield from _budget_gauges(self._snapshot)
        for name, value in self._wakeup_state().items():
            family = GaugeMetricFamily(f"image_listener_wakeup_{name}", f"Wake-up source {name}")
            family.add_metric([], value)
            yield family


def _budget_gauges(snapshot: Mapping[str, Any] | None) -> Iterator[GaugeMetricFamily]:
    """The fleet's provider budget (``provider_budget`` of the snapshot): the same numbers on
    every listener of the fleet, as ``image-listener status`` shows them."""
    budget = (snapshot or {}).get("provider_budget")
    rate = GaugeMetricFamily(
        "image_listener_provider_budget_per_minute",
        "Provider calls per minute the fleet may start, by source (operator, listeners, "
        "learned); absent when no budget is in force",
        labels=["source"],
    )
    tokens = GaugeMetricFamily(
        "image_listener_provider_budget_tokens", "Calls that may start at once right now"
    )
    paused = GaugeMetricFamily(
        "image_listener_provider_paused_seconds",
        "Seconds left of the fleet's pause after a rate-limit 429 (0: not paused)",
    )
    fleet_limited = GaugeMetricFamily(
        "image_listener_provider_fleet_rate_limited",
        "Rate-limit 429s the whole fleet has received (since the budget's migration)",
    )
    fleet_pauses = GaugeMetricFamily(
        "image_listener_provider_fleet_pauses", "Fleet pauses after rate-limit 429s"
    )
    if isinstance(budget, Mapping):
        if budget.get("per_minute") is not None:
            rate.add_metric([str(budget.get("source"))], float(budget["per_minute"]))
        if budget.get("tokens") is not None:
            tokens.add_metric([], float(budget["tokens"]))
        until = budget.get("paused_until")
        left = 0.0
        if until is not None:
            left = max(
                0.0, (datetime.fromisoformat(str(until)) - datetime.now(UTC)).total_seconds()
            )
        paused.add_metric([], left)
        fleet_limited.add_metric([], float(budget.get("rate_limited") or 0))
        fleet_pauses.add_metric([], float(budget.get("pauses") or 0))
    yield from (rate, tokens, paused, fleet_limited, fleet_pauses)


async def watch_loop_lag(metrics: Metrics, interval: float = 0.05) -> None:
    """Measure how late the loop runs a short timer: stalls from CPU work show up here."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval)
        metrics.observe_loop_lag(max(0.0, loop.time() - started - interval))
