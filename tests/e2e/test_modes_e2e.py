"""The same end-to-end suite in both deployment modes (see tests/support/modes.py): the real daemon
in a subprocess, a frontend inserting as a signed-in user, the real OpenAI SDK against the fake
server, real signals."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from core.png import read_png_size
from tests.support.modes import Conn, ModeRig
from tests.support.queue_helpers import job_of, new_chat, reply_of

pytestmark = pytest.mark.e2e


@pytest.fixture
def rig(mode_rig: ModeRig) -> ModeRig:
    return mode_rig


def _wait_until(condition: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_request_completes_with_a_downloadable_image_of_the_requested_size(rig: ModeRig) -> None:
    rig.start()
    user, chat = new_chat(rig.db)
    request = rig.insert_request(user, chat, "a lighthouse at dawn", {"size": "1024x1536"})
    reply = rig.wait_final(request)
    assert reply["status"] == "complete"
    assert reply["content"] == 'Image generated from prompt: "a lighthouse at dawn"'
    assert read_png_size(rig.fetch_image(reply["image_url"])) == (1024, 1536)
    location = reply["metadata"]["storage"]["location"]
    assert location == f"{user}/{chat}/{request}.png"
    if rig.stack is not None:
        [upload] = [r for r in rig.stack.storage.requests if r.method == "POST" and r.upsert]
        assert upload.path == f"/object/generated-images/{location}"
        assert (upload.content_type, upload.role) == ("image/png", "service_role")
    assert job_of(rig.db, request) is None


def test_a_watcher_of_the_reply_row_sees_queued_then_generating_then_complete(
    rig: ModeRig,
) -> None:
    """One row tells the story: it exists 'queued' from the insert (no listener is running yet),
    with its place in line; the claim makes the same row 'generating'; then 'complete'."""
    user, chat = new_chat(rig.db)
    ahead = rig.insert_request(user, chat, "first in line")
    request = rig.insert_request(user, chat, "slow one [fake:delay=1.5]")
    [queued] = reply_of(rig.db, request)
    assert queued["status"] == "queued"
    assert rig.position(user, request) == 1
    assert rig.position(user, ahead) == 0
    rig.start()  # (returns once it listens: it may have claimed already)
    seen: list[str] = [queued["status"]]
    deadline = time.monotonic() + 20
    while seen[-1] not in ("complete", "failed"):
        assert time.monotonic() < deadline, seen
        [row] = reply_of(rig.db, request)
        assert row["id"] == queued["id"], "one reply row throughout"
        if seen[-1] != row["status"]:
            seen.append(row["status"])
        time.sleep(0.02)
    assert seen == ["queued", "generating", "complete"]
    assert rig.position(user, request) is None


def test_previews_show_on_the_reply_before_the_final_image_and_are_cleaned_up(
    rig: ModeRig,
) -> None:
    """partial_images 2: the watcher of the one reply row sees 'generating' with a
    preview_url it can open (metadata.preview_index says which), then 'complete' with the
    image, preview_url null and the preview objects gone from storage."""
    rig.start()
    user, chat = new_chat(rig.db)
    request = rig.insert_request(
        user, chat, "a slow sunrise [fake:partial-every=0.4]", {"partial_images": 2}
    )
    previews: dict[str, int] = {}
    opened: list[tuple[int, int]] = []
    deadline = time.monotonic() + 20
    while True:
        assert time.monotonic() < deadline, previews
        [row] = reply_of(rig.db, request)
        if row["status"] == "complete":
            break
        url = row["preview_url"]
        if url and url not in previews:
            assert row["status"] == "generating"
            previews[url] = row["metadata"]["preview_index"]
            opened.append(read_png_size(rig.fetch_image(url)))
        time.sleep(0.02)
    assert sorted(previews.values()) == [0, 1]
    assert opened == [(128, 128), (128, 128)]
    assert row["preview_url"] is None
    assert read_png_size(rig.fetch_image(row["image_url"])) == (1024, 1024)
    _wait_until(lambda: not any(".preview-" in path for path in rig.stored_images()))
    [stored] = rig.stored_images()  # (the Supabase stand-in prefixes the bucket)
    assert stored.endswith(f"{user}/{chat}/{request}.png")


def test_requests_inserted_while_down_are_served_on_start(rig: ModeRig) -> None:
    user, chat = new_chat(rig.db)
    requests = [rig.insert_request(user, chat, f"backlog {i}") for i in range(4)]
    rig.start()
    for request in requests:
        assert rig.wait_final(request)["status"] == "complete"


def test_kill_9_mid_generation_then_restart_gives_exactly_one_reply(rig: ModeRig) -> None:
    daemon = rig.start()
    user, chat = new_chat(rig.db)
    prompt = "crash during this one [fake:delay=2]"
    request = rig.insert_request(user, chat, prompt)
    _wait_until(lambda: rig.fake.calls(prompt) == 1)
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    rig.start()
    reply = rig.wait_final(request)
    assert reply["status"] == "complete"
    assert reply["metadata"]["attempt"] == 2
    assert len(reply_of(rig.db, request)) == 1


def test_sigterm_lets_in_flight_work_finish_and_exits_zero(rig: ModeRig) -> None:
    daemon = rig.start()
    user, chat = new_chat(rig.db)
    prompt = "finish me [fake:delay=1.5]"
    request = rig.insert_request(user, chat, prompt)
    _wait_until(lambda: rig.fake.calls(prompt) == 1)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert rig.wait_final(request, timeout=2)["status"] == "complete"


def test_a_refused_prompt_ends_failed_with_a_user_safe_reason(rig: ModeRig) -> None:
    rig.start()
    user, chat = new_chat(rig.db)
    request = rig.insert_request(user, chat, "refuse me [fake:moderation]")
    reply = rig.wait_final(request)
    assert reply["status"] == "failed"
    assert "safety system" in reply["error"]
    assert reply["image_url"] is None


def test_deleting_a_request_mid_generation_leaves_no_reply_and_no_image(rig: ModeRig) -> None:
    rig.start()
    user, chat = new_chat(rig.db)
    prompt = "cancel me [fake:delay=1.5]"
    request = rig.insert_request(user, chat, prompt)
    _wait_until(lambda: rig.fake.calls(prompt) == 1)
    rig.delete_request(user, request)
    time.sleep(2.5)  # the generation finishes; its late write must change nothing
    assert reply_of(rig.db, request) == []
    assert job_of(rig.db, request) is None
    assert rig.stored_images() == []


def test_several_requests_each_get_exactly_one_reply(rig: ModeRig, db: Conn) -> None:
    rig.start()
    user, chat = new_chat(db)
    requests = [rig.insert_request(user, chat, f"batch {i}") for i in range(10)]
    for request in requests:
        assert rig.wait_final(request)["status"] == "complete"
    assert rig.fake.total_calls == 10
