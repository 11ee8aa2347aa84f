"""The image bucket and its read policy, on a database that has Supabase Storage's schema.

The storage schema here is a stand-in with the columns and the ``storage.foldername`` function
the policy uses, copied from Supabase's storage migrations; real Storage has much more.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from listener.migrate import apply_migrations
from tests.support.pg import PostgresServer, as_user, connect, create_user
from tests.support.storage_schema import STORAGE_SCHEMA


@pytest.fixture
def storage_db(pg_server: PostgresServer) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    name = pg_server.empty()
    try:
        with connect(pg_server.dsn(name)) as conn:
            conn.execute(STORAGE_SCHEMA)
        apply_migrations(pg_server.dsn(name))
        with connect(pg_server.dsn(name)) as conn:
            yield conn
    finally:
        pg_server.drop(name)


def test_private_bucket_is_created(storage_db: psycopg.Connection[dict[str, Any]]) -> None:
    row = storage_db.execute("select public from storage.buckets where id = 'generated-images'")
    assert row.fetchone() == {"public": False}


def test_chat_owner_reads_only_their_own_images(
    storage_db: psycopg.Connection[dict[str, Any]],
) -> None:
    conn = storage_db
    owners = {}
    for label in ("a", "b"):
        user = create_user(conn)
        with as_user(conn, user):
            chat = conn.execute("insert into public.chats (title) values ('t') returning id")
            chat_id = chat.fetchone()["id"]  # type: ignore[index]
        owners[label] = (user, chat_id)
        conn.execute(
            "insert into storage.objects (bucket_id, name) values ('generated-images', %s)",
            (f"{user}/{chat_id}/req-{label}.png",),
        )
    user_a, chat_a = owners["a"]
    user_b, _ = owners["b"]
    # An object under A's user folder but a chat A does not own, and one in another bucket.
    conn.execute("insert into storage.buckets (id, name) values ('other', 'other')")
    conn.execute(
        "insert into storage.objects (bucket_id, name) values"
        " ('generated-images', %s), ('other', %s), ('generated-images', 'malformed')",
        (f"{user_a}/{owners['b'][1]}/stolen.png", f"{user_a}/{chat_a}/elsewhere.png"),
    )
    with as_user(conn, user_a):
        seen = [r["name"] for r in conn.execute("select name from storage.objects").fetchall()]
    assert seen == [f"{user_a}/{chat_a}/req-a.png"]
    with as_user(conn, user_b):
        seen_b = [r["name"] for r in conn.execute("select name from storage.objects").fetchall()]
    assert len(seen_b) == 1
    assert seen_b[0].startswith(str(user_b))
    with as_user(conn, None):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select name from storage.objects")
