"""The chaos harness: real daemons in subprocesses, a real PostgreSQL, the fake OpenAI server.

A scenario opens a :class:`ChaosRun` (a fresh migrated database, the fake server, a work
directory), starts a :class:`~tests.chaos.fleet.Fleet` of ``image-listener run`` processes
(restarted whenever one dies), inserts requests as a frontend would (:class:`Requester`,
:class:`Arrivals`), injects its faults, waits until every request is final, and hands the
outcomes to :meth:`ChaosRun.result`, which judges every request (see
:mod:`tests.chaos.outcomes`) and returns the figures. Every loop here is bounded in time; every
process is killed on the way out.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg

from listener.migrate import apply_migrations
from tests.chaos.fleet import Fleet
from tests.chaos.outcomes import (
    Expectation,
    RequestOutcome,
    ScenarioResult,
    expect_complete,
    judge,
    percentile,
)
from tests.support.daemon_process import listener_env
from tests.support.fake_openai import FakeOpenAI
from tests.support.pg import PostgresServer, as_user, connect
from tests.support.queue_helpers import new_chat

SCALES = ("short", "full")

#: What every chaos daemon runs with unless a scenario says otherwise. A 3 s lease makes a
#: takeover quick; a 1 s probe makes a dead LISTEN connection noticed quickly; small images keep
#: four daemons, PostgreSQL and the fake server within two cores.
CHAOS_ENV = {
    "IMAGE_LISTENER_LEASE_SECONDS": "3",
    "IMAGE_LISTENER_POLL_SECONDS": "0.5",
    "IMAGE_LISTENER_LISTEN_PROBE_SECONDS": "1",
    "IMAGE_LISTENER_DEFAULT_SIZE": "256x256",
    "IMAGE_LISTENER_SHUTDOWN_GRACE_SECONDS": "2",
    "IMAGE_LISTENER_OPENAI_TIMEOUT_SECONDS": "10",
    "IMAGE_LISTENER_MAX_ATTEMPTS": "5",
    "IMAGE_LISTENER_TRIES_PER_ATTEMPT": "3",
    # several daemons side by side, and nothing listening beyond 127.0.0.1: no ops server
    "IMAGE_LISTENER_HTTP_PORT": "0",
}


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    return scale


# -- requests ----------------------------------------------------------------------------------


class Requester:
    """Inserts image requests as one signed-in user would, through RLS, many per transaction."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn = connect(dsn)
        self.user_id, self.chat_id = new_chat(self._conn)

    def insert(self, prompts: Sequence[str], options: Mapping[str, Any] | None = None) -> int:
        """Insert one request per prompt in one transaction (one NOTIFY each, at commit)."""
        if not prompts:
            return 0
        with as_user(self._conn, self.user_id):
            self._conn.execute(
                "insert into public.messages (chat_id, role, content, message_type, options)"
                " select %s, 'user', p, 'image', %s::jsonb from unnest(%s::text[]) as t (p)",
                (self.chat_id, json.dumps(dict(options or {})), list(prompts)),
            )
        return len(prompts)

    def insert_resilient(
        self, make_prompts: Callable[[], Sequence[str]], *, deadline: float
    ) -> int:
        """Insert, reconnecting and retrying while the database is down, until ``deadline``.

        ``make_prompts`` is called again for every try, so a commit whose outcome was lost
        cannot leave two requests with one prompt (the database is the truth either way).
        """
        while True:
            try:
                return self.insert(make_prompts())
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
                self._reconnect(deadline)

    def close(self) -> None:
        self._conn.close()

    def _reconnect(self, deadline: float) -> None:
        self._conn.close()
        while True:
            try:
                self._conn = connect(self._dsn)
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def insert_paced(requester: Requester, prompts: Sequence[str], rate: float) -> int:
    """Insert ``prompts`` at ``rate`` per second (a batch every quarter second); blocks."""
    started = time.monotonic()
    inserted = 0
    while inserted < len(prompts):
        due = min(len(prompts), int((time.monotonic() - started) * rate) + 1)
        inserted += requester.insert(prompts[inserted:due])
        time.sleep(0.25)
    return inserted


def unique_prompts(tag: str, count: int, suffix: str = "") -> list[str]:
    """``count`` prompts no other request shares (the fake server counts calls per prompt)."""
    token = uuid.uuid4().hex[:8]
    return [f"chaos {tag} {token} #{n}{suffix}" for n in range(count)]


class Arrivals:
    """Requests arriving at a steady rate from a background thread, through outages.

    Every quarter second the thread inserts what is due; while the database is down it keeps
    retrying (with fresh prompts, see :meth:`Requester.insert_resilient`), so the requests of an
    outage arrive as soon as it ends, as a frontend's retries would.
    """

    def __init__(self, dsn: str, tag: str, rate: float) -> None:
        self._dsn = dsn
        self._tag = tag
        self._rate = rate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"arrivals-{tag}", daemon=True)
        self.inserted = 0
        self.error: BaseException | None = None

    def __enter__(self) -> Arrivals:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> int:
        """Stop arriving; returns how many requests were inserted."""
        self._stop.set()
        self._thread.join(timeout=60)
        return self.inserted

    def _run(self) -> None:
        try:
            requester = Requester(self._dsn)
        except BaseException as exc:
            self.error = exc
            return
        started = time.monotonic()
        try:
            while not self._stop.wait(0.25):
                due = int((time.monotonic() - started) * self._rate) - self.inserted
                if due > 0:
                    self.inserted += requester.insert_resilient(
                        functools.partial(unique_prompts, self._tag, due),
                        deadline=time.monotonic() + 60,
                    )
        except BaseException as exc:
            self.error = exc
        finally:
            requester.close()


# -- one scenario run --------------------------------------------------------------------------


class ChaosRun:
    """The resources of one scenario: database, fake server, work directory, fleets.

    Use as a context manager; everything started through it is stopped on exit. The work
    directory (daemon logs, images) is deleted after a clean run and kept after a failed one
    (its path is in the result's notes).
    """

    def __init__(
        self,
        name: str,
        scale: str,
        *,
        pg: PostgresServer | None = None,
        dsn: str | None = None,
        fake: FakeOpenAI | None = None,
    ) -> None:
        self.name = name
        self.scale = check_scale(scale)
        self._pg = pg
        self._own_pg: PostgresServer | None = None
        self._dbname: str | None = None
        self._given_dsn = dsn
        self.fake = fake or FakeOpenAI()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"il-chaos-{name}-"))
        self.log_dir = self.workdir / "logs"
        self.image_dir = self.workdir / "images"
        self.dsn = ""
        self.fleets: list[Fleet] = []
        self._started = 0.0
        self._keep_workdir = False

    def __enter__(self) -> ChaosRun:
        self._started = time.monotonic()
        self.log_dir.mkdir(parents=True)
        try:
            if self._given_dsn is not None:
                self.dsn = self._given_dsn
            else:
                if self._pg is None:
                    self._own_pg = self._pg = PostgresServer()
                self._dbname = self._pg.empty()
                self.dsn = self._pg.dsn(self._dbname)
                apply_migrations(self.dsn)
            self.fake.start()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self._keep_workdir = True
        self._cleanup()

    def env(self, *, database_url: str | None = None, **overrides: str) -> dict[str, str]:
        """A daemon environment: :data:`CHAOS_ENV`, then ``overrides`` (setting names)."""
        return listener_env(
            database_url or self.dsn,
            self.fake.base_url,
            self.image_dir,
            **{**CHAOS_ENV, **overrides},
        )

    def fleet(
        self,
        size: int,
        *,
        env: Mapping[str, str] | None = None,
        restart: bool = True,
        wait: bool = True,
    ) -> Fleet:
        """Start ``size`` daemons (killed when the run ends)."""
        fleet = Fleet(env or self.env(), size, self.log_dir, restart=restart)
        self.fleets.append(fleet)
        return fleet.start(wait=wait)

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def result(
        self,
        outcomes: Iterable[RequestOutcome],
        *,
        expect: Expectation = expect_complete,
        max_calls: int,
        faults: int = 0,
        problems: Sequence[str] = (),
        notes: Mapping[str, Any] | None = None,
    ) -> ScenarioResult:
        """Judge every request (see the module docstring) and build the scenario's figures."""
        outcomes = list(outcomes)
        # A rate-limit 429 costs the request nothing (no attempt, no try): not counted.
        limited = self.fake.rate_limited_counts()
        calls = {p: n - limited.get(p, 0) for p, n in self.fake.call_counts().items()}
        successes = self.fake.success_counts()
        result = ScenarioResult(
            name=self.name,
            scale=self.scale,
            requests=len(outcomes),
            kills=sum(f.kills for f in self.fleets) + len(self.fake.kills()),
            restarts=sum(f.restarts for f in self.fleets),
            faults=faults,
            wall_s=self.elapsed(),
            problems=list(problems),
            notes=dict(notes or {}),
        )
        times = []
        for outcome in outcomes:
            why = judge(outcome, calls, successes, max_calls, expect)
            if outcome.status == "complete" and not self._image_stored(outcome):
                why.wrong = True
                why.texts.append("complete, but its image is not in the image directory")
            if not outcome.is_final:
                result.lost += 1
            if outcome.has_job or outcome.status == "generating":
                result.stuck += 1
            if why.duplicated:
                result.duplicated += 1
            if why.wrong:
                result.wrong += 1
            result.problems.extend(f"{outcome.request_id}: {text}" for text in why.texts)
            ttf = outcome.time_to_final
            if ttf is not None:
                times.append(ttf)
        result.p50_s = percentile(times, 0.50)
        result.p99_s = percentile(times, 0.99)
        result.max_s = max(times) if times else None
        leftovers = sum(1 for _ in self.image_dir.rglob(".*.tmp"))
        if leftovers:
            # a listener killed mid-write leaves its temporary file: worth knowing, not wrong
            result.notes["temporary image files left by kills"] = leftovers
        exits = [text for fleet in self.fleets for text in fleet.unexpected_exits]
        if exits:
            result.problems.insert(0, f"{len(exits)} unexpected exits, the first: {exits[0]}")
        if not result.ok:
            self._keep_workdir = True
            result.notes["logs"] = str(self.log_dir)
        return result

    def _image_stored(self, outcome: RequestOutcome) -> bool:
        storage = outcome.metadata.get("storage")
        location = storage.get("location") if isinstance(storage, dict) else None
        return isinstance(location, str) and (self.image_dir / location).is_file()

    def _cleanup(self) -> None:
        try:
            for fleet in self.fleets:
                fleet.close()
        finally:
            try:
                self.fake.stop()
            finally:
                if self._pg is not None and self._dbname is not None:
                    self._pg.drop(self._dbname)
                if self._own_pg is not None:
                    self._own_pg.close()
                if not self._keep_workdir:
                    shutil.rmtree(self.workdir, ignore_errors=True)
