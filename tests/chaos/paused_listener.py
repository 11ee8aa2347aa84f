"""Clock and lease: a listener frozen (SIGSTOP) past its lease is fenced out when it wakes up.

Listener A claims the requests and is frozen while the provider works on them. Its leases run
out; listener B takes the requests over, generates them again and completes them. Then A is
resumed (SIGCONT) with its images in hand and its timers long overdue. Whatever it does next
must change nothing: the replies stay exactly as B wrote them (same row, same ``updated_at``,
same metadata, B's attempt), the stored images stay B's files, and A reports that it lost the
lease instead of completing.
"""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.chaos.fleet import Fleet
from tests.chaos.harness import ChaosRun, Requester, check_scale, unique_prompts
from tests.chaos.outcomes import (
    RequestOutcome,
    ScenarioResult,
    collect_outcomes,
    wait_until_settled,
)
from tests.support.fake_openai import FakeOpenAI
from tests.support.pg import PostgresServer, connect

NAME = "paused listener"
LEASE_SECONDS = 3.0
#: long enough that A is surely frozen mid-call, short enough for B to finish quickly
PROVIDER_SECONDS = 2.0
#: A is frozen this much longer than a lease
PAUSE_MARGIN_SECONDS = 2.0
#: what a listener that lost its lease may log for the request (a cancelled task logs nothing
#: of its own: the lease renewer's ``lease_lost`` says it)
FENCED_OUTCOMES = {"lease_lost", "lease_lost_before_store"}


@dataclass(frozen=True)
class Params:
    requests: int


PARAMS = {"short": Params(2), "full": Params(12)}


def run(scale: str, *, pg: PostgresServer | None = None) -> ScenarioResult:
    params = PARAMS[check_scale(scale)]
    with ChaosRun(NAME, scale, pg=pg, fake=FakeOpenAI()) as run_:
        env = run_.env(
            IMAGE_LISTENER_LEASE_SECONDS=f"{LEASE_SECONDS:g}",
            IMAGE_LISTENER_CONCURRENCY=str(params.requests),
            IMAGE_LISTENER_OPENAI_TIMEOUT_SECONDS="60",
        )
        a = run_.fleet(1, env={**env, "IMAGE_LISTENER_WORKER_ID": "chaos-a"}, restart=False)
        requester = Requester(run_.dsn)
        prompts = unique_prompts(
            "paused", params.requests, suffix=f" [fake:delay={PROVIDER_SECONDS:g}]"
        )
        requester.insert(prompts)
        requester.close()
        problems: list[str] = []
        try:
            _wait(lambda: all(run_.fake.calls(p) == 1 for p in prompts), "A to call the provider")
            a.signal(0, signal.SIGSTOP)
            paused_at = time.monotonic()
            b = run_.fleet(1, env={**env, "IMAGE_LISTENER_WORKER_ID": "chaos-b"}, restart=False)
            settled = wait_until_settled(run_.dsn, LEASE_SECONDS + PROVIDER_SECONDS + 20)
            before = _snapshot(run_.dsn, run_.image_dir)
            time.sleep(
                max(0.0, paused_at + LEASE_SECONDS + PAUSE_MARGIN_SECONDS - time.monotonic())
            )
            paused_for = time.monotonic() - paused_at
        finally:
            a.signal(0, signal.SIGCONT)
        if not settled:
            problems.append("B did not finish the requests taken over from A")
        fenced = _wait_fenced(a, before)
        time.sleep(1.0)  # anything A still had in mind would have been written by now
        after = _snapshot(run_.dsn, run_.image_dir)
        if after != before:
            problems.append(f"A changed the replies or images after resuming: {before} -> {after}")
        problems += [
            f"A did not report a lost lease for {rid}" for rid in before if rid not in fenced
        ]
        if paused_for <= LEASE_SECONDS:
            problems.append(f"A was paused only {paused_for:.1f}s")
        b_completed = {
            e.get("request_id")
            for e in b.events("request_finished")
            if e.get("outcome") == "complete"
        }

        def expect(outcome: RequestOutcome) -> str | None:
            if outcome.status != "complete":
                return f"expected complete, got {outcome.status} ({outcome.error})"
            if outcome.claims != 2 or str(outcome.request_id) not in b_completed:
                return f"the reply is not B's (attempt {outcome.claims})"
            return None

        return run_.result(
            collect_outcomes(run_.dsn),
            expect=expect,
            max_calls=2,
            faults=1,
            problems=problems,
            notes={"A paused for": f"{paused_for:.1f}s (lease {LEASE_SECONDS:g}s)"},
        )


def _wait(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _wait_fenced(a: Fleet, requests: dict[str, Any], timeout: float = 15.0) -> set[str]:
    """The requests A has said it lost, once it said so for all of them (or time ran out)."""
    deadline = time.monotonic() + timeout
    while True:
        fenced = {
            str(e.get("request_id"))
            for name in ("request_finished", "lease_lost")
            for e in a.events(name)
            if name == "lease_lost" or e.get("outcome") in FENCED_OUTCOMES
        }
        if set(requests) <= fenced or time.monotonic() > deadline:
            return fenced
        time.sleep(0.1)


def _snapshot(dsn: str, image_dir: Path) -> dict[str, Any]:
    """Per request: the reply row as written and the stored file's identity and content."""
    with connect(dsn) as conn:
        rows = conn.execute(
            "select reply_to, id, status, image_url, metadata, updated_at from public.messages"
            " where role = 'assistant'"
        ).fetchall()
    snapshot = {}
    for row in rows:
        location = (row["metadata"] or {}).get("storage", {}).get("location")
        path = image_dir / location if location else None
        if path is not None and path.exists():
            stat = path.stat()
            image: Any = (
                stat.st_ino,
                stat.st_mtime_ns,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
        else:
            image = None
        snapshot[str(row["reply_to"])] = (
            row["id"],
            row["status"],
            row["image_url"],
            row["metadata"],
            row["updated_at"],
            image,
        )
    return snapshot
