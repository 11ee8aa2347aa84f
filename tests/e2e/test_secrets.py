"""Secrets stay secret on every error path. The real CLI runs in subprocesses with distinctive
values for OPENAI_API_KEY, the database password (in DATABASE_URL) and, in Supabase mode,
SUPABASE_SERVICE_ROLE_KEY; then every error path we can drive is driven (rejected key, 403,
unknown model, moderation, quota, 500s/429s/timeouts/dropped connections/bad bodies to
exhaustion, a row that bypassed the trigger, a cancelled request, killed database connections,
PostgREST failures, Realtime drops, a database unreachable or misspelt at start-up, malformed
settings, doctor and ask failures), and each secret is looked for everywhere it could land:
stdout and stderr of every command, every column of every message, image_queue.jobs (its
last_error included, read while the retries wait). Not even "[REDACTED]" may appear: the log
redactor is a last line of defence, and code that reaches it is a leak waiting to happen.

Prompts appear in the logs only with IMAGE_LISTENER_LOG_PROMPTS=true.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from listener.settings import SettingsError, load_settings
from tests.support.daemon_process import Daemon, cli, listener_env
from tests.support.fake_openai import FakeOpenAI
from tests.support.pg import as_user
from tests.support.queue_helpers import insert_request, job_of, new_chat, reply_of
from tests.support.supabase_stack import anon_key, new_jwt_secret, service_role_key
from tests.support.supabase_stack.fixtures import StackFactory
from tests.support.supabase_stack.realtime import FakeRealtime, install_trigger_sql

pytestmark = pytest.mark.e2e
Conn = psycopg.Connection[dict[str, Any]]

#: a word in every prompt: it may reach the logs only when the operator opts in
PROMPT_WORD = "zebraquartzpromptword"
REDACTED = "[REDACTED]"
BUCKET = "generated-images"


@dataclass(frozen=True)
class Canaries:
    """Distinctive secrets, and the fragments that would betray a partial leak."""

    values: dict[str, str]

    @classmethod
    def make(cls, **extra: str) -> Canaries:
        # "sk-rejected" makes the fake's GET /v1/models answer 401 (doctor's key check)
        openai = f"sk-rejected-oaiCANARY{secrets.token_hex(12)}"
        password = f"pwCANARY{secrets.token_hex(12)}"
        return cls({"OPENAI_API_KEY": openai, "database password": password, **extra})

    def fragments(self) -> dict[str, str]:
        """Each secret whole, and its random middle (a masked or truncated echo shows that)."""
        found = {}
        for name, value in self.values.items():
            found[name] = value
            middle = value[len(value) // 4 : -len(value) // 4]
            if len(middle) >= 12:
                found[f"{name} (middle)"] = middle
        return found

    def leaks(self, where: str, text: str) -> list[str]:
        found = [f"{name} in {where}" for name, value in self.fragments().items() if value in text]
        if REDACTED in text:
            found.append(f"{REDACTED} in {where}: the redactor had to step in")
        return found


def with_password(dsn: str, password: str) -> str:
    """The test database's conninfo with a password (trust auth ignores it, so it still works)."""
    if conninfo_to_dict(dsn).get("password"):
        pytest.skip("the test server needs its own password; the canary cannot replace it")
    return make_conninfo(dsn, password=password)


def database_texts(db: Conn) -> dict[str, str]:
    """Every message row and every job row as JSON text: all the columns a secret could reach."""
    messages = db.execute("select row_to_json(m)::text as t from public.messages m").fetchall()
    jobs = db.execute("select row_to_json(j)::text as t from image_queue.jobs j").fetchall()
    return {
        "public.messages": "\n".join(r["t"] for r in messages),
        "image_queue.jobs": "\n".join(r["t"] for r in jobs),
    }


def run_concurrently(
    commands: Mapping[str, tuple[list[str], Mapping[str, str]]], timeout: float = 60
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Several CLI commands at once (each is mostly interpreter start-up)."""
    started = {
        label: subprocess.Popen(
            [sys.executable, "-m", "listener", *args],
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for label, (args, env) in commands.items()
    }
    done = {}
    for label, proc in started.items():
        out, err = proc.communicate(timeout=timeout)
        done[label] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def is_final(db: Conn, request: uuid.UUID) -> bool:
    replies = reply_of(db, request)
    return bool(replies) and replies[0]["status"] in ("complete", "failed")


def insert_bypassing_validation(
    db: Conn, user: uuid.UUID, chat: uuid.UUID, prompt: str, options: dict[str, Any]
) -> uuid.UUID:
    """A row the validation trigger would refuse, as if written before it existed."""
    db.execute("alter table public.messages disable trigger messages_validate")
    try:
        return insert_request(db, user, chat, prompt, options)
    finally:
        db.execute("alter table public.messages enable trigger messages_validate")


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def start(daemons: list[Daemon], env: Mapping[str, str], ready: str) -> Daemon:
    daemon = Daemon(env)
    daemons.append(daemon)
    daemon.wait_for_event(ready)
    return daemon


def stop(daemon: Daemon) -> str:
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0, daemon.output()
    return daemon.output()


#: every provider error the fake can script: (label, directive, final status, error_code)
PERMANENT = [
    ("rejected-key", "[fake:status=401]", "service_misconfigured"),
    ("forbidden", "[fake:status=403]", "service_misconfigured"),
    ("unknown-model", "[fake:status=404-model]", "service_misconfigured"),
    ("quota", "[fake:status=billing]", "service_misconfigured"),
    ("moderation", "[fake:moderation]", "moderation_blocked"),
    ("bad-param", "[fake:status=400:code=invalid_value:param=size]", "invalid_request"),
    ("bad-directive", "[fake:no-such-directive]", "invalid_request"),
]
TRANSIENT = [
    ("server-error", "[fake:status=500]"),
    ("unavailable", "[fake:status=503]"),
    ("dropped", "[fake:status=drop]"),
    ("timeout", "[fake:status=hang:seconds=3]"),
    ("bad-base64", "[fake:status=bad-b64]"),
    ("no-data", "[fake:status=no-data]"),
    ("bad-json", "[fake:status=bad-json]"),
]
#: rate limits are nobody's fault: the request waits for the fleet's pause and completes
RECOVERING = [("rate-limited", "[fake:fail=429:retry-after=0,429:retry-after=0]")]
FAST_FAILURES = {
    "IMAGE_LISTENER_LOG_LEVEL": "debug",
    "IMAGE_LISTENER_TRIES_PER_ATTEMPT": "2",
    "IMAGE_LISTENER_OPENAI_TIMEOUT_SECONDS": "1",
    "IMAGE_LISTENER_LISTEN_PROBE_SECONDS": "1",
    "IMAGE_LISTENER_CONCURRENCY": "8",
}


def insert_error_paths(db: Conn, user: uuid.UUID, chat: uuid.UUID) -> dict[str, uuid.UUID]:
    requests = {
        label: insert_request(db, user, chat, f"{PROMPT_WORD} {label} {directive}")
        for label, directive, _ in PERMANENT
    }
    requests |= {
        label: insert_request(db, user, chat, f"{PROMPT_WORD} {label} {directive}")
        for label, directive in TRANSIENT + RECOVERING
    }
    requests["ok"] = insert_request(db, user, chat, f"{PROMPT_WORD} fine")
    requests["bypassed-trigger"] = insert_bypassing_validation(
        db, user, chat, f"{PROMPT_WORD} odd", {"size": "17x17", "colour": "red"}
    )
    return requests


def check_final_replies(db: Conn, requests: dict[str, uuid.UUID]) -> None:
    """The error paths were really taken: each request ended the way its script says."""
    codes = {label: code for label, _, code in PERMANENT}
    for label, request in requests.items():
        [reply] = reply_of(db, request)
        if label == "ok" or label in dict(RECOVERING):
            assert reply["status"] == "complete", (label, reply)
            continue
        assert reply["status"] == "failed", (label, reply)
        if label in codes:
            assert reply["metadata"]["error_code"] == codes[label], (label, reply["metadata"])
        assert job_of(db, request) is None


def test_no_secret_anywhere_when_every_error_path_runs_in_postgres_mode(
    database_url: str, db: Conn, fake_openai: FakeOpenAI, tmp_path: Path, daemons: list[Daemon]
) -> None:
    canaries = Canaries.make()
    env = listener_env(
        with_password(database_url, canaries.values["database password"]),
        fake_openai.base_url,
        tmp_path / "images",
        OPENAI_API_KEY=canaries.values["OPENAI_API_KEY"],
        IMAGE_LISTENER_MAX_ATTEMPTS="2",
        **FAST_FAILURES,
    )
    user, chat = new_chat(db)
    daemon = start(daemons, env, "listening")
    requests = insert_error_paths(db, user, chat)
    cancelled = insert_request(db, user, chat, f"{PROMPT_WORD} cancel me [fake:delay=2]")
    wait_until(lambda: fake_openai.calls(f"{PROMPT_WORD} cancel me [fake:delay=2]"), 10, "cancel")
    with as_user(db, user):
        db.execute("delete from public.messages where id = %s", (cancelled,))

    # The transient failures go back to the queue after their first attempt, with last_error.
    transient = [requests[label] for label, _ in TRANSIENT]
    waiting = "select count(*) as n from image_queue.jobs where request_id = any(%s)"
    with_error = waiting + " and last_error is not null"
    wait_until(
        lambda: db.execute(with_error, (transient,)).fetchone() == {"n": len(transient)},
        20,
        "every transient failure to wait for its second attempt",
    )
    last_errors = database_texts(db)["image_queue.jobs"]
    assert "status=500" in last_errors, "last_error holds the operator's detail"
    # Kill every connection the daemon holds (pool and LISTEN): it must reconnect, saying why.
    db.execute(
        "select pg_terminate_backend(pid) from pg_stat_activity"
        " where datname = current_database() and pid <> pg_backend_pid()"
    )
    daemon.wait_for_event("listen_connection_lost")
    db.execute("update image_queue.jobs set run_at = now() where run_at > now()")
    asked = cli("ask", f"{PROMPT_WORD} asked [fake:status=401]", "--timeout", "20", env=env)
    wait_until(lambda: all(is_final(db, r) for r in requests.values()), 30, "final replies")
    log = stop(daemon)

    check_final_replies(db, requests)
    assert reply_of(db, cancelled) == []
    assert asked.returncode == 1
    assert "configuration problem" in asked.stderr
    for event in ("operator_action_required", "provider_retry", "listen_connection_lost"):
        assert f'"{event}"' in log, f"the {event} path was not taken"
    texts = {"daemon output": log, "ask stdout": asked.stdout, "ask stderr": asked.stderr}
    texts |= database_texts(db) | {"image_queue.jobs.last_error": last_errors}
    leaks = [leak for where, text in texts.items() for leak in canaries.leaks(where, text)]
    assert leaks == [], "\n".join(leaks)
    assert PROMPT_WORD not in log, "prompts are logged as length + hash by default"
    assert PROMPT_WORD not in asked.stderr


def test_prompts_reach_the_logs_only_when_opted_in_and_secrets_still_do_not(
    database_url: str, db: Conn, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    canaries = Canaries.make()
    env = listener_env(
        with_password(database_url, canaries.values["database password"]),
        fake_openai.base_url,
        tmp_path / "images",
        OPENAI_API_KEY=canaries.values["OPENAI_API_KEY"],
        IMAGE_LISTENER_LOG_PROMPTS="true",
        IMAGE_LISTENER_MAX_ATTEMPTS="1",
        **FAST_FAILURES,
    )
    user, chat = new_chat(db)
    for label, directive in [
        ("ok", ""),
        ("rejected", "[fake:status=401]"),
        ("down", "[fake:drop=2]"),
    ]:
        insert_request(db, user, chat, f"{PROMPT_WORD} {label} {directive}")
    drained = cli("run", "--drain", env=env)
    assert drained.returncode == 0, drained.stderr
    log = drained.stdout + drained.stderr
    assert f'"prompt": "{PROMPT_WORD} ok "' in log
    assert f'"prompt": "{PROMPT_WORD} rejected [fake:status=401]"' in log
    assert canaries.leaks("run --drain output", log) == []
    assert canaries.leaks("database", "\n".join(database_texts(db).values())) == []


COMMANDS = {
    "run": ["run"],
    "migrate": ["migrate"],
    "doctor": ["doctor"],
    "ask": ["ask", "a fox", "--timeout", "1"],
}
QUOTED_BY_LIBPQ = ("unclosed-ipv6-bracket", "bad-percent-escape", "unterminated-quote")
COMMANDS_FOR = {
    "unreachable": ("run", "doctor"),
    "unknown-host": ("run",),
    "unknown-database": ("run", "ask"),
    "bad-port": ("run",),
    "keyword-form": ("doctor",),
    "unterminated-quote": ("run",),
    # libpq's URI parser quotes the URI, or the token, it cannot parse: every command
    "unclosed-ipv6-bracket": tuple(COMMANDS),
    "bad-percent-escape": tuple(COMMANDS),
}


def _bad_urls(database_url: str, password: str) -> dict[str, str]:
    """DATABASE_URLs that fail at start-up, each carrying the password."""
    host = conninfo_to_dict(database_url).get("host") or "localhost"
    return {
        "unreachable": f"postgresql://postgres:{password}@127.0.0.1:1/postgres",
        "unknown-host": f"postgresql://postgres:{password}@no-such-host.invalid/postgres",
        "unknown-database": make_conninfo(database_url, dbname="no_such_db", password=password),
        "unclosed-ipv6-bracket": f"postgresql://postgres:{password}@[::1/postgres",
        "bad-percent-escape": f"postgresql://postgres:{password}%zz@{host}/postgres",
        "bad-port": f"postgresql://postgres:{password}@127.0.0.1:port/postgres",
        "keyword-form": f"host=127.0.0.1 port=1 password={password} dbname=x",
        "unterminated-quote": f"host=127.0.0.1 password='{password}",
    }


def test_a_database_unreachable_or_misspelt_at_start_up_never_shows_its_password(
    database_url: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """Every command that reads DATABASE_URL fails in one line naming the problem; neither that
    line nor anything logged quotes the URL's password."""
    canaries = Canaries.make()
    password = canaries.values["database password"]
    commands = {}
    for label, url in _bad_urls(database_url, password).items():
        env = listener_env(url, fake_openai.base_url, tmp_path / "images")
        env["OPENAI_API_KEY"] = canaries.values["OPENAI_API_KEY"]
        for command in COMMANDS_FOR[label]:  # each command connects its own way
            commands[f"{command} {label}"] = ([*COMMANDS[command]], env)
    results = run_concurrently(commands)
    leaks = []
    for label, result in results.items():
        assert result.returncode == 1, (label, result.stdout, result.stderr)
        last_line = result.stderr.strip().splitlines()[-1]
        assert last_line.startswith("image-listener: error:"), (label, result.stderr)
        assert "Traceback" not in result.stderr, (label, result.stderr)
        leaks += canaries.leaks(label, result.stdout + result.stderr)
    assert leaks == [], "\n".join(leaks)


@pytest.mark.parametrize("label", QUOTED_BY_LIBPQ)
def test_a_database_url_libpq_cannot_parse_is_refused_with_the_settings(label: str) -> None:
    """Before any connect(): libpq's parse errors quote the URL (or the token) they choke on."""
    password = f"pwCANARY{secrets.token_hex(12)}"
    url = _bad_urls("host=localhost dbname=x", password)[label]
    with pytest.raises(SettingsError) as refused:
        load_settings({"DATABASE_URL": url})
    assert refused.value.variables == ("DATABASE_URL",)
    assert str(refused.value) == (
        "DATABASE_URL: must be a PostgreSQL connection URL (postgresql://...) or key=value string"
    )
    assert password not in repr(refused.value.__context__)


def test_malformed_settings_are_named_and_never_echoed(
    database_url: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    canaries = Canaries.make()
    key = canaries.values["OPENAI_API_KEY"]
    base = listener_env(
        with_password(database_url, canaries.values["database password"]),
        fake_openai.base_url,
        tmp_path / "images",
        OPENAI_API_KEY=key,
    )
    cases = {
        "key-with-space": ({"OPENAI_API_KEY": f"{key} trailing"}, "OPENAI_API_KEY"),
        "key-with-newline": ({"OPENAI_API_KEY": f"{key}\n"}, "OPENAI_API_KEY"),
        "key-non-ascii": ({"OPENAI_API_KEY": f"{key}\u00e9"}, "OPENAI_API_KEY"),
        "bad-concurrency": ({"IMAGE_LISTENER_CONCURRENCY": "many"}, "IMAGE_LISTENER_CONCURRENCY"),
        "service-key-alone": ({"SUPABASE_SERVICE_ROLE_KEY": key}, "SUPABASE_URL"),
        "service-key-with-space": (
            {"SUPABASE_URL": "http://127.0.0.1:1", "SUPABASE_SERVICE_ROLE_KEY": f"{key} x"},
            "SUPABASE_SERVICE_ROLE_KEY",
        ),
    }
    commands = {
        f"{command} {label}": ([command], {**base, **change})
        for label, (change, _) in cases.items()
        for command in ("run", "doctor")
    }
    leaks = []
    for label, result in run_concurrently(commands).items():
        variable = cases[label.split(" ", 1)[1]][1]
        assert result.returncode == 1, (label, result.stdout, result.stderr)
        assert result.stderr.startswith("image-listener: error:"), (label, result.stderr)
        assert variable in result.stderr, (label, result.stderr)
        leaks += canaries.leaks(label, result.stdout + result.stderr)
    assert leaks == [], "\n".join(leaks)


def test_doctor_and_ask_failures_show_no_secret(
    database_url: str, db: Conn, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    accepted_key = f"sk-proj-CANARY{secrets.token_hex(12)}"  # the fake accepts it
    canaries = Canaries.make(**{"accepted OPENAI_API_KEY": accepted_key})
    env = listener_env(
        with_password(database_url, canaries.values["database password"]),
        fake_openai.base_url,
        tmp_path / "images",
        OPENAI_API_KEY=canaries.values["OPENAI_API_KEY"],
    )
    unknown_model = {**env, "OPENAI_API_KEY": accepted_key, "IMAGE_LISTENER_MODEL": "unknown-1"}
    results = run_concurrently(
        {
            "doctor rejected key": (["doctor"], env),
            "doctor unknown model": (["doctor"], unknown_model),
            "ask refused prompt": (["ask", "   "], env),
            "ask refused option": (["ask", "a fox", "--size", "17x17"], env),
            "ask without a listener": (["ask", f"{PROMPT_WORD}", "--timeout", "0.5"], env),
        }
    )
    assert "status=401" in results["doctor rejected key"].stdout
    assert "status=404" in results["doctor unknown model"].stdout
    assert "the image prompt is empty" in results["ask refused prompt"].stderr
    assert "multiples of 16" in results["ask refused option"].stderr
    assert "no final reply" in results["ask without a listener"].stderr
    leaks = []
    for label, result in results.items():
        assert result.returncode == 1, (label, result.stdout, result.stderr)
        leaks += canaries.leaks(label, result.stdout + result.stderr)
    assert leaks == [], "\n".join(leaks)


# --- Supabase mode ----------------------------------------------------------------------------


@dataclass
class SupabaseRig:
    env: dict[str, str]
    stack: Any
    realtime: FakeRealtime


@pytest.fixture
def supabase_rig(
    database_url: str,
    db: Conn,
    fake_openai: FakeOpenAI,
    tmp_path: Path,
    make_supabase_stack: StackFactory,
) -> SupabaseRig:
    """The daemon's environment for Supabase mode: URL + service-role key only
    (tests/support/modes.py)."""
    jwt_secret = new_jwt_secret()
    db.execute(install_trigger_sql())
    realtime = FakeRealtime(
        database_url, api_keys={anon_key(jwt_secret), service_role_key(jwt_secret)}
    )
    stack = make_supabase_stack(realtime=realtime, jwt_secret=jwt_secret, buckets=[BUCKET])
    env = listener_env("", fake_openai.base_url, tmp_path / "images")
    env.pop("DATABASE_URL")
    env |= {"SUPABASE_URL": stack.url, "SUPABASE_SERVICE_ROLE_KEY": stack.service_role_key}
    return SupabaseRig(env, stack, realtime)


def supabase_canaries(rig: SupabaseRig) -> Canaries:
    key = rig.stack.service_role_key
    # the key's signature is what makes it secret; header and claims are the same for any project
    return Canaries.make(
        SUPABASE_SERVICE_ROLE_KEY=key, **{"service-role key signature": key.rsplit(".", 1)[1]}
    )


def test_no_secret_anywhere_when_every_error_path_runs_in_supabase_mode(
    supabase_rig: SupabaseRig, db: Conn, fake_openai: FakeOpenAI, daemons: list[Daemon]
) -> None:
    canaries = supabase_canaries(supabase_rig)
    env = {
        **supabase_rig.env,
        "OPENAI_API_KEY": canaries.values["OPENAI_API_KEY"],
        "IMAGE_LISTENER_MAX_ATTEMPTS": "1",
        **FAST_FAILURES,
    }
    user, chat = new_chat(db)
    daemon = start(daemons, env, "realtime_subscribed")
    supabase_rig.stack.rest_fail_next(4, status=503)
    requests = insert_error_paths(db, user, chat)
    supabase_rig.stack.run_coroutine(supabase_rig.realtime.drop_connections())
    supabase_rig.stack.run_coroutine(supabase_rig.realtime.send_channel_error())
    wait_until(lambda: all(is_final(db, r) for r in requests.values()), 40, "final replies")
    log = stop(daemon)

    check_final_replies(db, requests)
    for event in ("operator_action_required", "provider_retry", "claim_failed"):
        assert f'"{event}"' in log, f"the {event} path was not taken"
    texts = {"daemon output": log} | database_texts(db)
    leaks = [leak for where, text in texts.items() for leak in canaries.leaks(where, text)]
    assert leaks == [], "\n".join(leaks)
    assert PROMPT_WORD not in log


def test_supabase_commands_that_fail_show_no_secret(
    supabase_rig: SupabaseRig, fake_openai: FakeOpenAI
) -> None:
    """doctor with a rejected OpenAI key, a missing bucket, the anon key as the service key;
    run with a key that is not a JWT at all (doctor would wait out its Realtime check)."""
    canaries = supabase_canaries(supabase_rig)
    garbage = f"sbCANARY{secrets.token_hex(16)}"
    canaries.values["garbage service key"] = garbage
    env = {**supabase_rig.env, "OPENAI_API_KEY": canaries.values["OPENAI_API_KEY"]}
    anon_as_service = {**env, "SUPABASE_SERVICE_ROLE_KEY": supabase_rig.stack.anon_key}
    results = run_concurrently(
        {
            "doctor": (["doctor"], env),
            "doctor no bucket": (["doctor"], {**env, "IMAGE_LISTENER_STORAGE_BUCKET": "nope"}),
            "doctor anon key": (["doctor", "--offline"], anon_as_service),
            "run garbage key": (["run"], {**env, "SUPABASE_SERVICE_ROLE_KEY": garbage}),
        }
    )
    assert "FAIL  openai" in results["doctor"].stdout
    assert "FAIL  storage" in results["doctor no bucket"].stdout
    assert "FAIL  postgrest" in results["doctor anon key"].stdout
    leaks = []
    for label, result in results.items():
        assert result.returncode == 1, (label, result.stdout, result.stderr)
        leaks += canaries.leaks(label, result.stdout + result.stderr)
    assert leaks == [], "\n".join(leaks)


def test_the_canaries_would_be_found(database_url: str) -> None:
    """The scanner itself: a whole secret, its middle, and the redactor's mark are each caught."""
    canaries = Canaries.make()
    key = canaries.values["OPENAI_API_KEY"]
    masked = key[:3] + "*" * 8 + key[-4:]  # how OpenAI masks a key: must not count as a leak
    assert canaries.leaks("x", f"error: {key}") == [
        "OPENAI_API_KEY in x",
        "OPENAI_API_KEY (middle) in x",
    ]
    assert canaries.leaks("x", key[5:-5]) == ["OPENAI_API_KEY (middle) in x"]
    assert canaries.leaks("x", f"Incorrect API key provided: {masked}") == []
    assert canaries.leaks("x", json.dumps({"reason": REDACTED})) == [
        f"{REDACTED} in x: the redactor had to step in"
    ]
    assert with_password(database_url, "p").endswith("password=p")
