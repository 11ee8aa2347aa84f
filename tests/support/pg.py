"""Test helpers for the real PostgreSQL: a server (embedded via pgserver unless DATABASE_URL is
set), a migrated template database, and one fresh clone of it per test.

A clone per test rather than a rolled-back transaction: NOTIFY is delivered only on commit, and
the daemon under test uses its own connections, so tests must commit for real.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from listener.migrate import apply_migrations, discover

TEMPLATE_DB = f"image_listener_template_{os.getpid()}"
_counter = itertools.count()


class PostgresServer:
    """A running server plus the admin conninfo used to create and drop test databases."""

    def __init__(self) -> None:
        self._embedded: Any = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        external = os.environ.get("DATABASE_URL")
        if external:
            self.admin_dsn = external
        else:
            import pgserver

            self._tmp = tempfile.TemporaryDirectory(prefix="il-pg-")
            self._embedded = pgserver.get_server(Path(self._tmp.name) / "data", cleanup_mode="stop")
            self.admin_dsn = self._embedded.get_uri()

    def dsn(self, dbname: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=dbname)

    def create_template(self) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{TEMPLATE_DB}"')
            conn.execute(f'create database "{TEMPLATE_DB}"')
        apply_migrations(self.dsn(TEMPLATE_DB))

    def clone(self) -> str:
        name = f"il_test_{os.getpid()}_{next(_counter)}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'create database "{name}" template "{TEMPLATE_DB}"')
        return name

    def empty(self) -> str:
        name = f"il_empty_{os.getpid()}_{next(_counter)}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        return name

    @contextmanager
    def migrated_before(self, version: str, scratch: Path) -> Iterator[str]:
        """The DSN of a fresh database migrated by the release before ``version`` (every
        migration older than it, copied into ``scratch``); dropped after. An upgrade test
        applies the rest with ``apply_migrations(dsn)``."""
        earlier = scratch / f"migrations-before-{version}"
        earlier.mkdir()
        for migration in discover():
            if migration.version < version:
                (earlier / f"{migration.version}_{migration.name}.sql").write_text(migration.sql)
        name = self.empty()
        try:
            apply_migrations(self.dsn(name), earlier)
            yield self.dsn(name)
        finally:
            self.drop(name)

    def drop(self, name: str) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')

    def close(self) -> None:
        try:
            with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
                conn.execute(f'drop database if exists "{TEMPLATE_DB}" with (force)')
        finally:
            if self._embedded is not None:
                self._embedded.cleanup()
            if self._tmp is not None:
                self._tmp.cleanup()

    @property
    def host(self) -> str | None:
        return conninfo_to_dict(self.admin_dsn).get("host")  # type: ignore[return-value]


def create_user(conn: psycopg.Connection[Any], email: str | None = None) -> uuid.UUID:
    """A row in auth.users, as GoTrue would create on sign-up."""
    user_id = uuid.uuid4()
    conn.execute(
        "insert into auth.users (id, email) values (%s, %s)",
        (user_id, email or f"{user_id}@example.test"),
    )
    return user_id


@contextmanager
def as_user(conn: psycopg.Connection[Any], user_id: uuid.UUID | None) -> Iterator[None]:
    """Run statements the way PostgREST does for a request: role + JWT claims, in a transaction.

    ``user_id=None`` acts as ``anon``. The transaction commits on success (so NOTIFY fires).
    """
    role = "anon" if user_id is None else "authenticated"
    claims = {"role": role} if user_id is None else {"sub": str(user_id), "role": role}
    with conn.transaction():
        conn.execute(f"set local role {role}")
        conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        yield


@contextmanager
def as_service_role(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Statements as PostgREST runs them for the service-role key."""
    with conn.transaction():
        conn.execute("set local role service_role")
        conn.execute(
            "select set_config('request.jwt.claims', %s, true)",
            (json.dumps({"role": "service_role"}),),
        )
        yield


def connect(dsn: str) -> psycopg.Connection[dict[str, Any]]:
    return psycopg.connect(dsn, autocommit=True, row_factory=dict_row)
