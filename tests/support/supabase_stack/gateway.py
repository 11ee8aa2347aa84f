"""`SupabaseStack`: a local stand-in for a hosted Supabase project's HTTP surface, on one origin.

The supabase client derives every service URL from one SUPABASE_URL, so, like Kong in a real
project, a small aiohttp gateway serves them all on 127.0.0.1:<port>:

    /rest/v1/*               reverse proxy to the real PostgREST (apikey checked as Kong does)
    /storage/v1/*            FakeStorage, in memory (see storage.py for what it leaves out)
    /realtime/v1/websocket   the `realtime` object's handler if one is given, else 404
    anything else            404 {"message": "no Route matched with those values"}

The gateway runs in a background thread with its own event loop, so sync and async tests can
both use it; `run_coroutine` runs a coroutine on that loop. Fault hooks on the REST path
(`rest_fail_next`, `rest_pause`/`rest_resume`) let tests simulate an unavailable or slow API.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import threading
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict

from tests.support.supabase_stack import jwt
from tests.support.supabase_stack.postgrest import (
    DEFAULT_AUTHENTICATOR_PASSWORD,
    INSTALL_HINT,
    PostgrestError,
    PostgrestProcess,
    authenticator_conninfo,
    ensure_authenticator,
    find_postgrest,
)
from tests.support.supabase_stack.storage import FakeStorage

T = TypeVar("T")

REST_PREFIX = "/rest/v1"
# Room for generated images: aiohttp's default request limit is 1 MiB.
MAX_BODY_BYTES = 64 * 1024 * 1024
# Headers that describe one hop, not the message (RFC 9110 7.6.1), plus those aiohttp recomputes.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


class RealtimeServer(Protocol):
    """What the gateway needs from a Realtime stand-in; its methods run on the gateway's loop."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def handle(self, request: web.Request) -> web.StreamResponse: ...


@dataclass
class RestCall:
    """One request on /rest/v1 as the gateway saw it."""

    method: str
    path: str  # below /rest/v1, with the query string, e.g. "/rpc/image_jobs_next_due"
    status: int = 0
    forwarded: bool = False  # False when the gateway answered itself (apikey, fault hook)


class SupabaseStack:
    """PostgREST + FakeStorage (+ an optional Realtime stand-in) behind one local origin.

    A context manager: entering starts PostgREST and the gateway, leaving stops both.
    """

    def __init__(
        self,
        database_conninfo: str,
        admin_conninfo: str,
        *,
        realtime: RealtimeServer | None = None,
        jwt_secret: str | None = None,
        postgrest_binary: Path | None = None,
        buckets: Iterable[str] = (),
        require_apikey: bool = True,
        proxy_timeout: float = 30.0,
        hold_timeout: float = 30.0,
        authenticator_password: str = DEFAULT_AUTHENTICATOR_PASSWORD,
    ) -> None:
        binary = postgrest_binary or find_postgrest()
        if binary is None:
            raise PostgrestError(f"PostgREST not installed: run '{INSTALL_HINT}'")
        self.jwt_secret = jwt_secret or jwt.new_jwt_secret()
        self.service_role_key = jwt.service_role_key(self.jwt_secret)
        self.anon_key = jwt.anon_key(self.jwt_secret)
        self.storage = FakeStorage(self.jwt_secret, buckets)
        self.realtime = realtime
        self.rest_calls: list[RestCall] = []
        self._admin_conninfo = admin_conninfo
        self._authenticator_password = authenticator_password
        self._postgrest = PostgrestProcess(
            binary,
            authenticator_conninfo(database_conninfo, authenticator_password),
            self.jwt_secret,
        )
        self._api_keys = {self.anon_key, self.service_role_key}
        self._require_apikey = require_apikey
        self._proxy_timeout = proxy_timeout
        self._hold_timeout = hold_timeout
        self._failures: collections.deque[int] = collections.deque()
        self._failures_lock = threading.Lock()
        self._held = 0
        self._port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Created on the gateway loop by _astart.
        self._resumed: asyncio.Event | None = None
        self._held_changed: asyncio.Event | None = None
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    # --- public surface ------------------------------------------------------------------

    @property
    def url(self) -> str:
        """SUPABASE_URL for the client: http://127.0.0.1:<port>."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def postgrest_url(self) -> str:
        """PostgREST itself, bypassing the gateway (no apikey check, no fault hooks)."""
        return self._postgrest.url

    def user_token(self, user_id: object) -> str:
        """An access token for `user_id` (role authenticated), as GoTrue would issue."""
        return jwt.user_token(self.jwt_secret, str(user_id))

    def run_coroutine(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run `coro` on the gateway's loop and return its result (call from another thread)."""
        if self._loop is None:
            coro.close()
            raise RuntimeError("the stack is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def rest_fail_next(self, n: int = 1, status: int = 503) -> None:
        """Answer the next `n` REST calls with `status` (PostgREST's error shape), unforwarded."""
        with self._failures_lock:
            self._failures.extend([status] * n)

    def rest_pause(self) -> None:
        """Hold REST calls at the gateway until rest_resume (or hold_timeout: then 504)."""
        self._on_loop(self._require_resumed().clear)

    def rest_resume(self) -> None:
        """Let held REST calls (and later ones) through to PostgREST."""
        self._on_loop(self._require_resumed().set)

    @property
    def rest_held(self) -> int:
        """How many REST calls are being held by rest_pause right now."""
        return self._held

    async def wait_rest_held(self, count: int = 1) -> None:
        """Wait, from any event loop, until at least `count` REST calls are being held.

        Bound it with `asyncio.timeout`: cancelling the wait cancels it on the gateway loop too.
        """
        if self._loop is None:
            raise RuntimeError("the stack is not running")
        future = asyncio.run_coroutine_threadsafe(self._await_held(count), self._loop)
        await asyncio.wrap_future(future)

    def postgrest_log(self) -> str:
        """PostgREST's own log so far, for failure messages."""
        return self._postgrest.log_text()

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start PostgREST, then the gateway; on any failure stop what was started."""
        ensure_authenticator(self._admin_conninfo, self._authenticator_password)
        try:
            self._postgrest.start()
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=self._run_loop, name="supabase-stack-gateway", daemon=True
            )
            self._thread.start()
            self.run_coroutine(self._astart(), timeout=15.0)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the gateway (and the Realtime stand-in), its loop and thread, then PostgREST."""
        loop, thread = self._loop, self._thread
        try:
            if loop is not None and thread is not None and thread.is_alive():
                try:
                    asyncio.run_coroutine_threadsafe(self._astop(), loop).result(timeout)
                finally:
                    loop.call_soon_threadsafe(loop.stop)
                    thread.join(timeout)
            elif loop is not None and not loop.is_closed():
                loop.close()
        finally:
            self._loop = self._thread = None
            self._postgrest.stop()

    def __enter__(self) -> SupabaseStack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run_loop(self) -> None:
        assert self._loop is not None
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def _astart(self) -> None:
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._held_changed = asyncio.Event()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._proxy_timeout),
            # Forward exactly what the client sent and what PostgREST answered.
            auto_decompress=False,
            skip_auto_headers=(hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT),
        )
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", REST_PREFIX, self._rest)
        app.router.add_route("*", REST_PREFIX + "/{tail:.*}", self._rest)
        app.router.add_route("*", "/storage/v1/{tail:.*}", self._storage)
        app.router.add_get("/realtime/v1/websocket", self._realtime)
        app.router.add_route("*", "/{tail:.*}", self._no_route)
        # Handlers still running at shutdown get this long before they are cancelled.
        self._runner = web.AppRunner(app, shutdown_timeout=5.0, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            self._port = sock.getsockname()[1]
            await web.SockSite(self._runner, sock).start()
        except BaseException:
            sock.close()
            raise
        if self.realtime is not None:
            await asyncio.wait_for(self.realtime.start(), timeout=10.0)

    async def _astop(self) -> None:
        if self._resumed is not None:
            self._resumed.set()  # let held calls finish rather than be cut off
        try:
            if self.realtime is not None:
                await asyncio.wait_for(self.realtime.stop(), timeout=10.0)
        finally:
            if self._runner is not None:
                await self._runner.cleanup()
            if self._session is not None:
                await self._session.close()
            # Nothing should be left; cancel stragglers so the loop closes cleanly.
            current = asyncio.current_task()
            leftovers = [task for task in asyncio.all_tasks() if task is not current]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)

    def _on_loop(self, fn: Callable[[], object]) -> None:
        loop, thread = self._loop, self._thread
        if loop is None:
            raise RuntimeError("the stack is not running")
        if threading.current_thread() is thread:
            fn()
            return

        async def call() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(call(), loop).result(5.0)

    def _require_resumed(self) -> asyncio.Event:
        if self._resumed is None:
            raise RuntimeError("the stack is not running")
        return self._resumed

    # --- handlers ------------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        tail = request.raw_path[len(REST_PREFIX) :]
        if not tail.startswith("/"):
            tail = "/" + tail
        call = RestCall(request.method, tail)
        self.rest_calls.append(call)
        response = await self._rest_response(request, call)
        call.status = response.status
        return response

    async def _rest_response(self, request: web.Request, call: RestCall) -> web.StreamResponse:
        refusal = self._check_apikey(request)
        if refusal is not None:
            return refusal
        with self._failures_lock:
            injected = self._failures.popleft() if self._failures else None
        if injected is not None:
            return web.json_response(
                {
                    "code": "PGRST000",
                    "details": "injected by SupabaseStack.rest_fail_next",
                    "hint": None,
                    "message": f"injected failure: HTTP {injected}",
                },
                status=injected,
            )
        if not await self._wait_resumed():
            return web.json_response({"message": "held by rest_pause for too long"}, status=504)
        call.forwarded = True
        return await self._forward(request, self._postgrest.url + call.path)

    def _check_apikey(self, request: web.Request) -> web.Response | None:
        """Kong's key-auth on the REST route, with hosted Supabase's messages."""
        if not self._require_apikey:
            return None
        key = request.headers.get("apikey") or request.query.get("apikey")
        if not key:
            return web.json_response(
                {
                    "message": "No API key found in request",
                    "hint": "No `apikey` request header or url param was found.",
                },
                status=401,
            )
        if key not in self._api_keys:
            return web.json_response(
                {
                    "message": "Invalid API key",
                    "hint": "Double check your Supabase `anon` or `service_role` API key.",
                },
                status=401,
            )
        return None

    async def _wait_resumed(self) -> bool:
        resumed = self._require_resumed()
        if resumed.is_set():
            return True
        self._set_held(self._held + 1)
        try:
            await asyncio.wait_for(resumed.wait(), self._hold_timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._set_held(self._held - 1)

    def _set_held(self, held: int) -> None:
        self._held = held
        if self._held_changed is not None:
            self._held_changed.set()

    async def _await_held(self, count: int) -> None:
        assert self._held_changed is not None
        while self._held < count:
            self._held_changed.clear()
            await self._held_changed.wait()

    async def _forward(self, request: web.Request, upstream: str) -> web.StreamResponse:
        assert self._session is not None
        headers = CIMultiDict(
            (name, value)
            for name, value in request.headers.items()
            if name.lower() not in _HOP_BY_HOP
        )
        body = await request.read() if request.body_exists else None
        try:
            async with self._session.request(
                request.method, upstream, headers=headers, data=body, allow_redirects=False
            ) as answer:
                payload = await answer.read()
                out = CIMultiDict(
                    (name, value)
                    for name, value in answer.headers.items()
                    if name.lower() not in _HOP_BY_HOP
                )
                return web.Response(
                    status=answer.status, reason=answer.reason, body=payload, headers=out
                )
        except TimeoutError:
            return web.json_response({"message": "The upstream server is timing out"}, status=504)
        except aiohttp.ClientError:
            return web.json_response(
                {"message": "An invalid response was received from the upstream server"},
                status=502,
            )

    async def _storage(self, request: web.Request) -> web.StreamResponse:
        return await self.storage.handle(request, request.match_info["tail"])

    async def _realtime(self, request: web.Request) -> web.StreamResponse:
        if self.realtime is None:
            return await self._no_route(request)
        return await self.realtime.handle(request)

    async def _no_route(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"message": "no Route matched with those values"}, status=404)
