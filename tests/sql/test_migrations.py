"""The migration runner on real, initially empty databases: order, history, idempotence, the
advisory lock, and living next to the objects a Supabase project already has."""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from listener.migrate import (
    MIGRATIONS_DIR,
    Migration,
    MigrationError,
    apply_migrations,
    discover,
    pending,
)
from tests.support.pg import PostgresServer, as_user, connect, create_user

MIGRATIONS = discover()
SUPABASE_FILE_NAME = re.compile(r"^(\d{14})_[a-z0-9_]+\.sql$")


@pytest.fixture
def empty_url(pg_server: PostgresServer) -> Iterator[str]:
    """A database with nothing in it (not even the migration history)."""
    name = pg_server.empty()
    try:
        yield pg_server.dsn(name)
    finally:
        pg_server.drop(name)


def _ids(migrations: list[Migration]) -> list[tuple[str, str]]:
    return [(m.version, m.name) for m in migrations]


def _history(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "select version, name from supabase_migrations.schema_migrations order by version"
        ).fetchall()
    return [(str(version), str(name)) for version, name in rows]


def _copy_migrations(target: Path, migrations: list[Migration]) -> Path:
    target.mkdir()
    for m in migrations:
        shutil.copy(MIGRATIONS_DIR / f"{m.version}_{m.name}.sql", target)
    return target


def test_there_are_migrations_to_test() -> None:
    """Guards the other tests here against passing vacuously on an empty migrations/."""
    assert len(MIGRATIONS) >= 3


def test_every_migration_applies_to_an_empty_database_in_order_and_is_recorded(
    empty_url: str,
) -> None:
    applied = apply_migrations(empty_url)

    assert _ids(applied) == _ids(MIGRATIONS)
    assert [m.version for m in applied] == sorted(m.version for m in applied)
    assert _history(empty_url) == _ids(MIGRATIONS)
    with connect(empty_url) as conn:
        row = conn.execute(
            "select to_regclass('public.chats') is not null as chats,"
            " to_regclass('public.messages') is not null as messages,"
            " to_regclass('image_queue.jobs') is not null as jobs,"
            " to_regprocedure('public.image_jobs_claim(text, integer, double precision, integer)')"
            " is not null as claim"
        ).fetchone()
    assert row == {"chats": True, "messages": True, "jobs": True, "claim": True}


def test_second_apply_applies_nothing_and_leaves_history_unchanged(empty_url: str) -> None:
    apply_migrations(empty_url)
    before = _history(empty_url)

    assert apply_migrations(empty_url) == []
    assert _history(empty_url) == before == _ids(MIGRATIONS)


def test_concurrent_migrators_all_succeed_and_apply_each_migration_exactly_once(
    empty_url: str,
) -> None:
    """Several replicas starting at once: the advisory lock lets one migrate, the rest see it done.

    Without the lock the racing `create schema` / `create table` statements collide."""
    workers = 4
    start = threading.Barrier(workers)

    def migrate() -> list[Migration]:
        start.wait(timeout=10)
        return apply_migrations(empty_url)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(migrate) for _ in range(workers)]
        results = [f.result(timeout=30) for f in futures]

    applied = sorted(m.version for result in results for m in result)
    assert applied == [m.version for m in MIGRATIONS]
    assert _history(empty_url) == _ids(MIGRATIONS)


SUPABASE_AUTH_SETUP = """
create schema auth;
create table auth.users (
  instance_id uuid,
  id uuid primary key,
  aud varchar(255),
  role varchar(255),
  email varchar(255),
  raw_user_meta_data jsonb,
  is_anonymous boolean not null default false,
  created_at timestamptz
);
create function auth.uid() returns uuid language sql stable as $$
  -- supabase-original-uid
  select coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
$$;
comment on function auth.uid() is 'Deprecated. Use auth.jwt() -> ''sub'' instead.';
create function auth.role() returns text language sql stable as $$
  -- supabase-original-role
  select nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role'
$$;
create function auth.jwt() returns jsonb language sql stable as $$
  -- supabase-original-jwt
  select nullif(current_setting('request.jwt.claims', true), '')::jsonb
$$;
"""

_AUTH_STATE = """
select
  (select array_agg(p.oid::regprocedure::text || ' ' || p.prosrc
                    || ' ' || coalesce(obj_description(p.oid, 'pg_proc'), '') order by p.proname)
   from pg_proc p where p.pronamespace = 'auth'::regnamespace) as functions,
  (select array_agg(a.attname::text order by a.attnum) from pg_attribute a
   where a.attrelid = 'auth.users'::regclass and a.attnum > 0 and not a.attisdropped) as columns,
  'auth.users'::regclass::oid as users_oid,
  (select array_agg(r.oid || ':' || r.rolname || ':' || r.rolbypassrls order by r.rolname)
   from pg_roles r where r.rolname in ('anon', 'authenticated', 'service_role')) as roles
"""


def test_existing_supabase_roles_auth_schema_users_and_functions_are_kept(
    empty_url: str,
) -> None:
    """On a Supabase project GoTrue owns auth.*: the migrations must use it, never replace it.

    The roles are cluster-wide and already exist here (the template created them), so this also
    shows that an existing role is neither recreated nor altered."""
    with connect(empty_url) as conn:
        conn.execute(SUPABASE_AUTH_SETUP)
        before = conn.execute(_AUTH_STATE).fetchone()
    assert before is not None
    assert len(before["functions"]) == 3
    assert len(before["roles"]) == 3

    apply_migrations(empty_url)

    with connect(empty_url) as conn:
        after = conn.execute(_AUTH_STATE).fetchone()
        assert after == before
        assert after is not None
        assert "is_anonymous" in after["columns"]
        assert any("supabase-original-uid" in f for f in after["functions"])
        # The contract works on top of Supabase's own auth.uid() and auth.users.
        user = create_user(conn)
        with as_user(conn, user):
            chat = conn.execute("insert into public.chats default values returning user_id")
            assert chat.fetchone() == {"user_id": user}


def test_migration_files_are_named_as_the_supabase_cli_expects() -> None:
    files = sorted(p.name for p in MIGRATIONS_DIR.iterdir() if p.is_file())
    assert files, "no migration files"
    for name in files:
        match = SUPABASE_FILE_NAME.match(name)
        assert match, f"{name} is not YYYYMMDDHHMMSS_name.sql"
        datetime.strptime(match[1], "%Y%m%d%H%M%S")  # a real timestamp, not 14 random digits
    assert [f"{m.version}_{m.name}.sql" for m in MIGRATIONS] == files


@pytest.mark.parametrize(
    "file_name",
    [
        "2026_init.sql",
        "20261127080000-init.sql",
        "20261127080000_Init.sql",
        "20261127080000_init.SQL.sql",
        "init.sql",
    ],
)
def test_discover_rejects_a_file_name_the_supabase_cli_would_not_accept(
    tmp_path: Path, file_name: str
) -> None:
    (tmp_path / file_name).write_text("select 1;\n")
    with pytest.raises(MigrationError, match=r"YYYYMMDDHHMMSS_name\.sql"):
        discover(tmp_path)


def test_messages_join_an_existing_supabase_realtime_publication(empty_url: str) -> None:
    with connect(empty_url) as conn:
        conn.execute("create publication supabase_realtime")

    apply_migrations(empty_url)

    with connect(empty_url) as conn:
        published = conn.execute(
            "select schemaname, tablename from pg_publication_tables"
            " where pubname = 'supabase_realtime'"
        ).fetchall()
    assert {"schemaname": "public", "tablename": "messages"} in published


def test_without_a_supabase_realtime_publication_migrating_creates_none(empty_url: str) -> None:
    apply_migrations(empty_url)

    with connect(empty_url) as conn:
        assert conn.execute("select pubname from pg_publication").fetchall() == []


def test_a_for_all_tables_realtime_publication_is_accepted_as_it_is(empty_url: str) -> None:
    """`alter publication ... add table` would fail on a FOR ALL TABLES publication."""
    with connect(empty_url) as conn:
        conn.execute("create publication supabase_realtime for all tables")

    apply_migrations(empty_url)

    with connect(empty_url) as conn:
        row = conn.execute(
            "select p.puballtables, exists (select 1 from pg_publication_tables t"
            "  where t.pubname = p.pubname and t.tablename = 'messages') as has_messages"
            " from pg_publication p where p.pubname = 'supabase_realtime'"
        ).fetchone()
    assert row == {"puballtables": True, "has_messages": True}


def test_pending_lists_exactly_the_migrations_not_applied(empty_url: str, tmp_path: Path) -> None:
    def pending_ids() -> list[tuple[str, str]]:
        # daemon.check_migrated calls pending() with a plain (tuple-row) connection.
        with psycopg.connect(empty_url) as conn:
            return _ids(pending(conn))  # type: ignore[arg-type]

    assert pending_ids() == _ids(MIGRATIONS)  # not even the history table exists yet

    apply_migrations(empty_url, _copy_migrations(tmp_path / "first", MIGRATIONS[:1]))
    assert pending_ids() == _ids(MIGRATIONS[1:])

    apply_migrations(empty_url)
    assert pending_ids() == []


def test_a_failing_migration_is_rolled_back_and_not_recorded(
    empty_url: str, tmp_path: Path
) -> None:
    directory = _copy_migrations(tmp_path / "migrations", MIGRATIONS)
    (directory / "20991231235959_broken.sql").write_text(
        "create table public.half_done (id integer);\nselect 1 / 0;\n"
    )

    with pytest.raises(MigrationError, match="20991231235959_broken"):
        apply_migrations(empty_url, directory)

    assert _history(empty_url) == _ids(MIGRATIONS)
    with connect(empty_url) as conn:
        row: dict[str, Any] | None = conn.execute(
            "select to_regclass('public.half_done') as t"
        ).fetchone()
    assert row == {"t": None}
