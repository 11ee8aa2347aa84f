"""The daemon and the CLI behind a real PgBouncer in transaction pool mode.

Poolers in transaction mode (PgBouncer, Supavisor's port 6543) hand each transaction to any
server connection: LISTEN is accepted, but the session that listens is back in the pool by the
time another session's NOTIFY is delivered, and the notification is dropped. The daemon must
notice (``listen_unsupported``, then polling), ``doctor`` must say so, and
``IMAGE_LISTENER_WAKEUP=poll`` must work there without errors. Server-side prepared statements
do not survive either: every command must run with them off.

PgBouncer comes from the distribution (``apt-get install -y pgbouncer``); without it these
tests skip. It runs in front of the test server with a ``*`` entry, so any database name given
by a test reaches the database of the same name.
"""

from __future__ import annotations

import getpass
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from listener import migrate
from tests.support.daemon_process import Daemon, cli, listener_env
from tests.support.fake_openai import FakeOpenAI
from tests.support.pg import PostgresServer
from tests.support.queue_helpers import insert_request, new_chat, reply_of

Conn = psycopg.Connection[dict[str, Any]]

PGBOUNCER_MISSING = "pgbouncer not installed: run 'apt-get install -y pgbouncer'"
#: Debian installs it in /usr/sbin, which is not on a normal user's PATH
PGBOUNCER = shutil.which("pgbouncer") or next(
    (
        path
        for path in ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer")
        if os.access(path, os.X_OK)
    ),
    None,
)

pytestmark = pytest.mark.skipif(PGBOUNCER is None, reason=PGBOUNCER_MISSING)


class PgBouncer:
    """A real PgBouncer (transaction pool mode, trust auth) on 127.0.0.1 in front of ``server``."""

    def __init__(self, binary: str, server_dsn: str, directory: Path) -> None:
        self.directory = directory
        server = conninfo_to_dict(server_dsn)
        self.user = str(server.get("user") or getpass.getuser())
        host = str(server.get("host") or "/tmp")
        target = f"host={host} port={server.get('port') or 5432}"
        if server.get("password"):
            target += f" user={self.user} password={server['password']}"
        self.port = _free_port()
        directory.chmod(0o755)  # read by the unprivileged user pgbouncer switches to
        auth_file = directory / "users.txt"
        auth_file.write_text(f'"{self.user}" ""\n')
        config = directory / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"* = {target}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {auth_file}\n"
            "pool_mode = transaction\n"
            "max_client_conn = 200\n"
            "default_pool_size = 10\n"
        )
        for path in (auth_file, config):
            path.chmod(0o644)
        command = [binary, str(config)]
        if os.geteuid() == 0:
            # pgbouncer refuses to run as root: run it as whoever may open the server's socket
            command[1:1] = ["-u", _socket_owner(host)]
        self.log = directory / "pgbouncer.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self._wait_until_listening()

    def url(self, dbname: str) -> str:
        """A DATABASE_URL that reaches ``dbname`` through the pooler."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def _wait_until_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"pgbouncer did not start:\n{self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "safe shutdown" would wait for clients
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _socket_owner(host: str) -> str:
    """The owner of a unix-socket directory (pgserver's own user), else ``nobody``."""
    if host.startswith("/"):
        uid = os.stat(host).st_uid
        if uid != 0:
            return pwd.getpwuid(uid).pw_name
    return "nobody"


@pytest.fixture(scope="session")
def pgbouncer(pg_server: PostgresServer) -> Iterator[PgBouncer]:
    assert PGBOUNCER is not None
    with tempfile.TemporaryDirectory(prefix="il-pgbouncer-") as directory:
        bouncer = PgBouncer(PGBOUNCER, pg_server.admin_dsn, Path(directory))
        try:
            yield bouncer
        finally:
            bouncer.stop()


def _dbname(database_url: str) -> str:
    return str(conninfo_to_dict(database_url)["dbname"])


@pytest.fixture
def pooled_url(pgbouncer: PgBouncer, database_url: str) -> str:
    """The test's database, through PgBouncer in transaction mode."""
    return pgbouncer.url(_dbname(database_url))


@pytest.fixture
def env(pooled_url: str, fake_openai: FakeOpenAI, tmp_path: Path) -> dict[str, str]:
    # The regular timer is slowed down so that only push wake-ups or the poll-only interval
    # (IMAGE_LISTENER_POLL_ONLY_SECONDS, 0.5 s) can serve a request within the tests' 2 s.
    return listener_env(
        pooled_url, fake_openai.base_url, tmp_path / "images", IMAGE_LISTENER_POLL_SECONDS="60"
    )


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def _events(daemon: Daemon) -> list[dict[str, Any]]:
    found = []
    for line in list(daemon.lines):
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return found


def _first_of(daemon: Daemon, names: set[str], timeout: float = 20.0) -> dict[str, Any]:
    """The first log event among ``names`` (fails fast on the one a test does not expect)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in _events(daemon):
            if event.get("event") in names:
                return event
        if daemon.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"none of {sorted(names)} logged\n{daemon.output()}")


def _served_within(db: Conn, request_id: uuid.UUID, seconds: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        replies = reply_of(db, request_id)
        if replies and replies[0]["status"] == "complete":
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"not complete within {seconds}s: {reply_of(db, request_id)}")


def test_a_transaction_pooler_drops_notifications_from_other_sessions(
    pooled_url: str, database_url: str
) -> None:
    """What the detection rests on: through the pooler a NOTIFY sent on the listening
    connection itself comes back (same transaction, same server session), one sent from any
    other session never does. A self-test must therefore notify from a second connection."""
    with psycopg.connect(pooled_url, autocommit=True) as listener:
        listener.execute("listen pooler_probe")
        listener.execute("notify pooler_probe, 'self'")
        assert [note.payload for note in listener.notifies(timeout=1)] == ["self"]
        for sender_url in (database_url, pooled_url):
            with psycopg.connect(sender_url, autocommit=True) as sender:
                sender.execute("notify pooler_probe, 'other'")
            assert list(listener.notifies(timeout=1)) == [], sender_url


@pytest.mark.e2e
def test_daemon_behind_the_pooler_reports_listen_unsupported_and_serves_by_polling(
    env: dict[str, str], db: Conn, daemons: list[Daemon]
) -> None:
    daemon = Daemon(env)
    daemons.append(daemon)
    event = _first_of(daemon, {"listen_unsupported", "listening"})
    assert event["event"] == "listen_unsupported", "LISTEN through a transaction pooler passed"
    assert event["level"] == "error"
    assert "IMAGE_LISTENER_WAKEUP=poll" in event["advice"]
    user, chat = new_chat(db)
    request = insert_request(db, user, chat, "behind a pooler")
    assert _served_within(db, request, 2.0) < 2.0
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


@pytest.mark.e2e
def test_poll_wakeup_behind_the_pooler_serves_requests_without_errors(
    env: dict[str, str], db: Conn, daemons: list[Daemon]
) -> None:
    daemon = Daemon({**env, "IMAGE_LISTENER_WAKEUP": "poll"})
    daemons.append(daemon)
    daemon.wait_for_event("daemon_started")
    user, chat = new_chat(db)
    for number in range(3):
        request = insert_request(db, user, chat, f"polled through a pooler {number}")
        assert _served_within(db, request, 2.0) < 2.0
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    events = _events(daemon)
    assert [e for e in events if e.get("level") in ("error", "critical")] == []
    assert "listen_unsupported" not in {e.get("event") for e in events}


@pytest.mark.e2e
def test_doctor_behind_the_pooler_fails_the_listen_check_with_a_pooler_hint(
    env: dict[str, str],
) -> None:
    result = cli("doctor", "--offline", env=env)
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.strip()}
    assert lines["database"].startswith("ok"), result.stdout
    assert lines["listen"].startswith("FAIL"), result.stdout
    assert "pooler" in lines["listen"]
    assert "IMAGE_LISTENER_WAKEUP=poll" in lines["listen"]
    assert result.returncode == 1
    assert "listen" in result.stderr


@pytest.mark.e2e
def test_doctor_behind_the_pooler_passes_with_poll_wakeup(env: dict[str, str]) -> None:
    result = cli("doctor", "--offline", env={**env, "IMAGE_LISTENER_WAKEUP": "poll"})
    assert result.returncode == 0, result.stdout + result.stderr
    listen = next(line for line in result.stdout.splitlines() if line.split()[1:2] == ["listen"])
    assert listen.startswith("ok")
    assert "IMAGE_LISTENER_WAKEUP=poll" in listen


@pytest.mark.e2e
def test_migrate_behind_the_pooler_applies_every_migration(
    pg_server: PostgresServer, pgbouncer: PgBouncer, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """One migrator at a time works through the pooler (README still advises a direct
    connection: the advisory lock that serialises migrators is a session lock)."""
    name = pg_server.empty()
    try:
        env = listener_env(pgbouncer.url(name), fake_openai.base_url, tmp_path / "images")
        result = cli("migrate", env=env)
        assert result.returncode == 0, result.stderr
        assert f"{len(migrate.discover())} migration(s) applied" in result.stdout
        with psycopg.connect(pg_server.dsn(name)) as conn:
            assert migrate.pending(conn) == []
        again = cli("migrate", env=env)
        assert again.returncode == 0, again.stderr
        assert "0 migration(s) applied" in again.stdout
    finally:
        pg_server.drop(name)


@pytest.mark.e2e
def test_ask_behind_the_pooler_works_again_and_again(
    env: dict[str, str], daemons: list[Daemon]
) -> None:
    """``ask`` polls for its reply; with psycopg's default prepare threshold that query becomes
    a server-side prepared statement, which outlives the command on the pooled server session
    and collides with the next ``ask`` ("prepared statement _pg3_0 already exists")."""
    daemon = Daemon({**env, "IMAGE_LISTENER_WAKEUP": "poll"})
    daemons.append(daemon)
    daemon.wait_for_event("daemon_started")
    for number in range(3):
        result = cli("ask", f"[fake:delay=1] ask number {number}", "--timeout", "20", env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("complete "), result.stdout
