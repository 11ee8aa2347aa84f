"""Our side of the comparison, part two: many slow requests in flight, and a deep backlog.

As in bench/scenarios.py, each run has its own database clone, fake server and listener, and
stops them before it returns.
"""

from __future__ import annotations

import bisect
import time
from typing import Any

import psycopg

from bench.processes import (
    CpuMeter,
    FakeServer,
    PySpy,
    RssSampler,
    counter_total,
    histogram_max_bound,
    histogram_quantile,
    lag_buckets,
)
from bench.rig import REPLY_TIMES, Rig, exists_check, generation_calls, wait_until

#: a realistic GPT Image PNG (1024x1024, medium) is 1-2 MB (the fake's own is 5 KB)
REALISTIC_IMAGE_BYTES = 1_500_000


def slow_provider(
    rig: Rig,
    count: int,
    *,
    delay: float = 10.0,
    jitter: float = 0.0,
    image_bytes: int = 0,
    profile: bool = False,
) -> dict[str, Any]:
    """``count`` requests in flight at once against a provider that takes ``delay`` seconds
    (plus up to ``jitter``); one listener with concurrency ``count``. ``image_bytes`` pads the
    fake's images to a realistic size (0: its 5 KB solid PNG)."""
    name = "il_slow"
    conninfo = rig.fresh_db(name)
    fake = FakeServer(rig.work / "logs", delay=delay, jitter=jitter, image_bytes=image_bytes)
    listener = rig.listener(conninfo, fake, "slow", concurrency=count)
    rss: RssSampler | None = None
    spy: PySpy | None = None
    try:
        listener.wait_ready()
        if profile and rig.profile_dir is not None:
            spy = PySpy(listener.pid, rig.profile_dir / f"listener-slow{count}.txt", gil=True)
        time.sleep(0.5)
        lag_before = lag_buckets(listener.metrics())
        max_before = listener.loop_lag_max_ms()
        rss_idle = RssSampler([listener.pid]).sample()
        rss = RssSampler([listener.pid]).start()
        cpu = CpuMeter({"listener": [listener.pid], "fake": [fake.pid]}).start()
        rig.insert(conninfo, count, "a slow lighthouse #")
        inserted = time.time()
        with psycopg.connect(conninfo, autocommit=True) as conn:
            drained = exists_check(conn, "select not exists (select 1 from image_queue.jobs)")
            wait_until(drained, delay * 3 + 60, 0.02, [listener])
            done = time.time()
            conn.row_factory = psycopg.rows.dict_row
            times = conn.execute(REPLY_TIMES).fetchone()
            assert times is not None
        cpu_s = cpu.stop()
        rss.stop()
        if spy is not None:
            spy.stop()
        metrics_after = listener.metrics()
        lag_after = lag_buckets(metrics_after)
        lag_max = listener.loop_lag_max_ms()
        received = [float(r["received_at"]) for r in fake.received()]  # type: ignore[arg-type]
        calls, _ = generation_calls(fake)
    finally:
        if rss is not None:
            rss.stop()
        if spy is not None:
            spy.stop()
        listener.stop()
        fake.stop()
        rig.cleanup_images()
        rig.cluster.drop_database(name)
    p99 = histogram_quantile(0.99, lag_before, lag_after)
    if lag_max <= max_before:
        # the running maximum dates from start-up: bound the run's own by its histogram
        bound = histogram_max_bound(lag_before, lag_after)
        lag_max = min(lag_max, (bound or 0.0) * 1000)
    return {
        "count": count,
        "provider_delay_s": delay,
        "provider_jitter_s": jitter,
        "image_bytes": image_bytes,
        "generation_calls": calls,
        "provider_retries": counter_total(metrics_after, "image_listener_provider_retries_total"),
        "insert_to_all_done_s": round(done - inserted, 2),
        "first_claim_to_last_done_s": round(
            float(times["last_done"]) - float(times["first_claim"]), 2
        ),
        "calls_started_within_s": round(max(received) - min(received), 3),
        "complete": times["complete"],
        "failed": times["failed"],
        "rss_idle_mb": round(rss_idle / 2**20, 1),
        "rss_peak_mb": round(rss.peak / 2**20, 1),
        "loop_lag_p99_ms": None if p99 is None else round(p99 * 1000, 1),
        "loop_lag_max_ms": round(lag_max, 1),
        "loop_lag_max_before_ms": round(max_before, 1),
        "cpu_s": {k: round(v, 2) for k, v in cpu_s.items()},
    }


def backlog(rig: Rig, n: int, *, window: int = 1000) -> dict[str, Any]:
    """``n`` queued requests drained by one listener (concurrency 10): the completion rate
    while the backlog is still ~n deep versus when ~1k are left, and the listener's memory."""
    name = "il_backlog"
    conninfo = rig.fresh_db(name)
    enqueue_s = rig.insert(conninfo, n, "backlog #")
    fake = FakeServer(rig.work / "logs")
    listener = rig.listener(conninfo, fake, "backlog")
    rss = RssSampler([listener.pid], interval=0.5)
    try:
        rss.start()
        with psycopg.connect(conninfo, autocommit=True) as conn:
            drained = exists_check(conn, "select not exists (select 1 from image_queue.jobs)")
            wait_until(drained, n / 20 + 120, 0.25, [listener])
            done_times = [
                float(row[0])
                for row in conn.execute(
                    "select extract(epoch from updated_at)::float8 from public.messages"
                    " where reply_to is not null and status = 'complete' order by 1"
                )
            ]
        rss.stop()
    finally:
        rss.stop()
        listener.stop()
        fake.stop()
        rig.cleanup_images()
        rig.cluster.drop_database(name)
    if len(done_times) != n:
        raise SystemExit(f"bench: backlog finished with {len(done_times)} of {n} complete")
    window = min(window, n // 4)
    start_slice = done_times[window : 2 * window]
    end_lo = n - window - window // 2
    end_slice = done_times[end_lo : end_lo + window]
    start_rate = window / (start_slice[-1] - start_slice[0])
    end_rate = window / (end_slice[-1] - end_slice[0])
    tenth = n // 10
    deciles = [
        round(tenth / (done_times[(i + 1) * tenth - 1] - done_times[i * tenth]), 1)
        for i in range(10)
    ]
    return {
        "n": n,
        "enqueue_s": round(enqueue_s, 2),
        "window": window,
        "rate_start": round(start_rate, 1),
        "rate_end": round(end_rate, 1),
        "end_over_start": round(end_rate / start_rate, 3),
        "rate_by_decile": deciles,
        "drain_s": round(done_times[-1] - done_times[0], 1),
        "rss_mb_at_start": round(_rss_at(rss, start_slice[-1]) / 2**20, 1),
        "rss_mb_at_end": round(_rss_at(rss, end_slice[-1]) / 2**20, 1),
        "rss_mb_peak": round(rss.peak / 2**20, 1),
        "rss_end_over_start": round(
            _rss_at(rss, end_slice[-1]) / max(_rss_at(rss, start_slice[-1]), 1), 3
        ),
    }


def _rss_at(sampler: RssSampler, when: float) -> int:
    times = [t for t, _ in sampler.series]
    index = min(bisect.bisect_left(times, when), len(times) - 1)
    return sampler.series[index][1] if sampler.series else 0
