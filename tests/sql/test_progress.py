"""The reply tells the whole story from the insert: it exists 'queued' in the inserting
transaction, the claim turns it into 'generating', a job handed back puts it back to 'queued';
and a request's owner can ask its place in line."""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from listener.migrate import apply_migrations
from tests.support.pg import PostgresServer, as_user, connect
from tests.support.queue_helpers import insert_request, job_of, new_chat, reply_of

Conn = psycopg.Connection[dict[str, Any]]
QUEUED_REPLY_VERSION = "20261205130000"


def claim(db: Conn, worker: str = "w", limit: int = 1) -> list[dict[str, Any]]:
    return db.execute(
        "select * from public.image_jobs_claim(%s, %s, 60, 5)", (worker, limit)
    ).fetchall()


def position(db: Conn, user: uuid.UUID | None, request: uuid.UUID) -> int | None:
    with as_user(db, user):
        row = db.execute("select public.image_request_position(%s) as p", (request,)).fetchone()
    assert row is not None
    value = row["p"]
    assert value is None or isinstance(value, int)
    return value


def test_the_reply_exists_queued_in_the_transaction_that_inserts_the_request(db: Conn) -> None:
    user, chat = new_chat(db)
    with as_user(db, user):
        request = db.execute(
            "insert into public.messages (chat_id, role, content, message_type)"
            " values (%s, 'user', 'a lighthouse', 'image') returning id",
            (chat,),
        ).fetchone()
        assert request is not None
        # the owner sees it before commit, in the same transaction, through RLS
        [reply] = db.execute(
            "select status, role, message_type, content from public.messages where reply_to = %s",
            (request["id"],),
        ).fetchall()
    assert (reply["status"], reply["role"], reply["message_type"]) == (
        "queued",
        "assistant",
        "image",
    )
    assert reply["content"].startswith("Queued")


def test_claim_turns_the_same_reply_into_generating_and_release_puts_it_back(db: Conn) -> None:
    user, chat = new_chat(db)
    request = insert_request(db, user, chat)
    [queued] = reply_of(db, request)
    [job] = claim(db)
    [generating] = reply_of(db, request)
    assert generating["id"] == queued["id"] == job["reply_id"]
    assert (generating["status"], generating["content"]) == ("generating", "Generating image...")
    # when the work began (its created_at is the insert's): stamped as it turns 'generating'
    started = datetime.fromisoformat(generating["metadata"]["started_at"])
    assert started >= queued["created_at"]
    result = db.execute(
        "select public.image_jobs_release(%s, 'w', %s) as r", (request, job["attempt"])
    ).fetchone()
    assert result == {"r": "released"}
    [back] = reply_of(db, request)
    assert (back["id"], back["status"]) == (queued["id"], "queued")


def test_requeue_stuck_and_retry_put_the_reply_back_to_queued(db: Conn) -> None:
    user, chat = new_chat(db)
    stuck, failing = insert_request(db, user, chat, "stuck"), insert_request(db, user, chat, "x")
    jobs = {job["request_id"]: job for job in claim(db, limit=2)}
    db.execute(
        "update image_queue.jobs set lease_expires_at = now() - interval '1 minute'"
        " where request_id = %s",
        (stuck,),
    )
    assert db.execute("select public.image_jobs_requeue_stuck() as n").fetchone() == {"n": 1}
    assert reply_of(db, stuck)[0]["status"] == "queued"
    db.execute(
        "select public.image_jobs_fail(%s, 'w', %s, 'The image could not be generated.', 'd',"
        " null, '{}'::jsonb)",
        (failing, jobs[failing]["attempt"]),
    )
    assert reply_of(db, failing)[0]["status"] == "failed"
    assert db.execute("select public.image_jobs_retry(%s) as r", (failing,)).fetchone() == {
        "r": "retried"
    }
    [retried] = reply_of(db, failing)
    assert (retried["status"], retried["error"]) == ("queued", None)


def test_deleting_the_request_removes_its_queued_reply_and_job(db: Conn) -> None:
    user, chat = new_chat(db)
    request = insert_request(db, user, chat)
    with as_user(db, user):
        db.execute("delete from public.messages where id = %s", (request,))
    assert reply_of(db, request) == []
    assert job_of(db, request) is None


def test_position_counts_the_queued_requests_the_fair_order_claims_first(db: Conn) -> None:
    flooder, flood_chat = new_chat(db)
    other, other_chat = new_chat(db)
    flood = [insert_request(db, flooder, flood_chat, f"flood {i}") for i in range(3)]
    single = insert_request(db, other, other_chat, "just one")
    # lanes: flood[0] and single share the first round, so single is claimed second
    assert [position(db, flooder, r) for r in flood] == [0, 2, 3]
    assert position(db, other, single) == 1
    claim(db)
    assert position(db, flooder, flood[0]) is None  # no longer queued
    assert position(db, other, single) == 0


def test_position_is_the_owners_alone(db: Conn) -> None:
    owner, chat = new_chat(db)
    stranger, _ = new_chat(db)
    request = insert_request(db, owner, chat)
    for caller, target in ((stranger, request), (owner, uuid.uuid4())):
        with pytest.raises(psycopg.errors.NoDataFound, match="not found"):
            position(db, caller, target)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        position(db, None, request)


def test_requests_queued_before_the_upgrade_get_their_queued_reply(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    """A database migrated by the previous release, with requests queued (no reply yet) and
    one running (its reply 'generating'), then upgraded: every request has its one reply."""
    with pg_server.migrated_before(QUEUED_REPLY_VERSION, tmp_path) as dsn, connect(dsn) as db:
        user, chat = new_chat(db)
        running = insert_request(db, user, chat, "running")
        claim(db)
        waiting = [insert_request(db, user, chat, f"queued {i}") for i in range(2)]
        assert reply_of(db, waiting[0]) == []  # the old rule
        apply_migrations(dsn)
        assert [reply_of(db, r)[0]["status"] for r in waiting] == ["queued", "queued"]
        assert reply_of(db, running)[0]["status"] == "generating"
        [job] = claim(db)  # a listener of either release then claims as before
        [reply] = reply_of(db, job["request_id"])
        assert (reply["id"], reply["status"]) == (job["reply_id"], "generating")


def preview(db: Conn, job: dict[str, Any], worker: str, url: str, index: int) -> str:
    row = db.execute(
        "select public.image_jobs_preview(%s, %s, %s, %s, %s) as r",
        (job["request_id"], worker, job["attempt"], url, index),
    ).fetchone()
    assert row is not None
    return str(row["r"])


def test_only_the_lease_holder_shows_a_preview_and_it_goes_when_the_reply_moves_on(
    db: Conn,
) -> None:
    user, chat = new_chat(db)
    request = insert_request(db, user, chat, "previewed", {"partial_images": 2})
    [job] = claim(db)
    assert preview(db, job, "someone-else", "file:///stolen.png", 0) == "lease_lost"
    assert preview(db, job, "w", "file:///p0.png", 0) == "previewed"
    [reply] = reply_of(db, request)
    assert (reply["preview_url"], reply["metadata"]["preview_index"]) == ("file:///p0.png", 0)
    assert preview(db, job, "w", "file:///p1.png", 1) == "previewed"
    db.execute(
        "select * from public.image_jobs_complete_priced(%s, 'w', %s, 'file:///final.png',"
        " '{}'::jsonb)",
        (request, job["attempt"]),
    )
    [done] = reply_of(db, request)
    assert (done["status"], done["image_url"], done["preview_url"]) == (
        "complete",
        "file:///final.png",
        None,
    )
    assert preview(db, job, "w", "file:///late.png", 2) == "lease_lost"
    assert reply_of(db, request)[0]["preview_url"] is None


def test_a_preview_of_a_deleted_request_answers_cancelled(db: Conn) -> None:
    user, chat = new_chat(db)
    request = insert_request(db, user, chat, "deleted while previewing")
    [job] = claim(db)
    with as_user(db, user):
        db.execute("delete from public.messages where id = %s", (request,))
    assert preview(db, job, "w", "file:///p0.png", 0) == "cancelled"


def test_a_user_cannot_insert_a_message_that_names_a_preview(db: Conn) -> None:
    user, chat = new_chat(db)
    with pytest.raises(psycopg.errors.InsufficientPrivilege), as_user(db, user):
        db.execute(
            "insert into public.messages (chat_id, role, content, message_type, preview_url)"
            " values (%s, 'user', 'x', 'image', 'https://evil.example/p.png')",
            (chat,),
        )
