"""Pytest fixtures for the local Supabase stand-in. Register them in tests/conftest.py with
`pytest_plugins = ["tests.support.supabase_stack.fixtures"]`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.pg import PostgresServer
from tests.support.supabase_stack.gateway import SupabaseStack
from tests.support.supabase_stack.postgrest import INSTALL_HINT, find_postgrest

StackFactory = Callable[..., SupabaseStack]


@pytest.fixture
def make_supabase_stack(request: pytest.FixtureRequest) -> Iterator[StackFactory]:
    """Start SupabaseStacks in front of the test's database; keyword arguments go to
    SupabaseStack (e.g. `realtime=`, `jwt_secret=`). Each is stopped at teardown, before the
    database is dropped. Skips the test, before any database work, without PostgREST."""
    binary = find_postgrest()
    if binary is None:
        if os.environ.get("REQUIRE_POSTGREST_TESTS"):  # CI with Node: a skip would hide a gap
            pytest.fail(
                f"PostgREST missing although REQUIRE_POSTGREST_TESTS is set: {INSTALL_HINT}"
            )
        pytest.skip(f"PostgREST not installed: run '{INSTALL_HINT}'")
    # Requested only now so that a skip costs no database.
    database_url: str = request.getfixturevalue("database_url")
    pg_server: PostgresServer = request.getfixturevalue("pg_server")
    started: list[SupabaseStack] = []

    def make(**kwargs: Any) -> SupabaseStack:
        stack = SupabaseStack(database_url, pg_server.admin_dsn, postgrest_binary=binary, **kwargs)
        stack.start()
        started.append(stack)
        return stack

    try:
        yield make
    finally:
        for stack in reversed(started):
            stack.stop()


@pytest.fixture
def supabase_stack(make_supabase_stack: StackFactory) -> SupabaseStack:
    """A running stack (PostgREST + FakeStorage, no Realtime) in front of the test's database."""
    return make_supabase_stack()
