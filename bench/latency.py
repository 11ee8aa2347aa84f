"""Insert-to-reply latency of single requests against the local fake OpenAI server.

Starts a throwaway PostgreSQL (pgserver; or uses DATABASE_URL), migrates it, runs the fake
OpenAI server and one ``image-listener run`` in subprocesses, then inserts requests one at a
time (as the ``authenticated`` role, like a frontend) with an idle gap between them, and reads
the timings from the database's own clock:

* wake-up: request ``created_at`` -> the claim that started the work (the reply's
  ``metadata.started_at``, stamped as it turns ``generating``)
* insert-to-complete: request ``created_at`` -> reply ``updated_at`` when it became complete

``--mode supabase`` runs the daemon with only SUPABASE_URL and the service-role key, in front of
the local Supabase stand-in (the real PostgREST from npm, the fake Realtime and Storage servers
of tests/support/supabase_stack): requests are inserted over PostgREST with a user's JWT,
wake-ups come over Realtime, images go to the fake Storage.

Usage: ``python bench/latency.py [--mode postgres|supabase] [--requests 200] [--delay 0]``
(delay = fake generation time in seconds).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.mode_rig import running_listener  # noqa: E402
from tests.support.fake_openai import FakeOpenAI  # noqa: E402
from tests.support.modes import MODES  # noqa: E402
from tests.support.queue_helpers import new_chat  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="postgres")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.0, help="fake generation seconds")
    args = parser.parse_args()
    with (
        FakeOpenAI(default_delay_seconds=args.delay) as fake,
        running_listener(args.mode, fake) as (rig, conn),
    ):
        rows = _measure(rig, conn, args.requests)
    wake = [float(r["wake_ms"]) for r in rows]
    done = [float(r["done_ms"]) for r in rows]
    print(
        f"mode {args.mode}: {len(rows)} requests one at a time,"
        f" fake generation delay {args.delay:g}s"
    )
    print("metric                  p50      p90      p99      max   (ms)")
    for label, values in (("wake-up (claim)", wake), ("insert-to-complete", done)):
        print(
            f"{label:<20} {statistics.median(values):8.2f} {percentile(values, 0.9):8.2f}"
            f" {percentile(values, 0.99):8.2f} {max(values):8.2f}"
        )
    return 0


def _measure(
    rig: object, conn: psycopg.Connection[dict[str, object]], count: int
) -> list[dict[str, object]]:
    """Insert ``count`` requests one at a time as the frontend; timings from the DB clock."""
    from tests.support.modes import ModeRig

    assert isinstance(rig, ModeRig)
    user, chat = new_chat(conn)
    rng = random.Random(7)
    ids = []
    for i in range(count):
        request = rig.insert_request(user, chat, f"bench {i}")
        ids.append(request)
        deadline = time.monotonic() + 30
        while True:
            row = conn.execute(
                "select status from public.messages where reply_to = %s", (request,)
            ).fetchone()
            if row and row["status"] == "complete":
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: request {i} not complete after 30 s")
            time.sleep(0.001)
        time.sleep(rng.uniform(0.02, 0.06))
    return conn.execute(
        # the claim's time: metadata.started_at (the reply itself exists from the insert)
        "select extract(epoch from ((r.metadata ->> 'started_at')::timestamptz - q.created_at))"
        " * 1000 as wake_ms,"
        " extract(epoch from (r.updated_at - q.created_at)) * 1000 as done_ms"
        " from public.messages q join public.messages r on r.reply_to = q.id"
        " where q.id = any(%s)",
        (ids,),
    ).fetchall()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except psycopg.Error as exc:
        print(f"bench: database error: {exc}", file=sys.stderr)
        sys.exit(1)
