"""The processes a benchmark runs and watches: the fake OpenAI server, listener daemons, and
samplers for memory, CPU and the daemon's own /metrics.

Everything here is bounded in time and stops what it started (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-bench-not-a-real-key"


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET; HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class FakeServer:
    """``python -m tests.support.fake_openai`` in a subprocess (its own CPU, as a provider's is)."""

    def __init__(
        self, log_dir: Path, *, delay: float = 0.0, jitter: float = 0.0, image_bytes: int = 0
    ) -> None:
        argv = [sys.executable, "-m", "tests.support.fake_openai", "--port", "0", "--seed", "1"]
        if delay:
            argv += ["--delay", str(delay)]
        if jitter:
            argv += ["--delay-jitter", str(jitter)]
        if image_bytes:
            argv += ["--image-bytes", str(image_bytes)]
        with (log_dir / "fake-openai.log").open("ab") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("http"):
            _stop(self.proc)
            raise SystemExit(f"bench: the fake OpenAI server did not start (got {line!r})")
        self.base_url = line

    @property
    def pid(self) -> int:
        return self.proc.pid

    def received(self) -> list[dict[str, object]]:
        """The recorded generation requests (prompt, received_at), oldest first (last 1000)."""
        status, body = http_get(self.base_url.removesuffix("/v1") + "/_fake/received")
        if status != 200:
            raise SystemExit(f"bench: fake server /_fake/received answered {status}")
        result: list[dict[str, object]] = json.loads(body)
        return result

    def stop(self) -> None:
        _stop(self.proc)


class Listener:
    """One ``image-listener run`` process against ``database``, talking to ``fake``."""

    def __init__(
        self,
        conninfo: str,
        fake_url: str,
        image_dir: Path,
        log_dir: Path,
        *,
        concurrency: int,
        http_port: int,
        name: str = "listener",
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        prefixes = ("IMAGE_LISTENER_", "OPENAI_", "SUPABASE_", "DATABASE_URL")
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
        env.update(
            {
                "DATABASE_URL": conninfo,
                "OPENAI_API_KEY": API_KEY,
                "OPENAI_BASE_URL": fake_url,
                "IMAGE_LISTENER_CONCURRENCY": str(concurrency),
                "IMAGE_LISTENER_LOG_LEVEL": "warning",
                "IMAGE_LISTENER_LOG_FORMAT": "json",
                "IMAGE_LISTENER_HTTP_PORT": str(http_port),
                "IMAGE_LISTENER_HTTP_HOST": "127.0.0.1",
                "IMAGE_LISTENER_IMAGE_DIR": str(image_dir),
                **(extra_env or {}),
            }
        )
        self.http_port = http_port
        self.log_path = log_dir / f"{name}.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "listener", "run"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until /readyz answers 200 (pool open, LISTEN connected)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise SystemExit(f"bench: the listener exited early; see {self.log_path}")
            try:
                if http_get(f"http://127.0.0.1:{self.http_port}/readyz", 1.0)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise SystemExit(f"bench: the listener was not ready after {timeout:g}s")

    def metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.http_port}/metrics", 10.0)[1].decode()

    def loop_lag_max_ms(self) -> float:
        """The daemon's own running maximum of event-loop lag (since it started)."""
        body = http_get(f"http://127.0.0.1:{self.http_port}/healthz", 10.0)[1]
        return float(json.loads(body)["loop_lag_max_ms"])

    def stop(self) -> None:
        _stop(self.proc)


_BUCKET = re.compile(
    r'^image_listener_event_loop_lag_seconds_bucket\{le="([^"]+)"\} ([0-9.e+-]+)$', re.M
)


def lag_buckets(metrics_text: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) pairs of the loop-lag histogram."""
    return [(float(le), float(count)) for le, count in _BUCKET.findall(metrics_text)]


def counter_total(metrics_text: str, name: str) -> float:
    """The sum of every sample of a counter (all label sets) in a /metrics text."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", re.M)
    return sum(float(value) for value in pattern.findall(metrics_text))


def histogram_quantile(
    q: float, before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> float | None:
    """Prometheus-style quantile (linear within a bucket) of the observations between two
    scrapes; the largest finite bound if it falls in +Inf, None if nothing was observed."""
    counts = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]
    total = counts[-1][1] if counts else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for le, cumulative in counts:
        if cumulative >= rank:
            if le == float("inf"):
                return lower_bound
            share = (rank - lower_count) / max(cumulative - lower_count, 1e-9)
            return lower_bound + (le - lower_bound) * share
        lower_bound, lower_count = le, cumulative
    return lower_bound


def histogram_max_bound(
    before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> float | None:
    """Upper bound of the highest bucket that gained observations between two scrapes."""
    bound = None
    previous_gain = 0.0
    for (le, a), (_, b) in zip(after, before, strict=True):
        gain = a - b
        if gain > previous_gain:
            bound = le
        previous_gain = gain
    return bound


@dataclass
class RssSampler:
    """Samples the resident set size of some pids every ``interval`` seconds, in a thread."""

    pids: list[int]
    interval: float = 0.02
    peak: int = 0
    series: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def sample(self) -> int:
        total = 0
        for pid in self.pids:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.sample()
            self.peak = max(self.peak, rss)
            self.series.append((time.time(), rss))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _cpu_of(pid_or_proc: int | psutil.Process, *, kernel_only: bool = False) -> float:
    try:
        proc = (
            pid_or_proc if isinstance(pid_or_proc, psutil.Process) else psutil.Process(pid_or_proc)
        )
        times = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.system if kernel_only else times.user + times.system)


@dataclass
class CpuMeter:
    """CPU seconds spent by groups of processes between ``start()`` and ``stop()``.

    With ``postmaster``, a ``postgres`` group is the postmaster and all its children; a backend
    that exits in the window moves from the live sum to the postmaster's reaped-children total,
    so the sum stays monotonic.
    """

    groups: Mapping[str, Iterable[int]]
    postmaster: int | None = None
    result: dict[str, float] = field(default_factory=dict)
    _start: dict[str, float] = field(default_factory=dict)

    def _totals(self) -> dict[str, float]:
        totals = {name: sum(_cpu_of(pid) for pid in pids) for name, pids in self.groups.items()}
        # of which in the kernel (socket I/O, epoll, file writes and fsync)
        for name, pids in self.groups.items():
            totals[f"{name}_kernel"] = sum(_cpu_of(pid, kernel_only=True) for pid in pids)
        if self.postmaster is not None:
            root = psutil.Process(self.postmaster)
            times = root.cpu_times()
            total = times.user + times.system + times.children_user + times.children_system
            totals["postgres"] = total + sum(_cpu_of(c) for c in root.children(recursive=True))
        return totals

    def start(self) -> CpuMeter:
        self._start = self._totals()
        return self

    def stop(self) -> dict[str, float]:
        end = self._totals()
        self.result = {name: end[name] - self._start.get(name, 0.0) for name in end}
        return self.result


class PySpy:
    """``py-spy record`` attached to a pid, writing collapsed stacks (``--format raw``) with the
    thread in the first frame; ``gil=True`` keeps only samples of the thread holding the GIL
    (where Python spends CPU), not threads blocked in fsync or a lock."""

    def __init__(self, pid: int, output: Path, *, rate: int = 200, gil: bool = False) -> None:
        self.output = output
        argv = ["py-spy", "record", "--pid", str(pid), "--rate", str(rate), "--threads"]
        argv += ["--format", "raw", "-o", str(output), *(["--gil"] if gil else [])]
        self._proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        """SIGINT makes py-spy write its output and exit."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)
