"""The worker in-process against the real database and the real OpenAI SDK over HTTP: every
retry and no-retry case ends in exactly one final reply with the right status and message."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog

from core.png import read_png_size
from tests.support.fake_openai import FakeOpenAI
from tests.support.pg import as_user
from tests.support.queue_helpers import insert_request, job_of, new_chat, reply_of
from tests.support.worker_rig import API_KEY, FAST, Rig

Conn = psycopg.Connection[dict[str, Any]]


@pytest.fixture
async def rig(database_url: str, fake_openai: FakeOpenAI, tmp_path: Path) -> AsyncIterator[Rig]:
    return Rig(database_url, fake_openai, tmp_path / "images")


def only_reply(db: Conn, request_id: uuid.UUID) -> dict[str, Any]:
    replies = reply_of(db, request_id)
    assert len(replies) == 1, replies
    assert job_of(db, request_id) is None, "a final request leaves no job behind"
    return replies[0]


async def test_request_completes_with_png_of_requested_size(rig: Rig, db: Conn) -> None:
    user, chat = new_chat(db)
    request = insert_request(
        db, user, chat, "a harbour at night", {"size": "1536x1024", "quality": "low"}
    )
    await rig.drain()
    reply = only_reply(db, request)
    assert reply["status"] == "complete"
    assert reply["content"] == 'Image generated from prompt: "a harbour at night"'
    path = rig.image_dir / reply["metadata"]["storage"]["location"]
    assert reply["image_url"] == path.resolve().as_uri()
    assert read_png_size(path.read_bytes()) == (1536, 1024)
    assert path.relative_to(rig.image_dir).parts == (str(user), str(chat), f"{request}.png")
    meta = reply["metadata"]
    assert meta["model"] == "gpt-image-2.6-flare"
    assert (meta["size"], meta["quality"], meta["attempt"]) == ("1536x1024", "low", 1)
    assert meta["usage"]["total_tokens"] > 0
    sent = rig.fake.last_request("a harbour at night").body
    assert sent["model"] == "gpt-image-2.6-flare"
    assert sent["quality"] == "low"
    assert sent["safety_identifier"]
    assert str(user) not in sent["safety_identifier"]
    assert "response_format" not in sent


async def test_rate_limit_with_retry_after_is_retried_within_the_attempt(
    rig: Rig, db: Conn
) -> None:
    user, chat = new_chat(db)
    prompt = "busy [fake:fail=429:retry-after=0.2]"
    request = insert_request(db, user, chat, prompt)
    await rig.drain()
    reply = only_reply(db, request)
    assert reply["status"] == "complete"
    assert reply["metadata"]["attempt"] == 1
    assert rig.fake.calls(prompt) == 2


async def test_server_errors_and_dropped_connections_are_retried(rig: Rig, db: Conn) -> None:
    user, chat = new_chat(db)
    prompt = "flaky [fake:fail=500,drop]"
    request = insert_request(db, user, chat, prompt)
    await rig.drain()
    assert only_reply(db, request)["status"] == "complete"
    assert rig.fake.calls(prompt) == 3


async def test_timeout_is_retried(rig: Rig, db: Conn) -> None:
    user, chat = new_chat(db)
    prompt = "slow [fake:hang=4]"
    request = insert_request(db, user, chat, prompt)
    await rig.drain()
    assert only_reply(db, request)["status"] == "complete"
    assert rig.fake.calls(prompt) == 2


async def test_transient_failures_continue_across_attempts_then_succeed(rig: Rig, db: Conn) -> None:
    """One call per attempt: the job goes back to the queue with backoff and is claimed again."""
    rig.policy = replace(FAST, tries_per_attempt=1)
    user, chat = new_chat(db)
    prompt = "stubborn [fake:fail=500,503]"
    request = insert_request(db, user, chat, prompt)
    await rig.drain()
    reply = only_reply(db, request)
    assert reply["status"] == "complete"
    assert reply["metadata"]["attempt"] == 3
    assert rig.fake.calls(prompt) == 3


async def test_transient_failures_give_up_after_max_attempts(rig: Rig, db: Conn) -> None:
    rig.policy = replace(FAST, tries_per_attempt=2)
    rig.max_attempts = 2
    user, chat = new_chat(db)
    prompt = "down [fake:status=500]"
    request = insert_request(db, user, chat, prompt)
    await rig.drain()
    reply = only_reply(db, request)
    assert reply["status"] == "failed"
    assert "after 2 attempts" in reply["error"]
    assert rig.fake.calls(prompt) == 4  # 2 calls in each of 2 attempts, never more


@pytest.mark.parametrize(
    ("directive", "expected_error", "error_code"),
    [
        ("[fake:moderation]", "safety system", "moderation_blocked"),
        ("[fake:status=400:code=invalid_value:param=size]", "size", "invalid_request"),
        ("[fake:status=401]", "configuration problem", "service_misconfigured"),
        ("[fake:status=403]", "configuration problem", "service_misconfigured"),
        ("[fake:status=404-model]", "configuration problem", "service_misconfigured"),
        ("[fake:status=billing]", "configuration problem", "service_misconfigured"),
    ],
)
async def test_permanent_errors_fail_once_with_user_safe_reason(
    rig: Rig, db: Conn, directive: str, expected_error: str, error_code: str
) -> None:
    user, chat = new_chat(db)
    prompt = f"never {directive}"
    request = insert_request(db, user, chat, prompt)
    with structlog.testing.capture_logs() as logs:
        await rig.drain()
    reply = only_reply(db, request)
    assert reply["status"] == "failed"
    assert expected_error in reply["error"]
    assert reply["metadata"]["error_code"] == error_code
    assert rig.fake.calls(prompt) == 1, "permanent errors are never retried"
    for text in (reply["error"], reply["content"]):
        assert API_KEY not in text
        assert "Traceback" not in text
        assert "Error code" not in text
    if error_code == "service_misconfigured":
        assert any(e["event"] == "operator_action_required" for e in logs)
    assert not any(e.get("exc_info") for e in logs), "a user's mistake logs no stack trace"


async def test_request_that_bypassed_database_validation_fails_cleanly(rig: Rig, db: Conn) -> None:
    """Defense in depth: a row that slipped past the insert trigger still gets a clear reply."""
    user, chat = new_chat(db)
    db.execute("alter table public.messages disable trigger messages_validate")
    try:
        request = insert_request(db, user, chat, "odd", {"size": "17x17", "colour": "red"})
    finally:
        db.execute("alter table public.messages enable trigger messages_validate")
    await rig.drain()
    reply = only_reply(db, request)
    assert reply["status"] == "failed"
    assert "colour" in reply["error"]
    assert rig.fake.total_calls == 0


async def test_many_requests_each_get_exactly_one_reply(rig: Rig, db: Conn) -> None:
    user, chat = new_chat(db)
    requests = [insert_request(db, user, chat, f"picture {i}") for i in range(25)]
    await rig.drain()
    for request in requests:
        assert only_reply(db, request)["status"] == "complete"
    assert rig.fake.total_calls == 25


async def test_deleting_a_request_mid_generation_leaves_no_reply_and_no_image(
    rig: Rig, db: Conn
) -> None:
    user, chat = new_chat(db)
    prompt = "cancel me [fake:delay=1.5]"
    request = insert_request(db, user, chat, prompt)
    drain = asyncio.create_task(rig.drain())
    for _ in range(100):
        if reply_of(db, request) and rig.fake.calls(prompt):
            break
        await asyncio.sleep(0.05)
    assert reply_of(db, request)[0]["status"] == "generating"
    with as_user(db, user):
        db.execute("delete from public.messages where id = %s", (request,))
    await drain
    assert reply_of(db, request) == []
    assert job_of(db, request) is None
    assert not list(rig.image_dir.rglob("*.png")), "the late image was removed"
