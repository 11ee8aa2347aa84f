"""A burst against a rate-limited provider: today's listeners, the fleet budget, and the rate the
fleet learns without one, side by side in one run.

The provider is the local test server with a server-wide limit (``--limit`` calls per sliding
``--window`` seconds, 429 with the retry-after at which a slot frees beyond it) and ~1 s per
image. Four listeners (concurrency 8 each) share a fresh database; two users insert a burst of
``--burst`` requests, alternately, all at once. Three runs:

* (a) **before**: the previous release's listeners (``--baseline-ref``, extracted with
  ``git archive``): each retries its own 429s within the attempt;
* (b) **budget**: ``IMAGE_LISTENER_PROVIDER_IMAGES_PER_MINUTE`` set to the limit;
* (c) **learned**: no budget; the fleet learns a rate from 429s (a fresh database: nothing
  learned yet), then (c2) a second burst on what it learned.

Printed per run: the time to drain the burst (first insert to last final reply) over the ideal
(burst / limit), the share of provider calls answered 429, requests that ended ``failed``, and
how the two users were served (each one's share of the first half of the images completed,
and when each one's last request completed).

The default provider admits 50 calls per 10 s (300 per minute, a per-minute limit in a sixth of
the time); ``--limit 10 --window 2`` is the same rate with a window five times shorter, where
the few milliseconds by which calls arrive early or late weigh five times more.

Usage: ``python bench/rate_limits.py [--burst 300] [--limit 50] [--window 10]
[--only before,budget,learned] [--baseline-ref 7b000bd]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from listener.migrate import apply_migrations  # noqa: E402
from tests.support.fake_openai import FakeOpenAI  # noqa: E402
from tests.support.pg import PostgresServer, as_user, connect, create_user  # noqa: E402

Conn = psycopg.Connection[dict[str, Any]]
#: the last commit before the fleet budget (#15): listeners that retry their own 429s
BASELINE_REF = "7b000bd"
LISTENERS = 4
CONCURRENCY = 8


@dataclass
class Outcome:
    label: str
    drain_s: float
    ideal_s: float
    calls: int
    refused: int
    failed: int
    first_half_a: float
    last_done_a: float
    last_done_b: float

    def row(self) -> str:
        return (
            f"| {self.label} | {self.drain_s:.1f} s | {self.drain_s / self.ideal_s:.2f}x | "
            f"{self.calls} | {self.refused} ({100 * self.refused / max(self.calls, 1):.1f}%) | "
            f"{self.failed} | A {100 * self.first_half_a:.0f}% / B "
            f"{100 * (1 - self.first_half_a):.0f}% | A {self.last_done_a:.1f} s, "
            f"B {self.last_done_b:.1f} s |"
        )


def start_listeners(
    dsn: str, fake: FakeOpenAI, work: Path, code: Path, extra: dict[str, str]
) -> list[subprocess.Popen[bytes]]:
    prefixes = ("IMAGE_LISTENER_", "OPENAI_", "SUPABASE_", "DATABASE_URL")
    base = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    procs = []
    for index in range(LISTENERS):
        log = work / f"listener-{index}.log"
        env = {
            **base,
            # the code under test first on the path (the baseline's own tree for run a)
            "PYTHONPATH": str(code),
            "DATABASE_URL": dsn,
            "OPENAI_API_KEY": "sk-bench",
            "OPENAI_BASE_URL": fake.base_url,
            "IMAGE_LISTENER_CONCURRENCY": str(CONCURRENCY),
            "IMAGE_LISTENER_WORKER_ID": f"bench-{index}",
            "IMAGE_LISTENER_LOG_FORMAT": "json",
            "IMAGE_LISTENER_LOG_LEVEL": "info",
            "IMAGE_LISTENER_HTTP_PORT": "0",
            "IMAGE_LISTENER_IMAGE_DIR": str(work / "images"),
            **extra,
        }
        with log.open("ab") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "listener", "run"],
                    cwd=code,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + 60
    for index, proc in enumerate(procs):
        log = work / f"listener-{index}.log"
        while '"listening"' not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench: listener {index} did not start:\n{log.read_text()}")
            time.sleep(0.1)
    return procs


def stop_listeners(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def insert_burst(conn: Conn, chats: dict[str, tuple[Any, Any]], burst: int, tag: str) -> float:
    """Two users' requests, alternately, in one transaction per user pair; the start time."""
    started = time.time()
    for i in range(burst // 2):
        for label, (user, chat) in chats.items():
            with as_user(conn, user):
                conn.execute(
                    "insert into public.messages (chat_id, role, content, message_type)"
                    " values (%s, 'user', %s, 'image')",
                    (chat, f"{tag} {label} {i}"),
                )
    return started


def wait_drained(conn: Conn, tag: str, burst: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute(
            "select count(*) filter (where r.status in ('complete', 'failed')) as final,"
            " extract(epoch from max(r.updated_at)) as last"
            " from public.messages q join public.messages r on r.reply_to = q.id"
            " where q.content like %s",
            (f"{tag} %",),
        ).fetchone()
        assert row is not None
        if row["final"] == burst:
            return float(row["last"])
        time.sleep(0.2)
    raise SystemExit(f"bench: the burst {tag!r} did not drain within {timeout:.0f} s")


def measure(
    conn: Conn,
    fake: FakeOpenAI,
    chats: dict[str, tuple[Any, Any]],
    args: argparse.Namespace,
    label: str,
    tag: str,
) -> Outcome:
    fake.reset()
    ideal = args.burst / (args.limit / args.window)
    started = insert_burst(conn, chats, args.burst, tag)
    last = wait_drained(conn, tag, args.burst, timeout=max(600.0, 20 * ideal))
    rows = conn.execute(
        "select r.status, split_part(q.content, ' ', 2) as owner,"
        " extract(epoch from r.updated_at) as done"
        " from public.messages q join public.messages r on r.reply_to = q.id"
        " where q.content like %s",
        (f"{tag} %",),
    ).fetchall()
    # the order of service: who got the first half of the images
    completed = sorted((float(r["done"]), r["owner"]) for r in rows if r["status"] == "complete")
    half = [owner for _done, owner in completed[: max(1, len(completed) // 2)]]
    return Outcome(
        label=label,
        drain_s=last - started,
        ideal_s=ideal,
        calls=len(fake.admissions()) + fake.rate_limited,
        refused=fake.rate_limited,
        failed=sum(1 for r in rows if r["status"] == "failed"),
        first_half_a=half.count("A") / len(half) if half else 0.0,
        last_done_a=max(float(r["done"]) for r in rows if r["owner"] == "A") - started,
        last_done_b=max(float(r["done"]) for r in rows if r["owner"] == "B") - started,
    )


def baseline_tree(ref: str, into: Path) -> Path:
    """The previous release's code, extracted from git (no worktree bookkeeping)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run(label: str, args: argparse.Namespace, code: Path, extra: dict[str, str]) -> list[Outcome]:
    server = PostgresServer()
    name = server.empty()
    dsn = server.dsn(name)
    apply_migrations(dsn)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="il-ratelimit-") as work_dir:
        work = Path(work_dir)
        fake = FakeOpenAI(
            default_delay_seconds=0.9,
            delay_jitter_seconds=0.2,
            seed=1,
            rate_limit=args.limit,
            rate_window_seconds=args.window,
        )
        try:
            with fake, connect(dsn) as conn:
                chats = {}
                for owner in ("A", "B"):
                    user = create_user(conn)
                    with as_user(conn, user):
                        row = conn.execute(
                            "insert into public.chats (title) values ('bench') returning id"
                        ).fetchone()
                    assert row is not None
                    chats[owner] = (user, row["id"])
                procs = start_listeners(dsn, fake, work, code, extra)
                try:
                    outcomes.append(measure(conn, fake, chats, args, label, "burst1"))
                    if label.startswith("(c)"):
                        time.sleep(args.window)  # the provider's window empties between bursts
                        outcomes.append(
                            measure(conn, fake, chats, args, "(c2) learned, second burst", "burst2")
                        )
                finally:
                    stop_listeners(procs)
        finally:
            server.drop(name)
            server.close()
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--burst", type=int, default=300, help="requests, half per user")
    parser.add_argument("--limit", type=int, default=50, help="provider calls per window")
    parser.add_argument("--window", type=float, default=10.0, help="the provider's window (s)")
    parser.add_argument("--only", default="before,budget,learned")
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    args = parser.parse_args()
    only = set(args.only.split(","))
    per_minute = args.limit * 60 / args.window
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="il-baseline-") as baseline_dir:
        if "before" in only:
            code = baseline_tree(args.baseline_ref, Path(baseline_dir))
            print(
                f"[{time.strftime('%H:%M:%S')}] (a) before ({args.baseline_ref})", file=sys.stderr
            )
            outcomes += run(f"(a) before ({args.baseline_ref})", args, code, {})
        if "budget" in only:
            print(f"[{time.strftime('%H:%M:%S')}] (b) budget", file=sys.stderr)
            extra = {"IMAGE_LISTENER_PROVIDER_IMAGES_PER_MINUTE": f"{per_minute:g}"}
            outcomes += run(f"(b) budget {per_minute:g}/min", args, ROOT, extra)
        if "learned" in only:
            print(f"[{time.strftime('%H:%M:%S')}] (c) learned", file=sys.stderr)
            outcomes += run("(c) no budget, learned", args, ROOT, {})
    print(
        f"{LISTENERS} listeners x concurrency {CONCURRENCY}; provider: {args.limit} calls per "
        f"{args.window:g} s sliding window ({per_minute:g}/min), 0.9-1.1 s per image; burst of "
        f"{args.burst} from two users (alternate inserts); ideal drain = burst / limit = "
        f"{args.burst / (args.limit / args.window):.1f} s"
    )
    print(
        "| run | drain | over ideal | provider calls | answered 429 | failed "
        "| first half of images | last image of each user |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for outcome in outcomes:
        print(outcome.row())
    return 0


if __name__ == "__main__":
    sys.exit(main())
