"""Run the real ``image-listener`` CLI in a subprocess, the way an operator would."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

API_KEY = "sk-test-E2E-distinctive-9c41d"


def listener_env(
    database_url: str, base_url: str, image_dir: Path, **overrides: str
) -> dict[str, str]:
    """The environment of one daemon: short leases and polls, JSON logs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGE_LISTENER_", "OPENAI_"))}
    env.update(
        {
            "DATABASE_URL": database_url,
            "OPENAI_API_KEY": API_KEY,
            "OPENAI_BASE_URL": base_url,
            "IMAGE_LISTENER_IMAGE_DIR": str(image_dir),
            "IMAGE_LISTENER_LEASE_SECONDS": "3",
            "IMAGE_LISTENER_POLL_SECONDS": "0.5",
            "IMAGE_LISTENER_LOG_FORMAT": "json",
            "IMAGE_LISTENER_OPENAI_TIMEOUT_SECONDS": "10",
            "IMAGE_LISTENER_SHUTDOWN_GRACE_SECONDS": "10",
            # several daemons run side by side: the ops server only where a test asks for it
            "IMAGE_LISTENER_HTTP_PORT": "0",
        }
    )
    env.update(overrides)
    return env


def cli(
    *args: str, env: Mapping[str, str], timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one CLI command to completion."""
    return subprocess.run(
        [sys.executable, "-m", "listener", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


class Daemon:
    """``image-listener run`` in a subprocess; stdout JSON log lines are collected as they come."""

    def __init__(self, env: Mapping[str, str], *args: str, stderr_path: Path | None = None) -> None:
        # A long run (chaos tests) sends stderr to a file: an unread pipe would fill and block.
        self._stderr_path = stderr_path
        stderr_file = None if stderr_path is None else stderr_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "listener", "run", *args],
                env=dict(env),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE if stderr_file is None else stderr_file,
                text=True,
            )
        finally:
            if stderr_file is not None:
                stderr_file.close()
        self.lines: list[str] = []
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            try:
                self._events.put(json.loads(line))
            except json.JSONDecodeError:
                continue

    def wait_for_event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        """Block until a log event named ``name`` appears (or fail with the log so far)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self._events.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self._events.empty():
                    break
                continue
            if event.get("event") == name:
                return event
        raise AssertionError(f"no {name!r} event; exit={self.proc.poll()}\n{self.output()}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def output(self) -> str:
        stderr = ""
        if self.proc.poll() is not None and self.proc.stderr is not None:
            stderr = self.proc.stderr.read()
        elif self._stderr_path is not None and self._stderr_path.exists():
            stderr = self._stderr_path.read_text(errors="replace")
        return "".join(self.lines) + stderr

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
