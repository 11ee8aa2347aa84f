"""The operations endpoints: ``/healthz``, ``/readyz`` and ``/metrics`` on a tiny HTTP server,
and the rules they answer by (:func:`ops_server`).

Written on ``asyncio.start_server`` (GET only, one request per connection): three read-only
endpoints do not justify a web framework in the daemon, and serving them from the daemon's own
event loop is the point of ``/healthz``: if the loop stalls, the probe times out.
"""

from __future__ import annotations

import asyncio
import errno
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from core.errors import ImageListenerError, OperatorError
from core.ports import JobStore, WakeupSource
from listener.ops.metrics import LiveState, Metrics
from listener.queue.calls import queue_snapshot
from listener.settings import Settings

log = structlog.get_logger("listener.ops")

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
_READ_TIMEOUT = 5.0


@dataclass(frozen=True)
class Response:
    """What one endpoint answers."""

    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, status: int, payload: object) -> Response:
        return cls(status, json.dumps(payload).encode())


Handler = Callable[[], Awaitable[Response]]


class PortInUse(OperatorError):
    """Another process (often a second listener on the host) serves the port already."""


class OpsServer:
    """Serves ``routes`` (path -> handler) on ``host:port``; ``port`` 0 picks a free one."""

    def __init__(self, host: str, port: int, routes: dict[str, Handler]) -> None:
        self._host = host
        self._port = port
        self._routes = routes
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self._host, self._port)
        except OSError as exc:
            error = PortInUse if exc.errno == errno.EADDRINUSE else OperatorError
            raise error(
                f"cannot serve /healthz and /metrics on {self._host}:{self._port}: {exc.strerror}"
                " (set IMAGE_LISTENER_HTTP_PORT to a free port, or 0 to turn it off)"
            ) from exc
        log.info("ops_server_listening", host=self._host, port=self.port)

    async def start_unless_default_port_taken(self, *, port_explicit: bool) -> bool:
        """Start; a taken port that nobody chose (the default) is a warning, not a failure,
        so that a second listener on the host runs on without endpoints. Whether it serves."""
        try:
            await self.start()
        except PortInUse as exc:
            if port_explicit:
                raise
            log.warning(
                "ops_server_port_taken",
                reason=exc.detail,
                advice="this listener runs without /healthz, /readyz and /metrics; give it "
                "IMAGE_LISTENER_HTTP_PORT of its own (or 0 to say so and silence this)",
            )
            return False
        return True

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                request_line = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # headers are not needed
            response = await self._respond(request_line.decode("latin-1").split())
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            writer.close()
            return
        head = (
            f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Error')}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        try:
            writer.write(head.encode("latin-1") + response.body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _respond(self, parts: list[str]) -> Response:
        if len(parts) < 2:
            return Response.json(404, {"error": "bad request"})
        method, target = parts[0], parts[1].split("?", 1)[0]
        handler = self._routes.get(target)
        if handler is None:
            return Response.json(404, {"error": f"no such endpoint: {target[:100]}"})
        if method not in ("GET", "HEAD"):
            return Response.json(405, {"error": "GET only"})
        try:
            return await handler()
        except Exception as exc:  # a failing check is an unhealthy answer, not a crash
            log.exception("ops_endpoint_failed", path=target)
            return Response.json(503, {"status": "error", "error": type(exc).__name__})


def ops_server(
    settings: Settings,
    *,
    queue: JobStore,
    wakeups: WakeupSource,
    in_flight: Callable[[], int],
    metrics: Metrics,
) -> OpsServer | None:
    """/healthz, /readyz and /metrics of one daemon, unless IMAGE_LISTENER_HTTP_PORT is 0.

    ``/healthz`` is the event loop answering; ``/readyz`` also wants the database answered
    recently and the wake-up source connected; ``/metrics`` refreshes the queue snapshot.
    """
    if settings.http_port == 0:
        return None
    metrics.in_flight.set_function(in_flight)

    live = LiveState(
        queue_status=lambda: queue_snapshot(queue),
        wakeup_state=lambda: {
            "healthy": float(wakeups.healthy),
            "reconnects": float(wakeups.reconnects),
            "hints": float(wakeups.hints),
        },
    )
    metrics.add_live_collector(live)
    # The database must have answered recently: the worker calls it at least every poll
    # interval when idle and every third of a lease when busy.
    stale_after = max(30.0, settings.poll_seconds * 3, settings.lease_seconds * 0.7)

    async def healthz() -> Response:
        return Response.json(
            200, {"status": "ok", "loop_lag_max_ms": round(metrics.loop_lag_max * 1000, 1)}
        )

    async def readyz() -> Response:
        problems = []
        last_ok = queue.last_ok
        if last_ok is None or time.monotonic() - last_ok > stale_after:
            problems.append("database not reached recently")
        if not wakeups.healthy:
            problems.append("wake-up source not connected (polling covers it)")
        status = 200 if not problems else 503
        return Response.json(status, {"ready": not problems, "problems": problems})

    async def metrics_endpoint() -> Response:
        try:
            await live.refresh()
        except ImageListenerError as exc:
            log.warning("queue_snapshot_failed", reason=exc.detail)
        return Response(200, metrics.render(), "text/plain; version=0.0.4; charset=utf-8")

    return OpsServer(
        settings.http_host,
        settings.http_port,
        {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics_endpoint},
    )
