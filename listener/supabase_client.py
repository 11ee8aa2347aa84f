"""One supabase ``AsyncClient`` for the daemon, on an HTTP client whose lifetime we own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from supabase import AsyncClient, AsyncClientOptions, acreate_client

from core.errors import OperatorError, first_line


@asynccontextmanager
async def supabase_client(url: str, key: str, *, http_timeout: float) -> AsyncIterator[AsyncClient]:
    """A service-role client for PostgREST and Storage; closed (with its sockets) on exit.

    No auth session is kept or refreshed: the service-role key is a long-lived server secret.
    """
    async with httpx.AsyncClient(timeout=httpx.Timeout(http_timeout, connect=10.0)) as http:
        try:
            client = await acreate_client(
                url,
                key,
                options=AsyncClientOptions(
                    httpx_client=http,
                    auto_refresh_token=False,
                    persist_session=False,
                ),
            )
        except Exception as exc:  # the client validates the URL and key shape
            raise OperatorError(f"cannot create the Supabase client: {first_line(exc)}") from exc
        yield client
