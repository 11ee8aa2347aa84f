"""The embedded default database: a PostgreSQL started through ``pgserver`` in a local folder.

``dev`` starts (or reuses) it; ``ask`` finds it there when DATABASE_URL is not set. The server
is stopped when the last process using it exits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.errors import OperatorError

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
