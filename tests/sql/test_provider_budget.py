"""The fleet's provider budget in SQL: a token bucket taken in the claim, the smallest listener
setting or the operator's value in force, a 429 that requeues without spending the attempt and
pauses everyone, and the rate learned from 429s when no budget is set. Time passes by moving the
bucket's clock back (``refilled_at``, ``paused_until``), not by sleeping."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from tests.support.queue_helpers import insert_request, job_of, new_chat, reply_of

Conn = psycopg.Connection[dict[str, Any]]


def claim(
    db: Conn, worker: str = "w", limit: int = 8, per_minute: float | None = None
) -> list[dict[str, Any]]:
    return db.execute(
        "select * from public.image_jobs_claim_within_budget(%s, %s, 60, 5, %s)",
        (worker, limit, per_minute),
    ).fetchall()


def budget(db: Conn) -> dict[str, Any]:
    row = db.execute("select public.image_provider_budget() as b").fetchone()
    assert row is not None
    result: dict[str, Any] = row["b"]
    return result


def bucket(db: Conn) -> dict[str, Any]:
    row = db.execute("select * from image_queue.provider_budget").fetchone()
    assert row is not None
    return row


def next_start(db: Conn) -> dict[str, Any]:
    row = db.execute(
        "select *, extract(epoch from due_at - now()) as in_s from public.image_jobs_next_start()"
    ).fetchone()
    assert row is not None
    return row


def rate_limited(
    db: Conn, job: dict[str, Any], retry_after: float | None, worker: str = "w"
) -> str:
    row = db.execute(
        "select public.image_jobs_rate_limited(%s, %s, %s, %s, '429 rate_limit_exceeded') as r",
        (job["request_id"], worker, job["attempt"], retry_after),
    ).fetchone()
    assert row is not None
    result: str = row["r"]
    return result


def time_passes(db: Conn, seconds: float) -> None:
    """Move the bucket's clock back, as if ``seconds`` had passed since its last refill and its
    pause had started that much earlier."""
    db.execute(
        "update image_queue.provider_budget"
        " set refilled_at = refilled_at - make_interval(secs => %s),"
        " paused_until = paused_until - make_interval(secs => %s),"
        " listener_seen_at = listener_seen_at - make_interval(secs => %s),"
        " last_limited_at = last_limited_at - make_interval(secs => %s)",
        (seconds, seconds, seconds, seconds),
    )


def requests(db: Conn, n: int) -> list[uuid.UUID]:
    user, chat = new_chat(db)
    return [insert_request(db, user, chat, prompt=f"p{i}") for i in range(n)]


def test_without_a_budget_the_claim_takes_everything_and_writes_nothing(db: Conn) -> None:
    requests(db, 5)
    before = bucket(db)
    assert len(claim(db, limit=8)) == 5
    assert bucket(db) == before  # no lock, no write: the common path costs one read
    assert budget(db)["source"] == "none"
    assert next_start(db)["held_by"] is None


def test_a_listener_budget_grants_one_start_per_token(db: Conn) -> None:
    requests(db, 6)
    assert len(claim(db, per_minute=60)) == 1  # a full bucket is one token at this rate
    assert claim(db, per_minute=60) == []
    ahead = next_start(db)
    assert ahead["held_by"] == "budget"
    assert (ahead["per_minute"], ahead["source"]) == (60, "listeners")
    assert 0.9 < ahead["in_s"] <= 1.0  # the next token, one second after the last
    assert ahead["wait_seconds"] == pytest.approx(float(ahead["in_s"]), abs=0.01)
    time_passes(db, 0.5)
    assert claim(db, per_minute=60) == []
    time_passes(db, 0.6)
    assert len(claim(db, per_minute=60)) == 1
    time_passes(db, 30)  # tokens never pile up beyond the burst: one at this rate
    assert len(claim(db, per_minute=60)) == 1
    assert claim(db, per_minute=60) == []


def test_starts_never_come_closer_than_the_interval(db: Conn) -> None:
    """A claim late for its token does not make the next one early: any N successive starts
    span N intervals, as a provider's sliding window at the exact limit demands."""
    requests(db, 10)
    claim(db, per_minute=60)
    time_passes(db, 1.3)  # 0.3 s late
    assert len(claim(db, per_minute=60)) == 1
    time_passes(db, 0.8)
    assert claim(db, per_minute=60) == []


def test_at_a_high_rate_the_burst_is_a_tenth_of_a_second(db: Conn) -> None:
    requests(db, 30)
    claim(db, per_minute=6000)
    time_passes(db, 60)
    assert len(claim(db, limit=25, per_minute=6000)) == 10
    assert claim(db, limit=25, per_minute=6000) == []


def test_listeners_that_disagree_use_the_smallest_until_it_stops_claiming(db: Conn) -> None:
    requests(db, 1)
    claim(db, "a", per_minute=120)
    claim(db, "b", per_minute=60)
    claim(db, "a", per_minute=120)
    assert (budget(db)["per_minute"], budget(db)["source"]) == (60, "listeners")
    time_passes(db, 121)  # b has not claimed for two minutes
    claim(db, "a", per_minute=120)
    assert budget(db)["per_minute"] == 120
    time_passes(db, 121)  # nobody with a setting claims any more
    assert budget(db)["source"] == "none"


def test_the_operator_value_wins_over_every_listener(db: Conn) -> None:
    requests(db, 3)
    row = db.execute("select public.image_provider_budget_set(30) as b").fetchone()
    assert row is not None
    assert row["b"]["source"] == "operator"
    claim(db, per_minute=600)
    assert (budget(db)["per_minute"], budget(db)["source"]) == (30, "operator")
    time_passes(db, 1.9)  # a token takes two seconds at 30 per minute
    assert claim(db, per_minute=600) == []
    time_passes(db, 0.2)
    assert len(claim(db, per_minute=600)) == 1
    db.execute("select public.image_provider_budget_set(null)")
    assert budget(db)["source"] == "listeners"


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_nonsense_rates_are_refused(db: Conn, bad: float) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="positive"):
        claim(db, per_minute=bad)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="positive"):
        db.execute("select public.image_provider_budget_set(%s)", (bad,))


def test_a_429_requeues_without_the_attempt_and_pauses_the_fleet(db: Conn) -> None:
    first, second = requests(db, 2)
    [job] = claim(db, limit=1)
    assert job["request_id"] == first
    assert rate_limited(db, job, retry_after=2.5) == "requeued"
    queued = job_of(db, first)
    assert queued is not None
    assert (queued["state"], queued["attempts"]) == ("queued", 0)
    [reply] = reply_of(db, first)
    assert reply["status"] == "queued"
    # nobody starts anything during the pause, with a budget or without
    assert claim(db, "other") == []
    assert claim(db, "other", per_minute=600) == []
    ahead = next_start(db)
    assert ahead["held_by"] == "pause"
    assert 2.0 < ahead["in_s"] <= 2.5
    state = budget(db)
    assert (state["rate_limited"], state["pauses"]) == (1, 1)
    time_passes(db, 2.6)
    # the requeued request kept its place in the fair order: it comes first
    assert [j["request_id"] for j in claim(db, "other", limit=1)] == [first]
    assert job_of(db, first)["attempts"] == 1  # type: ignore[index]
    time_passes(db, 3)  # the 429 started a learned rate (24 per minute): the next token
    assert second in {j["request_id"] for j in claim(db, "other")}


def test_a_429_of_a_lost_lease_changes_nothing(db: Conn) -> None:
    requests(db, 1)
    [job] = claim(db, limit=1)
    assert rate_limited(db, {**job, "attempt": job["attempt"] + 1}, 1.0) == "lease_lost"
    assert budget(db)["rate_limited"] == 0
    assert job_of(db, job["request_id"])["state"] == "running"  # type: ignore[index]


def test_without_retry_after_the_pause_backs_off(db: Conn) -> None:
    requests(db, 3)
    pauses = []
    for _ in range(3):
        [job] = claim(db, limit=1, per_minute=6000)
        rate_limited(db, job, retry_after=None)
        pauses.append(round(next_start(db)["in_s"]))
        time_passes(db, pauses[-1] + 0.1)
    assert pauses == [1, 2, 4]
    time_passes(db, 5)  # calls went on for a while without a 429: the backoff starts over
    [job] = claim(db, limit=1, per_minute=6000)
    rate_limited(db, job, retry_after=None)
    assert round(next_start(db)["in_s"]) == 1


def test_a_provider_that_keeps_saying_now_is_not_called_in_a_tight_loop(db: Conn) -> None:
    requests(db, 1)
    pauses = []
    for _ in range(5):
        [job] = claim(db, limit=1, per_minute=6000)
        rate_limited(db, job, retry_after=0.0)
        ahead = next_start(db)
        pauses.append(0 if ahead["held_by"] is None else round(ahead["in_s"]))
        time_passes(db, pauses[-1] + 0.1)
    assert pauses == [0, 0, 1, 2, 4]


def test_429s_within_one_pause_make_one_pause(db: Conn) -> None:
    requests(db, 5)
    jobs = claim(db, limit=5, per_minute=6000)
    for job in jobs:  # calls in flight when the first 429 came back
        rate_limited(db, job, retry_after=2.0)
    state = budget(db)
    assert (state["rate_limited"], state["pauses"]) == (5, 1)
    assert 1.5 < next_start(db)["in_s"] <= 2.0


def test_without_a_budget_the_fleet_learns_a_rate_from_429s(db: Conn) -> None:
    requests(db, 60)
    jobs = claim(db, limit=9)  # nothing known: all nine start
    rate_limited(db, jobs[0], retry_after=3.0)
    learned = budget(db)
    # a first guess: the eight other calls in flight per the 3 s the provider asked for ...
    assert learned["source"] == "learned"
    assert learned["learned_per_minute"] == pytest.approx(60 * 8 / 3)
    # ... each of them that is refused in the same pause takes itself out of it (6 got through)
    rate_limited(db, jobs[1], retry_after=3.0)
    rate_limited(db, jobs[2], retry_after=3.0)
    assert budget(db)["learned_per_minute"] == pytest.approx(60 * 6 / 3)
    assert (budget(db)["decreases"], budget(db)["pauses"]) == (1, 1)
    time_passes(db, 3.1)
    [job] = claim(db, limit=1)
    rate_limited(db, job, retry_after=0.5)  # a new pause: multiplicative decrease
    assert budget(db)["learned_per_minute"] == pytest.approx(120 * 0.85)
    time_passes(db, 0.6)
    # calls started while the budget holds claims back raise it by a fixed step
    lowered = budget(db)["learned_per_minute"]
    started = 0
    for _ in range(20):
        started += len(claim(db, limit=8))
        time_passes(db, 0.4)
    step = max(1.0, lowered / 0.85 * 0.15 / 40)
    assert started >= 10
    assert budget(db)["learned_per_minute"] == pytest.approx(lowered + started * step)
    db.execute("select public.image_provider_budget_set(null, p_forget_learned => true)")
    assert budget(db)["source"] == "none"
