"""Who may see and do what, checked as PostgREST runs requests: row-level security on chats and
messages, table grants, and the queue being reachable by the service role only."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from listener.migrate import apply_migrations
from tests.support.pg import PostgresServer, as_service_role, as_user, connect, create_user

Conn = psycopg.Connection[dict[str, Any]]

INSUFFICIENT_PRIVILEGE = "42501"
RLS_VIOLATION = "new row violates row-level security policy"


@dataclass(frozen=True)
class World:
    """Users A and B, each with a chat and an image request; A's request has a reply."""

    a: uuid.UUID
    b: uuid.UUID
    chat_a: uuid.UUID
    chat_b: uuid.UUID
    request_a: uuid.UUID
    request_b: uuid.UUID
    reply_a: uuid.UUID


def _one_id(conn: Conn, sql: str, params: tuple[Any, ...] = ()) -> uuid.UUID:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    value = row["id"]
    assert isinstance(value, uuid.UUID)
    return value


def _new_chat(db: Conn, user: uuid.UUID) -> uuid.UUID:
    with as_user(db, user):
        return _one_id(db, "insert into public.chats (title) values ('mine') returning id")


def _new_request(db: Conn, user: uuid.UUID, chat: uuid.UUID) -> uuid.UUID:
    with as_user(db, user):
        return _one_id(
            db,
            "insert into public.messages (chat_id, role, content, message_type)"
            " values (%s, 'user', 'a red fox', 'image') returning id",
            (chat,),
        )


def _build_world(db: Conn) -> World:
    a, b = create_user(db), create_user(db)
    chat_a, chat_b = _new_chat(db, a), _new_chat(db, b)
    request_a, request_b = _new_request(db, a, chat_a), _new_request(db, b, chat_b)
    with as_service_role(db):
        # the reply the insert created ('queued'), as a claim leaves it
        reply_a = _one_id(
            db,
            "update public.messages set status = 'generating', content = 'Generating image...'"
            " where reply_to = %s returning id",
            (request_a,),
        )
    return World(a, b, chat_a, chat_b, request_a, request_b, reply_a)


@pytest.fixture
def world(db: Conn) -> World:
    """A world in the test's own database, for tests that change it."""
    return _build_world(db)


@pytest.fixture(scope="module")
def shared_world(shared_db: Conn) -> World:
    return _build_world(shared_db)


def _ids(conn: Conn, sql: str, params: tuple[Any, ...] = ()) -> set[uuid.UUID]:
    return {row["id"] for row in conn.execute(sql, params).fetchall()}


def _exists(db: Conn, message_id: uuid.UUID) -> bool:
    row = db.execute("select count(*) as n from public.messages where id = %s", (message_id,))
    return row.fetchone() == {"n": 1}


def test_a_sees_exactly_their_own_chats_and_messages(shared_db: Conn, shared_world: World) -> None:
    with as_user(shared_db, shared_world.a):
        chats = _ids(shared_db, "select id from public.chats")
        messages = _ids(shared_db, "select id from public.messages")
    assert chats == {shared_world.chat_a}
    assert messages == {shared_world.request_a, shared_world.reply_a}


@pytest.mark.parametrize(
    ("sql", "target"),
    [
        ("select id from public.chats where id = %s", "chat_a"),
        ("select id from public.chats where user_id = %s", "a"),
        ("select id from public.messages where chat_id = %s", "chat_a"),
        ("select id from public.messages where id = %s", "request_a"),
        ("select id from public.messages where reply_to = %s", "request_a"),
    ],
)
def test_b_cannot_see_a_rows_even_by_id(
    shared_db: Conn, shared_world: World, sql: str, target: str
) -> None:
    param = getattr(shared_world, target)
    assert _ids(shared_db, sql, (param,)), "the row must exist for the check to mean anything"
    with as_user(shared_db, shared_world.b):
        assert _ids(shared_db, sql, (param,)) == set()


def test_b_cannot_insert_into_a_chat(shared_db: Conn, shared_world: World) -> None:
    """Refused as if A's chat did not exist: B learns nothing about it."""
    with (
        pytest.raises(
            psycopg.errors.CheckViolation, match=f"^chat {shared_world.chat_a} not found\n"
        ),
        as_user(shared_db, shared_world.b),
    ):
        shared_db.execute(
            "insert into public.messages (chat_id, role, content, message_type)"
            " values (%s, 'user', 'planted by B', 'image')",
            (shared_world.chat_a,),
        )
    in_chat_a = _ids(
        shared_db, "select id from public.messages where chat_id = %s", (shared_world.chat_a,)
    )
    assert in_chat_a == {shared_world.request_a, shared_world.reply_a}


def test_chat_user_id_defaults_to_the_signed_in_user(db: Conn, world: World) -> None:
    with as_user(db, world.b):
        row = db.execute("insert into public.chats default values returning user_id").fetchone()
    assert row == {"user_id": world.b}


def test_a_cannot_create_a_chat_owned_by_b(shared_db: Conn, shared_world: World) -> None:
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege, match=RLS_VIOLATION),
        as_user(shared_db, shared_world.a),
    ):
        shared_db.execute("insert into public.chats (user_id) values (%s)", (shared_world.b,))
    assert _ids(shared_db, "select id from public.chats where user_id = %s", (shared_world.b,)) == {
        shared_world.chat_b
    }


def test_a_cannot_give_their_chat_to_b(db: Conn, world: World) -> None:
    """Only the title of a chat is updatable by its owner."""
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"),
        as_user(db, world.a),
    ):
        db.execute("update public.chats set user_id = %s where id = %s", (world.b, world.chat_a))
    with as_user(db, world.a):
        renamed = db.execute(
            "update public.chats set title = 'renamed' where id = %s", (world.chat_a,)
        )
        assert renamed.rowcount == 1
    with as_user(db, world.b):
        hijacked = db.execute(
            "update public.chats set title = 'mine now' where id = %s", (world.chat_a,)
        )
        assert hijacked.rowcount == 0


FORGED_ROWS = [
    pytest.param({"role": "assistant"}, id="role-assistant"),
    pytest.param({"role": "system"}, id="role-system"),
    pytest.param({"image_url": "https://evil.example/x.png"}, id="image-url"),
    pytest.param({"status": "complete"}, id="status"),
    pytest.param({"error": "fake failure"}, id="error"),
    pytest.param({"metadata": '{"model": "forged"}'}, id="metadata"),
    pytest.param({"role": "assistant", "status": "complete", "reply_to": "request_a"}, id="reply"),
    pytest.param(
        {
            "role": "assistant",
            "status": "complete",
            "image_url": "https://evil.example/x.png",
            "reply_to": "request_b",
        },
        id="reply-to-someone-elses-request",
    ),
]


@pytest.mark.parametrize("forged", FORGED_ROWS)
def test_a_cannot_insert_anything_but_a_plain_user_message(
    shared_db: Conn, shared_world: World, forged: dict[str, str]
) -> None:
    """Replies, statuses, image URLs and metadata are written by the service role alone."""
    columns = {
        "chat_id": shared_world.chat_a,
        "role": "user",
        "content": "x",
        "message_type": "image",
    }
    for column, value in forged.items():
        columns[column] = getattr(shared_world, value) if column == "reply_to" else value
    names = ", ".join(columns)
    placeholders = ", ".join("%s::jsonb" if c == "metadata" else "%s" for c in columns)
    before = shared_db.execute("select count(*) as n from public.messages").fetchone()

    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege, match=RLS_VIOLATION),
        as_user(shared_db, shared_world.a),
    ):
        shared_db.execute(
            f"insert into public.messages ({names}) values ({placeholders})",
            tuple(columns.values()),
        )

    assert shared_db.execute("select count(*) as n from public.messages").fetchone() == before


@pytest.mark.parametrize(
    ("target", "assignment"),
    [
        ("request_a", "content = 'edited prompt'"),
        ("request_a", 'options = \'{"size": "auto"}\''),
        ("reply_a", "status = 'complete', image_url = 'https://evil.example/x.png'"),
        ("reply_a", "content = 'edited reply'"),
    ],
)
def test_a_cannot_update_messages_at_all(
    shared_db: Conn, shared_world: World, target: str, assignment: str
) -> None:
    """No UPDATE grant at all: neither the request nor the reply in A's own chat can be edited."""
    message_id = getattr(shared_world, target)
    read = "select * from public.messages where id = %s"
    before = shared_db.execute(read, (message_id,)).fetchone()

    with (
        pytest.raises(
            psycopg.errors.InsufficientPrivilege, match="permission denied for table messages"
        ),
        as_user(shared_db, shared_world.a),
    ):
        shared_db.execute(f"update public.messages set {assignment} where id = %s", (message_id,))

    assert before is not None
    assert shared_db.execute(read, (message_id,)).fetchone() == before


def test_a_deleting_their_request_cancels_it_with_its_job_and_reply(db: Conn, world: World) -> None:
    def leftovers() -> dict[str, Any] | None:
        return db.execute(
            "select (select count(*) from image_queue.jobs where request_id = %(r)s) as jobs,"
            " (select count(*) from public.messages where id = %(r)s or reply_to = %(r)s) as rows",
            {"r": world.request_a},
        ).fetchone()

    assert leftovers() == {"jobs": 1, "rows": 2}

    with as_user(db, world.a):
        deleted = db.execute("delete from public.messages where id = %s", (world.request_a,))
        assert deleted.rowcount == 1

    assert leftovers() == {"jobs": 0, "rows": 0}
    assert _exists(db, world.request_b)


@pytest.mark.parametrize(
    ("table", "target"),
    [("messages", "request_a"), ("messages", "reply_a"), ("chats", "chat_a")],
)
def test_b_cannot_delete_a_rows(
    shared_db: Conn, shared_world: World, table: str, target: str
) -> None:
    row_id = getattr(shared_world, target)
    with as_user(shared_db, shared_world.b):
        deleted = shared_db.execute(f"delete from public.{table} where id = %s", (row_id,))
        assert deleted.rowcount == 0
    assert _ids(shared_db, f"select id from public.{table} where id = %s", (row_id,)) == {row_id}


def test_a_cannot_delete_the_assistant_reply_directly(shared_db: Conn, shared_world: World) -> None:
    with as_user(shared_db, shared_world.a):
        deleted = shared_db.execute(
            "delete from public.messages where id = %s", (shared_world.reply_a,)
        )
        assert deleted.rowcount == 0
    assert _exists(shared_db, shared_world.reply_a)


@pytest.mark.parametrize(
    ("sql", "table"),
    [
        ("select * from public.chats", "chats"),
        ("select * from public.messages", "messages"),
        ("insert into public.chats (user_id) values (%(a)s)", "chats"),
        (
            "insert into public.messages (chat_id, role, content, message_type)"
            " values (%(chat_a)s, 'user', 'anonymous', 'image')",
            "messages",
        ),
        ("delete from public.messages where id = %(request_a)s", "messages"),
    ],
)
def test_anon_can_neither_read_nor_write_chats_or_messages(
    shared_db: Conn, shared_world: World, sql: str, table: str
) -> None:
    params = {
        "a": shared_world.a,
        "chat_a": shared_world.chat_a,
        "request_a": shared_world.request_a,
    }
    with (
        pytest.raises(
            psycopg.errors.InsufficientPrivilege, match=f"permission denied for table {table}"
        ),
        as_user(shared_db, None),
    ):
        shared_db.execute(sql, params)


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_client_roles_cannot_read_the_job_table(
    shared_db: Conn, shared_world: World, role: str
) -> None:
    user = None if role == "anon" else shared_world.a
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as raised, as_user(shared_db, user):
        shared_db.execute("select * from image_queue.jobs")
    assert raised.value.sqlstate == INSUFFICIENT_PRIVILEGE
    assert "permission denied" in (raised.value.diag.message_primary or "")
    privileges = shared_db.execute(
        "select has_schema_privilege(%(r)s, 'image_queue', 'usage') as usage,"
        " has_table_privilege(%(r)s, 'image_queue.jobs', 'select, insert, update, delete')"
        " as table_access",
        {"r": role},
    ).fetchone()
    assert privileges == {"usage": False, "table_access": False}


QUEUE_FUNCTIONS = [
    pytest.param(
        "public.image_jobs_claim(text, integer, double precision, integer)",
        "select * from public.image_jobs_claim('w', 1, 30, 3)",
        id="claim",
    ),
    pytest.param(
        "public.image_jobs_extend(text, uuid[], integer[], double precision)",
        "select * from public.image_jobs_extend('w', array[]::uuid[], array[]::integer[], 30)",
        id="extend",
    ),
    pytest.param(
        "public.image_jobs_complete(uuid, text, integer, text, jsonb)",
        "select public.image_jobs_complete(gen_random_uuid(), 'w', 1, 'file:///x.png', '{}')",
        id="complete",
    ),
    pytest.param(
        "public.image_jobs_fail(uuid, text, integer, text, text, double precision, jsonb)",
        "select public.image_jobs_fail(gen_random_uuid(), 'w', 1, 'e', 'd', null, '{}')",
        id="fail",
    ),
    pytest.param(
        "public.image_jobs_release(uuid, text, integer)",
        "select public.image_jobs_release(gen_random_uuid(), 'w', 1)",
        id="release",
    ),
    pytest.param("public.image_jobs_next_due()", "select public.image_jobs_next_due()", id="due"),
]


@pytest.mark.parametrize("role", ["anon", "authenticated"])
@pytest.mark.parametrize(("signature", "call"), QUEUE_FUNCTIONS)
def test_client_roles_cannot_execute_queue_functions(
    shared_db: Conn, shared_world: World, role: str, signature: str, call: str
) -> None:
    granted = shared_db.execute(
        "select has_function_privilege(%s, %s, 'execute') as granted", (role, signature)
    ).fetchone()
    assert granted == {"granted": False}

    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege) as raised,
        as_user(shared_db, None if role == "anon" else shared_world.a),
    ):
        shared_db.execute(call)
    assert raised.value.sqlstate == INSUFFICIENT_PRIVILEGE
    assert "permission denied for function image_jobs_" in (raised.value.diag.message_primary or "")


@pytest.mark.parametrize(("signature", "call"), QUEUE_FUNCTIONS)
def test_service_role_can_execute_queue_functions(
    db: Conn, world: World, signature: str, call: str
) -> None:
    granted = db.execute(
        "select has_function_privilege('service_role', %s, 'execute') as granted", (signature,)
    ).fetchone()
    assert granted == {"granted": True}
    with as_service_role(db):
        db.execute(call).fetchall()


def test_client_roles_cannot_log_in_and_only_service_role_bypasses_rls(shared_db: Conn) -> None:
    roles = shared_db.execute(
        "select rolname, rolcanlogin, rolsuper, rolbypassrls from pg_roles"
        " where rolname in ('anon', 'authenticated', 'service_role') order by rolname"
    ).fetchall()
    assert [(r["rolname"], r["rolcanlogin"], r["rolsuper"], r["rolbypassrls"]) for r in roles] == [
        ("anon", False, False, False),
        ("authenticated", False, False, False),
        ("service_role", False, False, True),
    ]


def test_service_role_reads_every_message_past_rls(shared_db: Conn, shared_world: World) -> None:
    with as_service_role(shared_db):
        seen = _ids(shared_db, "select id from public.messages")
    reply_b = shared_db.execute(
        "select id from public.messages where reply_to = %s", (shared_world.request_b,)
    ).fetchone()
    assert reply_b is not None  # B's request is queued: its reply exists from the insert
    assert seen == {
        shared_world.request_a,
        shared_world.reply_a,
        shared_world.request_b,
        reply_b["id"],
    }


_CLIENT_EXECUTABLE = """
select p.oid::regprocedure::text as function, r.role
from pg_proc p
cross join (values ('anon'), ('authenticated')) as r (role)
where p.pronamespace in ('public'::regnamespace, 'image_queue'::regnamespace)
  and has_function_privilege(r.role, p.oid, 'execute')
order by 1, 2
"""


@pytest.fixture
def supabase_defaults_url(pg_server: PostgresServer) -> Iterator[str]:
    """An empty database with Supabase's default privileges, then migrated."""
    name = pg_server.empty()
    url = pg_server.dsn(name)
    try:
        with connect(url) as conn:
            # Roles are cluster-wide: the session template already created them.
            conn.execute(
                "alter default privileges in schema public"
                " grant all on tables to anon, authenticated, service_role;"
                "alter default privileges in schema public"
                " grant all on functions to anon, authenticated, service_role;"
                "alter default privileges in schema public"
                " grant all on sequences to anon, authenticated, service_role;"
            )
        apply_migrations(url)
        yield url
    finally:
        pg_server.drop(name)


def test_client_roles_can_execute_no_function_except_the_policy_helper(shared_db: Conn) -> None:
    """Lists every function in public and image_queue, so a new one cannot slip through: the
    policy helper, and a signed-in user's view of their own quota."""
    assert shared_db.execute(_CLIENT_EXECUTABLE).fetchall() == [
        {"function": "image_request_position(uuid)", "role": "authenticated"},
        {"function": "is_chat_owner(uuid)", "role": "authenticated"},
        {"function": "my_image_quota()", "role": "authenticated"},
    ]


def test_supabase_default_privileges_do_not_open_functions_or_tables_to_clients(
    supabase_defaults_url: str,
) -> None:
    """Supabase grants anon and authenticated everything new in public; the migrations revoke."""
    with connect(supabase_defaults_url) as conn:
        executable = conn.execute(_CLIENT_EXECUTABLE).fetchall()
        tables = conn.execute(
            "select r.role, t.name,"
            " array(select p from unnest(array['select', 'insert', 'update', 'delete',"
            "   'truncate', 'references', 'trigger']) as p"
            "   where has_table_privilege(r.role, t.name, p)) as privileges"
            " from (values ('anon'), ('authenticated')) as r (role)"
            " cross join (values ('public.chats'), ('public.messages')) as t (name)"
            " order by 1, 2"
        ).fetchall()
        updatable_chat_columns = conn.execute(
            "select array_agg(attname::text order by attname) as columns from pg_attribute"
            " where attrelid = 'public.chats'::regclass and attnum > 0 and not attisdropped"
            "   and has_column_privilege('authenticated', attrelid, attnum, 'update')"
        ).fetchone()
    assert executable == [
        {"function": "image_request_position(uuid)", "role": "authenticated"},
        {"function": "is_chat_owner(uuid)", "role": "authenticated"},
        {"function": "my_image_quota()", "role": "authenticated"},
    ]
    assert tables == [
        {"role": "anon", "name": "public.chats", "privileges": []},
        {"role": "anon", "name": "public.messages", "privileges": []},
        {
            "role": "authenticated",
            "name": "public.chats",
            "privileges": ["select", "insert", "delete"],
        },
        {
            "role": "authenticated",
            "name": "public.messages",
            "privileges": ["select", "insert", "delete"],
        },
    ]
    assert updatable_chat_columns == {"columns": ["title"]}


def test_every_function_is_security_invoker_or_pins_a_safe_search_path(shared_db: Conn) -> None:
    """A SECURITY DEFINER function resolving names through a writable schema can be hijacked."""
    functions = shared_db.execute(
        "select p.oid::regprocedure::text as function, p.prosecdef as definer,"
        " (select c from unnest(p.proconfig) as c where c like 'search_path=%%') as search_path"
        " from pg_proc p"
        " where p.pronamespace in ('public'::regnamespace, 'image_queue'::regnamespace)"
        " order by 1"
    ).fetchall()
    names = {f["function"].split("(")[0] for f in functions}
    assert {"image_jobs_claim", "image_queue.enqueue_image_request", "is_chat_owner"} <= names

    unsafe = [
        f
        for f in functions
        if f["definer"]
        and (
            f["search_path"] is None or "public" in f["search_path"] or "$user" in f["search_path"]
        )
    ]
    assert unsafe == []
