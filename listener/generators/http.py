"""The HTTP client the OpenAI SDK is given: its aiohttp transport, with a small read buffer.

The trap, and its fix: aiohttp stops reading a socket only once a response's unread body
exceeds twice the session's ``read_bufsize``, which defaults to 256 KiB in aiohttp 3.14
(64 KiB before). The generator leaves a body unread until one of its body slots is free, so
with hundreds of answers of ~2 MB landing together, every waiting socket held ~650 KB in the
process (measured: three or four socket reads before the pause) instead of leaving the rest in
the kernel's receive buffer. A 16 KiB ``read_bufsize`` pauses such a socket after its first
read. The transport reads bodies in 16 KiB chunks anyway, and a socket still reads as much as
the kernel has once a slot reads it, so nothing else changes (``bench/FINDINGS.md``, "Large
images").

The SDK does not expose the session's settings: ``openai.DefaultAioHttpClient`` builds its
transport, and the transport its ``aiohttp.ClientSession``, inside. The transport takes a
``client`` factory (the vendored ``httpx-aiohttp``'s documented parameter); this module gives
each transport the client builds (the direct one and any proxy one from the environment) a
factory for the same session its own ``get_client`` would build, plus ``read_bufsize``.
"""

from __future__ import annotations

import functools
from typing import Any

import aiohttp
import httpx2
import openai
from openai._vendor.httpx_aiohttp import AiohttpTransport

#: aiohttp pauses a socket once this much times two is unread (see the module docstring).
READ_BUFSIZE = 16 * 1024

_AIOHTTP_DEFAULT_LIMIT = 100


class AioHttpClient(openai.DefaultAioHttpClient):
    """``openai.DefaultAioHttpClient`` (its defaults and transport) with the small read buffer."""

    def _init_transport(self, *args: Any, **kwargs: Any) -> httpx2.AsyncBaseTransport:
        return _with_small_reads(super()._init_transport(*args, **kwargs))

    def _init_proxy_transport(self, *args: Any, **kwargs: Any) -> httpx2.AsyncBaseTransport:
        return _with_small_reads(super()._init_proxy_transport(*args, **kwargs))


def _with_small_reads(transport: httpx2.AsyncBaseTransport) -> httpx2.AsyncBaseTransport:
    """``transport`` set to build its session with :data:`READ_BUFSIZE`; any other transport
    (one passed in by a caller) is left as it is."""
    if isinstance(transport, AiohttpTransport) and transport.client is None:
        transport.client = functools.partial(_session, transport)
    return transport


def _session(transport: AiohttpTransport) -> aiohttp.ClientSession:
    """The session ``AiohttpTransport.get_client`` builds (its TCP branch: we set no Unix
    socket and no local address), with :data:`READ_BUFSIZE`."""
    limits = transport.limits
    connector = aiohttp.TCPConnector(
        keepalive_timeout=limits.keepalive_expiry,
        ssl=transport.ssl_context,
        # the transport's own rule: aiohttp's default when the limits set none
        limit=_AIOHTTP_DEFAULT_LIMIT if limits.max_connections is None else limits.max_connections,
    )
    return aiohttp.ClientSession(connector=connector, read_bufsize=READ_BUFSIZE)
