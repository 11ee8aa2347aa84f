"""HS256 JWTs shaped like a Supabase project's: the legacy anon and service_role API keys and a
GoTrue access token for a signed-in user.

PostgREST and the fake Storage verify them with the same secret, as a hosted project does with
its JWT secret. Only the claims those servers read are set (role, sub, aud, exp); GoTrue's
session_id, aal, amr, email and so on are left out.
"""

from __future__ import annotations

import secrets
import time
import uuid

import jwt as pyjwt

# The legacy API keys Supabase issues live for ten years; tests only need "not expired".
KEY_LIFETIME_SECONDS = 10 * 365 * 24 * 3600
# GoTrue's default access-token lifetime.
USER_TOKEN_LIFETIME_SECONDS = 3600


def new_jwt_secret() -> str:
    """A random project JWT secret (PostgREST wants at least 32 characters)."""
    return secrets.token_urlsafe(32)


def service_role_key(secret: str) -> str:
    """The service_role API key: PostgREST runs as service_role (bypasses RLS)."""
    return _api_key(secret, "service_role")


def anon_key(secret: str) -> str:
    """The anon API key: PostgREST runs as anon."""
    return _api_key(secret, "anon")


def user_token(
    secret: str, user_id: uuid.UUID | str, lifetime_seconds: int = USER_TOKEN_LIFETIME_SECONDS
) -> str:
    """An access token for a signed-in user: role authenticated, auth.uid() = user_id."""
    now = int(time.time())
    claims = {
        "iss": "supabase",
        "sub": str(user_id),
        "role": "authenticated",
        "aud": "authenticated",
        "iat": now,
        "exp": now + lifetime_seconds,
    }
    return pyjwt.encode(claims, secret, algorithm="HS256")


#: A fixed issue time, so a key is a pure function of (secret, role) like a project's real
#: keys: the Realtime stand-in and the gateway each mint the keys they accept, and with the
#: current time in ``iat`` two mints straddling a second boundary disagreed (a 401 flake).
KEYS_ISSUED_AT = 1_767_225_600  # 2026-01-01T00:00:00Z


def _api_key(secret: str, role: str) -> str:
    claims = {
        "iss": "supabase",
        "role": role,
        "iat": KEYS_ISSUED_AT,
        "exp": KEYS_ISSUED_AT + KEY_LIFETIME_SECONDS,
    }
    return pyjwt.encode(claims, secret, algorithm="HS256")
