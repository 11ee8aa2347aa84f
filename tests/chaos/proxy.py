"""A TCP proxy in front of PostgreSQL's unix socket that can cut or freeze the network.

pgserver listens on a unix socket only; the daemons under test connect to this proxy
(``host=127.0.0.1 port=<proxy.port>``) instead, so a test can break their connections the two
ways a real network does:

* :meth:`TcpToUnixProxy.drop` resets every open connection (RST, as a restarted NAT or load
  balancer does); new connections are accepted as usual afterwards;
* :meth:`TcpToUnixProxy.stall` stops forwarding bytes in both directions while every socket
  stays open (a half-open path: nothing fails, nothing answers) until :meth:`unstall`.
  Connections opened during a stall are accepted but stay silent too.

It runs its own asyncio loop in a daemon thread and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")


class _Pair:
    """One proxied connection: the client's stream and the server's."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server

    def reset(self) -> None:
        """Close both ends at once; the client end with an RST (SO_LINGER 0)."""
        sock = self.client.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.client.transport.abort()
        self.server.transport.abort()


class TcpToUnixProxy:
    """Forward ``127.0.0.1:<port>`` to a unix socket, with fault switches for tests."""

    def __init__(self, unix_path: str) -> None:
        self._unix_path = unix_path
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-proxy")
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        self._flowing = asyncio.Event()
        self.port = 0
        self.connections = 0
        self.drops = 0
        self.stalls = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> TcpToUnixProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def close(self) -> None:
        """Stop listening, reset every connection, stop the loop and join its thread."""
        if not self._thread.is_alive():
            return
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> TcpToUnixProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def dsn(self, dbname: str, user: str = "postgres") -> str:
        """A conninfo that reaches ``dbname`` through this proxy."""
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={user} connect_timeout=5"

    # -- faults ------------------------------------------------------------------------------

    def drop(self) -> int:
        """Reset every open connection; returns how many were reset."""
        self.drops += 1
        return self._call(self._drop())

    def stall(self) -> None:
        """Stop forwarding bytes (both ways) while keeping every socket open."""
        self.stalls += 1
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def unstall(self) -> None:
        """Forward again, starting with the bytes held back."""
        self._loop.call_soon_threadsafe(self._flowing.set)

    # -- the loop side -----------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._drop()
        self._flowing.set()
        # Let every connection's task see its transports closed before the loop stops.
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def _drop(self) -> int:
        pairs = list(self._pairs)
        for pair in pairs:
            pair.reset()
        return len(pairs)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server_r, server_w = await asyncio.open_unix_connection(self._unix_path)
        except OSError:
            client_w.transport.abort()  # the database is down: refuse as it would
            return
        pair = _Pair(client_w, server_w)
        self._pairs.add(pair)
        pumps = [
            asyncio.create_task(self._pump(client_r, server_w)),
            asyncio.create_task(self._pump(server_r, client_w)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._pairs.discard(pair)
            client_w.transport.abort()
            server_w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                # Held here while stalled: the reader is not read again, so TCP pushes back.
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
