"""Shared fixtures: the real PostgreSQL, one migrated database per test, the fake OpenAI server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from listener.runtime.wiring import MODES as MODE_PLANS
from tests.support.fake_openai import FakeOpenAI
from tests.support.modes import MODES, Conn, ModeRig, build_rig
from tests.support.pg import PostgresServer, connect

pytest_plugins = ["tests.support.supabase_stack.fixtures"]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.create_template()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def database_url(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh database cloned from the migrated template; dropped after the test."""
    name = pg_server.clone()
    try:
        yield pg_server.dsn(name)
    finally:
        pg_server.drop(name)


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """An autocommit superuser connection to the test's database."""
    with connect(database_url) as conn:
        yield conn


@pytest.fixture(scope="module")
def shared_db(pg_server: PostgresServer) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """One clone for a whole module, for tests that only read, are refused, or work in rows of
    their own (a fresh user and chat each): a clone per test would dominate their run time. A
    test that changes shared state uses ``db``."""
    name = pg_server.clone()
    try:
        with connect(pg_server.dsn(name)) as conn:
            yield conn
    finally:
        pg_server.drop(name)


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    """The local OpenAI-compatible server the real SDK talks to over HTTP."""
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(params=MODES)
def mode_rig(
    request: pytest.FixtureRequest,
    database_url: str,
    db: Conn,
    fake_openai: FakeOpenAI,
    tmp_path: Path,
) -> Iterator[ModeRig]:
    """The daemon's environment and the frontend's way in, once per deployment mode."""
    make_stack: Any = None
    if MODE_PLANS[request.param].uses_supabase:
        make_stack = request.getfixturevalue("make_supabase_stack")
    yield from build_rig(
        request.param,
        database_url=database_url,
        db=db,
        fake=fake_openai,
        image_dir=tmp_path / "images",
        make_stack=make_stack,
    )
