"""EXPLAIN ANALYZE of the queue's statements with a deep backlog, and their cost as it drains.

Starts a throwaway PostgreSQL 15 cluster (bench/cluster.py), migrates it, queues ``--backlog``
requests (one user, one transaction, through RLS and the triggers as a frontend would), then:

1. prints the plan of every statement inside ``image_jobs_claim``, ``image_jobs_complete``,
   ``image_jobs_next_due`` and the enqueue trigger (auto_explain with nested statements,
   ANALYZE and BUFFERS, in a transaction that is rolled back), at full depth;
2. drains the queue the way listeners do (claim 10, complete each: one transaction per call)
   and times ``image_jobs_claim(limit 10)`` at several depths, so a cost that grows with the
   backlog shows up as a rising column; the plans are printed again near the end (~1k left).

Usage: ``python bench/explain_claim.py [--backlog 100000] [--plans-only]``
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cluster import Cluster  # noqa: E402
from bench.rig import Rig  # noqa: E402

WORKER = "explain-worker"
_DRAIN_CHUNK = """
do $$
declare r record;
begin
  for r in select * from public.image_jobs_claim('drain-worker', %(limit)s, 90, 5) loop
    perform public.image_jobs_complete(r.request_id, 'drain-worker', r.attempt,
                                       'file:///bench.png', '{}'::jsonb);
  end loop;
end $$
"""


def _explained(conn: psycopg.Connection[Any], statements: list[str]) -> list[str]:
    """Run ``statements`` in a rolled-back transaction with auto_explain; the plans logged."""
    plans: list[str] = []

    def collect(diag: psycopg.errors.Diagnostic) -> None:
        if diag.message_primary and "Query Text" in diag.message_primary:
            plans.append(diag.message_primary)

    conn.add_notice_handler(collect)
    try:
        with conn.transaction(force_rollback=True):
            for sql in statements:
                conn.execute(sql)
    finally:
        conn.remove_notice_handler(collect)
    return plans


def _setup_auto_explain(conn: psycopg.Connection[Any]) -> None:
    conn.execute("load 'auto_explain'")
    for setting, value in (
        ("log_min_duration", "0"),
        ("log_analyze", "on"),
        ("log_buffers", "on"),
        ("log_timing", "on"),
        ("log_nested_statements", "on"),
        ("log_level", "notice"),
    ):
        conn.execute(f"set auto_explain.{setting} = {value}")


def print_plans(conn: psycopg.Connection[Any], rig: Rig, title: str) -> None:
    """Plans of claim (limit 10), complete, next_due and one enqueue at the current depth."""
    depth = conn.execute("select count(*) from image_queue.jobs").fetchone()[0]  # type: ignore[index]
    print(f"\n## {title}: {depth:,} jobs in image_queue.jobs\n")
    quiet, loud = (f"set local auto_explain.log_min_duration = {v}" for v in (-1, 0))
    claim = f"select * from public.image_jobs_claim('{WORKER}', 10, 90, 5)"
    complete = [
        quiet,
        f"create temp table c on commit drop as"
        f" select * from public.image_jobs_claim('{WORKER}', 1, 90, 5)",
        loud,
        f"select public.image_jobs_complete(c.request_id, '{WORKER}', c.attempt,"
        " 'file:///x.png', '{}'::jsonb) from c",
    ]
    claims = f'{{"sub": "{rig.user_id}", "role": "authenticated"}}'
    enqueue = [
        quiet,
        f"select set_config('request.jwt.claims', '{claims}', true)",
        loud,
        "set local role authenticated",
        "insert into public.messages (chat_id, role, content, message_type)"
        f" values ('{rig.chat_id}', 'user', 'explain me', 'image')",
    ]
    costly: list[tuple[int, str, str]] = []
    for label, statements in (
        ("image_jobs_claim(limit 10)", [claim]),
        ("image_jobs_complete (after a claim of 1)", complete),
        ("image_jobs_next_due()", ["select public.image_jobs_next_due()"]),
        ("enqueue trigger (one frontend insert)", enqueue),
    ):
        print(f"### {label}\n\n```")
        for plan in _explained(conn, statements):
            print(plan.strip(), end="\n\n")
            if not _is_wrapper(plan):
                costly.append((*_plan_cost(plan), label))
        print("```")
    print(f"\n### statements touching the most buffers at {depth:,} jobs\n")
    print("| buffers | rows removed by filter / heap fetches | statement | in |")
    print("|---|---|---|---|")
    for buffers, text, label in sorted(costly, reverse=True)[:8]:
        print(f"| {buffers} | {text} | {label} |")


def _is_wrapper(plan: str) -> bool:
    """Our own call of a queue function: its buffers are the sum of the statements inside."""
    query = plan.split("Query Text:", 1)[-1].strip()
    return query.startswith(("select * from public.image_jobs_", "select public.image_jobs_"))


def _plan_cost(plan: str) -> tuple[int, str]:
    """(shared buffers hit/read by a leaf statement, its filtered rows and heap fetches, and
    the first line of its text) for the summary table."""
    lines = plan.splitlines()
    query = next((ln for ln in lines if ln.startswith("Query Text:")), "")
    index = lines.index(query) + 1 if query in lines else 1
    text = " ".join(" ".join(lines[index - 1 : index + 4]).split()).replace("|", "/")
    text = text.removeprefix("Query Text:").strip()[:160]
    buffers = [int(n) for n in re.findall(r"Buffers: shared (?:hit|read)=(\d+)", plan)[:1]]
    removed = sum(int(n) for n in re.findall(r"Rows Removed by Filter: (\d+)", plan))
    fetches = sum(int(n) for n in re.findall(r"Heap Fetches: (\d+)", plan))
    return (buffers[0] if buffers else 0), f"{removed} / {fetches} | `{text}`"


def time_claims(conn: psycopg.Connection[Any], repeat: int = 20) -> float:
    """Median ms of ``image_jobs_claim(limit 10)`` (each rolled back, so the depth stays)."""
    samples = []
    for _ in range(repeat):
        with conn.transaction(force_rollback=True):
            started = time.perf_counter()
            conn.execute(f"select * from public.image_jobs_claim('{WORKER}', 10, 90, 5)").fetchall()
            samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--plans-only", action="store_true", help="skip the drain")
    args = parser.parse_args()
    with Cluster() as cluster:
        rig = Rig(cluster, Path(tempfile.mkdtemp(prefix="il-explain-"))).prepare()
        conninfo = rig.fresh_db("il_explain")
        started = time.perf_counter()
        rig.insert(conninfo, args.backlog, "explain #")
        print(f"queued {args.backlog:,} requests in {time.perf_counter() - started:.1f} s")
        with (
            psycopg.connect(conninfo, autocommit=True) as conn,
            psycopg.connect(conninfo, autocommit=True) as timing,
        ):
            _setup_auto_explain(conn)
            print_plans(conn, rig, "full backlog")
            if args.plans_only:
                return 0
            print("\n## claim(limit 10) median ms by depth while draining (claim 10 + complete)\n")
            print("| jobs left | claim ms | drained so far, s |")
            print("|---|---|---|")
            drain_started = time.perf_counter()
            left = args.backlog
            step = max(args.backlog // 10, 1)
            checkpoints = [*range(args.backlog, 1000, -step), 5000, 2000, 1000]
            while checkpoints:
                if left <= checkpoints[0]:
                    checkpoints.pop(0)
                    took = time.perf_counter() - drain_started
                    print(f"| {left:,} | {time_claims(timing):.2f} | {took:.0f} |", flush=True)
                    continue
                timing.execute(_DRAIN_CHUNK % {"limit": 10})
                left -= 10
            print_plans(conn, rig, "near the end of the drain")
    return 0


if __name__ == "__main__":
    sys.exit(main())
