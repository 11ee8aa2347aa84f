"""A fleet of ``image-listener run`` processes whose dead are replaced, as a supervisor would."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.support.daemon_process import Daemon

#: a fleet stops restarting daemons that exit on their own after this many such exits
MAX_UNEXPECTED_EXITS = 5


class Fleet:
    """``size`` daemons, each in a slot that is refilled whenever its process dies.

    A supervisor thread polls the slots; a death the harness caused (:meth:`kill`) or a SIGKILL
    from elsewhere (the fake server's ``kill-caller``) is expected; any other exit is recorded in
    :attr:`unexpected_exits`, with the tail of its log. After :data:`MAX_UNEXPECTED_EXITS` of
    those the fleet stops restarting (a daemon that cannot start would otherwise spin).
    """

    def __init__(
        self, env: Mapping[str, str], size: int, log_dir: Path, *, restart: bool = True
    ) -> None:
        self._env = dict(env)
        self._log_dir = log_dir
        self._restart = restart
        self._lock = threading.Lock()
        self._slots: list[Daemon | None] = [None] * size
        self._killed: set[int] = set()  # pids the harness killed
        self.history: list[Daemon] = []
        self.kills = 0
        self.restarts = 0
        self.external_kills = 0
        self.unexpected_exits: list[str] = []
        self._closing = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="fleet", daemon=True)

    @property
    def size(self) -> int:
        return len(self._slots)

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> Fleet:
        """Start every slot (and the supervisor); with ``wait``, until each one listens."""
        with self._lock:
            for slot in range(self.size):
                self._spawn(slot)
        if wait:
            for slot in range(self.size):
                self.current(slot).wait_for_event("listening", timeout=timeout)
        self._supervisor.start()
        return self

    def current(self, slot: int) -> Daemon:
        daemon = self._slots[slot]
        if daemon is None:
            raise RuntimeError(f"slot {slot} was never started")
        return daemon

    def kill(self, slot: int) -> bool:
        """SIGKILL the slot's process (the supervisor restarts it); False if it was not alive."""
        with self._lock:
            daemon = self._slots[slot]
            if daemon is None or daemon.proc.poll() is not None:
                return False
            self._killed.add(daemon.proc.pid)
            daemon.proc.send_signal(signal.SIGKILL)
            self.kills += 1
            return True

    def signal(self, slot: int, signum: int) -> None:
        self.current(slot).proc.send_signal(signum)

    def events(self, name: str) -> list[dict[str, Any]]:
        """Every log event called ``name`` from every process this fleet ever ran."""
        found = []
        needle = f'"{name}"'
        for daemon in list(self.history):
            for line in list(daemon.lines):
                if needle in line:
                    try:
                        event = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if event.get("event") == name:
                        found.append(event)
        return found

    def close(self) -> None:
        """Kill every process and keep their logs in the log directory."""
        self._closing.set()
        if self._supervisor.is_alive():
            self._supervisor.join(timeout=5)
        with self._lock:
            for daemon in self.history:
                daemon.stop()
        for number, daemon in enumerate(self.history):
            (self._log_dir / f"daemon-{number:03d}.log").write_text("".join(daemon.lines))

    def _spawn(self, slot: int) -> None:
        number = len(self.history)
        daemon = Daemon(self._env, stderr_path=self._log_dir / f"daemon-{number:03d}.err")
        self._slots[slot] = daemon
        self.history.append(daemon)

    def _supervise(self) -> None:
        while not self._closing.wait(0.1):
            with self._lock:
                for slot, daemon in enumerate(self._slots):
                    if daemon is None or daemon.proc.poll() is None:
                        continue
                    self._record_exit(daemon)
                    if len(self.unexpected_exits) >= MAX_UNEXPECTED_EXITS:
                        self._restart = False
                    if self._restart and not self._closing.is_set():
                        self._spawn(slot)
                        self.restarts += 1
                    else:
                        self._slots[slot] = None

    def _record_exit(self, daemon: Daemon) -> None:
        code = daemon.proc.returncode
        if daemon.proc.pid in self._killed:
            return
        if code == -signal.SIGKILL:
            self.external_kills += 1
            return
        tail = "".join(daemon.lines[-5:])
        self.unexpected_exits.append(f"pid {daemon.proc.pid} exited {code}: {tail}")
