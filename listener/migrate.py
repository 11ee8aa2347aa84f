"""Apply migrations/ in order, once each, recording them where the Supabase CLI records its own.

Recording in ``supabase_migrations.schema_migrations`` (version, name, statements) means a project
migrated by ``image-listener migrate`` and one migrated by ``supabase db push`` agree on what is
applied. An advisory lock serialises concurrent migrators (several replicas starting at once).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from core.errors import OperatorError, first_line


def _migrations_dir() -> Path:
    """listener/migrations/ in a wheel install (pyproject.toml ships migrations/ there); the
    repository's migrations/ in a checkout or an editable install."""
    package = Path(__file__).resolve().parent
    shipped = package / "migrations"
    return shipped if shipped.is_dir() else package.parent / "migrations"


MIGRATIONS_DIR = _migrations_dir()
_FILE_NAME = re.compile(r"^(?P<version>\d{14})_(?P<name>[a-z0-9_]+)\.sql$")
# Any constant shared by every migrator of this project; hashtext keeps it readable.
_LOCK_KEY = "image-listener:migrate"

_CREATE_HISTORY = """
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (
  version text primary key,
  statements text[],
  name text
);
"""


class MigrationError(OperatorError):
    """A migration file is malformed or failed to apply."""


@dataclass(frozen=True)
class Migration:
    """One SQL file of migrations/, identified by its 14-digit timestamp version."""

    version: str
    name: str
    sql: str


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Migrations sorted by version; rejects names the Supabase CLI would not accept."""
    if not directory.is_dir():
        raise MigrationError(f"migrations directory not found: {directory}")
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(
                f"migration file name {path.name!r} is not YYYYMMDDHHMMSS_name.sql"
            )
        found.append(Migration(match["version"], match["name"], path.read_text("utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version")
    return found


def applied_versions(conn: psycopg.Connection[Any]) -> set[str]:
    """Versions recorded as applied (empty when the history table does not exist yet)."""
    exists = conn.execute(
        "select to_regclass('supabase_migrations.schema_migrations') is not null"
    ).fetchone()
    if not exists or not exists[0]:
        return set()
    rows = conn.execute("select version from supabase_migrations.schema_migrations").fetchall()
    return {str(row[0]) for row in rows}


def pending(conn: psycopg.Connection[Any], directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Migrations not applied yet on this database."""
    done = applied_versions(conn)
    return [m for m in discover(directory) if m.version not in done]


def apply_migrations(conninfo: str, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Apply every pending migration, each in its own transaction; returns those applied."""
    migrations = discover(directory)
    applied: list[Migration] = []
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("select pg_advisory_lock(hashtext(%s))", (_LOCK_KEY,))
            try:
                conn.execute(_CREATE_HISTORY)
                done = applied_versions(conn)
                for migration in migrations:
                    if migration.version in done:
                        continue
                    _apply_one(conn, migration)
                    applied.append(migration)
            finally:
                conn.execute("select pg_advisory_unlock(hashtext(%s))", (_LOCK_KEY,))
    except psycopg.Error as exc:
        raise MigrationError(f"migration failed: {first_line(exc)}") from exc
    return applied


def _apply_one(conn: psycopg.Connection[Any], migration: Migration) -> None:
    try:
        with conn.transaction():
            conn.execute(migration.sql.encode("utf-8"))
            conn.execute(
                "insert into supabase_migrations.schema_migrations (version, name, statements)"
                " values (%s, %s, %s)",
                (migration.version, migration.name, [migration.sql]),
            )
    except psycopg.Error as exc:
        raise MigrationError(
            f"migration {migration.version}_{migration.name} failed: {first_line(exc)}"
        ) from exc
