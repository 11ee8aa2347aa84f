"""A local stand-in for a hosted Supabase project's HTTP surface: the real PostgREST, an
in-memory Storage API and a pluggable Realtime server behind one gateway origin, so the real
`supabase` client can be tested end to end. Fixtures are in
`tests.support.supabase_stack.fixtures`."""

from tests.support.supabase_stack.gateway import RealtimeServer, RestCall, SupabaseStack
from tests.support.supabase_stack.jwt import anon_key, new_jwt_secret, service_role_key, user_token
from tests.support.supabase_stack.postgrest import (
    INSTALL_HINT,
    PostgrestError,
    PostgrestProcess,
    ensure_authenticator,
    find_postgrest,
)
from tests.support.supabase_stack.storage import FakeStorage, StorageRequest, StoredObject

__all__ = [
    "INSTALL_HINT",
    "FakeStorage",
    "PostgrestError",
    "PostgrestProcess",
    "RealtimeServer",
    "RestCall",
    "StorageRequest",
    "StoredObject",
    "SupabaseStack",
    "anon_key",
    "ensure_authenticator",
    "find_postgrest",
    "new_jwt_secret",
    "service_role_key",
    "user_token",
]
