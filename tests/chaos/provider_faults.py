"""Provider chaos: a fifth of the provider's answers are faults, and the policy absorbs them.

The fake server turns 20% of the calls that would succeed into one of: a 429 with
``retry-after``, a 500, a hang longer than the client's timeout, or a dropped connection (evenly,
from a seeded generator). Every one of those is transient, so every request must still end
``complete``, and none may be charged more calls than the policy allows:
``MAX_ATTEMPTS * TRIES_PER_ATTEMPT`` (quick retries within a claim, times claims). A 429 is
charged nothing (the request goes back to the queue with its attempt, and the fleet pauses), so
the calls answered 429 do not count against that bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.chaos.harness import ChaosRun, Requester, check_scale, insert_paced, unique_prompts
from tests.chaos.outcomes import ScenarioResult, collect_outcomes, wait_until_settled
from tests.support.fake_openai import FAULT_KINDS, FakeOpenAI
from tests.support.pg import PostgresServer

NAME = "provider faults"
MAX_ATTEMPTS = 5
TRIES_PER_ATTEMPT = 3
FAULT_RATE = 0.2
#: the client gives up on a call after this long ...
CLIENT_TIMEOUT_SECONDS = 1.5
#: ... and a hanging call would answer only after this long
HANG_SECONDS = 2.5
RETRY_AFTER_SECONDS = 0.3


@dataclass(frozen=True)
class Params:
    listeners: int
    requests: int
    #: arrivals per second (below what the fleet serves, so times show the faults, not a queue)
    rate: float
    concurrency: int
    min_latency: float
    max_latency: float
    settle_timeout: float


PARAMS = {
    "short": Params(2, 200, 40.0, 8, 0.0, 0.2, 90.0),
    "full": Params(4, 1000, 15.0, 8, 0.2, 1.0, 240.0),
}


def run(scale: str, *, pg: PostgresServer | None = None, seed: int = 5) -> ScenarioResult:
    params = PARAMS[check_scale(scale)]
    fake = FakeOpenAI(
        default_delay_seconds=params.min_latency,
        delay_jitter_seconds=params.max_latency - params.min_latency,
        seed=seed,
        fault_rate=FAULT_RATE,
        fault_seed=seed,
        fault_hang_seconds=HANG_SECONDS,
        fault_retry_after_seconds=RETRY_AFTER_SECONDS,
    )
    with ChaosRun(NAME, scale, pg=pg, fake=fake) as run_:
        env = run_.env(
            IMAGE_LISTENER_CONCURRENCY=str(params.concurrency),
            IMAGE_LISTENER_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
            IMAGE_LISTENER_TRIES_PER_ATTEMPT=str(TRIES_PER_ATTEMPT),
            IMAGE_LISTENER_OPENAI_TIMEOUT_SECONDS=f"{CLIENT_TIMEOUT_SECONDS:g}",
        )
        run_.fleet(params.listeners, env=env)
        requester = Requester(run_.dsn)
        insert_paced(requester, unique_prompts("provider", params.requests), params.rate)
        requester.close()
        done = wait_until_settled(run_.dsn, params.settle_timeout)
        outcomes = collect_outcomes(run_.dsn)
        problems = [] if done else [f"not settled within {params.settle_timeout:g}s"]
        kinds = fake.fault_counts()
        problems += [f"no {kind} fault was injected" for kind in FAULT_KINDS if not kinds.get(kind)]
        calls = fake.call_counts()
        share = fake.faults_injected / max(1, sum(calls.values()))
        return run_.result(
            outcomes,
            max_calls=MAX_ATTEMPTS * TRIES_PER_ATTEMPT,
            faults=fake.faults_injected,
            problems=problems,
            notes={
                "faults by kind": dict(sorted(kinds.items())),
                "share of calls faulted": f"{share:.1%}",
                "most calls for one request": max(calls.values(), default=0),
                "policy limit": f"{MAX_ATTEMPTS} attempts x {TRIES_PER_ATTEMPT} tries",
                "needed a second claim": sum(1 for o in outcomes if o.claims > 1),
            },
        )
