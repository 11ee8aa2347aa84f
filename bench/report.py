"""The comparison table: our figures, the peers', the ratios and the targets, as markdown.

A round is ``{"peers": {"graphile:N:W": json, ...}, "ours": {"tp:N:P": ..., "latency": ...,
"slow": ..., "backlog": ...}}``; the table shows the median of each figure over the rounds
(with two rounds, their mean) and computes ratios and verdicts from those medians.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Round = dict[str, dict[str, Any]]
Getter = Callable[[Round], float | None]

NOTE = (
    "Our job is the full pipeline: claim (lease + `generating` reply row; one call claims for "
    "all free slots), the generation call over HTTP to the local OpenAI-compatible fake "
    "(instant; its 5 KB 1024x1024 PNG unless a row says 1.5 MB), base64 decode, lease fence "
    "(skipped while the lease is fresh), fsynced atomic image write, completion (job delete + "
    "reply update). The peers' job is one INSERT into `bench_done`. Throughput = N / (last "
    "completion - first start), as the peers' harness computes it; in brackets: from process "
    "start. Wake-up: ours to the listener starting the generation call (the peers: handler "
    "entry); in brackets: to the fake provider receiving it. Slow-provider rows: one listener "
    "with concurrency = requests in flight."
)


def _dig(data: Any, *path: str | int) -> Any:
    for key in path:
        if data is None:
            return None
        data = data.get(key) if isinstance(data, dict) else data[key]
    return data


def _ours(*path: str | int) -> Getter:
    return lambda r: _dig(r.get("ours"), *path)


def _peer(system: str, key: str, *path: str | int) -> Getter:
    return lambda r: _dig(r.get("peers", {}).get(f"{system}:{key}"), *path)


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass(frozen=True)
class Row:
    """One metric: how to read it for us and each peer, and what we must reach."""

    label: str
    unit: str
    ours: Getter
    graphile: Getter | None = None
    procrastinate: Getter | None = None
    #: (medians of ours, graphile, procrastinate) -> (target text, met)
    target: Callable[[float | None, float | None, float | None], tuple[str, bool | None]] = (
        lambda o, g, p: ("", None)
    )
    extra: Getter | None = None  # shown in brackets after ours


def _throughput_target(
    o: float | None, g: float | None, p: float | None
) -> tuple[str, bool | None]:
    if o is None or g is None or p is None:
        return ">= 1.5x gw, >= 4x proc", None
    return ">= 1.5x gw, >= 4x proc", o >= 1.5 * g and o >= 4 * p


def rows(sizes: Sequence[int], slow_delay: float, slow_count: int) -> list[Row]:
    """Every row of the table, for the throughput sizes of this run."""
    table: list[Row] = []
    for n in sizes:
        for workers in (1, 2):
            key = f"{n}:{workers}"
            table.append(
                Row(
                    f"throughput N={n:,}, {workers} process{'es' if workers > 1 else ''}",
                    "jobs/s",
                    _ours(f"tp:{key}", "jobs_per_s_processing"),
                    _peer("graphile", key, "throughput", "jobs_per_s_processing"),
                    _peer("procrastinate", key, "throughput", "jobs_per_s_processing"),
                    _throughput_target,
                    extra=_ours(f"tp:{key}", "jobs_per_s_incl_startup"),
                )
            )
    first = f"{sizes[0]}:1"
    table.append(
        Row(
            f"enqueue by insert trigger, N={sizes[0]:,} in 1 txn",
            "rows/s",
            _ours(f"tp:{first}", "enqueue_per_s"),
            _peer("graphile", first, "throughput", "enqueue_jobs_per_s"),
            _peer("procrastinate", first, "throughput", "enqueue_jobs_per_s"),
        )
    )
    for stat, target in (("p50_ms", "<= gw p50"), ("p99_ms", "<= 10 ms"), ("max_ms", "")):

        def check(
            o: float | None, g: float | None, p: float | None, stat: str = stat, text: str = target
        ) -> tuple[str, bool | None]:
            if o is None or not text:
                return text, None
            return text, o <= (g if stat == "p50_ms" and g is not None else 10.0)

        table.append(
            Row(
                f"wake-up {stat[:-3]}: COMMIT sent -> handler / generation call starts",
                "ms",
                _ours("latency", "to_call_start", stat),
                _peer("graphile", first, "latency", "from_commit_sent", stat),
                _peer("procrastinate", first, "latency", "from_commit_sent", stat),
                check,
                extra=_ours("latency", "from_commit_sent", stat),
            )
        )
    table.append(
        Row(
            "  of which COMMIT sent -> claim statement starts, p50",
            "ms",
            _ours("latency", "commit_to_claim_start", "p50_ms"),
        )
    )
    table += _slow_rows("slow", f"{slow_count} in flight, provider {slow_delay:g} s", slow_delay)
    table += _slow_rows(
        "slow_big", f"{slow_count} in flight, 1.5 MB images, provider 10-12 s", slow_delay + 2
    )
    table += [
        Row("backlog: drain rate while ~N queued", "jobs/s", _ours("backlog", "rate_start")),
        Row("backlog: drain rate while ~1k queued", "jobs/s", _ours("backlog", "rate_end")),
        Row(
            "backlog: rate at ~1k / rate at ~N",
            "x",
            _ours("backlog", "end_over_start"),
            target=lambda o, g, p: ("0.9 .. 1.1", None if o is None else abs(o - 1) <= 0.1),
        ),
        Row(
            "backlog: listener RSS at ~1k left (at ~N left)",
            "MB",
            _ours("backlog", "rss_mb_at_end"),
            extra=_ours("backlog", "rss_mb_at_start"),
        ),
        Row(
            "backlog: listener RSS growth over the drain",
            "x",
            _ours("backlog", "rss_end_over_start"),
            target=lambda o, g, p: ("flat: <= 1.1", None if o is None else o <= 1.1),
        ),
    ]
    return table


def _slow_rows(key: str, title: str, latency: float) -> list[Row]:
    """Rows of one slow-provider run: done within ~one provider latency, memory, loop lag."""
    limit = latency * 1.2
    return [
        Row(
            f"{title}: insert -> all done",
            "s",
            _ours(key, "insert_to_all_done_s"),
            target=lambda o, g, p: (f"<= {limit:g} s", None if o is None else o <= limit),
        ),
        Row(
            f"{title}: listener peak RSS (idle)",
            "MB",
            _ours(key, "rss_peak_mb"),
            target=lambda o, g, p: ("<= 300 MB", None if o is None else o <= 300),
            extra=_ours(key, "rss_idle_mb"),
        ),
        Row(
            f"{title}: event-loop lag p99 (50 ms timer)",
            "ms",
            _ours(key, "loop_lag_p99_ms"),
            target=lambda o, g, p: ("< 20 ms", None if o is None else o < 20),
        ),
        Row(
            f"{title}: event-loop lag max",
            "ms",
            _ours(key, "loop_lag_max_ms"),
            target=lambda o, g, p: ("< 50 ms", None if o is None else o < 50),
        ),
    ]


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(ours: float | None, peer: float | None) -> str:
    if ours is None or peer is None or peer == 0:
        return "-"
    return f"{ours / peer:.2f}x"


def render(rounds: Sequence[Round], table: Sequence[Row]) -> str:
    """The markdown table of medians over ``rounds``."""
    lines = [
        "| metric | unit | ours | graphile-worker | procrastinate | ours/gw | ours/proc "
        "| target | met? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        ours = median([row.ours(r) for r in rounds])
        gw = median([row.graphile(r) for r in rounds]) if row.graphile else None
        proc = median([row.procrastinate(r) for r in rounds]) if row.procrastinate else None
        extra = median([row.extra(r) for r in rounds]) if row.extra else None
        target, met = row.target(ours, gw, proc)
        cell = _fmt(ours) + (f" ({_fmt(extra)})" if extra is not None else "")
        verdict = {True: "yes", False: "**no**", None: ""}[met]
        lines.append(
            f"| {row.label} | {row.unit} | {cell} | {_fmt(gw)} | {_fmt(proc)} "
            f"| {_ratio(ours, gw)} | {_ratio(ours, proc)} | {target} | {verdict} |"
        )
    return "\n".join(lines)


def header(meta: dict[str, Any]) -> str:
    """Machine, PostgreSQL settings and run conditions, printed above the table."""
    settings = meta["pg"]
    shown = ", ".join(
        f"{k}={settings[k]}"
        for k in ("shared_buffers", "synchronous_commit", "fsync", "max_connections", "jit")
    )
    loads = ", ".join(f"{a:.1f}" for a in meta["load_avg"])
    return "\n".join(
        [
            f"CPUs: {meta['cpus']} ({meta['cpu_model']}) · PostgreSQL {settings['server_version']}"
            f" · {shown} (everything else default)",
            f"graphile-worker {meta['versions']['graphile']} · procrastinate "
            f"{meta['versions']['procrastinate']} · concurrency 10 per process · "
            f"{meta['rounds']} round(s), medians · 1-min load average at each round start/end: "
            f"{loads} · code under test: {meta.get('code', '?')}",
            f"images written under {meta.get('work_dir', '?')}: creating a 5 KB file there costs "
            f"{meta.get('file_create_ms', '?')} ms of CPU",
            "",
            NOTE,
        ]
    )
