"""Kill storm: listeners SIGKILLed at random while requests stream in; nothing lost or doubled.

Four listeners serve requests arriving at a steady rate (below what the fleet can serve, so
the times measure takeovers rather than a backlog) from a provider that takes 0.2-2 s. Every
two seconds a random listener is SIGKILLed and restarted, until every request is final.

A killed listener's jobs wait for their lease to run out, then any listener takes them over, so
each claim a kill cost adds at most one lease (plus a claim's latency) to a request. The bound
checked for every request is therefore::

    time to final <= (claims - 1) * lease + claims * (max provider latency + 1 s) + 5 s

where the 1 s per claim covers the claim round trip, the poll interval and the final write,
and the 5 s covers a request waiting for a free slot while a quarter of the fleet restarts.
MAX_ATTEMPTS is raised to 10 so that a request surviving several kills is still expected to
complete (at one kill every 2 s across 4 listeners, a 1 s attempt dies with p ~ 0.15).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from tests.chaos.harness import ChaosRun, Requester, check_scale, unique_prompts
from tests.chaos.outcomes import RequestOutcome, ScenarioResult, collect_outcomes, settled
from tests.support.fake_openai import FakeOpenAI
from tests.support.pg import PostgresServer, connect

NAME = "kill storm"
LEASE_SECONDS = 3.0
MAX_ATTEMPTS = 10
TRIES_PER_ATTEMPT = 3


@dataclass(frozen=True)
class Params:
    listeners: int
    requests: int
    #: arrivals per second
    rate: float
    min_latency: float
    max_latency: float
    kill_every: float
    concurrency: int
    settle_timeout: float


PARAMS = {
    "short": Params(4, 120, 8.0, 0.2, 2.0, 2.0, 4, 60.0),
    "full": Params(4, 1000, 10.0, 0.2, 2.0, 2.0, 8, 240.0),
}
TICK_SECONDS = 0.25


def time_bound(claims: int, params: Params) -> float:
    """The longest a request with ``claims`` claims may take (see the module docstring)."""
    return (claims - 1) * LEASE_SECONDS + claims * (params.max_latency + 1.0) + 5.0


def run(scale: str, *, pg: PostgresServer | None = None, seed: int = 1) -> ScenarioResult:
    params = PARAMS[check_scale(scale)]
    fake = FakeOpenAI(
        default_delay_seconds=params.min_latency,
        delay_jitter_seconds=params.max_latency - params.min_latency,
        seed=seed,
    )
    rng = random.Random(seed)
    with ChaosRun(NAME, scale, pg=pg, fake=fake) as run_:
        env = run_.env(
            IMAGE_LISTENER_CONCURRENCY=str(params.concurrency),
            IMAGE_LISTENER_LEASE_SECONDS=f"{LEASE_SECONDS:g}",
            IMAGE_LISTENER_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
            IMAGE_LISTENER_TRIES_PER_ATTEMPT=str(TRIES_PER_ATTEMPT),
        )
        fleet = run_.fleet(params.listeners, env=env)
        requester = Requester(run_.dsn)
        prompts = unique_prompts("kill-storm", params.requests)
        per_tick = params.rate * TICK_SECONDS
        started = time.monotonic()
        deadline = started + params.requests / params.rate + params.settle_timeout
        next_kill = started + params.kill_every
        inserted, due, done = 0, 0.0, False
        with connect(run_.dsn) as conn:
            while time.monotonic() < deadline:
                tick_started = time.monotonic()
                if inserted < len(prompts):
                    due += per_tick
                    batch = prompts[inserted : int(due)]
                    inserted += requester.insert(batch)
                elif settled(conn):
                    done = True
                    break
                if tick_started >= next_kill:
                    fleet.kill(rng.randrange(fleet.size))
                    next_kill += params.kill_every
                time.sleep(max(0.0, tick_started + TICK_SECONDS - time.monotonic()))
        requester.close()
        outcomes = collect_outcomes(run_.dsn)
        problems = [] if done else [f"not settled {params.settle_timeout:g}s after the arrivals"]
        late = [o for o in outcomes if _too_late(o, params)]
        problems += [
            f"{o.request_id}: final after {o.time_to_final:.1f}s with {o.claims} claims, "
            f"bound {time_bound(o.claims, params):.1f}s"
            for o in late
        ]
        if fleet.kills == 0:
            problems.append("no listener was killed")
        excess = [
            (o.time_to_final or 0.0) - (o.claims - 1) * LEASE_SECONDS
            for o in outcomes
            if o.is_final
        ]
        return run_.result(
            outcomes,
            max_calls=MAX_ATTEMPTS * TRIES_PER_ATTEMPT,
            faults=0,
            problems=problems,
            notes={
                "taken over (claims > 1)": sum(1 for o in outcomes if o.claims > 1),
                "most claims": max((o.claims for o in outcomes), default=0),
                "max time to final minus lost leases": f"{max(excess, default=0.0):.2f}s",
                "bound": "(claims-1)*lease + claims*(max latency + 1s) + 5s",
            },
        )


def _too_late(outcome: RequestOutcome, params: Params) -> bool:
    ttf = outcome.time_to_final
    return ttf is not None and ttf > time_bound(max(outcome.claims, 1), params)
