"""What the per-user limits cost an insert: the frontend's insert of one image request (as the
``authenticated`` role, through RLS, the validation and enqueue triggers, one transaction each)
timed with no limit set (the baseline: no lock, no counting) and with all three limits set high
enough never to refuse, alternating in rounds so that drift hits both alike.

Two populations:

* ``typical``: 200 users, a few requests each in the window (counts of a handful of rows);
* ``heavy``: one user with ``--heavy`` requests already in the last 24 hours and as many still
  pending (the counts walk that many index entries: the worst case a limit allows).

Usage: ``python bench/limits_cost.py [--inserts 2000] [--rounds 4] [--heavy 1000]``; starts a
throwaway PostgreSQL through pgserver (or uses DATABASE_URL) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.pg import PostgresServer, as_user, connect  # noqa: E402
from tests.support.queue_helpers import new_chat  # noqa: E402

Conn = psycopg.Connection[dict[str, Any]]
INSERT = (
    "insert into public.messages (chat_id, role, content, message_type)"
    " values (%s, 'user', 'a lighthouse at dawn', 'image')"
)
HIGH = {"max_pending": 1_000_000, "per_day": 1_000_000, "usd_per_month": 1_000_000}
NONE = {"max_pending": None, "per_day": None, "usd_per_month": None}


def set_default(conn: Conn, limits: dict[str, int | None]) -> None:
    conn.execute("select public.image_quota_set(null, %s::jsonb)", (json.dumps(limits),))


def timed_inserts(conn: Conn, targets: list[tuple[uuid.UUID, uuid.UUID]], n: int) -> list[float]:
    """``n`` single-row inserts round-robin over (user, chat); ms each, commit included."""
    timings = []
    for i in range(n):
        user, chat = targets[i % len(targets)]
        started = time.perf_counter()
        with as_user(conn, user):
            conn.execute(INSERT, (chat,))
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"{statistics.median(ordered):.3f} / {p99:.3f} / {statistics.fmean(ordered):.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--inserts", type=int, default=2000, help="per population and setting")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--heavy", type=int, default=1000, help="the heavy user's backlog")
    args = parser.parse_args()
    server = PostgresServer()
    server.create_template()
    name = server.clone()
    try:
        with connect(server.dsn(name)) as conn:
            typical = [new_chat(conn) for _ in range(200)]
            heavy_user, heavy_chat = new_chat(conn)
            set_default(conn, NONE)
            timed_inserts(conn, [(heavy_user, heavy_chat)], args.heavy)  # its backlog
            results: dict[str, dict[str, list[float]]] = {
                population: {"no limits": [], "limits set": []}
                for population in ("typical", "heavy")
            }
            per_round = max(1, args.inserts // args.rounds)
            timed_inserts(conn, typical, 200)  # warm-up
            for _ in range(args.rounds):
                for setting, limits in (("no limits", NONE), ("limits set", HIGH)):
                    set_default(conn, limits)
                    results["typical"][setting] += timed_inserts(conn, typical, per_round)
                    results["heavy"][setting] += timed_inserts(
                        conn, [(heavy_user, heavy_chat)], per_round // 4
                    )
            window = conn.execute(
                "select count(*) as n from image_queue.usage where user_id = %s", (heavy_user,)
            ).fetchone()
    finally:
        server.drop(name)
        server.close()
    print(f"insert latency in ms, p50 / p99 / mean ({args.rounds} alternating rounds)")
    print("| population | no limits (baseline) | limits set | p50 difference |")
    print("|---|---|---|---|")
    for population, by_setting in results.items():
        base, limited = by_setting["no limits"], by_setting["limits set"]
        delta = statistics.median(limited) - statistics.median(base)
        label = (
            population
            if population == "typical"
            else (f"heavy ({window['n'] if window else '?'} requests in its window at the end)")
        )
        print(f"| {label} | {summary(base)} | {summary(limited)} | {delta:+.3f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
