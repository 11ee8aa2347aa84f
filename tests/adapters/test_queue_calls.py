"""The one queue-call layer over both transports: every queue and admin function called through
``QueueCalls`` with SQL (psycopg) and with PostgREST ``rpc`` (the real PostgREST, the real
supabase client) must reach the same SQL function with the same arguments and come back as the
same Python values; each transport's failures come out as the core error tree."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from core.errors import DatabaseUnavailable, OperatorError
from core.models import ClaimedJob
from core.ports import Completion, WriteResult
from listener.queue.calls import QueueCalls
from listener.queue.postgres import SqlTransport, connect_per_call, open_pool
from listener.queue.postgrest import RpcTransport
from listener.supabase_client import supabase_client
from tests.support.pg import as_user
from tests.support.queue_helpers import insert_request, job_of, new_chat, reply_of

Conn = psycopg.Connection[dict[str, Any]]
WORKER = "calls-test"
LEASE = 60.0


@pytest.fixture(params=["sql", "postgrest"])
async def queue(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[QueueCalls]:
    """``QueueCalls`` over the pool the daemon uses, or over PostgREST with the service key."""
    if request.param == "sql":
        pool = open_pool(database_url, max_size=2, timeout=5)
        await pool.open(wait=True)
        try:
            yield QueueCalls(SqlTransport.over_pool(pool, call_timeout=5))
        finally:
            await pool.close()
        return
    stack = request.getfixturevalue("supabase_stack")
    async with supabase_client(stack.url, stack.service_role_key, http_timeout=10) as client:
        yield QueueCalls(RpcTransport(client, call_timeout=10))


async def claim_one(queue: QueueCalls, db: Conn, prompt: str = "a fox") -> ClaimedJob:
    user, chat = new_chat(db)
    request = insert_request(db, user, chat, prompt, {"size": "1536x1024"})
    [job] = await queue.claim(WORKER, 5, LEASE, 3)
    assert job.request_id == request
    return job


async def test_claim_returns_the_job_as_the_worker_needs_it(queue: QueueCalls, db: Conn) -> None:
    user, chat = new_chat(db)
    request = insert_request(db, user, chat, "a harbour", {"quality": "low"})
    assert queue.last_ok is None
    [job] = await queue.claim(WORKER, 5, LEASE, 3)
    assert (job.request_id, job.chat_id, job.user_id) == (request, chat, user)
    assert (job.prompt, job.options, job.attempt) == ("a harbour", {"quality": "low"}, 1)
    assert job.lease_expires_at > datetime.now(UTC) + timedelta(seconds=LEASE / 2)
    assert job.requested_at is not None
    [reply] = reply_of(db, request)
    assert reply["id"] == job.reply_id
    assert reply["status"] == "generating"
    assert queue.last_ok is not None
    assert await queue.claim(WORKER, 5, LEASE, 3) == []


async def test_extend_renews_only_leases_held_with_the_right_attempt(
    queue: QueueCalls, db: Conn
) -> None:
    job = await claim_one(queue, db)
    stranger = uuid.uuid4()
    held = await queue.extend(
        WORKER, [(job.request_id, job.attempt), (stranger, 1)], lease_seconds=LEASE * 2
    )
    assert held == {job.request_id}
    row = job_of(db, job.request_id)
    assert row is not None
    assert row["lease_expires_at"] > job.lease_expires_at
    assert await queue.extend(WORKER, [(job.request_id, job.attempt + 1)], LEASE) == set()
    assert await queue.extend("someone-else", [(job.request_id, job.attempt)], LEASE) == set()
    assert await queue.extend(WORKER, [], LEASE) == set()


async def test_complete_writes_the_reply_once_and_fences_a_repeat(
    queue: QueueCalls, db: Conn
) -> None:
    job = await claim_one(queue, db)
    metadata = {"model": "gpt-image-test", "size": "1536x1024", "nested": {"n": [1, 2]}}
    result = await queue.complete(job, WORKER, "file:///tmp/x.png", metadata)
    assert result == Completion(WriteResult.DONE, cost_usd=None)  # a model without a price
    [reply] = reply_of(db, job.request_id)
    assert (reply["status"], reply["image_url"]) == ("complete", "file:///tmp/x.png")
    assert reply["metadata"]["nested"] == {"n": [1, 2]}
    assert reply["metadata"]["cost_usd"] is None
    assert job_of(db, job.request_id) is None
    again = await queue.complete(job, WORKER, "file:///tmp/y.png", metadata)
    assert again.write is WriteResult.LEASE_LOST
    assert reply_of(db, job.request_id)[0]["image_url"] == "file:///tmp/x.png"


async def test_complete_prices_the_image_from_the_price_table(queue: QueueCalls, db: Conn) -> None:
    """cost_usd = tokens x the model's USD per 1M tokens, on the reply and back to the caller
    (the number the metrics count); input tokens split by kind when the provider splits them."""
    job = await claim_one(queue, db)
    usage = {
        "input_tokens": 1200,
        "input_text_tokens": 200,
        "input_image_tokens": 1000,
        "output_tokens": 4160,
    }
    metadata = {"model": "gpt-image-2.6-flare", "usage": usage}
    result = await queue.complete(job, WORKER, "file:///tmp/x.png", metadata)
    expected = (200 * 5.0 + 1000 * 8.0 + 4160 * 30.0) / 1_000_000
    assert result.write is WriteResult.DONE
    assert result.cost_usd == pytest.approx(expected)
    [reply] = reply_of(db, job.request_id)
    assert float(reply["metadata"]["cost_usd"]) == pytest.approx(expected)


async def test_fail_schedules_a_retry_or_gives_up_with_the_public_error(
    queue: QueueCalls, db: Conn
) -> None:
    job = await claim_one(queue, db)
    retrying = await queue.fail(
        job,
        WORKER,
        public_error="The image service is busy.",
        detail="HTTP 503",
        retry_in_seconds=30.0,
        metadata={"error_code": "provider_unavailable"},
    )
    assert retrying is WriteResult.DONE
    row = job_of(db, job.request_id)
    assert row is not None
    assert row["state"] == "waiting"
    due = await queue.next_due()
    assert due is not None
    assert timedelta(seconds=25) < due - datetime.now(UTC) < timedelta(seconds=35)

    other = await claim_one(queue, db, "another")
    final = await queue.fail(
        other,
        WORKER,
        public_error="The prompt was refused.",
        detail="moderation",
        retry_in_seconds=None,
        metadata={"error_code": "moderation_blocked"},
    )
    assert final is WriteResult.DONE
    [reply] = reply_of(db, other.request_id)
    assert (reply["status"], reply["error"]) == ("failed", "The prompt was refused.")
    assert reply["metadata"]["error_code"] == "moderation_blocked"


async def test_release_hands_the_job_back_without_counting_the_attempt(
    queue: QueueCalls, db: Conn
) -> None:
    job = await claim_one(queue, db)
    assert await queue.release(job, WORKER) is WriteResult.DONE
    row = job_of(db, job.request_id)
    assert row is not None
    assert (row["state"], row["attempts"]) == ("queued", 0)
    assert await queue.release(job, WORKER) is WriteResult.LEASE_LOST


async def test_a_deleted_request_answers_cancelled(queue: QueueCalls, db: Conn) -> None:
    job = await claim_one(queue, db)
    with as_user(db, job.user_id):
        db.execute("delete from public.messages where id = %s", (job.request_id,))
    result = await queue.complete(job, WORKER, "file:///tmp/x.png", {})
    assert result.write is WriteResult.CANCELLED


async def test_next_due_is_none_for_an_empty_queue(queue: QueueCalls) -> None:
    assert await queue.next_due() is None


async def test_the_budget_calls(queue: QueueCalls, db: Conn) -> None:
    """The claim within a listener's budget, a 429 handed back (requeued, the fleet paused),
    the next start, and the operator's budget, each through both transports."""
    user, chat = new_chat(db)
    first = insert_request(db, user, chat, "a lighthouse")
    insert_request(db, user, chat, "a harbour")
    [job] = await queue.claim(WORKER, 5, LEASE, 3, images_per_minute=30)
    assert job.request_id == first  # one token: one job of the two
    ahead = await queue.next_start()
    assert (ahead.held_by, ahead.per_minute, ahead.source) == ("budget", 30.0, "listeners")
    assert ahead.due_at is not None
    assert ahead.due_at > datetime.now(UTC)
    result = await queue.rate_limited(job, WORKER, retry_after=5.0, detail="429 ipm")
    assert result is WriteResult.DONE
    assert job_of(db, first)["state"] == "queued"  # type: ignore[index]
    ahead = await queue.next_start()
    assert ahead.held_by == "pause"
    assert ahead.paused_until is not None
    assert await queue.rate_limited(job, WORKER, retry_after=5.0, detail="again") is (
        WriteResult.LEASE_LOST
    )
    shown = await queue.provider_budget()
    assert (shown["rate_limited"], shown["pauses"]) == (1, 1)
    shown = await queue.provider_budget_set(120, forget_learned=True)
    assert (shown["per_minute"], shown["source"], shown["paused_until"]) == (120, "operator", None)
    with pytest.raises(OperatorError, match="images per minute must be a positive number"):
        await queue.provider_budget_set(-1)
    assert (await queue.provider_budget_set(None))["source"] == "listeners"


async def test_status_and_the_operator_actions(queue: QueueCalls, db: Conn) -> None:
    failed = await claim_one(queue, db, "will fail")
    await queue.fail(
        failed,
        WORKER,
        public_error="The image service is down.",
        detail="HTTP 500",
        retry_in_seconds=None,
        metadata={"error_code": "provider_unavailable"},
    )
    running = await claim_one(queue, db, "still running")
    snapshot = await queue.status(failures=5)
    assert snapshot["jobs"]["running"] == 1
    assert [f["request_id"] for f in snapshot["recent_failures"]] == [str(failed.request_id)]
    assert (await queue.status())["recent_failures"] == []

    assert await queue.retry(failed.request_id) == "retried"
    assert await queue.retry(failed.request_id) == "in_progress"
    assert await queue.retry(uuid.uuid4()) == "not_found"
    assert await queue.cancel(running.request_id, "Stopped by the operator.") == "cancelled"
    assert reply_of(db, running.request_id)[0]["error"] == "Stopped by the operator."
    assert await queue.cancel(running.request_id, None) == "not_queued"
    assert await queue.retry_failed(datetime.now(UTC) - timedelta(hours=1)) == 1

    back = await queue.claim(WORKER, 5, LEASE, 3)
    assert {job.request_id for job in back} == {failed.request_id, running.request_id}
    db.execute("update image_queue.jobs set lease_expires_at = now() - interval '1 minute'")
    assert await queue.requeue_stuck() == 2
    assert await queue.requeue_stuck() == 0


async def test_a_function_the_database_lacks_is_an_operator_error(
    queue: QueueCalls, db: Conn
) -> None:
    """A database migrated by an older release, or the wrong key: not retried as transient."""
    db.execute("alter function public.image_jobs_next_due() rename to image_jobs_next_due_gone")
    db.execute("notify pgrst, 'reload schema'")  # PostgREST's schema cache; SQL ignores it
    with pytest.raises(OperatorError, match="image_jobs_next_due"):
        await _until_it_raises(queue.next_due)


async def _until_it_raises(call: Callable[[], Awaitable[object]]) -> None:
    """PostgREST reloads its schema cache asynchronously: a few calls may still succeed."""
    for _ in range(100):
        await call()
        await asyncio.sleep(0.1)


async def test_an_unreachable_database_is_transient() -> None:
    closed_port = "postgresql://nobody@127.0.0.1:9/none"
    queue = QueueCalls(
        SqlTransport(connect_per_call(closed_port, connect_timeout=2), call_timeout=5)
    )
    with pytest.raises(DatabaseUnavailable, match="image_jobs_next_due failed"):
        await queue.next_due()
    assert queue.last_ok is None
