"""Fairness between users, and claim costs that do not grow with the backlog.

Policy (see the queue migration): each queued job has a lane position; claims take the lowest
first. A user's first queued job enters at the position being served now, each further one of
the same user one position later. One user's flood therefore gets one job per round, and any
other user's request is claimed within about one round, not after the flood.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg

from tests.support.pg import as_user
from tests.support.queue_helpers import insert_request, new_chat

Conn = psycopg.Connection[dict[str, Any]]


def flood(db: Conn, user: uuid.UUID, chat: uuid.UUID, count: int, tag: str) -> None:
    """``count`` requests in one statement, as a frontend bulk insert would."""
    with as_user(db, user):
        db.execute(
            "insert into public.messages (chat_id, role, content, message_type)"
            " select %s, 'user', %s || n, 'image' from generate_series(1, %s) as n",
            (chat, tag, count),
        )


def claim(db: Conn, limit: int) -> list[dict[str, Any]]:
    return db.execute("select * from public.image_jobs_claim('w', %s, 60, 5)", (limit,)).fetchall()


def complete(db: Conn, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        db.execute(
            "select public.image_jobs_complete(%s, 'w', %s, 'file:///x.png', '{}'::jsonb)",
            (row["request_id"], row["attempt"]),
        )


def test_a_single_request_is_not_stuck_behind_another_users_flood(db: Conn) -> None:
    flooder, flood_chat = new_chat(db)
    flood(db, flooder, flood_chat, 1000, "flood ")
    other, other_chat = new_chat(db)
    single = insert_request(db, other, other_chat, "just one")
    first_batch = claim(db, 10)
    assert single in [row["request_id"] for row in first_batch]
    # Half the flood later, the other user asks again: served in the next batch again.
    complete(db, first_batch)
    for _ in range(50):
        complete(db, claim(db, 10))
    again = insert_request(db, other, other_chat, "one more")
    assert again in [row["request_id"] for row in claim(db, 10)]


def test_several_floods_are_served_round_robin(db: Conn) -> None:
    users = [new_chat(db) for _ in range(3)]
    for index, (user, chat) in enumerate(users):
        flood(db, user, chat, 100, f"user{index} ")
    served = [row["user_id"] for row in claim(db, 30)]
    assert sorted(served.count(user) for user, _ in users) == [10, 10, 10]


def test_within_one_user_requests_stay_in_order(db: Conn) -> None:
    user, chat = new_chat(db)
    requests = [insert_request(db, user, chat, f"n{i}") for i in range(20)]
    claimed = [row["request_id"] for row in claim(db, 5)]
    assert set(claimed) == set(requests[:5])


def _plan(db: Conn, query: str, params: tuple[Any, ...] = ()) -> dict[str, Any]:
    row = db.execute("explain (analyze, format json) " + query, params).fetchone()
    assert row is not None
    plan: dict[str, Any] = json.loads(json.dumps(row["QUERY PLAN"]))[0]["Plan"]
    return plan


def _index_scans(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan] if "Index" in plan["Node Type"] else []
    for child in plan.get("Plans", []):
        found += _index_scans(child)
    return found


def test_claim_and_enqueue_queries_read_only_a_few_index_entries_with_a_deep_backlog(
    db: Conn,
) -> None:
    """The statements inside image_jobs_claim and the enqueue trigger, EXPLAIN ANALYZEd with
    5,000 queued jobs: each walks a partial index and stops after a handful of rows."""
    user, chat = new_chat(db)
    flood(db, user, chat, 4000, "deep ")
    for _ in range(100):  # and a crowd of ordinary users with a few requests each
        other, other_chat = new_chat(db)
        flood(db, other, other_chat, 10, "crowd ")
    db.execute("analyze image_queue.jobs")
    queries = {
        "queued pick": (
            "select j.request_id from image_queue.jobs j where j.state = 'queued'"
            " order by j.lane_seq, j.created_at limit 10 for update skip locked",
            "jobs_queued_lane_idx",
        ),
        "expired leases": (
            "select j.request_id from image_queue.jobs j where j.state = 'running'"
            " and j.lease_expires_at <= now() order by j.lease_expires_at limit 10"
            " for update skip locked",
            "jobs_running_lease_idx",
        ),
        "due retries": (
            "select w.request_id from image_queue.jobs w where w.state = 'waiting'"
            " and w.run_at <= now() order by w.run_at limit 1000 for update skip locked",
            "jobs_waiting_run_at_idx",
        ),
        "serving position": (
            "select j.lane_seq from image_queue.jobs j where j.state = 'queued'"
            " order by j.lane_seq, j.created_at limit 1",
            "jobs_queued_lane_idx",
        ),
        "own last position": (
            f"select j.lane_seq from image_queue.jobs j where j.state = 'queued'"
            f" and j.user_id = '{other}' order by j.lane_seq desc limit 1",
            "jobs_queued_user_lane_idx",
        ),
    }
    with db.transaction():
        for name, (query, index) in queries.items():
            [scan] = _index_scans(_plan(db, query))
            assert scan["Index Name"] in (index, "jobs_queued_lane_idx"), name
            examined = scan["Actual Rows"] + scan.get("Rows Removed by Filter", 0)
            assert examined <= 50, (name, scan)
        db.execute("rollback")  # release the FOR UPDATE locks of the explained picks
