"""Insert-to-reply latency of single requests against the local fake OpenAI server.

Starts a throwaway PostgreSQL (pgserver; or uses DATABASE_URL), migrates it, runs the fake
OpenAI server and one ``image-listener run`` in subprocesses, then inserts requests one at a
time (as the ``authenticated`` role, like a frontend) with an idle gap between them, and reads
the timings from the database's own clock:

* wake-up: request ``created_at`` -> reply row created (the claim that started the work)
* insert-to-complete: request ``created_at`` -> reply ``updated_at`` when it became complete

Usage: ``python bench/latency.py [--requests 200] [--delay 0]`` (delay = fake generation time).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from listener.migrate import apply_migrations  # noqa: E402
from tests.pg import PostgresServer, connect  # noqa: E402
from tests.queue_helpers import insert_request, new_chat  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.0, help="fake generation seconds")
    args = parser.parse_args()

    server = PostgresServer()
    name = server.empty()
    dsn = server.dsn(name)
    apply_migrations(dsn)
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_openai", "--port", "0", "--delay", str(args.delay)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert fake.stdout is not None
    base_url = fake.stdout.readline().strip()
    images = tempfile.TemporaryDirectory(prefix="il-bench-")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("IMAGE_LISTENER_")},
        "DATABASE_URL": dsn,
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": base_url,
        "IMAGE_LISTENER_IMAGE_DIR": images.name,
        "IMAGE_LISTENER_LOG_LEVEL": "warning",
        "IMAGE_LISTENER_LOG_FORMAT": "json",
    }
    daemon = subprocess.Popen([sys.executable, "-m", "listener.cli", "run"], cwd=ROOT, env=env)
    try:
        with connect(dsn) as conn:
            time.sleep(2.0)  # let the daemon connect and LISTEN
            user, chat = new_chat(conn)
            rng = random.Random(7)
            ids = []
            for i in range(args.requests):
                request = insert_request(conn, user, chat, f"bench {i}")
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
            rows = conn.execute(
                "select extract(epoch from (r.created_at - q.created_at)) * 1000 as wake_ms,"
                " extract(epoch from (r.updated_at - q.created_at)) * 1000 as done_ms"
                " from public.messages q join public.messages r on r.reply_to = q.id"
                " where q.id = any(%s)",
                (ids,),
            ).fetchall()
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        fake.terminate()
        fake.wait(timeout=10)
        server.drop(name)
        server.close()
        images.cleanup()
    wake = [float(r["wake_ms"]) for r in rows]
    done = [float(r["done_ms"]) for r in rows]
    print(f"requests: {len(rows)} sequential, fake generation delay {args.delay:g}s")
    print("metric                  p50      p90      p99      max   (ms)")
    for label, values in (("wake-up (claim)", wake), ("insert-to-complete", done)):
        print(
            f"{label:<20} {statistics.median(values):8.2f} {percentile(values, 0.9):8.2f}"
            f" {percentile(values, 0.99):8.2f} {max(values):8.2f}"
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except psycopg.Error as exc:
        print(f"bench: database error: {exc}", file=sys.stderr)
        sys.exit(1)
