"""One ``image-listener run`` in a deployment mode on a throwaway migrated database, for the
single-request benchmarks (``latency.py``, ``progress.py``): the PostgreSQL of the tests
(pgserver, or DATABASE_URL), the Supabase stand-in stack when the mode needs it, and the
listener started through the tests' mode rig, all torn down on the way out."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from listener.migrate import apply_migrations
from listener.runtime.wiring import MODES as MODE_PLANS
from tests.support.fake_openai import FakeOpenAI
from tests.support.modes import ModeRig, build_rig
from tests.support.pg import PostgresServer, connect
from tests.support.supabase_stack import SupabaseStack
from tests.support.supabase_stack.postgrest import INSTALL_HINT, find_postgrest

Conn = psycopg.Connection[dict[str, Any]]


@contextmanager
def running_listener(mode: str, fake: FakeOpenAI) -> Iterator[tuple[ModeRig, Conn]]:
    """The started listener's rig and a superuser connection to its database."""
    if MODE_PLANS[mode].uses_supabase and find_postgrest() is None:
        raise SystemExit(f"bench: PostgREST is not installed: run '{INSTALL_HINT}'")
    server = PostgresServer()
    name = server.empty()
    dsn = server.dsn(name)
    apply_migrations(dsn)
    stacks: list[SupabaseStack] = []

    def make_stack(**kwargs: object) -> SupabaseStack:
        stack = SupabaseStack(dsn, server.admin_dsn, **kwargs)  # type: ignore[arg-type]
        stack.start()
        stacks.append(stack)
        return stack

    images = tempfile.TemporaryDirectory(prefix="il-bench-")
    try:
        with connect(dsn) as conn:
            rigs = build_rig(
                mode,
                database_url=dsn,
                db=conn,
                fake=fake,
                image_dir=Path(images.name),
                make_stack=make_stack,
            )
            rig = next(rigs)
            try:
                rig.env |= {"IMAGE_LISTENER_LOG_LEVEL": "info"}
                rig.start()
                yield rig, conn
            finally:
                rigs.close()
    finally:
        for stack in stacks:
            stack.stop()
        server.drop(name)
        server.close()
        images.cleanup()
