"""Helpers for tests of the daemon's HTTP endpoints: free ports and Prometheus samples."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody listens on right now (on 127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "0.0.0.0") -> bool:
    """Whether ``host:port`` can be bound now, as the daemon would bind it (asyncio sets
    SO_REUSEADDR, so connections in TIME_WAIT from an earlier test do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def metric(text: str, name: str) -> float:
    """The value of one sample line of /metrics (``name`` includes its labels)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")
