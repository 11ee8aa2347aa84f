"""A private embedded PostgreSQL that a chaos scenario may crash and restart at will.

The shared test server (``tests.support.pg.PostgresServer``) serves every other test, so the
database scenario starts its own with pgserver in a temporary directory and drives it with the
bundled ``pg_ctl``: ``-m immediate`` is a crash (no checkpoint, clients cut, recovery on start),
``-m fast`` an orderly restart. It listens on a unix socket only, like every pgserver instance; put
:class:`tests.chaos.proxy.TcpToUnixProxy` in front of :attr:`RestartablePostgres.socket_path` to
reach it over TCP.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from psycopg.conninfo import make_conninfo

from listener.migrate import apply_migrations

StopMode = Literal["immediate", "fast"]


class RestartablePostgres:
    """An embedded server of its own; :meth:`close` stops it and deletes its files."""

    def __init__(self) -> None:
        import pgserver
        from pgserver._commands import POSTGRES_BIN_PATH

        self._pg_ctl = str(POSTGRES_BIN_PATH / "pg_ctl")
        self._tmp = tempfile.TemporaryDirectory(prefix="il-chaos-pg-")
        self._pgdata = Path(self._tmp.name) / "data"
        self._server: Any = pgserver.get_server(self._pgdata, cleanup_mode="stop")
        info = self._server.get_postmaster_info()
        self._socket_dir = str(info.socket_dir)
        self._port = int(info.port or 5432)
        self.admin_dsn: str = self._server.get_uri()
        self.restarts = 0

    @property
    def socket_path(self) -> str:
        """The server's unix socket (what a TCP proxy forwards to)."""
        return f"{self._socket_dir}/.s.PGSQL.{self._port}"

    def dsn(self, dbname: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=dbname)

    def create_database(self, name: str) -> str:
        """A new migrated database; returns its (unix socket) conninfo."""
        import psycopg

        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        apply_migrations(self.dsn(name))
        return self.dsn(name)

    def stop(self, mode: StopMode = "immediate") -> None:
        self._ctl("-m", mode, "-w", "stop")

    def start(self) -> None:
        # The options pgserver itself starts with: no TCP listener, the socket in its directory.
        self._ctl(
            "-w", "-o", '-h ""', "-o", f"-k {self._socket_dir}", "-l", str(self._pgdata / "log"),
            "start",
        )  # fmt: skip

    def restart(self, mode: StopMode = "immediate", down_seconds: float = 0.0) -> None:
        """Stop (``immediate`` = crash), stay down ``down_seconds``, start and wait until ready."""
        self.stop(mode)
        time.sleep(down_seconds)
        self.start()
        self.restarts += 1

    def close(self) -> None:
        try:
            self._ctl("-m", "immediate", "-w", "stop", check=False)
            # pgserver remembers the first postmaster's pid only; it is stopped already, and
            # this keeps its cleanup from signalling a pid that may have been reused since.
            self._server._postmaster_info = None
            self._server.cleanup()
        finally:
            self._tmp.cleanup()

    def _ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run(
            [self._pg_ctl, "-D", str(self._pgdata), *args],
            user=self._server.system_user,
            check=check,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
