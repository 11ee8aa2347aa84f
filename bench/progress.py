"""What a watcher of the reply row sees, and when: one request at a time, with a provider that
streams ``--partials`` partial images ``--every`` seconds apart and then the image.

For each request the watcher (a second connection polling the reply every millisecond, as
close to a Realtime subscriber as a poll gets) notes when the reply was first readable as
``queued``, became ``generating``, showed each ``preview_url``, and became ``complete``; the
fake server notes when it sent each partial image (same host, same clock). Printed: insert ->
queued readable, insert -> generating, provider sent -> preview visible (every preview), and
insert -> complete.

Usage: ``python bench/progress.py [--mode postgres|supabase] [--requests 30] [--partials 2]
[--every 0.3]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.mode_rig import running_listener  # noqa: E402
from tests.support.fake_openai import FakeOpenAI  # noqa: E402
from tests.support.modes import MODES, ModeRig  # noqa: E402
from tests.support.queue_helpers import new_chat  # noqa: E402

Conn = psycopg.Connection[dict[str, Any]]


def watch(conn: Conn, request: object, deadline: float) -> dict[str, Any]:
    """Poll the reply until it is final; the time each state and preview was first seen."""
    seen: dict[str, Any] = {"previews": {}}
    while time.monotonic() < deadline:
        row = conn.execute(
            "select status, preview_url, metadata ->> 'preview_index' as idx"
            " from public.messages where reply_to = %s",
            (request,),
        ).fetchone()
        now = time.time()
        if row is not None:
            seen.setdefault(row["status"], now)
            if row["preview_url"] and row["idx"] is not None:
                seen["previews"].setdefault(int(row["idx"]), now)
            if row["status"] in ("complete", "failed"):
                return seen
        time.sleep(0.001)
    raise SystemExit(f"bench: request {request} not final in time")


def measure(
    rig: ModeRig, conn: Conn, fake: FakeOpenAI, args: argparse.Namespace
) -> dict[str, list[float]]:
    user, chat = new_chat(conn)
    results: dict[str, list[float]] = {
        "queued": [],
        "generating": [],
        "preview": [],
        "complete": [],
    }
    options = {"partial_images": args.partials}
    for i in range(args.requests):
        prompt = f"progress {i} [fake:partial-every={args.every}]"
        started = time.time()
        request = rig.insert_request(user, chat, prompt, options)
        seen = watch(conn, request, time.monotonic() + 60)
        if "complete" not in seen:
            raise SystemExit(f"bench: request {i} ended {list(seen)}")
        results["queued"].append((seen.get("queued", seen["complete"]) - started) * 1000)
        results["generating"].append((seen.get("generating", seen["complete"]) - started) * 1000)
        results["complete"].append((seen["complete"] - started) * 1000)
        for index, sent_at in fake.partials_sent(prompt):
            if index in seen["previews"]:
                results["preview"].append((seen["previews"][index] - sent_at) * 1000)
        time.sleep(0.05)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="postgres")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--partials", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--every", type=float, default=0.3, help="seconds between stream events")
    args = parser.parse_args()
    with FakeOpenAI() as fake, running_listener(args.mode, fake) as (rig, conn):
        results = measure(rig, conn, fake, args)
    total = (args.partials + 1) * args.every
    print(
        f"mode {args.mode}: {args.requests} requests one at a time; the provider streams "
        f"{args.partials} partial image(s) {args.every:g}s apart, the image at {total:g}s"
    )
    print("| from -> to | p50 | p95 | max |")
    print("|---|---|---|---|")
    labels = {
        "queued": "insert -> reply readable as queued (ms)",
        "generating": "insert -> reply generating (ms)",
        "preview": "provider sends a partial -> preview_url visible (ms)",
        "complete": "insert -> complete (ms)",
    }
    for key, label in labels.items():
        values = sorted(results[key])
        p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
        print(f"| {label} | {statistics.median(values):.1f} | {p95:.1f} | {max(values):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
