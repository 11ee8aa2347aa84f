"""The operations endpoints: ``/healthz``, ``/readyz`` and ``/metrics`` on a tiny HTTP server.

Written on ``asyncio.start_server`` (GET only, one request per connection): three read-only
endpoints do not justify a web framework in the daemon, and serving them from the daemon's own
event loop is the point of ``/healthz``: if the loop stalls, the probe times out.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from core.errors import OperatorError

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
            raise OperatorError(
                f"cannot serve /healthz and /metrics on {self._host}:{self._port}: {exc.strerror}"
                " (set IMAGE_LISTENER_HTTP_PORT to a free port, or 0 to turn it off)"
            ) from exc
        log.info("ops_server_listening", host=self._host, port=self.port)

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
