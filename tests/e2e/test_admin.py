"""Operator commands against a real database, in both modes (SQL, or PostgREST rpc)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.support.daemon_process import cli
from tests.support.modes import Conn, ModeRig
from tests.support.queue_helpers import insert_request, job_of, new_chat, reply_of


@pytest.fixture
def rig(mode_rig: ModeRig) -> ModeRig:
    return mode_rig


def claim(db: Conn, worker: str = "w1", limit: int = 10) -> list[dict[str, Any]]:
    return db.execute(
        "select * from public.image_jobs_claim(%s, %s, 60, 3)", (worker, limit)
    ).fetchall()


def give_up(db: Conn, job: dict[str, Any], worker: str = "w1") -> None:
    db.execute(
        "select public.image_jobs_fail(%s, %s, %s, 'The image service is down.', 'HTTP 500',"
        ' null, \'{"error_code": "provider_unavailable"}\'::jsonb)',
        (job["request_id"], worker, job["attempt"]),
    )


def test_status_reports_depth_leases_and_failures(rig: ModeRig) -> None:
    user, chat = new_chat(rig.db)
    requests = [insert_request(rig.db, user, chat, f"r{i}") for i in range(4)]
    [failed] = claim(rig.db, limit=1)
    give_up(rig.db, failed)
    claim(rig.db, worker="worker-a", limit=1)
    [expired] = claim(rig.db, worker="worker-b", limit=1)
    rig.db.execute(
        "update image_queue.jobs set lease_expires_at = now() - interval '1 minute'"
        " where request_id = %s",
        (expired["request_id"],),
    )
    result = cli("status", "--json", env=rig.env)
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    assert snapshot["jobs"] == {"queued": 1, "waiting": 0, "running": 2, "expired_leases": 1}
    assert [lease["worker"] for lease in snapshot["leases"]] == ["worker-a", "worker-b"]
    [failure] = snapshot["recent_failures"]
    assert failure["request_id"] == str(requests[0])
    assert failure["error_code"] == "provider_unavailable"
    assert snapshot["oldest_queued_seconds"] >= 0
    readable = cli("status", env=rig.env)
    assert readable.returncode == 0
    for heading in ("queue", "leases by worker", "recent failures", "worker-a", "down"):
        assert heading in readable.stdout


def test_retry_gives_a_failed_request_a_new_attempt_on_the_same_reply_row(rig: ModeRig) -> None:
    user, chat = new_chat(rig.db)
    request = insert_request(rig.db, user, chat, "try me again")
    [job] = claim(rig.db)
    give_up(rig.db, job)
    [failed_reply] = reply_of(rig.db, request)
    result = cli("retry", str(request), env=rig.env)
    assert result.returncode == 0, result.stderr
    [reply] = reply_of(rig.db, request)
    assert reply["id"] == failed_reply["id"]
    assert (reply["status"], reply["error"]) == ("queued", None)
    rig.start()
    final = rig.wait_final(request)
    assert final["status"] == "complete"
    assert final["id"] == failed_reply["id"]
    assert len(reply_of(rig.db, request)) == 1


@pytest.mark.parametrize(
    ("setup", "reason"),
    [("unknown", "no such image request"), ("queued", "still queued or running")],
)
def test_retry_refuses_what_it_cannot_retry(rig: ModeRig, setup: str, reason: str) -> None:
    if setup == "unknown":
        target = uuid.uuid4()
    else:
        user, chat = new_chat(rig.db)
        target = insert_request(rig.db, user, chat, "still queued")
    result = cli("retry", str(target), env=rig.env)
    assert result.returncode == 1
    assert reason in result.stderr


def test_retry_failed_since_retries_only_recent_failures(rig: ModeRig) -> None:
    user, chat = new_chat(rig.db)
    old, recent = (insert_request(rig.db, user, chat, p) for p in ("old", "recent"))
    for job in claim(rig.db):
        give_up(rig.db, job)
    rig.db.execute("alter table public.messages disable trigger messages_touch_updated_at")
    rig.db.execute(
        "update public.messages set updated_at = now() - interval '3 hours' where reply_to = %s",
        (old,),
    )
    rig.db.execute("alter table public.messages enable trigger messages_touch_updated_at")
    result = cli("retry", "--failed-since", "1h", env=rig.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("retried 1 failed request(s)")
    assert job_of(rig.db, recent) is not None
    assert job_of(rig.db, old) is None


def test_cancel_ends_a_queued_request_with_a_failed_reply(rig: ModeRig) -> None:
    user, chat = new_chat(rig.db)
    request = insert_request(rig.db, user, chat, "never mind")
    result = cli("cancel", str(request), "--reason", "Cancelled by support.", env=rig.env)
    assert result.returncode == 0, result.stderr
    [reply] = reply_of(rig.db, request)
    assert (reply["status"], reply["error"]) == ("failed", "Cancelled by support.")
    assert job_of(rig.db, request) is None
    again = cli("cancel", str(request), env=rig.env)
    assert again.returncode == 1
    assert "not queued or running" in again.stderr


def test_requeue_stuck_moves_expired_leases_back_to_the_queue(rig: ModeRig) -> None:
    user, chat = new_chat(rig.db)
    stuck, healthy = (insert_request(rig.db, user, chat, p) for p in ("stuck", "healthy"))
    claim(rig.db)
    rig.db.execute(
        "update image_queue.jobs set lease_expires_at = now() - interval '1 minute'"
        " where request_id = %s",
        (stuck,),
    )
    result = cli("requeue-stuck", env=rig.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "requeued 1 job(s) with an expired lease"
    stuck_job, healthy_job = job_of(rig.db, stuck), job_of(rig.db, healthy)
    assert stuck_job is not None
    assert healthy_job is not None
    assert (stuck_job["state"], stuck_job["attempts"]) == ("queued", 1)
    assert healthy_job["state"] == "running"
