"""Replicas: four listeners race for a flood of requests; each image is generated exactly once.

With an instant provider the listeners spend their time claiming, so every claim races three
others (``FOR UPDATE SKIP LOCKED`` is what keeps them apart). Nothing is killed, so nothing may
be retried either: every request must be claimed once, called once and answered once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tests.chaos.harness import ChaosRun, Requester, check_scale, unique_prompts
from tests.chaos.outcomes import (
    RequestOutcome,
    ScenarioResult,
    collect_outcomes,
    wait_until_settled,
)
from tests.support.fake_openai import FakeOpenAI
from tests.support.pg import PostgresServer

NAME = "replicas"
CHUNK = 100


@dataclass(frozen=True)
class Params:
    listeners: int
    requests: int
    settle_timeout: float


PARAMS = {
    "short": Params(4, 600, 60.0),
    "full": Params(4, 10_000, 600.0),
}


def run(scale: str, *, pg: PostgresServer | None = None) -> ScenarioResult:
    params = PARAMS[check_scale(scale)]
    with ChaosRun(NAME, scale, pg=pg, fake=FakeOpenAI()) as run_:
        run_.fleet(params.listeners)
        requester = Requester(run_.dsn)
        started = time.monotonic()
        for start in range(0, params.requests, CHUNK):
            requester.insert(unique_prompts("replicas", min(CHUNK, params.requests - start)))
        requester.close()
        done = wait_until_settled(run_.dsn, params.settle_timeout)
        elapsed = time.monotonic() - started
        outcomes = collect_outcomes(run_.dsn)
        calls = run_.fake.call_counts()
        problems = [] if done else [f"not settled within {params.settle_timeout:g}s"]

        def expect(outcome: RequestOutcome) -> str | None:
            if outcome.status != "complete":
                return f"expected complete, got {outcome.status} ({outcome.error})"
            if outcome.claims != 1 or calls.get(outcome.prompt) != 1:
                return f"{outcome.claims} claims, {calls.get(outcome.prompt)} provider calls"
            return None

        return run_.result(
            outcomes,
            expect=expect,
            # nothing fails here, so the policy allows exactly one call per request
            max_calls=1,
            problems=problems,
            notes={
                "throughput": f"{len(outcomes) / elapsed:.0f} requests/s",
                "provider calls": sum(calls.values()),
            },
        )
