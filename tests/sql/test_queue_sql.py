"""The queue's SQL functions: claiming, leases, fencing, retries, giving up, cancellation."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import psycopg
import pytest

from tests.support.pg import connect
from tests.support.queue_helpers import insert_request, job_of, new_chat, reply_of

Conn = psycopg.Connection[dict[str, Any]]


def claim(
    conn: Conn, worker: str, limit: int = 10, lease: float = 30, max_attempts: int = 3
) -> list[dict[str, Any]]:
    return conn.execute(
        "select * from public.image_jobs_claim(%s, %s, %s, %s)",
        (worker, limit, lease, max_attempts),
    ).fetchall()


def complete(
    conn: Conn, request_id: uuid.UUID, worker: str, attempt: int, url: str = "file:///img.png"
) -> str:
    row = conn.execute(
        "select public.image_jobs_complete(%s, %s, %s, %s, %s::jsonb) as r",
        (request_id, worker, attempt, url, '{"model": "m"}'),
    ).fetchone()
    assert row is not None
    return str(row["r"])


def fail(
    conn: Conn, request_id: uuid.UUID, worker: str, attempt: int, retry_in: float | None
) -> str:
    row = conn.execute(
        "select public.image_jobs_fail(%s, %s, %s, %s, %s, %s, %s::jsonb) as r",
        (request_id, worker, attempt, "Try again later.", "HTTP 500 from provider", retry_in, "{}"),
    ).fetchone()
    assert row is not None
    return str(row["r"])


def expire_leases(conn: Conn) -> None:
    conn.execute(
        "update image_queue.jobs set lease_expires_at = now() - interval '1 second'"
        " where state = 'running'"
    )


def test_claim_leases_job_counts_attempt_and_creates_generating_reply(db: Conn) -> None:
    user, chat = new_chat(db)
    request = insert_request(db, user, chat, options={"size": "1024x1536"})
    [job] = claim(db, "w1")
    assert job["request_id"] == request
    assert job["attempt"] == 1
    assert job["prompt"] == "a red fox in the snow"
    assert job["options"] == {"size": "1024x1536"}
    [reply] = reply_of(db, request)
    assert reply["id"] == job["reply_id"]
    assert (reply["role"], reply["status"], reply["message_type"]) == (
        "assistant",
        "generating",
        "image",
    )
    row = job_of(db, request)
    assert row is not None
    assert row["state"] == "running"
    assert row["lease_holder"] == "w1"
    assert claim(db, "w2") == []  # leased: nobody else gets it


def test_two_concurrent_claimers_never_take_the_same_job(pg_server: Any, database_url: str) -> None:
    with connect(database_url) as setup:
        user, chat = new_chat(setup)
        for i in range(200):
            insert_request(setup, user, chat, prompt=f"prompt {i}")
    taken: dict[str, list[uuid.UUID]] = {"a": [], "b": [], "c": []}

    def worker(name: str) -> None:
        with connect(database_url) as conn:
            while batch := claim(conn, name, limit=3):
                taken[name].extend(row["request_id"] for row in batch)

    threads = [threading.Thread(target=worker, args=(n,)) for n in taken]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [rid for ids in taken.values() for rid in ids]
    assert len(everything) == 200
    assert len(set(everything)) == 200


def test_expired_lease_is_taken_over_and_old_holder_is_fenced(db: Conn) -> None:
    user, chat = new_chat(db)
    request = insert_request(db, user, chat)
    [first] = claim(db, "slow")
    expire_leases(db)
    [second] = claim(db, "fast")
    assert second["request_id"] == request
    assert second["attempt"] == 2
    # The slow worker wakes up and tries to finish: nothing changes.
    assert complete(db, request, "slow", first["attempt"], "file:///stale.png") == "lease_lost"
    assert fail(db, request, "slow", first["attempt"], None) == "lease_lost"
    [reply] = reply_of(db, request)
    assert reply["status"] == "generating"
    assert reply["image_url"] is None
    assert complete(db, request, "fast", second["attempt"], "file:///fresh.png") == "completed"
    [reply] = reply_of(db, request)
    assert reply["status"] == "complete"
    assert reply["image_url"] == "file:///fresh.png"
    assert reply["content"] == 'Image generated from prompt: "a red fox in the snow"'
    assert job_of(db, request) is None  # no job left behind
    # And after completion the stale holder still cannot overwrite.
    assert complete(db, request, "slow", first["attempt"], "file:///stale.png") == "lease_lost"
    assert reply_of(db, request)[0]["image_url"] == "file:///fresh.png"


def test_same_worker_name_with_old_attempt_is_fenced(db: Conn) -> None:
    """The attempt number is part of the fencing token, not only the worker name."""
    user, chat = new_chat(db)
    request = insert_request(db, user, chat)
    claim(db, "w")
    expire_leases(db)
    [again] = claim(db, "w")
    assert again["attempt"] == 2
    assert complete(db, request, "w", 1) == "lease_lost"
    assert complete(db, request, "w", 2) == "completed"


def test_fail_with_retry_requeues_later_and_keeps_reply_generating(db: Conn) -> None:
    user, chat = new_chat(db)
    request = insert_request(db, user, chat)
    [job] = claim(db, "w")
    assert fail(db, request, "w", job["attempt"], 3600) == "retrying"
    row = job_of(db, request)
    assert row is not None
    assert row["state"] == "waiting"
    assert row["lease_holder"] is None
    assert row["last_error"] == "HTTP 500 from provider"
    assert claim(db, "w") == []  # not due for an hour
    [reply] = reply_of(db, request)
    assert reply["status"] == "generating"
    assert "retry_at" in reply["metadata"]
    assert reply["error"] is None  # operator detail never reaches the user's row
    db.execute("update image_queue.jobs set run_at = now()")
    [again] = claim(db, "w")
    assert again["attempt"] == 2


def test_fail_without_retry_gives_up_with_user_safe_error(db: Conn) -> None:
    user, chat = new_chat(db)
    request = insert_request(db, user, chat)
    [job] = claim(db, "w")
    assert fail(db, request, "w", job["attempt"], None) == "failed"
    [reply] = reply_of(db, request)
    assert reply["status"] == "failed"
    assert reply["error"] == "Try again later."
    assert "HTTP 500" not in reply["content"]
    assert "HTTP 500" not in reply["error"]
    assert job_of(db, request) is None


def test_crash_looping_request_ends_failed_after_max_attempts(db: Conn) -> None:
    """Attempts are counted at claim time, so a worker that dies every time still uses them up."""
    user, chat = new_chat(db)
    poison = insert_request(db, user, chat, prompt="poison")
    for attempt in (1, 2, 3):
        [job] = claim(db, f"w{attempt}", max_attempts=3)
        assert job["attempt"] == attempt
        expire_leases(db)  # the worker died without a word
    other = insert_request(db, user, chat, prompt="healthy")
    claimed = claim(db, "w4", max_attempts=3)
    assert [row["request_id"] for row in claimed] == [other]
    [reply] = reply_of(db, poison)
    assert reply["status"] == "failed"
    assert "3 times" in reply["error"]
    assert job_of(db, poison) is None


def test_release_requeues_without_counting_the_attempt(db: Conn) -> None:
    user, chat = new_chat(db)
    request = insert_request(db, user, chat)
    [job] = claim(db, "w")
    row = db.execute(
        "select public.image_jobs_release(%s, 'w', %s) as r", (request, job["attempt"])
    ).fetchone()
    assert row is not None
    assert row["r"] == "released"
    [again] = claim(db, "w2")
    assert again["attempt"] == 1


def test_extend_renews_only_leases_still_held(db: Conn) -> None:
    user, chat = new_chat(db)
    kept = insert_request(db, user, chat, prompt="kept")
    lost = insert_request(db, user, chat, prompt="lost")
    jobs = {row["request_id"]: row for row in claim(db, "w", lease=1)}
    db.execute("update image_queue.jobs set lease_holder = 'thief' where request_id = %s", (lost,))
    rows = db.execute(
        "select public.image_jobs_extend('w', %s::uuid[], %s::integer[], 600) as id",
        ([kept, lost], [jobs[kept]["attempt"], jobs[lost]["attempt"]]),
    ).fetchall()
    assert [row["id"] for row in rows] == [kept]
    held = job_of(db, kept)
    assert held is not None
    remaining = db.execute(
        "select %s - now() > interval '500 seconds' as ok", (held["lease_expires_at"],)
    ).fetchone()
    assert remaining is not None
    assert remaining["ok"]


def test_deleting_the_request_cancels_job_and_reply_and_late_writes_report_cancelled(
    db: Conn,
) -> None:
    user, chat = new_chat(db)
    request = insert_request(db, user, chat)
    [job] = claim(db, "w")
    from tests.support.pg import as_user

    with as_user(db, user):
        deleted = db.execute("delete from public.messages where id = %s", (request,)).rowcount
    assert deleted == 1
    assert job_of(db, request) is None
    assert reply_of(db, request) == []
    assert complete(db, request, "w", job["attempt"]) == "cancelled"
    assert fail(db, request, "w", job["attempt"], None) == "cancelled"
    assert db.execute(
        "select count(*) as n from public.messages where reply_to = %s", (request,)
    ).fetchone() == {"n": 0}


def test_next_due_reports_earliest_run_or_lease_expiry(db: Conn) -> None:
    assert db.execute("select public.image_jobs_next_due() as due").fetchone() == {"due": None}
    user, chat = new_chat(db)
    insert_request(db, user, chat)
    row = db.execute("select public.image_jobs_next_due() <= now() as due_now").fetchone()
    assert row == {"due_now": True}
    claim(db, "w", lease=120)
    row = db.execute(
        "select public.image_jobs_next_due() > now() + interval '100 seconds' as later"
    ).fetchone()
    assert row == {"later": True}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", 1, 30, 3), "p_worker"),
        (("w", 0, 30, 3), "positive"),
        (("w", 1, 0, 3), "positive"),
        (("w", 1, 30, 0), "positive"),
    ],
)
def test_claim_rejects_nonsense_arguments(db: Conn, args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
        db.execute("select * from public.image_jobs_claim(%s, %s, %s, %s)", args)


def test_a_batch_crashed_once_comes_back_whole_then_is_isolated_after_a_second_crash(
    db: Conn,
) -> None:
    """First crash (a deploy, an OOM kill): the batch is taken over at once. Second crash of the
    same jobs: a poison may be among them, so each worker takes one at a time."""
    user, chat = new_chat(db)
    for i in range(5):
        insert_request(db, user, chat, f"batch {i}")
    assert len(claim(db, "a", limit=5)) == 5
    expire_leases(db)
    assert len(claim(db, "b", limit=5)) == 5  # crashed once: all back in one claim
    expire_leases(db)
    [isolated] = claim(db, "c", limit=5)
    assert isolated["attempt"] == 3
    assert claim(db, "c", limit=5) == []  # c already runs an isolated job
    assert len(claim(db, "d", limit=5)) == 1
    crashes = db.execute(
        "select crashes, count(*) as n from image_queue.jobs group by crashes order by crashes"
    ).fetchall()
    assert crashes == [{"crashes": 1, "n": 3}, {"crashes": 2, "n": 2}]
