"""What every benchmark scenario shares: the cluster with a migrated template database holding
one user and one chat, fresh clones of it, inserting requests as a frontend does, starting
listeners against a fake OpenAI server, and bounded polling.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench.cluster import Cluster, free_port
from bench.processes import FakeServer, Listener, http_get
from listener.migrate import apply_migrations
from tests.support.pg import as_user, create_user

TEMPLATE = "il_bench_template"

#: the replies' counts and the database-clock window from the first claim to the last completion
REPLY_TIMES = """
select count(*) filter (where status = 'complete') as complete,
       count(*) filter (where status = 'failed') as failed,
       -- the claim's time (the reply exists from the insert, so not its created_at)
       extract(epoch from min((metadata ->> 'started_at')::timestamptz)) as first_claim,
       extract(epoch from max(updated_at) filter (where status = 'complete')) as last_done
from public.messages where reply_to is not null
"""


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), as the peers' harness computes it."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Rig:
    """The cluster plus what every scenario shares: the template, a work dir, the user."""

    cluster: Cluster
    work: Path
    profile_dir: Path | None = None
    user_id: uuid.UUID | None = None
    chat_id: uuid.UUID | None = None
    _retired: int = 0

    def prepare(self) -> Rig:
        """Migrate a template database and give it one user with one chat."""
        conninfo = self.cluster.create_database(TEMPLATE)
        apply_migrations(conninfo)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            self.user_id = create_user(conn)
            with as_user(conn, self.user_id):
                row = conn.execute("insert into public.chats (title) values ('bench') returning id")
                self.chat_id = row.fetchone()[0]  # type: ignore[index]
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        return self

    def fresh_db(self, name: str) -> str:
        return self.cluster.create_database(name, template=TEMPLATE)

    def insert(self, conninfo: str, count: int, prefix: str) -> float:
        """Insert ``count`` requests in one transaction as the chat's owner; seconds taken."""
        with psycopg.connect(conninfo, autocommit=True) as conn:
            started = time.perf_counter()
            with as_user(conn, self.user_id):
                conn.execute(
                    "insert into public.messages (chat_id, role, content, message_type)"
                    " select %s, 'user', %s || g, 'image' from generate_series(1, %s) g",
                    (self.chat_id, prefix, count),
                )
            return time.perf_counter() - started

    def listener(
        self,
        conninfo: str,
        fake: FakeServer,
        name: str,
        concurrency: int = 10,
        extra_env: Mapping[str, str] | None = None,
    ) -> Listener:
        images = self.work / "images" / name
        images.mkdir(parents=True, exist_ok=True)
        return Listener(
            conninfo,
            fake.base_url,
            images,
            self.work / "logs",
            concurrency=concurrency,
            http_port=free_port(),
            name=name,
            extra_env=extra_env,
        )

    def cleanup_images(self) -> None:
        """Set the scenario's images aside; they are deleted by :meth:`remove_images` at the end.

        Not deleted now: on this VM's ext4 (no journal) the inode allocator skips inodes freed
        in the last ~30 s by reading each one's deletion time, so deleting 20,000 images made
        creating every file of the next scenario cost ~1 ms of kernel CPU (``perf``: 20% of the
        listener's samples in ``find_inode_bit``/``recently_deleted``), charged to the listener.
        """
        images = self.work / "images"
        if images.exists():
            self._retired += 1
            images.rename(self.work / f"images-done-{self._retired}")

    def remove_images(self) -> None:
        """Delete every scenario's images (the end of a run)."""
        for path in self.work.glob("images*"):
            shutil.rmtree(path, ignore_errors=True)


def wait_until(
    check: Callable[[], bool], timeout: float, interval: float, listeners: Sequence[Listener]
) -> int:
    """Poll ``check`` until true; returns the number of polls. Fails on timeout or a dead
    listener."""
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        polls += 1
        if check():
            return polls
        if any(not listener.alive() for listener in listeners):
            raise SystemExit("bench: a listener exited during the run; see the logs")
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: the run did not finish within {timeout:g}s")
        time.sleep(interval)


def exists_check(conn: psycopg.Connection[Any], sql: str) -> Callable[[], bool]:
    return lambda: bool(conn.execute(sql).fetchone()[0])  # type: ignore[index]


def generation_calls(fake: FakeServer) -> tuple[int, int]:
    """(all generation calls, the most calls any one prompt got)."""
    counts = json.loads(http_get(fake.base_url.removesuffix("/v1") + "/_fake/calls", 60)[1])
    return sum(counts.values()), max(counts.values(), default=0)
