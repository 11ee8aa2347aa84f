"""Shortcuts for tests that need image requests in the database."""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg

from tests.support.pg import as_user, create_user


def new_chat(
    conn: psycopg.Connection[Any], user_id: uuid.UUID | None = None
) -> tuple[uuid.UUID, uuid.UUID]:
    """(user_id, chat_id) for a fresh user with one chat."""
    user_id = user_id or create_user(conn)
    with as_user(conn, user_id):
        row = conn.execute("insert into public.chats (title) values ('t') returning id").fetchone()
    assert row is not None
    return user_id, _id(row)


def insert_request(
    conn: psycopg.Connection[Any],
    user_id: uuid.UUID,
    chat_id: uuid.UUID,
    prompt: str = "a red fox in the snow",
    options: dict[str, Any] | None = None,
) -> uuid.UUID:
    """Insert an image request as the frontend does (authenticated, through RLS)."""
    with as_user(conn, user_id):
        row = conn.execute(
            "insert into public.messages (chat_id, role, content, message_type, options)"
            " values (%s, 'user', %s, 'image', %s::jsonb) returning id",
            (chat_id, prompt, json.dumps(options or {})),
        ).fetchone()
    assert row is not None
    return _id(row)


def reply_of(conn: psycopg.Connection[Any], request_id: uuid.UUID) -> list[dict[str, Any]]:
    """All assistant replies to a request (the contract says there is at most one)."""
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(
        "select * from public.messages where reply_to = %s", (request_id,)
    ).fetchall()


def job_of(conn: psycopg.Connection[Any], request_id: uuid.UUID) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute(
        "select * from image_queue.jobs where request_id = %s", (request_id,)
    ).fetchone()


def _id(row: Any) -> uuid.UUID:
    value = row["id"] if isinstance(row, dict) else row[0]
    assert isinstance(value, uuid.UUID)
    return value
