"""The embedded default database: a PostgreSQL started through ``pgserver`` in a local folder.

``dev`` starts (or reuses) it; every command that talks to the database (``ask``, ``status``,
``retry``, ``cancel``, ``requeue-stuck``, ``doctor``, ``migrate``) finds it there when no
database is configured at all. The server is stopped when the last process using it exits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.errors import OperatorError
from listener.settings import Settings

DEFAULT_DATA_DIR = Path(".image-listener")


def pg_data_dir(data_dir: Path) -> Path:
    return data_dir / "pg"


def start(data_dir: Path) -> tuple[Any, str]:
    """Start or join the embedded server; returns (handle, conninfo). Keep the handle alive."""
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pgserver's own platformdirs deprecation chatter
        import pgserver

    logging.getLogger("pgserver").setLevel(logging.WARNING)  # it narrates every pg_ctl call
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        server = pgserver.get_server(  # type: ignore[attr-defined]
            pg_data_dir(data_dir).resolve(), cleanup_mode="stop"
        )
    except Exception as exc:
        raise OperatorError(f"cannot start the embedded PostgreSQL in {data_dir}: {exc}") from exc
    return server, str(server.get_uri())


def existing(data_dir: Path) -> bool:
    """Whether ``dev`` has created an embedded database here."""
    return (pg_data_dir(data_dir) / "PG_VERSION").exists()


def no_database_configured(settings: Settings) -> bool:
    """Neither DATABASE_URL nor any Supabase setting: the case where commands fall back to the
    embedded database of ``dev`` (a half-set Supabase pair is an error elsewhere, not this)."""
    return (
        settings.database_url is None
        and settings.supabase_url is None
        and settings.supabase_service_role_key is None
    )
