"""Poison request: a request whose handling kills the listener every time.

The fake server answers the poison prompt (``[fake:kill-caller]``) by SIGKILLing the process
that called it, for real; the fleet restarts it. Attempts are counted when a job is claimed, so
each crash uses one: after ``MAX_ATTEMPTS`` claims the next claim ends the request ``failed``
with a reason that names the attempts, and nobody calls the provider for it again.
Two groups of healthy requests share the queue with it, and every one of them must complete:

* **alongside**: inserted in the poison's own transaction, so the first claim takes them in one
  batch with it and the first crash kills them too (each loses one attempt);
* **stream**: arriving steadily from a second later on.

The alongside group is the hard case: the crashed batch's leases expire together. The claim
treats every expired lease as a suspect, hands suspects out one at a time and never to a
listener already running one, so the poison cannot take the same requests down twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tests.chaos.harness import ChaosRun, Requester, check_scale, unique_prompts
from tests.chaos.outcomes import RequestOutcome, ScenarioResult, collect_outcomes, settled
from tests.support.fake_openai import FakeOpenAI
from tests.support.pg import PostgresServer, connect

NAME = "poison"
MAX_ATTEMPTS = 3
TRIES_PER_ATTEMPT = 3
POISON = "[fake:kill-caller]"


@dataclass(frozen=True)
class Params:
    listeners: int
    poison: int
    #: healthy requests inserted in each poison request's transaction
    alongside: int
    #: healthy requests streaming in afterwards
    healthy: int
    #: healthy arrivals per second
    rate: float
    latency: float
    settle_timeout: float


PARAMS = {
    "short": Params(2, 1, 3, 40, 4.0, 0.2, 60.0),
    "full": Params(3, 3, 3, 400, 10.0, 0.2, 120.0),
}
#: the stream starts after the poison's first claim, so it is not in that batch
STREAM_START_SECONDS = 1.0
#: poison requests (full scale: more than one) arrive this far apart
POISON_EVERY_SECONDS = 4.0


def run(scale: str, *, pg: PostgresServer | None = None) -> ScenarioResult:
    params = PARAMS[check_scale(scale)]
    fake = FakeOpenAI(default_delay_seconds=params.latency)
    with ChaosRun(NAME, scale, pg=pg, fake=fake) as run_:
        env = run_.env(
            IMAGE_LISTENER_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
            IMAGE_LISTENER_TRIES_PER_ATTEMPT=str(TRIES_PER_ATTEMPT),
        )
        run_.fleet(params.listeners, env=env)
        requester = Requester(run_.dsn)
        poison = unique_prompts("poison", params.poison, suffix=f" {POISON}")
        alongside = unique_prompts("alongside", params.poison * params.alongside)
        healthy = unique_prompts("stream", params.healthy)
        started = time.monotonic()
        deadline = started + params.healthy / params.rate + params.settle_timeout
        poisoned, inserted, done = 0, 0, False
        with connect(run_.dsn) as conn:
            while time.monotonic() < deadline:
                tick = time.monotonic() - started
                if poisoned < len(poison) and tick >= poisoned * POISON_EVERY_SECONDS:
                    mates = alongside[poisoned * params.alongside :][: params.alongside]
                    requester.insert([poison[poisoned], *mates])
                    poisoned += 1
                if inserted < len(healthy) and tick >= STREAM_START_SECONDS:
                    due = int((tick - STREAM_START_SECONDS) * params.rate) + 1
                    inserted += requester.insert(healthy[inserted : min(len(healthy), due)])
                elif poisoned == len(poison) and inserted == len(healthy) and settled(conn):
                    done = True
                    break
                time.sleep(max(0.0, started + tick + 0.25 - time.monotonic()))
        requester.close()
        outcomes = collect_outcomes(run_.dsn)
        groups = {
            **dict.fromkeys(poison, "poison"),
            **dict.fromkeys(alongside, "alongside"),
            **dict.fromkeys(healthy, "stream"),
        }
        problems = [] if done else [f"not settled {params.settle_timeout:g}s after the arrivals"]
        for prompt in poison:
            if not 1 <= fake.calls(prompt) <= MAX_ATTEMPTS:
                problems.append(f"poison called {fake.calls(prompt)} times ({MAX_ATTEMPTS} claims)")
        if len(fake.kills()) < MAX_ATTEMPTS:
            problems.append(f"only {len(fake.kills())} listeners were killed")

        def expect(outcome: RequestOutcome) -> str | None:
            group = groups.get(outcome.prompt)
            if group == "poison":
                return _poison_verdict(outcome)
            if outcome.status != "complete":
                return f"{group} request ended {outcome.status}: {outcome.error}"
            return None

        def not_complete(group: str) -> int:
            return sum(
                1 for o in outcomes if groups.get(o.prompt) == group and o.status != "complete"
            )

        stream_times = [
            o.time_to_final
            for o in outcomes
            if groups.get(o.prompt) == "stream" and o.time_to_final is not None
        ]
        return run_.result(
            outcomes,
            expect=expect,
            max_calls=MAX_ATTEMPTS * TRIES_PER_ATTEMPT,
            faults=params.poison,
            problems=problems,
            notes={
                "poison requests": params.poison,
                "alongside not complete": not_complete("alongside"),
                "stream not complete": not_complete("stream"),
                "stream max time to final": f"{max(stream_times, default=0.0):.2f}s",
            },
        )


def _poison_verdict(outcome: RequestOutcome) -> str | None:
    if outcome.status != "failed":
        return f"poison ended {outcome.status}, expected failed"
    if outcome.metadata.get("error_code") != "attempts_exhausted":
        return f"poison failed with {outcome.metadata.get('error_code')}, not attempts_exhausted"
    if outcome.claims != MAX_ATTEMPTS or f"{MAX_ATTEMPTS} times" not in (outcome.error or ""):
        return f"poison failed after {outcome.claims} claims: {outcome.error!r}"
    return None
