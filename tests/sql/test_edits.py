"""Edit options at insert time: `edit_of` (a complete image reply in this chat), `references`
(the user's own uploads), `mask`, `input_fidelity`. Each refusal names the problem, stores
nothing, and reads the same in SQL and through PostgREST; the input bucket's policy lets a user
reach their own folder only."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import psycopg
import pytest

from listener.migrate import apply_migrations
from tests.support.pg import PostgresServer, as_service_role, as_user, connect, create_user
from tests.support.queue_helpers import insert_request, new_chat
from tests.support.storage_schema import STORAGE_SCHEMA
from tests.support.supabase_stack import SupabaseStack

Conn = psycopg.Connection[dict[str, Any]]
NOT_IN_CHAT = "option edit_of: there is no image reply {id} in this chat"
NOT_MINE = "is not an object path in your own folder (<your user id>/<name>)"


def complete_reply(db: Conn, user: uuid.UUID, chat: uuid.UUID, prompt: str = "a boat") -> uuid.UUID:
    """A request of ``user`` in ``chat``, claimed and completed as a listener would; its reply."""
    request = insert_request(db, user, chat, prompt)
    [job] = db.execute(
        "select * from public.image_jobs_claim('edits', 1, 60, 5) where request_id = %s",
        (request,),
    ).fetchall()
    db.execute(
        "select * from public.image_jobs_complete_priced(%s, 'edits', %s, 'file:///x.png',"
        ' \'{"storage": {"bucket": null, "location": "u/c/r.png"}}\'::jsonb)',
        (request, job["attempt"]),
    )
    return uuid.UUID(str(job["reply_id"]))


def refusal(db: Conn, user: uuid.UUID, chat: uuid.UUID, options: dict[str, Any]) -> str:
    before = db.execute("select count(*) as n from public.messages").fetchone()
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        insert_request(db, user, chat, "an edit", options)
    assert db.execute("select count(*) as n from public.messages").fetchone() == before
    return caught.value.diag.message_primary or ""


@pytest.fixture
def world(db: Conn) -> dict[str, Any]:
    user, chat = new_chat(db)
    _, other_chat = new_chat(db, user)
    stranger, stranger_chat = new_chat(db)
    return {
        "user": user,
        "chat": chat,
        "reply": complete_reply(db, user, chat),
        "own_other_reply": complete_reply(db, user, other_chat),
        "stranger_reply": complete_reply(db, stranger, stranger_chat),
    }


def test_accepted_edit_requests(db: Conn, world: dict[str, Any]) -> None:
    user, chat = world["user"], world["chat"]
    me = f"{user}/"
    for options in (
        {"edit_of": str(world["reply"])},
        {"edit_of": str(world["reply"]).upper(), "input_fidelity": "high"},
        {"references": [me + "cat.png", me + "trips/2026/beach.JPG", me + "a.webp"]},
        {"references": [me + f"r{i}.jpeg" for i in range(16)]},
        {"edit_of": str(world["reply"]), "references": [me + "cat.png"], "mask": me + "m.png"},
        {"references": [me + "cat.png"], "mask": me + "holes.png", "input_fidelity": "low"},
    ):
        insert_request(db, user, chat, "an edit", options)


def test_edit_of_must_be_a_complete_image_reply_in_this_chat(
    db: Conn, world: dict[str, Any]
) -> None:
    user, chat = world["user"], world["chat"]
    queued = insert_request(db, user, chat, "still queued")
    [queued_reply] = db.execute(
        "select id from public.messages where reply_to = %s", (queued,)
    ).fetchall()
    with as_service_role(db):
        text_reply = db.execute(
            "insert into public.messages (chat_id, role, content, message_type)"
            " values (%s, 'assistant', 'hello', 'text') returning id",
            (chat,),
        ).fetchone()
    assert text_reply is not None
    unknown = uuid.uuid4()
    for target, message in (
        (unknown, NOT_IN_CHAT.format(id=unknown)),
        # another chat of the user's own, and someone else's: the same answer
        (world["own_other_reply"], NOT_IN_CHAT.format(id=world["own_other_reply"])),
        (world["stranger_reply"], NOT_IN_CHAT.format(id=world["stranger_reply"])),
        (queued, NOT_IN_CHAT.format(id=queued)),  # the user's own request is no reply
        (
            queued_reply["id"],
            f"option edit_of: image reply {queued_reply['id']} is not complete (it is queued)",
        ),
        (text_reply["id"], f"option edit_of: message {text_reply['id']} is not an image reply"),
    ):
        assert refusal(db, user, chat, {"edit_of": str(target)}) == message
    for bad in ("not-a-uuid", 42, None, [str(world["reply"])]):
        assert refusal(db, user, chat, {"edit_of": bad}) == (
            "option edit_of must be the id of a complete image reply in this chat"
        )


@pytest.mark.parametrize(
    ("references", "message"),
    [
        ("{me}a.png", "option references must be an array of 1 to 16 object paths"),
        ([], "option references must be an array of 1 to 16 object paths"),
        (["{me}r.png"] * 17, "option references must be an array of 1 to 16 object paths"),
        ([7], "option references: each object path must be a string"),
        (["{other}/a.png"], NOT_MINE),
        (["{me}../{other}/a.png"], NOT_MINE),
        (["{me}x/../../a.png"], NOT_MINE),
        (["/{me}a.png"], NOT_MINE),
        (["{me}a\\\\b.png"], NOT_MINE),
        (["{me}a//b.png"], NOT_MINE),
        (["{me}"], NOT_MINE),
        (["a.png"], NOT_MINE),
        (["{me}a.gif"], "must end in .png, .jpg, .jpeg, .webp"),
        (["{me}noextension"], "must end in .png, .jpg, .jpeg, .webp"),
    ],
)
def test_references_must_be_the_users_own_uploads(
    db: Conn, world: dict[str, Any], references: Any, message: str
) -> None:
    me, other = f"{world['user']}/", str(uuid.uuid4())
    filled = json.loads(json.dumps(references).replace("{me}", me).replace("{other}", other))
    assert message in refusal(db, world["user"], world["chat"], {"references": filled})


def test_mask_rules_and_input_fidelity(db: Conn, world: dict[str, Any]) -> None:
    user, chat = world["user"], world["chat"]
    me = f"{user}/"
    assert refusal(db, user, chat, {"mask": me + "m.png"}) == (
        "option mask needs edit_of or references: it applies to the first input image"
    )
    with_refs = {"references": [me + "a.png"]}
    assert refusal(db, user, chat, {**with_refs, "mask": me + "m.jpg"}).endswith("must end in .png")
    assert NOT_MINE in refusal(db, user, chat, {**with_refs, "mask": "elsewhere/m.png"})
    assert refusal(db, user, chat, {**with_refs, "input_fidelity": "max"}) == (
        "option input_fidelity must be low or high"
    )
    assert refusal(db, user, chat, {"input_fidelity": "low"}) == (
        "option input_fidelity needs edit_of or references: it is about input images"
    )


def test_through_postgrest_a_refusal_is_a_400_naming_the_problem(
    db: Conn, supabase_stack: SupabaseStack
) -> None:
    user, chat = new_chat(db)
    stranger, stranger_chat = new_chat(db)
    theirs = complete_reply(db, stranger, stranger_chat)
    headers = {
        "apikey": supabase_stack.anon_key,
        "Authorization": f"Bearer {supabase_stack.user_token(user)}",
    }
    for options, message in (
        ({"edit_of": str(theirs)}, NOT_IN_CHAT.format(id=theirs)),
        ({"references": [f"{stranger}/their.png"]}, NOT_MINE),
    ):
        response = httpx.post(
            f"{supabase_stack.url}/rest/v1/messages",
            json={
                "chat_id": str(chat),
                "role": "user",
                "message_type": "image",
                "content": "edit",
                "options": options,
            },
            headers=headers,
            timeout=10,
        )
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "23514"
        assert message in response.json()["message"]


def test_a_user_reaches_only_their_own_folder_of_the_input_bucket(
    pg_server: PostgresServer,
) -> None:
    name = pg_server.empty()
    try:
        with connect(pg_server.dsn(name)) as conn:
            conn.execute(STORAGE_SCHEMA)
            conn.execute("grant insert, update, delete on storage.objects to authenticated")
        apply_migrations(pg_server.dsn(name))
        with connect(pg_server.dsn(name)) as conn:
            bucket = conn.execute("select public from storage.buckets where id = 'image-inputs'")
            assert bucket.fetchone() == {"public": False}
            me, other = create_user(conn), create_user(conn)
            insert = "insert into storage.objects (bucket_id, name) values (%s, %s)"
            with as_user(conn, me):
                conn.execute(insert, ("image-inputs", f"{me}/cat.png"))
            for bucket_id, path in (
                ("image-inputs", f"{other}/planted.png"),
                ("generated-images", f"{me}/x/forged.png"),
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege), as_user(conn, me):
                    conn.execute(insert, (bucket_id, path))
            conn.execute(insert, ("image-inputs", f"{other}/theirs.png"))
            with as_user(conn, me):
                names = [r["name"] for r in conn.execute("select name from storage.objects")]
            assert names == [f"{me}/cat.png"]
    finally:
        pg_server.drop(name)
