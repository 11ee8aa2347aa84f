"""One SupabaseStack (the real PostgREST) shared by a module's tests, in front of a database the
module owns: for tests that only read or are refused, where a stack and a clone per test would
cost more than the test. Skips, as `make_supabase_stack` does, when PostgREST is missing."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.pg import PostgresServer
from tests.support.supabase_stack import SupabaseStack
from tests.support.supabase_stack.postgrest import INSTALL_HINT, find_postgrest


def module_stack(pg_server: PostgresServer, dbname: str) -> Iterator[SupabaseStack]:
    """Generator for a module-scoped fixture: a running stack on ``dbname``, then stopped."""
    binary = find_postgrest()
    if binary is None:
        if os.environ.get("REQUIRE_POSTGREST_TESTS"):
            pytest.fail(f"PostgREST missing but REQUIRE_POSTGREST_TESTS is set: {INSTALL_HINT}")
        pytest.skip(f"PostgREST not installed: run '{INSTALL_HINT}'")
    stack = SupabaseStack(pg_server.dsn(dbname), pg_server.admin_dsn, postgrest_binary=binary)
    with stack:
        yield stack
