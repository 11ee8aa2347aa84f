"""Our side of the comparison, part one: throughput and wake-up latency of the full pipeline.

Each scenario gets a fresh database cloned from the migrated template (bench/rig.py), its own fake
OpenAI server and its own listener process(es), and stops them all before it returns. Requests
are inserted as a frontend inserts them (the ``authenticated`` role, through RLS, so the
validation and enqueue triggers run), by one user in one chat. Timings come from the database
clock (a reply row is created by the claim and last updated by the completion), from the fake
server's receive time and from the driver's own clock: one host, one clock.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from bench.cluster import Cluster
from bench.processes import CpuMeter, FakeServer, Listener, PySpy
from bench.rig import (
    REPLY_TIMES,
    Rig,
    exists_check,
    generation_calls,
    percentile,
    wait_until,
)

_REPLY_NOTIFY = """
create function public.bench_reply_done() returns trigger language plpgsql as $$
begin perform pg_notify('bench_reply', new.reply_to::text); return new; end $$;
create trigger bench_reply_done after update on public.messages for each row
  when (new.status = 'complete' and new.reply_to is not null)
  execute function public.bench_reply_done();
"""


def _xact_commits(cluster: Cluster, dbname: str) -> int:
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        row = conn.execute(
            "select xact_commit from pg_stat_database where datname = %s", (dbname,)
        ).fetchone()
    return int(row[0]) if row else 0


def _function_stats(conninfo: str) -> list[dict[str, Any]]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.row_factory = psycopg.rows.dict_row
        return conn.execute(
            "select schemaname || '.' || funcname as function, calls,"
            " round(total_time::numeric, 1) as total_ms, round(self_time::numeric, 1) as self_ms"
            " from pg_stat_user_functions order by total_time desc"
        ).fetchall()


def throughput(rig: Rig, n: int, processes: int, *, profile: bool = False) -> dict[str, Any]:
    """N requests in one transaction, then ``processes`` listeners (concurrency 10 each)."""
    name = f"il_tp_{n}_{processes}"
    conninfo = rig.fresh_db(name)
    if profile:
        with psycopg.connect(rig.cluster.conninfo(), autocommit=True) as admin:
            admin.execute(f"alter database {name} set track_functions = 'all'")
    enqueue_s = rig.insert(conninfo, n, "draw a cat #")
    fake = FakeServer(rig.work / "logs")
    listeners: list[Listener] = []
    spies: list[PySpy] = []
    try:
        xact_before = _xact_commits(rig.cluster, name)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            spawned = time.time()
            listeners = [rig.listener(conninfo, fake, f"tp{n}-{i}") for i in range(processes)]
            started = exists_check(
                conn, "select exists (select 1 from image_queue.jobs where state = 'running')"
            )
            polls = wait_until(started, 120, 0.005, listeners)
            if profile and rig.profile_dir is not None:
                # attached once the work has started: the profile is the steady state
                output = rig.profile_dir / f"listener-tp{n}-{processes}p.txt"
                spies = [PySpy(listeners[0].pid, output, gil=True)]
                spies.append(PySpy(fake.pid, rig.profile_dir / f"fake-tp{n}-{processes}p.txt"))
            cpu = CpuMeter(
                {
                    "listener": [p.pid for p in listeners],
                    "fake": [fake.pid],
                    "driver": [os.getpid()],
                },
                postmaster=rig.cluster.postmaster_pid(),
            ).start()
            load_before = os.getloadavg()[0]
            drained = exists_check(conn, "select not exists (select 1 from image_queue.jobs)")
            polls += wait_until(drained, max(600, n / 10), 0.02, listeners)
            drained_at = time.time()
            cpu_s = cpu.stop()
            load_after = os.getloadavg()[0]
            for spy in spies:
                spy.stop()
            conn.row_factory = psycopg.rows.dict_row
            times = conn.execute(REPLY_TIMES).fetchone()
            assert times is not None
        calls, max_calls = generation_calls(fake)
    finally:
        for listener in listeners:
            listener.stop()
        fake.stop()
        rig.cleanup_images()
    time.sleep(0.5)  # backends flush their statistics as they exit
    xact = _xact_commits(rig.cluster, name) - xact_before - polls - 1
    window = float(times["last_done"]) - float(times["first_claim"])
    result = {
        "n": n,
        "processes": processes,
        "enqueue_s": round(enqueue_s, 3),
        "enqueue_per_s": round(n / enqueue_s, 1),
        "jobs_per_s_processing": round(n / window, 1),
        "jobs_per_s_incl_startup": round(n / (drained_at - spawned), 1),
        "spawn_to_first_claim_s": round(float(times["first_claim"]) - spawned, 3),
        "complete": times["complete"],
        "failed": times["failed"],
        "generation_calls": calls,
        "max_calls_per_request": max_calls,
        "db_xacts_per_job": round(xact / n, 2),
        "cpu_ms_per_job": {k: round(v * 1000 / n, 3) for k, v in cpu_s.items()},
        "load_avg": [round(load_before, 2), round(load_after, 2)],
    }
    if profile:
        result["functions"] = _function_stats(conninfo)
    rig.cluster.drop_database(name)
    return result


def wakeup_latency(rig: Rig, k: int, *, warmup: int = 10) -> dict[str, Any]:
    """One idle listener; K single inserts with 20-60 ms gaps, each waited for to completion.

    Latency = the listener starting the generation call (its ``generation_started`` debug log
    line: the peers' "handler entry") - the driver sending COMMIT; also up to the fake server
    receiving the call (request building, HTTP, the fake's parsing on top)."""
    name = "il_wakeup"
    conninfo = rig.fresh_db(name)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(_REPLY_NOTIFY)
    fake = FakeServer(rig.work / "logs")
    listener = rig.listener(
        conninfo, fake, "wakeup", extra_env={"IMAGE_LISTENER_LOG_LEVEL": "debug"}
    )
    samples: list[tuple[str, uuid.UUID, float, float]] = []
    rng = random.Random(7)
    try:
        listener.wait_ready()
        time.sleep(1.0)
        waiter = psycopg.connect(conninfo, autocommit=True)
        writer = psycopg.connect(conninfo)
        try:
            waiter.execute("listen bench_reply")
            claims = json.dumps({"sub": str(rig.user_id), "role": "authenticated"})
            for i in range(warmup + k):
                prompt = f"wake {i}"
                # what tests.support.pg.as_user does, spelled out to time the COMMIT exactly
                writer.execute("set local role authenticated")
                writer.execute("select set_config('request.jwt.claims', %s, true)", (claims,))
                row = writer.execute(
                    "insert into public.messages (chat_id, role, content, message_type)"
                    " values (%s, 'user', %s, 'image') returning id",
                    (rig.chat_id, prompt),
                ).fetchone()
                request_id = row[0]  # type: ignore[index]
                sent = time.time()
                writer.commit()
                acked = time.time()
                if not _wait_notify(waiter, str(request_id), 30.0):
                    raise SystemExit(f"bench: wake-up request {i} not complete after 30 s")
                if i >= warmup:
                    samples.append((prompt, request_id, sent, acked))
                time.sleep(rng.uniform(0.02, 0.06))
        finally:
            waiter.close()
            writer.close()
        received = {str(r["prompt"]): float(r["received_at"]) for r in fake.received()}  # type: ignore[arg-type]
        with psycopg.connect(conninfo, autocommit=True) as conn:
            claimed = dict(
                conn.execute(
                    "select reply_to,"
                    " extract(epoch from (metadata ->> 'started_at')::timestamptz)::float8"
                    " from public.messages"
                    " where reply_to = any(%s)",
                    ([s[1] for s in samples],),
                ).fetchall()
            )
    finally:
        listener.stop()
        fake.stop()
        rig.cleanup_images()
        rig.cluster.drop_database(name)
    started = _generation_starts(listener.log_path)
    to_call = [(started[str(r)] - sent) * 1000 for _, r, sent, _ in samples]
    from_sent = [(received[p] - sent) * 1000 for p, _, sent, _ in samples]
    from_acked = [(received[p] - acked) * 1000 for p, _, _, acked in samples]
    to_claim = [(claimed[r] - sent) * 1000 for _, r, sent, _ in samples]
    return {
        "k": k,
        "to_call_start": _summary(to_call),
        "from_commit_sent": _summary(from_sent),
        "from_commit_acked": _summary(from_acked),
        "commit_to_claim_start": _summary(to_claim),
    }


def _generation_starts(log_path: Path) -> dict[str, float]:
    """request id -> epoch seconds of its first ``generation_started`` line in a JSON log."""
    starts: dict[str, float] = {}
    for line in log_path.read_text().splitlines():
        if '"generation_started"' not in line:
            continue
        entry = json.loads(line)
        stamp = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
        starts.setdefault(entry["request_id"], stamp)
    return starts


def _wait_notify(conn: psycopg.Connection[Any], payload: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        for note in conn.notifies(timeout=left, stop_after=1):
            if note.payload == payload:
                return True
    return False


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 50), 2),
        "p90_ms": round(percentile(values, 90), 2),
        "p99_ms": round(percentile(values, 99), 2),
        "max_ms": round(max(values), 2),
        "mean_ms": round(statistics.mean(values), 2),
    }
