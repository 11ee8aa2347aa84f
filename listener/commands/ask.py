"""``image-listener ask``: insert a request exactly as a frontend would, and wait for the reply.

The insert runs as the ``authenticated`` role with JWT claims set the way PostgREST sets them,
so it passes through the same RLS policies and validation as a real frontend's insert.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

from core.errors import DatabaseUnavailable, InvalidRequest, OperatorError, first_line

DEFAULT_EMAIL = "ask@image-listener.local"
#: the SQLSTATE of a request refused by a per-user limit (migrations/…_limits_and_prices.sql)
LIMIT_REACHED = "IL429"


@dataclass(frozen=True)
class Reply:
    """The assistant reply as the frontend would see it."""

    request_id: UUID
    id: UUID
    status: str
    image_url: str | None
    error: str | None
    content: str
    metadata: Mapping[str, Any]


def ensure_user(conninfo: str, email: str) -> UUID:
    """The id of the user ``email`` (created as sign-up would, if needed)."""
    try:
        with psycopg.connect(conninfo, row_factory=dict_row, prepare_threshold=None) as conn:
            user = conn.execute(
                "insert into auth.users (email) values (%s) on conflict (email) do update"
                " set email = excluded.email returning id",
                (email,),
            ).fetchone()
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot reach the database: {first_line(exc)}") from exc
    assert user is not None
    user_id: UUID = user["id"]
    return user_id


def put_inputs(input_dir: Path, user: UUID, files: Sequence[Path]) -> list[str]:
    """Copy local files into the user's folder of the input directory, as a frontend uploads
    them; their object paths (``<user>/<file name>``), in order."""
    paths = []
    for source in files:
        path = f"{user}/{source.name}"
        target = input_dir / str(user) / source.name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        except OSError as exc:
            raise OperatorError(
                f"cannot copy {source} into {target.parent}: {exc.strerror}"
            ) from exc
        paths.append(path)
    return paths


def submit(conninfo: str, prompt: str, options: Mapping[str, object], email: str) -> UUID:
    """Create the user and chat if needed, then insert the request through RLS."""
    ensure_user(conninfo, email)
    try:
        with psycopg.connect(conninfo, row_factory=dict_row, prepare_threshold=None) as conn:
            user = conn.execute("select id from auth.users where email = %s", (email,)).fetchone()
            assert user is not None
            conn.commit()  # the request's own transaction below, as a frontend's
            with conn.transaction():
                conn.execute("set local role authenticated")
                conn.execute(
                    "select set_config('request.jwt.claims', %s, true)",
                    (json.dumps({"sub": str(user["id"]), "role": "authenticated"}),),
                )
                chat = conn.execute(
                    "select id from public.chats where title = 'image-listener ask'"
                    " order by created_at limit 1"
                ).fetchone()
                if chat is None:
                    chat = conn.execute(
                        "insert into public.chats (title) values ('image-listener ask')"
                        " returning id"
                    ).fetchone()
                assert chat is not None
                row = conn.execute(
                    "insert into public.messages (chat_id, role, content, message_type, options)"
                    " values (%s, 'user', %s, 'image', %s::jsonb) returning id",
                    (chat["id"], prompt, json.dumps(dict(options))),
                ).fetchone()
                assert row is not None
                request_id: UUID = row["id"]
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot reach the database: {first_line(exc)}") from exc
    except psycopg.Error as exc:
        # the contract's refusals: validation (class 23) and the per-user limits (IL429)
        if exc.sqlstate == LIMIT_REACHED or (exc.sqlstate or "").startswith("23"):
            reason = exc.diag.message_primary or "the request was refused"
            raise InvalidRequest(reason, public_message=reason) from exc
        raise
    return request_id


def wait_for_reply(conninfo: str, request_id: UUID, timeout: float) -> Reply | None:
    """Poll until the reply is final (complete or failed); None when ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    try:
        # No server-side prepared statement for the polled query: behind a transaction pooler
        # it would outlive this command on the pooled session and collide with the next ask's.
        with psycopg.connect(
            conninfo, autocommit=True, row_factory=dict_row, prepare_threshold=None
        ) as conn:
            while True:
                row = conn.execute(
                    "select id, status, image_url, error, content, metadata from public.messages"
                    " where reply_to = %s",
                    (request_id,),
                ).fetchone()
                if row is not None and row["status"] in ("complete", "failed"):
                    return Reply(request_id=request_id, **row)
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.05)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot reach the database: {first_line(exc)}") from exc
