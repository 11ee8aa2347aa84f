"""The chaos scenarios at their short scale: real daemons killed, frozen, cut off and flooded.

Each test runs one scenario of ``tests/chaos`` (the same code as ``python -m tests.chaos``) and
checks that no request was lost, generated twice or left stuck, plus what that scenario is
about. A failure message is the scenario's full report, with the path of the kept daemon logs.
"""

from __future__ import annotations

import pytest

from tests.chaos import (
    database_outage,
    kill_storm,
    paused_listener,
    poison,
    provider_faults,
    replicas,
)
from tests.chaos.outcomes import ScenarioResult
from tests.support.pg import PostgresServer

pytestmark = pytest.mark.chaos


def assert_nothing_lost_doubled_or_stuck(result: ScenarioResult) -> None:
    assert (result.lost, result.duplicated, result.stuck) == (0, 0, 0), result.report()


def test_kill_storm_loses_nothing_and_generates_nothing_twice(pg_server: PostgresServer) -> None:
    """Listeners SIGKILLed every 2 s: every request completes, each within one lease per kill
    it suffered plus a bound (see ``kill_storm.time_bound``)."""
    result = kill_storm.run("short", pg=pg_server)
    assert_nothing_lost_doubled_or_stuck(result)
    assert result.ok, result.report()
    assert result.kills >= 5, result.report()
    assert result.restarts >= result.kills, result.report()


@pytest.fixture(scope="module")
def poison_result(pg_server: PostgresServer) -> ScenarioResult:
    """One poison run, judged by the two tests below."""
    return poison.run("short", pg=pg_server)


def test_poison_request_fails_after_max_attempts_and_others_keep_flowing(
    poison_result: ScenarioResult,
) -> None:
    """A request that kills its listener every time ends ``failed`` (attempts exhausted) after
    MAX_ATTEMPTS claims, crashes included; the requests streaming in meanwhile all complete."""
    result = poison_result
    assert_nothing_lost_doubled_or_stuck(result)
    assert result.problems == [], result.report()
    assert result.notes["stream not complete"] == 0, result.report()
    assert result.wrong == 0, result.report()
    assert result.kills >= poison.MAX_ATTEMPTS, result.report()


def test_poison_request_does_not_take_down_the_requests_claimed_with_it(
    poison_result: ScenarioResult,
) -> None:
    """Healthy requests inserted in the poison's own transaction lose one attempt to its first
    crash, and must then be served apart from it and complete."""
    assert poison_result.notes["alongside not complete"] == 0, poison_result.report()


def test_database_restarts_and_cut_connections_are_survived() -> None:
    """Crash restart, fast restart, reset and stalled connections: every listener re-LISTENs
    after each fault and every request completes."""
    result = database_outage.run("short")
    assert_nothing_lost_doubled_or_stuck(result)
    assert result.ok, result.report()


def test_provider_faults_are_absorbed_within_the_call_budget(pg_server: PostgresServer) -> None:
    """20% of provider answers are 429/500/hang/drop: every request completes, none is charged
    more than MAX_ATTEMPTS * TRIES_PER_ATTEMPT calls."""
    result = provider_faults.run("short", pg=pg_server)
    assert_nothing_lost_doubled_or_stuck(result)
    assert result.ok, result.report()
    assert result.faults > 0, result.report()


def test_replicas_generate_every_image_exactly_once(pg_server: PostgresServer) -> None:
    """Four listeners racing for a flood: one claim, one provider call, one reply per request."""
    result = replicas.run("short", pg=pg_server)
    assert_nothing_lost_doubled_or_stuck(result)
    assert result.ok, result.report()


def test_a_listener_paused_past_its_lease_is_fenced_out(pg_server: PostgresServer) -> None:
    """SIGSTOP past the lease, another listener completes, SIGCONT: the late listener changes
    nothing (reply row, metadata and stored image unchanged) and reports the lost lease."""
    result = paused_listener.run("short", pg=pg_server)
    assert_nothing_lost_doubled_or_stuck(result)
    assert result.ok, result.report()
