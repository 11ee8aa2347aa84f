"""The frontend's contract with the database: which image requests are accepted (and enqueued with
a NOTIFY carrying only the id), which are refused and with what message, and the reply rules."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.support.pg import as_service_role, as_user, connect, create_user

Conn = psycopg.Connection[dict[str, Any]]

#: stands for SQL NULL in `options`, as opposed to Python None, which is the JSON value null
SQL_NULL = object()
CHECK_VIOLATION = "23514"
PROMPT = "a red fox in the snow"
#: every character Python's str.strip() removes, which is what the worker trims (core/validation)
UNICODE_WHITESPACE = "".join(ch for ch in map(chr, range(0x3001)) if ch.isspace())


@pytest.fixture
def chat(db: Conn) -> tuple[uuid.UUID, uuid.UUID]:
    """(user_id, chat_id): a signed-up user with one chat of their own."""
    user = create_user(db)
    with as_user(db, user):
        row = db.execute("insert into public.chats (title) values ('t') returning id").fetchone()
    assert row is not None
    return user, row["id"]


@pytest.fixture
def fresh_chat(shared_db: Conn) -> tuple[uuid.UUID, uuid.UUID]:
    """(user_id, chat_id) of a new user in the shared database."""
    user = create_user(shared_db)
    with as_user(shared_db, user):
        row = shared_db.execute("insert into public.chats default values returning id").fetchone()
    assert row is not None
    return user, row["id"]


@pytest.fixture
def listener(database_url: str) -> Iterator[Conn]:
    """A second connection listening on image_requests, as the daemon does."""
    with connect(database_url) as conn:
        conn.execute("listen image_requests")
        yield conn


def insert_message(
    db: Conn,
    user: uuid.UUID,
    chat_id: uuid.UUID,
    content: str | None = PROMPT,
    options: Any = None,
    role: str = "user",
    message_type: str = "image",
) -> uuid.UUID:
    """Insert as the frontend does through PostgREST: authenticated, subject to RLS."""
    if options is None:
        options_json: str | None = "{}"
    elif options is SQL_NULL:
        options_json = None
    else:
        options_json = json.dumps(options)
    with as_user(db, user):
        row = db.execute(
            "insert into public.messages (chat_id, role, content, message_type, options)"
            " values (%s, %s, %s, %s, %s::jsonb) returning id",
            (chat_id, role, content, message_type, options_json),
        ).fetchone()
    assert row is not None
    return row["id"]


def jobs(db: Conn, chat_id: uuid.UUID) -> list[dict[str, Any]]:
    return db.execute(
        "select request_id, chat_id, user_id, state, attempts from image_queue.jobs"
        " where chat_id = %s",
        (chat_id,),
    ).fetchall()


def notifications(conn: Conn, expect: int) -> list[tuple[str, str]]:
    """(channel, payload) of what arrived: waits for `expect`, then briefly for any extra."""
    got = []
    if expect:
        got += list(conn.notifies(timeout=5, stop_after=expect))
    got += list(conn.notifies(timeout=0.05))
    return [(n.channel, n.payload) for n in got]


VALID_OPTIONS = [
    pytest.param({}, id="no-options"),
    pytest.param({"size": "auto"}, id="size-auto"),
    pytest.param({"size": "1024x1024", "quality": "high"}, id="square-high"),
    pytest.param({"size": "1536x1024", "quality": "low"}, id="landscape-low"),
    pytest.param({"size": "1024x1536", "quality": "medium"}, id="portrait-medium"),
    pytest.param({"size": "3840x2160", "quality": "auto"}, id="largest-area"),
    pytest.param({"size": "16x16"}, id="smallest"),
    pytest.param({"size": "3072x1024"}, id="exactly-3-to-1"),
    pytest.param({"size": "1024x3072"}, id="exactly-1-to-3"),
    pytest.param({"background": "transparent", "output_format": "png"}, id="transparent-png"),
    pytest.param({"background": "transparent", "output_format": "webp"}, id="transparent-webp"),
    pytest.param({"background": "opaque", "output_format": "jpeg"}, id="opaque-jpeg"),
    pytest.param({"background": "auto", "output_format": "jpeg"}, id="auto-background-jpeg"),
    pytest.param(
        {"size": "1024x1024", "quality": "high", "background": "opaque", "output_format": "webp"},
        id="all-four",
    ),
    pytest.param({"partial_images": 0}, id="no-previews"),
    pytest.param({"partial_images": 3}, id="three-previews"),
]


@pytest.mark.parametrize("options", VALID_OPTIONS)
def test_valid_image_request_is_accepted_and_enqueued_once_with_an_id_only_notify(
    db: Conn, chat: tuple[uuid.UUID, uuid.UUID], listener: Conn, options: dict[str, str]
) -> None:
    user, chat_id = chat

    request = insert_message(db, user, chat_id, options=options)

    assert jobs(db, chat_id) == [
        {
            "request_id": request,
            "chat_id": chat_id,
            "user_id": user,
            "state": "queued",
            "attempts": 0,
        }
    ]
    assert notifications(listener, expect=1) == [("image_requests", str(request))]
    stored = db.execute("select options from public.messages where id = %s", (request,))
    assert stored.fetchone() == {"options": options}


@pytest.mark.parametrize(
    "prompt",
    [
        pytest.param("a" * 32_000, id="exactly-32000"),
        pytest.param(
            " \n\t" * 100 + "a" * 32_000 + "\r\n " * 100, id="32000-plus-outer-whitespace"
        ),
        pytest.param("é" * 32_000, id="32000-multibyte-characters"),
        pytest.param(
            UNICODE_WHITESPACE + "a" * 32_000 + UNICODE_WHITESPACE,
            id="32000-plus-unicode-whitespace",
        ),
    ],
)
def test_prompt_of_32000_characters_after_trimming_is_accepted(
    db: Conn, chat: tuple[uuid.UUID, uuid.UUID], prompt: str
) -> None:
    user, chat_id = chat
    request = insert_message(db, user, chat_id, content=prompt)
    assert [job["request_id"] for job in jobs(db, chat_id)] == [request]


def _size(value: Any) -> dict[str, Any]:
    return {"options": {"size": value}}


BAD_SIZE = 'option size must be "auto" or "WIDTHxHEIGHT"'
NOT_AN_OBJECT = "options must be a JSON object"

BAD_REQUESTS = [
    pytest.param({"content": ""}, "the image prompt is empty", id="empty-prompt"),
    pytest.param({"content": " \t\r\n  "}, "the image prompt is empty", id="whitespace-prompt"),
    pytest.param(
        {"content": UNICODE_WHITESPACE * 2},
        "the image prompt is empty",
        id="unicode-whitespace-prompt",  # the worker would find it empty after str.strip()
    ),
    pytest.param(
        {"content": "a" * 32_001},
        "the image prompt is too long: 32001 characters, the limit is 32000",
        id="prompt-32001",
    ),
    pytest.param(
        {"content": "  " + "a" * 32_001 + "\n"},
        "the image prompt is too long: 32001 characters",
        id="prompt-32001-after-trimming",
    ),
    pytest.param(
        {"content": "a" * 16_000 + " " + "a" * 16_000},
        "the image prompt is too long: 32001 characters",
        id="inner-whitespace-counts",
    ),
    pytest.param({"options": {"n": 2}}, "unknown image option(s): n; allowed:", id="unknown-key"),
    *(
        pytest.param(
            {"options": {"partial_images": value}},
            "option partial_images must be a whole number from 0 to 3",
            id=f"partial-images-{name}",
        )
        for name, value in (
            ("4", 4),
            ("negative", -1),
            ("fraction", 1.5),
            ("text", "2"),
            ("true", True),
            ("null", None),
        )
    ),
    pytest.param(
        {"options": {"Size": "1024x1024"}}, "unknown image option(s): Size", id="key-wrong-case"
    ),
    pytest.param(
        {"options": {"size": "auto", "style": "vivid", "model": "x"}},
        "unknown image option(s): model, style",
        id="two-unknown-keys",
    ),
    pytest.param(_size("big"), BAD_SIZE, id="size-word"),
    pytest.param(_size("1024*1024"), BAD_SIZE, id="size-star"),
    pytest.param(_size("1024X1024"), BAD_SIZE, id="size-capital-x"),
    pytest.param(_size(" 1024x1024"), BAD_SIZE, id="size-leading-space"),
    pytest.param(_size("1024x"), BAD_SIZE, id="size-no-height"),
    pytest.param(_size("-16x16"), BAD_SIZE, id="size-negative"),
    pytest.param(_size(""), BAD_SIZE, id="size-empty"),
    pytest.param(_size("Auto"), BAD_SIZE, id="size-auto-wrong-case"),
    pytest.param(_size(1024), BAD_SIZE, id="size-number"),
    pytest.param(_size(["1024x1024"]), BAD_SIZE, id="size-array"),
    pytest.param(_size({"w": 1024, "h": 1024}), BAD_SIZE, id="size-object"),
    pytest.param(_size(None), BAD_SIZE, id="size-null"),
    pytest.param(_size("1000x1000"), "width and height must be multiples of 16", id="size-1000"),
    pytest.param(_size("1024x1000"), "width and height must be multiples of 16", id="height-1000"),
    pytest.param(_size("4096x2048"), "at most 3840 pixels a side", id="side-too-long"),
    pytest.param(_size("3840x3840"), "at most 3840 pixels a side", id="area-too-large"),
    pytest.param(_size("99984x99984"), "at most 3840 pixels a side", id="no-integer-overflow"),
    pytest.param(_size("3088x1024"), "the aspect ratio must be between 1:3 and 3:1", id="wide"),
    pytest.param(_size("1024x3088"), "the aspect ratio must be between 1:3 and 3:1", id="tall"),
    *[
        pytest.param(
            {"options": {key: value}},
            f"option {key} must be one of {allowed}",
            id=f"{key}-{label}",
        )
        for key, allowed in [
            ("quality", "low, medium, high, auto"),
            ("background", "transparent, opaque, auto"),
            ("output_format", "png, jpeg, webp"),
        ]
        for label, value in [
            ("unknown-word", "ultra"),
            ("wrong-case", {"quality": "HIGH", "background": "Opaque"}.get(key, "PNG")),
            ("number", 1),
            ("boolean", True),
            ("array", ["auto"]),
            ("object", {"value": "auto"}),
            ("null", None),
        ]
    ],
    pytest.param({"options": []}, NOT_AN_OBJECT, id="options-array"),
    pytest.param({"options": "size=1024x1024"}, NOT_AN_OBJECT, id="options-string"),
    pytest.param({"options": 42}, NOT_AN_OBJECT, id="options-number"),
    pytest.param({"options": [{"size": "auto"}]}, NOT_AN_OBJECT, id="options-wrapped"),
    pytest.param({"options": SQL_NULL}, NOT_AN_OBJECT, id="options-sql-null"),
    pytest.param(
        {"options": {"background": "transparent", "output_format": "jpeg"}},
        "a transparent background needs output_format png or webp",
        id="transparent-jpeg",
    ),
    pytest.param(
        {"message_type": "Image"},
        "message_type must be 'text' or 'image' in lower case (got 'Image')",
        id="message-type-Image",
    ),
    pytest.param(
        {"message_type": "picture"}, "message_type must be 'text' or 'image'", id="message-type-x"
    ),
    pytest.param(
        {"role": "User"}, "role must be one of user, assistant, system (got 'User')", id="role-User"
    ),
    pytest.param(
        {"message_type": "text", "options": {"size": "auto"}},
        "options are only allowed on image requests",
        id="text-with-options",
    ),
]


@pytest.mark.parametrize(("change", "message"), BAD_REQUESTS)
def test_bad_request_is_rejected_with_a_clear_message_and_nothing_is_stored(
    shared_db: Conn, fresh_chat: tuple[uuid.UUID, uuid.UUID], change: dict[str, Any], message: str
) -> None:
    user, chat_id = fresh_chat

    with pytest.raises(psycopg.errors.CheckViolation) as raised:
        insert_message(shared_db, user, chat_id, **change)

    assert raised.value.sqlstate == CHECK_VIOLATION
    assert message in (raised.value.diag.message_primary or "")
    stored = shared_db.execute("select id from public.messages where chat_id = %s", (chat_id,))
    assert stored.fetchall() == []
    assert jobs(shared_db, chat_id) == []


def test_json_null_options_is_rejected_like_any_non_object(
    shared_db: Conn, fresh_chat: tuple[uuid.UUID, uuid.UUID]
) -> None:
    """`options: null` in the JSON body arrives as the JSON value null, not SQL NULL."""
    user, chat_id = fresh_chat
    with (
        pytest.raises(psycopg.errors.CheckViolation, match=NOT_AN_OBJECT),
        as_user(shared_db, user),
    ):
        shared_db.execute(
            "insert into public.messages (chat_id, role, content, message_type, options)"
            " values (%s, 'user', 'a fox', 'image', 'null'::jsonb)",
            (chat_id,),
        )


def test_text_message_is_stored_but_creates_no_job_and_no_notify(
    db: Conn, chat: tuple[uuid.UUID, uuid.UUID], listener: Conn
) -> None:
    user, chat_id = chat

    message = insert_message(db, user, chat_id, content="hello", message_type="text")

    stored = db.execute("select id from public.messages where chat_id = %s", (chat_id,))
    assert stored.fetchall() == [{"id": message}]
    assert jobs(db, chat_id) == []
    assert notifications(listener, expect=0) == []


@pytest.mark.parametrize(
    ("role", "status", "is_reply"),
    [
        pytest.param("assistant", "generating", True, id="assistant-reply"),
        pytest.param("assistant", None, False, id="assistant-image-without-reply-to"),
        pytest.param("system", None, False, id="system-image"),
    ],
)
def test_only_user_image_messages_create_jobs(
    db: Conn,
    chat: tuple[uuid.UUID, uuid.UUID],
    listener: Conn,
    role: str,
    status: str | None,
    is_reply: bool,
) -> None:
    """A reply (or any non-user image row) that enqueued itself would loop forever."""
    user, chat_id = chat
    note = insert_message(db, user, chat_id, content="a note", message_type="text")
    request = insert_message(db, user, chat_id)
    assert notifications(listener, expect=1) == [("image_requests", str(request))]

    with as_service_role(db):  # (the request's own reply exists already: reply to the note)
        db.execute(
            "insert into public.messages (chat_id, role, content, message_type, status, reply_to)"
            " values (%s, %s, 'an image', 'image', %s, %s)",
            (chat_id, role, status, note if is_reply else None),
        )

    assert [job["request_id"] for job in jobs(db, chat_id)] == [request]
    assert notifications(listener, expect=0) == []


def _insert_reply(db: Conn, chat_id: uuid.UUID, request: uuid.UUID, status: str) -> None:
    db.execute(
        "insert into public.messages (chat_id, role, content, message_type, status, reply_to)"
        " values (%s, 'assistant', 'reply', 'image', %s, %s)",
        (chat_id, status, request),
    )


def test_only_one_assistant_reply_per_request(db: Conn, chat: tuple[uuid.UUID, uuid.UUID]) -> None:
    """The insert creates the request's one reply ('queued'); a second one collides."""
    user, chat_id = chat
    request = insert_message(db, user, chat_id)
    note = insert_message(db, user, chat_id, content="a note", message_type="text")
    with as_service_role(db):
        _insert_reply(db, chat_id, note, "generating")  # another message: no collision

    with pytest.raises(psycopg.errors.UniqueViolation) as raised, as_service_role(db):
        _insert_reply(db, chat_id, request, "complete")

    assert raised.value.diag.constraint_name == "messages_one_reply_per_request"
    replies = db.execute(
        "select reply_to, status from public.messages where reply_to = %s", (request,)
    ).fetchall()
    assert replies == [{"reply_to": request, "status": "queued"}]


def test_updated_at_is_set_to_the_update_time_and_cannot_be_forged(
    db: Conn, chat: tuple[uuid.UUID, uuid.UUID]
) -> None:
    user, chat_id = chat
    request = insert_message(db, user, chat_id, content="a note", message_type="text")
    with as_service_role(db):
        row = db.execute(
            "insert into public.messages"
            " (chat_id, role, content, message_type, status, reply_to, created_at, updated_at)"
            " values (%s, 'assistant', 'Generating image...', 'image', 'generating', %s,"
            "         '2000-01-01Z', '2000-01-01Z') returning id",
            (chat_id, request),
        ).fetchone()
    assert row is not None
    reply = row["id"]

    with as_service_role(db):
        updated = db.execute(
            "update public.messages set status = 'complete', image_url = 'file:///x.png',"
            " updated_at = '2001-01-01Z' where id = %s"
            " returning updated_at = now() as touched, created_at = '2000-01-01Z' as kept",
            (reply,),
        ).fetchone()

    assert updated == {"touched": True, "kept": True}
