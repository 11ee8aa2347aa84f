"""Per-user limits, enforced by the database at insert time: each limit refuses at the right
moment with a message that names it, its value and when the next request is possible, and a
refused insert stores nothing; concurrent inserts of one user cannot overshoot; overrides
replace the default; a user sees their own quota; through PostgREST a refusal is HTTP 429."""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from listener.migrate import apply_migrations
from tests.support.pg import PostgresServer, as_user, connect, create_user
from tests.support.queue_helpers import insert_request, new_chat
from tests.support.supabase_stack import SupabaseStack

Conn = psycopg.Connection[dict[str, Any]]
QUOTA = "IL429"
LIMITS_VERSION = "20261205120000"


def set_limits(db: Conn, user: uuid.UUID | None, **limits: float | None) -> dict[str, Any]:
    row = db.execute(
        "select public.image_quota_set(%s, %s::jsonb) as shown", (user, json.dumps(limits))
    ).fetchone()
    assert row is not None
    result: dict[str, Any] = row["shown"]
    return result


def refused(db: Conn, user: uuid.UUID, chat: uuid.UUID) -> psycopg.Error:
    """Insert a request that must be refused over a limit; the error."""
    with pytest.raises(psycopg.Error) as caught:
        insert_request(db, user, chat, "one too many")
    assert caught.value.sqlstate == QUOTA, caught.value
    return caught.value


def stored(db: Conn, user: uuid.UUID) -> int:
    """The user's image requests in the messages table, and their ledger rows agree."""
    row = db.execute(
        "select count(*) as n from public.messages m join public.chats c on c.id = m.chat_id"
        " where c.user_id = %s and m.role = 'user' and m.message_type = 'image'",
        (user,),
    ).fetchone()
    assert row is not None
    return int(row["n"])


def claim_and_complete(db: Conn, usage: dict[str, int] | None = None) -> list[uuid.UUID]:
    """Finish every queued request as a listener would, with this token usage."""
    jobs = db.execute("select * from public.image_jobs_claim('limits-test', 100, 60, 5)").fetchall()
    metadata = json.dumps({"model": "gpt-image-2.6-flare", "usage": usage or {}})
    for job in jobs:
        db.execute(
            "select * from public.image_jobs_complete_priced(%s, 'limits-test', %s,"
            " 'file:///x.png', %s::jsonb)",
            (job["request_id"], job["attempt"], metadata),
        )
    return [job["request_id"] for job in jobs]


def utc_minute(at: datetime) -> str:
    """The message's time: the next whole minute at or after ``at``, in UTC."""
    at = at.astimezone(UTC)
    rounded = at.replace(second=0, microsecond=0)
    if rounded < at:
        rounded += timedelta(minutes=1)
    return rounded.strftime("%Y-%m-%d %H:%M UTC")


def test_a_fresh_database_limits_nobody(db: Conn) -> None:
    shown = db.execute("select public.image_quota_show() as s").fetchone()
    assert shown == {"s": {"default": None, "any_limit": False, "user": None}}
    user, chat = new_chat(db)
    for i in range(25):
        insert_request(db, user, chat, f"unlimited {i}")
    assert stored(db, user) == 25


def test_max_pending_refuses_until_one_of_the_pending_requests_is_finished(db: Conn) -> None:
    set_limits(db, None, max_pending=2)
    user, chat = new_chat(db)
    insert_request(db, user, chat, "first")
    insert_request(db, user, chat, "second")
    error = refused(db, user, chat)
    assert error.diag.message_primary == (
        "too many unfinished image requests (2 at once); "
        "next request possible when one of them is finished"
    )
    assert stored(db, user) == 2
    other, other_chat = new_chat(db)
    insert_request(db, other, other_chat, "another user is not affected")
    db.execute("select * from public.image_jobs_claim('w', 1, 60, 5)")  # running still counts
    refused(db, user, chat)
    claim_and_complete(db)
    insert_request(db, user, chat, "a place was freed")
    assert stored(db, user) == 3


def test_per_day_refuses_until_the_oldest_request_of_the_window_is_a_day_old(db: Conn) -> None:
    set_limits(db, None, per_day=3)
    user, chat = new_chat(db)
    first = insert_request(db, user, chat, "first")
    db.execute(
        "update image_queue.usage set accepted_at = now() - interval '5 hours'"
        " where request_id = %s",
        (first,),
    )
    insert_request(db, user, chat, "second")
    insert_request(db, user, chat, "third")
    claim_and_complete(db)  # finished requests still count for the day
    accepted = db.execute(
        "select accepted_at from image_queue.usage where request_id = %s", (first,)
    ).fetchone()
    assert accepted is not None
    error = refused(db, user, chat)
    free_at = utc_minute(accepted["accepted_at"] + timedelta(days=1))
    assert error.diag.message_primary == (
        f"daily image limit reached (3 per day); next request possible at {free_at}"
    )
    assert stored(db, user) == 3
    db.execute(
        "update image_queue.usage set accepted_at = now() - interval '25 hours'"
        " where request_id = %s",
        (first,),
    )
    insert_request(db, user, chat, "the first one has left the window")


def test_deleting_requests_gives_back_neither_the_day_nor_the_month(db: Conn) -> None:
    set_limits(db, None, per_day=2)
    user, chat = new_chat(db)
    requests = [insert_request(db, user, chat, f"r{i}") for i in range(2)]
    with as_user(db, user):
        db.execute("delete from public.messages where id = any(%s)", (requests,))
    assert stored(db, user) == 0
    refused(db, user, chat)


def test_usd_per_month_counts_this_months_completed_costs(db: Conn) -> None:
    """Each image below costs 4,160 output tokens x 30 USD/1M = 0.1248 USD."""
    set_limits(db, None, usd_per_month=0.2)
    user, chat = new_chat(db)
    image = {"input_tokens": 0, "output_tokens": 4160}
    insert_request(db, user, chat, "first")
    [last_month] = claim_and_complete(db, image)
    db.execute(
        "update image_queue.usage set completed_at = date_trunc('month', now(), 'UTC')"
        " - interval '1 second' where request_id = %s",
        (last_month,),
    )
    insert_request(db, user, chat, "second")
    insert_request(db, user, chat, "third")
    claim_and_complete(db, image)
    error = refused(db, user, chat)
    now = datetime.now(UTC)
    next_month = (now.replace(day=28) + timedelta(days=4)).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
    assert error.diag.message_primary == (
        "monthly image budget reached (0.25 USD of 0.2 USD); next request possible at "
        f"{next_month:%Y-%m-%d %H:%M} UTC"
    )
    assert stored(db, user) == 3


def test_an_override_replaces_the_default_for_that_user_only(db: Conn) -> None:
    set_limits(db, None, per_day=1, max_pending=5)
    favoured, favoured_chat = new_chat(db)
    plain, plain_chat = new_chat(db)
    shown = set_limits(db, favoured, per_day=3)
    # a new override starts from the default's values; only per_day was changed
    assert shown["user"]["override"] == {"max_pending": 5, "per_day": 3, "usd_per_month": None}
    for i in range(3):
        insert_request(db, favoured, favoured_chat, f"favoured {i}")
    refused(db, favoured, favoured_chat)
    insert_request(db, plain, plain_chat, "plain")
    refused(db, plain, plain_chat)
    set_limits(db, favoured, per_day=None)  # unlimited for that user
    insert_request(db, favoured, favoured_chat, "no daily limit now")
    removed = db.execute("select public.image_quota_remove(%s) as r", (favoured,)).fetchone()
    assert removed == {"r": True}
    refused(db, favoured, favoured_chat)  # back to the default: 1 per day


def test_a_burst_in_one_statement_over_the_limit_is_refused_whole(db: Conn) -> None:
    set_limits(db, None, per_day=3)
    user, chat = new_chat(db)
    with pytest.raises(psycopg.Error) as caught, as_user(db, user):
        db.execute(
            "insert into public.messages (chat_id, role, content, message_type)"
            " select %s, 'user', 'burst ' || g, 'image' from generate_series(1, 5) g",
            (chat,),
        )
    assert caught.value.sqlstate == QUOTA
    assert stored(db, user) == 0
    assert db.execute("select count(*) as n from image_queue.usage").fetchone() == {"n": 0}


def test_twenty_parallel_inserts_against_a_daily_limit_of_five_accept_exactly_five(
    db: Conn, database_url: str
) -> None:
    set_limits(db, None, per_day=5)
    user, chat = new_chat(db)
    barrier = threading.Barrier(20)
    outcomes: list[str] = []

    def one(i: int) -> None:
        with connect(database_url) as conn:
            barrier.wait(timeout=30)
            try:
                insert_request(conn, user, chat, f"parallel {i}")
                outcomes.append("accepted")
            except psycopg.Error as exc:
                outcomes.append(exc.sqlstate or "?")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert Counter(outcomes) == {"accepted": 5, QUOTA: 15}
    assert stored(db, user) == 5


def test_my_image_quota_shows_a_user_their_own_numbers_and_refuses_anon(db: Conn) -> None:
    set_limits(db, None, max_pending=4, per_day=2, usd_per_month=10)
    user, chat = new_chat(db)
    other, other_chat = new_chat(db)
    insert_request(db, user, chat, "one")
    insert_request(db, user, chat, "two")
    insert_request(db, other, other_chat, "someone else's")
    with as_user(db, user):
        mine = db.execute("select * from public.my_image_quota()").fetchall()
    [row] = mine
    assert (row["max_pending"], row["pending"]) == (4, 2)
    assert (row["per_day"], row["today"]) == (2, 2)
    assert (row["usd_per_month"], row["spent_this_month"]) == (10, 0)
    assert row["next_request_at"] is not None  # the daily limit is reached
    with as_user(db, other):
        [theirs] = db.execute("select * from public.my_image_quota()").fetchall()
    assert (theirs["pending"], theirs["today"], theirs["next_request_at"]) == (1, 1, None)
    with pytest.raises(psycopg.errors.InsufficientPrivilege), as_user(db, None):
        db.execute("select * from public.my_image_quota()")


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"per_week": 3}, "unknown limit(s): per_week"),
        ({"per_day": -1}, "limit(s) per_day must be a number >= 0"),
        ({"max_pending": 1.5}, "limit(s) max_pending must be a number >= 0 (whole for counts)"),
        ({"usd_per_month": "ten"}, "limit(s) usd_per_month must be a number"),
    ],
)
def test_quota_set_refuses_what_it_cannot_store(
    db: Conn, limits: dict[str, Any], message: str
) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=re.escape(message)):
        set_limits(db, None, **limits)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"user .* not found"):
        set_limits(db, uuid.uuid4(), per_day=1)


def test_text_messages_and_replies_are_not_counted(db: Conn) -> None:
    set_limits(db, None, per_day=1)
    user, chat = new_chat(db)
    with as_user(db, user):
        for i in range(3):
            db.execute(
                "insert into public.messages (chat_id, role, content) values (%s, 'user', %s)",
                (chat, f"hello {i}"),
            )
    insert_request(db, user, chat, "the one image of the day")
    claim_and_complete(db)  # writes the assistant reply
    assert db.execute("select count(*) as n from image_queue.usage").fetchone() == {"n": 1}


def test_over_postgrest_a_refusal_is_http_429_with_retry_after(
    db: Conn, supabase_stack: SupabaseStack
) -> None:
    set_limits(db, None, per_day=1)
    user = create_user(db)
    headers = {
        "apikey": supabase_stack.anon_key,
        "Authorization": f"Bearer {supabase_stack.user_token(user)}",
    }
    chats = httpx.post(
        f"{supabase_stack.url}/rest/v1/chats",
        json={"title": "t"},
        headers=headers | {"Prefer": "return=representation"},
        timeout=10,
    )
    assert chats.status_code == 201, chats.text
    request = {
        "chat_id": chats.json()[0]["id"],
        "role": "user",
        "message_type": "image",
        "content": "a lighthouse",
    }
    url = f"{supabase_stack.url}/rest/v1/messages"
    assert httpx.post(url, json=request, headers=headers, timeout=10).status_code == 201
    response = httpx.post(url, json=request, headers=headers, timeout=10)
    assert response.status_code == 429, response.text
    body = response.json()
    assert body["code"] == QUOTA
    assert body["message"].startswith("daily image limit reached (1 per day); next request")
    retry_after = int(response.headers["Retry-After"])
    assert 23 * 3600 < retry_after <= 24 * 3600
    assert stored(db, user) == 1
    quota = httpx.post(
        f"{supabase_stack.url}/rest/v1/rpc/my_image_quota", json={}, headers=headers, timeout=10
    )
    assert quota.status_code == 200, quota.text
    assert quota.json()[0]["today"] == 1
    anon = {"apikey": supabase_stack.anon_key, "Authorization": f"Bearer {supabase_stack.anon_key}"}
    denied = httpx.post(
        f"{supabase_stack.url}/rest/v1/rpc/my_image_quota", json={}, headers=anon, timeout=10
    )
    assert denied.status_code == 401


def test_a_database_migrated_before_the_limits_counts_its_recent_requests(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    """The limits migration on a live database: recent requests join the ledger (a completed
    one with its cost at today's prices), so the first insert after it is already counted; a
    request queued before it completes priced."""
    with pg_server.migrated_before(LIMITS_VERSION, tmp_path) as dsn, connect(dsn) as db:
        user, chat = new_chat(db)
        insert_request(db, user, chat, "done before the upgrade")
        [job] = db.execute("select * from public.image_jobs_claim('old', 1, 60, 5)").fetchall()
        usage = {
            "model": "gpt-image-2.6-flare",
            "usage": {"input_tokens": 0, "output_tokens": 1000},
        }
        db.execute(
            "select public.image_jobs_complete(%s, 'old', %s, 'file:///x.png', %s::jsonb)",
            (job["request_id"], job["attempt"], json.dumps(usage)),
        )
        waiting = insert_request(db, user, chat, "queued across the upgrade")
        apply_migrations(dsn)
        ledger = db.execute(
            "select request_id, cost_usd from image_queue.usage order by accepted_at"
        ).fetchall()
        assert [row["request_id"] for row in ledger] == [job["request_id"], waiting]
        assert float(ledger[0]["cost_usd"]) == pytest.approx(1000 * 30.0 / 1_000_000)
        set_limits(db, None, per_day=2)
        refused(db, user, chat)
        claim_and_complete(db, {"output_tokens": 1000})
        [reply] = db.execute(
            "select metadata from public.messages where reply_to = %s", (waiting,)
        ).fetchall()
        assert float(reply["metadata"]["cost_usd"]) == pytest.approx(0.03)


def test_a_limit_of_zero_turns_generation_off_for_the_user(db: Conn) -> None:
    user, chat = new_chat(db)
    set_limits(db, user, per_day=0)
    error = refused(db, user, chat)
    assert error.diag.message_primary == (
        "image generation is turned off for this account (per_day is 0)"
    )
    with as_user(db, user):
        [row] = db.execute("select next_request_at::text from public.my_image_quota()").fetchall()
    assert row == {"next_request_at": "infinity"}  # no time will free a place
