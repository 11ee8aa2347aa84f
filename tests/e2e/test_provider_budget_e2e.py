"""The fleet's provider budget with real listener processes against the rate-limited test server
(N calls per sliding window, 429 with the retry-after at which a slot frees beyond it): the
budget holds across replicas, a 429 pauses every listener, and no request fails because of a
rate limit -- each runs with MAX_ATTEMPTS=1, so a 429 that spent an attempt would fail it."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.daemon_process import Daemon, listener_env
from tests.support.fake_openai import FakeOpenAI
from tests.support.queue_helpers import insert_request, new_chat, reply_of

pytestmark = pytest.mark.e2e
Conn = psycopg.Connection[dict[str, Any]]

#: one attempt, one call per attempt: a 429 that cost anything would fail the request
NOTHING_TO_SPARE = {"IMAGE_LISTENER_MAX_ATTEMPTS": "1", "IMAGE_LISTENER_TRIES_PER_ATTEMPT": "1"}


@contextlib.contextmanager
def running_fleet(
    count: int, database_url: str, fake: FakeOpenAI, tmp_path: Path, **settings: str
) -> Iterator[list[Daemon]]:
    """``count`` listeners (concurrency 4, nothing to spare) on the database, ready; killed
    after."""
    env = listener_env(
        database_url,
        fake.base_url,
        tmp_path / "images",
        IMAGE_LISTENER_CONCURRENCY="4",
        **NOTHING_TO_SPARE,
        **settings,
    )
    fleet = [
        Daemon({**env, "IMAGE_LISTENER_WORKER_ID": f"budget-{index}"}) for index in range(count)
    ]
    try:
        for daemon in fleet:
            daemon.wait_for_event("listening")
        yield fleet
    finally:
        for daemon in fleet:
            daemon.stop()


def wait_final(db: Conn, requests: list[uuid.UUID], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        replies = [reply_of(db, request) for request in requests]
        if all(r and r[0]["status"] in ("complete", "failed") for r in replies):
            return [r[0] for r in replies]
        if time.monotonic() > deadline:
            pending = sum(
                1 for r in replies if not r or r[0]["status"] not in ("complete", "failed")
            )
            raise AssertionError(f"{pending} of {len(requests)} requests not final in {timeout} s")
        time.sleep(0.1)


def budget_of(db: Conn) -> dict[str, Any]:
    row = db.execute("select public.image_provider_budget() as b").fetchone()
    assert row is not None
    shown: dict[str, Any] = row["b"]
    return shown


def finished_by(fleet: list[Daemon]) -> list[int]:
    """How many requests each listener completed (its ``request_finished`` lines)."""
    return [
        sum(1 for line in d.lines if '"request_finished"' in line and '"complete"' in line)
        for d in fleet
    ]


def two_users_requests(db: Conn, each: int, tag: str) -> tuple[list[uuid.UUID], dict[str, str]]:
    """``each`` requests of two users, inserted alternately as a burst; prompt -> user label."""
    chats = {label: new_chat(db) for label in ("A", "B")}
    requests, owner = [], {}
    for i in range(each):
        for label, (user, chat) in chats.items():
            prompt = f"{tag} {label}{i}"
            requests.append(insert_request(db, user, chat, prompt))
            owner[prompt] = label
    return requests, owner


def test_the_budget_holds_across_replicas(database_url: str, db: Conn, tmp_path: Path) -> None:
    """Three listeners set to 150 per minute (2.5/s) share one budget: the provider, which admits
    3 calls per second, never sees more than 3 arrive within a second and refuses none."""
    with FakeOpenAI(default_delay_seconds=0.3, rate_limit=3, rate_window_seconds=1.0) as fake:
        with running_fleet(
            3, database_url, fake, tmp_path, IMAGE_LISTENER_PROVIDER_IMAGES_PER_MINUTE="150"
        ) as fleet:
            requests, owner = two_users_requests(db, 10, "budget")
            replies = wait_final(db, requests, timeout=40)
            assert [r["status"] for r in replies] == ["complete"] * 20
            assert fake.rate_limited == 0
            assert fake.max_arrived_in_window() <= 3
            arrivals = fake.admissions()
            # spread out at the budget's pace: 20 starts at 2.5/s take about 7.6 s
            assert arrivals[-1] - arrivals[0] >= 19 / 2.5 * 0.9
            assert sum(1 for count in finished_by(fleet) if count > 0) >= 2, finished_by(fleet)
            # fair order: the first ten calls served both users alike
            first_ten = [owner[r.prompt] for r in fake.requests()[:10]]
            assert first_ten.count("A") >= 4, first_ten
            assert first_ten.count("B") >= 4, first_ten


def test_a_429_pauses_every_listener_and_costs_no_attempt(
    database_url: str, db: Conn, tmp_path: Path
) -> None:
    """One call is refused with retry-after 1 s: no listener starts another call before that
    second is over, though six requests are waiting; the refused request then completes on
    its first (and only) attempt."""
    with FakeOpenAI(default_delay_seconds=0.1) as fake:
        with running_fleet(2, database_url, fake, tmp_path):
            user, chat = new_chat(db)
            limited_prompt = "a lighthouse [fake:fail=429:retry-after=1]"
            limited = insert_request(db, user, chat, limited_prompt)
            # the requests come once the pause is recorded (a call started before it exists is
            # in flight, not a breach)
            deadline = time.monotonic() + 10
            while (paused_until := budget_of(db)["paused_until"]) is None:
                assert time.monotonic() < deadline, "no pause was recorded"
                time.sleep(0.01)
            refused_at = fake.last_request(limited_prompt).received_at
            others = [insert_request(db, user, chat, f"a harbour {i}") for i in range(6)]
            replies = wait_final(db, [limited, *others], timeout=30)
            assert [r["status"] for r in replies] == ["complete"] * 7
            assert replies[0]["metadata"]["attempt"] == 1
            starts = sorted(
                r.received_at for r in fake.requests() if r.prompt.startswith("a harbour")
            )
            # the pause lasts the retry-after from the refusal, and nobody calls before its end
            pause_ends = datetime.fromisoformat(paused_until).timestamp()
            assert pause_ends >= refused_at + 1.0 - 0.05, pause_ends - refused_at
            assert starts[0] >= pause_ends - 0.01, starts[0] - pause_ends
            shown = budget_of(db)
            assert (shown["rate_limited"], shown["pauses"]) == (1, 1)
            assert shown["source"] == "learned"


def test_without_a_budget_the_fleet_learns_and_no_request_fails(
    database_url: str, db: Conn, tmp_path: Path
) -> None:
    """A burst of 30 against 4 calls per second with no budget set: the fleet is refused at
    first, learns, and every request completes on its first attempt."""
    with FakeOpenAI(default_delay_seconds=0.2, rate_limit=4, rate_window_seconds=1.0) as fake:
        with running_fleet(3, database_url, fake, tmp_path):
            requests, _owner = two_users_requests(db, 15, "learn")
            replies = wait_final(db, requests, timeout=60)
            assert [r["status"] for r in replies] == ["complete"] * 30
            assert all(r["metadata"]["attempt"] == 1 for r in replies)
            assert fake.rate_limited > 0  # it was refused, and none of that failed a request
            calls = fake.rate_limited + len(fake.admissions())
            assert fake.rate_limited / calls < 0.5, (fake.rate_limited, calls)
