"""A throwaway PostgreSQL 15 cluster for benchmarks, set up exactly as the peers' harness does
(``../shared/anchors-bench/run_all.sh``): Debian's PostgreSQL 15 binaries, ``initdb`` as the
``postgres`` user when we are root, ``--auth=trust``, no TCP (a unix socket in a private temp
directory), ``max_connections=200``, every other setting at its default.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg

PG_BIN = Path(os.environ.get("BENCH_PG_BIN", "/usr/lib/postgresql/15/bin"))

#: the settings printed with every figure (the ones that move queue benchmarks the most)
REPORTED_SETTINGS = (
    "server_version",
    "shared_buffers",
    "synchronous_commit",
    "fsync",
    "max_connections",
    "wal_level",
    "checkpoint_timeout",
    "max_wal_size",
    "autovacuum",
    "jit",
)


def free_port() -> int:
    """A TCP port nobody listens on right now (for the socket name and our HTTP servers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """``initdb`` + ``pg_ctl start`` in a temp directory; ``stop()`` removes everything."""

    def __init__(self, *, max_connections: int = 200) -> None:
        self.max_connections = max_connections
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="il-bench-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._started = False

    @property
    def host(self) -> str:
        """The unix-socket directory (libpq's ``host`` for a socket)."""
        return str(self.root)

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host={self.root} port={self.port} dbname={dbname} user=postgres"

    def start(self) -> Cluster:
        if not (PG_BIN / "initdb").exists():
            raise SystemExit(f"bench: PostgreSQL 15 binaries not found in {PG_BIN}")
        if os.geteuid() == 0:
            # initdb refuses to run as root; the data directory must belong to postgres
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        initdb = [str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres"]
        self._as_postgres([*initdb, "--auth=trust", "-E", "UTF8"], log_to=self.root / "initdb.log")
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses='' "
            f"-c max_connections={self.max_connections}"
        )
        self._as_postgres(
            [
                str(PG_BIN / "pg_ctl"),
                "start",
                "-w",
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                options,
            ]
        )
        self._started = True
        return self

    def stop(self) -> None:
        """Stop the server (fast mode) and delete its directory; safe to call twice."""
        try:
            if self._started:
                self._as_postgres(
                    [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                    check=False,
                )
                self._started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def settings(self) -> dict[str, str]:
        """The reported settings, as ``SHOW`` prints them."""
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            return {
                name: str(conn.execute(f"show {name}").fetchone()[0])  # type: ignore[index]
                for name in REPORTED_SETTINGS
            }

    def create_database(self, name: str, template: str | None = None) -> str:
        """A fresh database (dropped first if it exists); returns its conninfo."""
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')
            suffix = f' template "{template}"' if template else ""
            conn.execute(f'create database "{name}"{suffix}')
        return self.conninfo(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')

    def _as_postgres(
        self, argv: list[str], *, log_to: Path | None = None, check: bool = True
    ) -> None:
        command = shlex.join(argv)
        if log_to is not None:
            command += f" > {shlex.quote(str(log_to))} 2>&1"
        full = ["su", "postgres", "-c", command] if os.geteuid() == 0 else ["sh", "-c", command]
        result = subprocess.run(full, capture_output=True, text=True, timeout=120, check=False)
        if check and result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise SystemExit(
                f"bench: {argv[0]} failed ({result.returncode}): {result.stderr.strip()}\n{log}"
            )
