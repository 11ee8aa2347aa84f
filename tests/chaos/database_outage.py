"""Database outages: a crash restart, a fast restart, a cut connection and a stalled one.

The listeners reach a private PostgreSQL (:class:`RestartablePostgres`) through a TCP proxy
(:class:`TcpToUnixProxy`) while requests keep arriving (the harness inserts over the unix
socket, retrying while the server is down). On a timeline, the scenario

* crashes the server (``pg_ctl -m immediate``) and starts it again two seconds later,
* restarts it in an orderly way (``-m fast``),
* resets every connection at the proxy (RST),
* stalls every connection at the proxy (bytes held, sockets open) for longer than the
  liveness probe, then lets them flow again.

After each fault every listener must notice (the LISTEN connection's probe or its error), open
a new connection and LISTEN again before the next fault: each one's ``listening`` log events are
matched against the fault times. The poll interval is 30 s here, so the requests of an outage
are served promptly only if the listeners catch up by themselves once they are back (a claim
after every reconnect); every request must be final within ``TIME_BOUND_SECONDS``. And as
everywhere: every request ends complete, none lost, none generated twice, no job left.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from tests.chaos.database import RestartablePostgres
from tests.chaos.fleet import Fleet
from tests.chaos.harness import Arrivals, ChaosRun, check_scale
from tests.chaos.outcomes import ScenarioResult, collect_outcomes, wait_until_settled
from tests.chaos.proxy import TcpToUnixProxy
from tests.support.fake_openai import FakeOpenAI

NAME = "database outage"
MAX_ATTEMPTS = 5
TRIES_PER_ATTEMPT = 3
#: the stall outlasts the probe interval (1 s) plus its timeout (1 s) with room to spare
STALL_SECONDS = 5.0
CRASH_DOWN_SECONDS = 2.0
#: a poll interval no outage here reaches: catching up must not wait for it
POLL_SECONDS = 30.0
#: the longest outage (the stall), plus a database call timing out in it (the daemon's 10 s
#: DB_CALL_TIMEOUT_SECONDS), plus a lease for the job whose final write was lost, plus 2 s
TIME_BOUND_SECONDS = STALL_SECONDS + 10.0 + 3.0 + 2.0


@dataclass(frozen=True)
class Params:
    listeners: int
    #: arrivals per second, throughout
    rate: float
    #: how many times the four faults are played
    rounds: int
    #: seconds between two faults
    gap: float
    settle_timeout: float


PARAMS = {
    "short": Params(2, 4.0, 1, 3.0, 60.0),
    "full": Params(4, 10.0, 3, 5.0, 120.0),
}


@dataclass(frozen=True)
class Fault:
    name: str
    started: datetime
    ended: datetime


def run(scale: str) -> ScenarioResult:
    params = PARAMS[check_scale(scale)]
    server = RestartablePostgres()
    try:
        dsn = server.create_database("chaos")
        with TcpToUnixProxy(server.socket_path) as proxy:
            return _run(scale, params, server, proxy, dsn)
    finally:
        server.close()


def _run(
    scale: str, params: Params, server: RestartablePostgres, proxy: TcpToUnixProxy, dsn: str
) -> ScenarioResult:
    fake = FakeOpenAI(default_delay_seconds=0.1, delay_jitter_seconds=0.2, seed=3)
    with ChaosRun(NAME, scale, dsn=dsn, fake=fake) as run_:
        env = run_.env(
            database_url=proxy.dsn("chaos"),
            IMAGE_LISTENER_POLL_SECONDS=f"{POLL_SECONDS:g}",
            IMAGE_LISTENER_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
            IMAGE_LISTENER_TRIES_PER_ATTEMPT=str(TRIES_PER_ATTEMPT),
        )
        fleet = run_.fleet(params.listeners, env=env)
        plays: list[tuple[str, Callable[[], object]]] = [
            ("crash restart", lambda: server.restart("immediate", CRASH_DOWN_SECONDS)),
            ("fast restart", lambda: server.restart("fast")),
            ("connections reset", proxy.drop),
            ("connections stalled", lambda: _stall(proxy)),
        ] * params.rounds
        faults: list[Fault] = []
        with Arrivals(dsn, "outage", params.rate) as arrivals:
            for name, play in plays:
                time.sleep(params.gap)
                began = datetime.now(UTC)
                play()
                faults.append(Fault(name, began, datetime.now(UTC)))
            time.sleep(params.gap)
        problems = [f"arrivals failed: {arrivals.error!r}"] if arrivals.error else []
        done = wait_until_settled(dsn, params.settle_timeout)
        outcomes = collect_outcomes(dsn)
        if not done:
            problems.append(f"not settled {params.settle_timeout:g}s after the arrivals")
        problems += _missed_relistens(fleet, faults)
        problems += [
            f"{o.request_id}: final after {o.time_to_final:.1f}s (bound {TIME_BOUND_SECONDS:g}s)"
            for o in outcomes
            if o.time_to_final is not None and o.time_to_final > TIME_BOUND_SECONDS
        ]
        return run_.result(
            outcomes,
            max_calls=MAX_ATTEMPTS * TRIES_PER_ATTEMPT,
            faults=len(faults),
            problems=problems,
            notes={
                "faults": ", ".join(f"{f.name} x{params.rounds}" for f in faults[:4]),
                "LISTEN connects per listener": [
                    len(_listening_times(daemon_lines)) for daemon_lines in _lines(fleet)
                ],
                "proxy connections": proxy.connections,
            },
        )


def _stall(proxy: TcpToUnixProxy) -> None:
    proxy.stall()
    try:
        time.sleep(STALL_SECONDS)
    finally:
        proxy.unstall()


def _lines(fleet: Fleet) -> list[list[str]]:
    return [list(daemon.lines) for daemon in fleet.history]


def _listening_times(lines: list[str]) -> list[datetime]:
    times = []
    for line in lines:
        if '"listening"' not in line:
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "listening":
            times.append(datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")))
    return times


def _missed_relistens(fleet: Fleet, faults: list[Fault]) -> list[str]:
    """Each listener must LISTEN again after each fault ended and before the next began."""
    problems = []
    windows = [
        (fault, faults[n + 1].started if n + 1 < len(faults) else None)
        for n, fault in enumerate(faults)
    ]
    for number, lines in enumerate(_lines(fleet)):
        times = _listening_times(lines)
        for fault, until in windows:
            if not any(fault.started < t and (until is None or t < until) for t in times):
                problems.append(
                    f"listener {number} did not LISTEN again after the {fault.name} "
                    f"at {fault.started:%H:%M:%S.%f}"
                )
    return problems
