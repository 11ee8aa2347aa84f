"""A local OpenAI-compatible Images API for tests and benchmarks (stdlib only, threaded).

Use it in-process::

    with FakeOpenAI() as fake:
        client = build_openai_client("sk-test", fake.base_url, 5.0)
        ...
        assert fake.calls("a cat") == 1

or as a process (the first stdout line is the base URL; SIGTERM/SIGINT stop it)::

    python -m tests.support.fake_openai --port 0 [--delay 0.5] [--delay-jitter 0.2] [--seed 1]
                                [--fault-rate 0.2 --fault-seed 7 --fault-hang 30]
                                [--image-bytes 1500000] [--rate-limit 10 --rate-window 2]

With ``"stream": true`` the answer is server-sent events, as the real API sends them:
``partial_images`` (0..3) ``image_generation.partial_image`` events (small PNGs, 1/8 of the
size) and then ``image_generation.completed`` with the image and usage; each sent partial is
recorded with its time (:meth:`FakeOpenAI.partials_sent`, ``GET /_fake/partials``).

``POST /v1/images/edits`` takes multipart form data as the SDK sends it (``image`` or repeated
``image[]`` parts, 1 to 16 PNG/JPEG/WebP files, an optional ``mask``, scalar form fields) and
answers like a generation (``image_edit.*`` events when streamed); the file parts are recorded
in order (:attr:`RecordedRequest.files`) so a test can check what arrived.

``POST /v1/images/generations`` answers like the real API: ``{"created", "data": [{"b64_json"}],
"usage", "background", "output_format", "quality", "size"}`` with an ``x-request-id`` header. The
image is a solid PNG of the requested size (1024x1024 for ``auto`` or no size), whatever the
``output_format``; ``image_bytes`` (``--image-bytes``) pads it with an ignorable private chunk
of random bytes to about that size, as large as a real image, for benchmarks that must feel the
weight of decoding and writing it. Requests are checked where that is cheap:
``Authorization: Bearer <key>``, a non-empty prompt, the size (``auto`` or ``WxH``, both
multiples of 16, at most 3840, ratio at most 3:1), quality, background, output_format, ``n`` in
1..10, and no ``response_format``.

Behaviour is scripted by directives inside the prompt, so each test, and each request within a
test, controls its own. Calls are counted per exact prompt text; call *k* of a prompt follows the
*k*-th scripted step, later calls follow ``status`` if given, else succeed.

Directives (anywhere in the prompt, each in its own brackets)::

    [fake:fail=STEP,STEP,...]   calls 1..n of this prompt follow these steps, then succeed
    [fake:status=STEP]          every call after the scripted ones follows STEP (e.g. 401)
    [fake:delay=SECONDS]        wait before answering every call of this prompt
    [fake:drop] [fake:drop=N]   sugar: append N (default 1) ``drop`` steps
    [fake:hang=SECONDS]         sugar: append one ``hang:seconds=SECONDS`` step
    [fake:moderation]           sugar: status=moderation
    [fake:bad-b64]              sugar: status=bad-b64
    [fake:kill-caller]          sugar: status=kill-caller
    [fake:partial-every=S]      streams: S seconds before each partial image and the last event
    [fake:stream-fail=KIND]     streams: KIND (STREAM_FAULTS) instead of finishing; with
                                ``:after=N``, after N partial images (default 0)

    STEP := HEAD (":" KEY "=" VALUE)*
    HEAD := a 3-digit HTTP status (an OpenAI-shaped error with a typical code for that status)
          | moderation   400, code moderation_blocked, type image_generation_user_error
          | 404-model    404, code model_not_found
          | billing      429, code insufficient_quota (a 429 that waiting does not fix)
          | drop         close the connection without answering
          | hang         wait ``seconds`` (default 30) without answering, then close
          | bad-b64      200 whose b64_json is not base64
          | no-data      200 with an empty ``data`` list
          | bad-json     200 whose body is not JSON
          | cut          200 headers and half of the body, then close the connection
          | stall        200 headers and half of the body, then wait ``seconds`` (default
                         30) before closing
          | ok           a normal success
          | kill-caller  SIGKILL the process that made the call, then close without answering
                         (only a descendant of the server's own process, or a pid that
                         ``killable`` accepts; otherwise a 400 ``bad_fake_directive``)
    KEY  := retry-after (seconds) | retry-after-ms | code | type | param | seconds

Examples: ``[fake:fail=429:retry-after=0.2,500]``, ``[fake:status=404-model]``, ``[fake:drop=2]``,
``[fake:status=400:code=invalid_value:param=size]``. Directives are applied after the auth check and
before parameter validation. An unknown directive is answered with a 400 whose code is
``bad_fake_directive``, so a typo fails loudly. The server-wide ``default_delay_seconds`` (plus
up to ``delay_jitter_seconds`` of random extra) models generation time and applies to successful
generations only; ``[fake:delay=...]`` applies to every call of its prompt.

Server-wide faults (chaos tests): with ``fault_rate`` (``--fault-rate``) that fraction of the
calls that would otherwise succeed is answered instead, chosen evenly by a generator seeded with
``fault_seed``, with one of: a 429 with ``retry-after: fault_retry_after_seconds``, a 500, a hang
of ``fault_hang_seconds`` (set it past the client's timeout) or a dropped connection. They are
counted in :meth:`FakeOpenAI.fault_counts` and :attr:`FakeOpenAI.faults_injected`.

Server-wide rate limit (the organisation's images-per-minute limit): with ``rate_limit`` calls
per ``rate_window_seconds`` (``--rate-limit N --rate-window W``), a generation or edit that
arrives while N calls were admitted within the last W seconds (a sliding window) is answered 429
``rate_limit_exceeded`` with ``retry-after`` and ``retry-after-ms`` saying when the oldest of
them leaves the window, so a slot frees; refused calls do not count against the window. Every
admission time is kept (:meth:`FakeOpenAI.admissions`, the most admitted within any window:
:meth:`FakeOpenAI.max_admitted_in_window`) and the refusals are counted
(:attr:`FakeOpenAI.rate_limited`; both in ``GET /_fake/stats``).

``GET /v1/models/{id}`` answers like the real API (401 for a key starting ``sk-rejected``, 404
for a model id containing ``unknown``), for ``image-listener doctor``.

Inspection: ``GET /_fake/calls`` returns ``{prompt: count}``, ``GET /_fake/requests`` the recorded
request bodies, ``GET /_fake/received`` their prompts with the receive time (``time.time()``,
for latency measurements across processes), ``GET /_fake/stats`` the counts of successes, faults
and kills, ``POST /_fake/reset`` clears all; in-process, :meth:`FakeOpenAI.calls`,
:meth:`FakeOpenAI.call_counts`, :attr:`FakeOpenAI.total_calls`, :meth:`FakeOpenAI.successes`
(images actually sent, per prompt), :meth:`FakeOpenAI.success_counts`,
:meth:`FakeOpenAI.fault_counts`, :meth:`FakeOpenAI.kills`, :meth:`FakeOpenAI.requests`,
:meth:`FakeOpenAI.last_request` and :meth:`FakeOpenAI.reset`.
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import email.policy
import functools
import json
import os
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
import uuid
import zlib
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any

import psutil

from core.png import solid_png

GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"

_DIRECTIVE = re.compile(r"\[fake:([a-z0-9-]+)(?:=([^\]\s]*))?\]")
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_QUALITIES = {"low", "medium", "high", "auto", "xhigh", "max", "standard", "hd"}
_BACKGROUNDS = {"transparent", "opaque", "auto"}
_FORMATS = {"png", "webp", "jpeg"}
#: community-quoted gpt-image-1 output tokens for a 1024x1024 image, by quality
_OUTPUT_TOKENS = {"low": 272, "medium": 1056, "high": 4160}
_MAX_RECORDED = 1000
_DEFAULT_HANG_SECONDS = 30.0


class DirectiveError(ValueError):
    """A ``[fake:...]`` directive the server does not understand."""


@dataclass(frozen=True)
class Step:
    """What the server does for one call."""

    kind: str  # ok | error | drop | hang | cut | stall | bad-b64 | no-data | bad-json | kill-caller
    status: int = 200
    code: str | None = None
    type: str | None = None
    param: str | None = None
    message: str | None = None
    retry_after: str | None = None
    retry_after_ms: str | None = None
    seconds: float = _DEFAULT_HANG_SECONDS


@dataclass(frozen=True)
class Script:
    """The behaviour a prompt asks for."""

    steps: tuple[Step, ...] = ()
    always: Step | None = None
    delay: float = 0.0
    #: streams: seconds before each partial image and before the completed event
    partial_every: float = 0.0
    #: streams: what goes wrong, after how many partial images (see STREAM_FAULTS)
    stream_fault: str | None = None
    stream_fault_after: int = 0

    def step_for(self, call_number: int) -> Step:
        """The step for the ``call_number``-th (1-based) call of this prompt."""
        if call_number <= len(self.steps):
            return self.steps[call_number - 1]
        return self.always or Step("ok")


# Typical bodies for each status, close to what the real API sends.
_ERRORS: dict[int, tuple[str | None, str, str]] = {
    400: ("invalid_value", "invalid_request_error", "Invalid value (scripted by the fake)."),
    401: ("invalid_api_key", "invalid_request_error", "Incorrect API key provided: {masked}."),
    403: (None, "invalid_request_error", "Your organization must be verified to use this model."),
    404: (None, "invalid_request_error", "Not found."),
    408: (None, "timeout", "Request timed out."),
    409: (None, "conflict", "The request conflicted with another request."),
    422: (None, "invalid_request_error", "Unprocessable request."),
    429: (
        "rate_limit_exceeded",
        "requests",
        "Rate limit reached on images per min (ipm): Limit 5, Used 5, Requested 1.",
    ),
}
_SERVER_ERROR = (None, "server_error", "The server had an error processing your request.")

_NAMED_STEPS: dict[str, Step] = {
    "moderation": Step(
        "error",
        400,
        code="moderation_blocked",
        type="image_generation_user_error",
        message="Your request was rejected by the safety system. safety_violations=[violence].",
    ),
    "404-model": Step(
        "error",
        404,
        code="model_not_found",
        type="invalid_request_error",
        message="The model does not exist or you do not have access to it.",
    ),
    "billing": Step(
        "error",
        429,
        code="insufficient_quota",
        type="insufficient_quota",
        message="You exceeded your current quota, please check your plan and billing details.",
    ),
    "drop": Step("drop"),
    "hang": Step("hang"),
    "bad-b64": Step("bad-b64"),
    "no-data": Step("no-data"),
    "bad-json": Step("bad-json"),
    "cut": Step("cut"),
    "stall": Step("stall"),
    "ok": Step("ok"),
    "kill-caller": Step("kill-caller"),
}

#: the server-wide fault kinds, drawn evenly for ``fault_rate`` of the would-be successes
FAULT_KINDS = ("429", "500", "hang", "drop")

#: what ``[fake:stream-fail=KIND:after=N]`` does after N partial images, instead of finishing:
#: moderation / server send an error event with a nested ``error`` object (the SDK raises
#: it), flat-moderation / flat send a flat ``{"type": "error", "code": ...}`` event (the SDK
#: yields it silently), unknown an event of a type nobody knows, end closes the stream without
#: the completed event, cut drops the connection in the middle of a frame
STREAM_FAULTS = ("moderation", "server", "flat-moderation", "flat", "unknown", "end", "cut")


def parse_step(text: str) -> Step:
    """Parse one STEP (see the module docstring)."""
    head, *options = text.split(":")
    if re.fullmatch(r"\d{3}", head):
        status = int(head)
        if status < 400:
            raise DirectiveError(f"an error step needs a 4xx/5xx status, got {status}")
        code, type_, message = _ERRORS.get(
            status,
            _SERVER_ERROR if status >= 500 else (None, "invalid_request_error", "Scripted error."),
        )
        step = Step("error", status, code=code, type=type_, message=message)
    elif head in _NAMED_STEPS:
        step = _NAMED_STEPS[head]
    else:
        raise DirectiveError(f"unknown step {head!r}")
    changes: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not value:
            raise DirectiveError(f"step option {option!r} is not KEY=VALUE")
        if key in ("code", "type", "param"):
            changes[key] = value
        elif key in ("retry-after", "retry-after-ms"):
            changes[key.replace("-", "_")] = value
        elif key == "seconds":
            changes["seconds"] = _number(value)
        else:
            raise DirectiveError(f"unknown step option {key!r}")
    return replace(step, **changes)


def parse_directives(prompt: str) -> Script:
    """The :class:`Script` a prompt asks for; raises :class:`DirectiveError` on a typo."""
    matches = list(_DIRECTIVE.finditer(prompt))
    if len(matches) != prompt.count("[fake:"):
        raise DirectiveError("a [fake:...] directive is malformed")
    steps: list[Step] = []
    always: Step | None = None
    delay = 0.0
    stream: dict[str, Any] = {}
    for match in matches:
        name, value = match.group(1), match.group(2)
        if name == "fail" and value:
            steps.extend(parse_step(part) for part in value.split(","))
        elif name == "status" and value:
            always = parse_step(value)
        elif name == "delay" and value:
            delay = _number(value)
        elif name == "drop":
            steps.extend([_NAMED_STEPS["drop"]] * (int(value) if value else 1))
        elif name == "hang" and value:
            steps.append(Step("hang", seconds=_number(value)))
        elif name in ("moderation", "bad-b64", "kill-caller") and not value:
            always = _NAMED_STEPS[name]
        elif name == "partial-every" and value:
            stream["partial_every"] = _number(value)
        elif name == "stream-fail" and value:
            kind, _, after = value.partition(":after=")
            if kind not in STREAM_FAULTS:
                raise DirectiveError(f"unknown stream fault {kind!r}")
            stream["stream_fault"] = kind
            stream["stream_fault_after"] = int(_number(after)) if after else 0
        else:
            raise DirectiveError(f"unknown directive [fake:{match.group(0)[6:-1]}]")
    return Script(steps=tuple(steps), always=always, delay=delay, **stream)


def _number(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise DirectiveError(f"{value!r} is not a number") from None
    if not 0 <= number < 3600:
        raise DirectiveError(f"{value!r} is out of range")
    return number


@functools.lru_cache(maxsize=64)
def _png_b64(width: int, height: int, image_bytes: int = 0) -> str:
    png = solid_png(width, height)
    padding = image_bytes - len(png) - 12
    if padding > 0:
        # An ancillary, private chunk ("paDd"): decoders skip it; random bytes do not compress,
        # like real image data. Placed before IEND (the last 12 bytes).
        filler = random.Random(padding).randbytes(padding)
        chunk = b"paDd" + filler
        framed = struct.pack(">I", padding) + chunk + struct.pack(">I", zlib.crc32(chunk))
        png = png[:-12] + framed + png[-12:]
    return base64.b64encode(png).decode("ascii")


@dataclass
class RecordedRequest:
    """One generation request as received (the Authorization header is not kept)."""

    prompt: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    #: wall-clock time (``time.time()``) the request was received
    received_at: float = field(default_factory=time.time)
    #: an edit's file parts in order: (field name ``image``/``image[]``/``mask``, bytes)
    files: list[tuple[str, bytes]] = field(default_factory=list)


class _Reply(Exception):
    """Internal: stop handling and send this error response."""

    def __init__(self, step: Step) -> None:
        super().__init__(step.message)
        self.step = step


def _invalid(param: str | None, message: str, code: str = "invalid_value") -> _Reply:
    return _Reply(
        Step("error", 400, code=code, type="invalid_request_error", param=param, message=message)
    )


class FakeOpenAI:
    """The server: a context manager that serves on ``127.0.0.1`` in a background thread."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        default_delay_seconds: float = 0.0,
        delay_jitter_seconds: float = 0.0,
        seed: int | None = None,
        verbose: bool = False,
        fault_rate: float = 0.0,
        fault_seed: int | None = None,
        fault_hang_seconds: float = _DEFAULT_HANG_SECONDS,
        fault_retry_after_seconds: float = 0.5,
        killable: Callable[[int], bool] | None = None,
        image_bytes: int = 0,
        rate_limit: int | None = None,
        rate_window_seconds: float = 60.0,
    ) -> None:
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be between 0 and 1, got {fault_rate!r}")
        if rate_limit is not None and (rate_limit < 1 or rate_window_seconds <= 0):
            raise ValueError("rate_limit must be at least 1 and rate_window_seconds positive")
        self._address = (host, port)
        self.default_delay_seconds = default_delay_seconds
        self.delay_jitter_seconds = delay_jitter_seconds
        self.verbose = verbose
        self.fault_rate = fault_rate
        self.fault_hang_seconds = fault_hang_seconds
        self.fault_retry_after_seconds = fault_retry_after_seconds
        self.image_bytes = image_bytes
        self.rate_limit = rate_limit
        self.rate_window_seconds = rate_window_seconds
        self._admitted: list[float] = []
        self._arrived: list[float] = []
        self._rate_limited = 0
        self._killable = killable or _is_descendant
        self._random = random.Random(seed)
        self._fault_random = random.Random(fault_seed)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._successes: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()
        self._limited: Counter[str] = Counter()
        self._kills: list[int] = []
        self._partials: list[tuple[str, int, float]] = []
        self._recorded: deque[RecordedRequest] = deque(maxlen=_MAX_RECORDED)
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeOpenAI:
        """Bind and serve in a background thread (idempotent)."""
        if self._httpd is None:
            self._stopping.clear()
            self._httpd = _Server(self._address, _Handler, self)
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.01},
                name="fake-openai",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake delayed and hanging calls, close every connection, join threads."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``, what ``base_url`` of the SDK expects."""
        if self._httpd is None:
            raise RuntimeError("the fake server is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    # -- inspection --------------------------------------------------------------------------

    def calls(self, prompt: str) -> int:
        """How many generation requests carried exactly this prompt."""
        with self._lock:
            return self._counts[prompt]

    def call_counts(self) -> dict[str, int]:
        """``{prompt: count}`` for every prompt seen."""
        with self._lock:
            return dict(self._counts)

    @property
    def total_calls(self) -> int:
        """Generation requests received since start (or the last reset)."""
        with self._lock:
            return sum(self._counts.values())

    def successes(self, prompt: str) -> int:
        """How many images were actually sent for this prompt (a 200 with image data)."""
        with self._lock:
            return self._successes[prompt]

    def success_counts(self) -> dict[str, int]:
        """``{prompt: images sent}`` for every prompt that got one."""
        with self._lock:
            return dict(self._successes)

    def fault_counts(self) -> dict[str, int]:
        """Server-wide faults injected so far, by kind (``429``, ``500``, ``hang``, ``drop``)."""
        with self._lock:
            return dict(self._faults)

    @property
    def faults_injected(self) -> int:
        """All server-wide faults injected so far."""
        with self._lock:
            return sum(self._faults.values())

    def rate_limited_counts(self) -> dict[str, int]:
        """Rate-limit 429s (``rate_limit_exceeded``) answered per prompt, whatever sent them
        (the server-wide limit, a fault, a script): calls that cost a request no attempt."""
        with self._lock:
            return dict(self._limited)

    def admissions(self) -> list[float]:
        """When each call was admitted by the rate limit (``time.monotonic()``), in order."""
        with self._lock:
            return list(self._admitted)

    def max_admitted_in_window(self) -> int:
        """The most calls admitted within any ``rate_window_seconds`` (what the limit bounds)."""
        return _most_within(self.admissions(), self.rate_window_seconds)

    def max_arrived_in_window(self) -> int:
        """The most calls that arrived, admitted or refused, within any ``rate_window_seconds``:
        a client that keeps to the limit never brings more than ``rate_limit``."""
        with self._lock:
            arrived = list(self._arrived)
        return _most_within(arrived, self.rate_window_seconds)

    @property
    def rate_limited(self) -> int:
        """Calls refused by the server-wide rate limit so far."""
        with self._lock:
            return self._rate_limited

    def partials_sent(self, prompt: str | None = None) -> list[tuple[int, float]]:
        """``(index, time.time())`` of each partial image streamed (for this prompt)."""
        with self._lock:
            return [(i, at) for p, i, at in self._partials if prompt is None or p == prompt]

    def kills(self) -> list[int]:
        """The pids that ``kill-caller`` sent SIGKILL to, in order."""
        with self._lock:
            return list(self._kills)

    def requests(self) -> list[RecordedRequest]:
        """The most recent requests (up to 1000), oldest first."""
        with self._lock:
            return list(self._recorded)

    def last_request(self, prompt: str | None = None) -> RecordedRequest:
        """The latest request, optionally the latest with this prompt; KeyError if none."""
        with self._lock:
            for recorded in reversed(self._recorded):
                if prompt is None or recorded.prompt == prompt:
                    return recorded
        raise KeyError(prompt)

    def reset(self) -> None:
        """Forget counts and recorded requests (scripts restart at call 1)."""
        with self._lock:
            self._counts.clear()
            self._recorded.clear()
            self._successes.clear()
            self._faults.clear()
            self._limited.clear()
            self._admitted.clear()
            self._arrived.clear()
            self._rate_limited = 0
            self._kills.clear()
            self._partials.clear()

    # -- used by the handler -----------------------------------------------------------------

    def _record(
        self,
        prompt: str,
        body: dict[str, Any],
        headers: dict[str, str],
        files: list[tuple[str, bytes]] | None = None,
    ) -> int:
        with self._lock:
            self._counts[prompt] += 1
            self._recorded.append(RecordedRequest(prompt, body, headers, files=files or []))
            return self._counts[prompt]

    def _admit(self) -> Step | None:
        """Count this call against the sliding window, or the 429 that refuses it."""
        if self.rate_limit is None:
            return None
        with self._lock:
            now = time.monotonic()
            self._arrived.append(now)
            window = [
                at
                for at in self._admitted[-self.rate_limit :]
                if now - at < self.rate_window_seconds
            ]
            if len(window) < self.rate_limit:
                self._admitted.append(now)
                return None
            self._rate_limited += 1
            frees_in = max(0.0, window[0] + self.rate_window_seconds - now)
        return replace(
            parse_step("429"),
            message=(
                f"Rate limit reached on images per min (ipm): Limit {self.rate_limit}, "
                f"Used {self.rate_limit}, Requested 1. Please try again in {frees_in:.3f}s."
            ),
            retry_after=f"{frees_in:.3f}",
            retry_after_ms=f"{frees_in * 1000:.0f}",
        )

    def _draw_fault(self) -> Step | None:
        """A server-wide fault for this would-be success, or None (``fault_rate`` of the time)."""
        if self.fault_rate <= 0:
            return None
        with self._lock:
            if self._fault_random.random() >= self.fault_rate:
                return None
            kind = self._fault_random.choice(FAULT_KINDS)
            self._faults[kind] += 1
        if kind == "429":
            return replace(parse_step("429"), retry_after=f"{self.fault_retry_after_seconds:g}")
        if kind == "500":
            return parse_step("500")
        if kind == "hang":
            return Step("hang", seconds=self.fault_hang_seconds)
        return Step("drop")

    def _partials_snapshot(self) -> list[tuple[str, int, float]]:
        with self._lock:
            return list(self._partials)

    def _record_partial(self, prompt: str, index: int) -> None:
        with self._lock:
            self._partials.append((prompt, index, time.time()))

    def _count_rate_limited(self, prompt: str) -> None:
        with self._lock:
            self._limited[prompt] += 1

    def _count_success(self, prompt: str) -> None:
        with self._lock:
            self._successes[prompt] += 1

    def _kill_caller(self, client: tuple[str, int], server: tuple[str, int]) -> int | None:
        """SIGKILL the local process owning the client end of this connection; its pid, or None
        when that process is not one this server may kill."""
        pid = _pid_of_peer(client, server)
        if pid is None or pid == os.getpid() or not self._killable(pid):
            return None
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        with self._lock:
            self._kills.append(pid)
        return pid

    def _generation_delay(self) -> float:
        with self._lock:
            jitter = self._random.uniform(0, self.delay_jitter_seconds)
        return self.default_delay_seconds + jitter

    def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when the server stops, so shutdown never waits on a hang."""
        if seconds > 0:
            self._stopping.wait(seconds)


class _Server(ThreadingHTTPServer):
    # Benchmarks open many connections at once (bench/compare.py: 500); the default backlog of 5,
    # or 128, would reset some of them.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], handler: type[_Handler], fake: FakeOpenAI) -> None:
        self.fake = fake
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Registered in the serving thread, so after shutdown() none can slip past close.
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake handlers blocked on idle keep-alive connections so their threads can end."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client gave up (e.g. its timeout fired): nothing to report
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without this, Nagle plus delayed ACKs add
    # about 40 ms to every response.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.fake.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        fake = self.server.fake
        if self.path == "/_fake/calls":
            self._send_json(200, fake.call_counts())
        elif self.path == "/_fake/stats":
            self._send_json(
                200,
                {
                    "successes": fake.success_counts(),
                    "faults": fake.fault_counts(),
                    "kills": fake.kills(),
                    "rate_limited": fake.rate_limited,
                    "max_admitted_in_window": fake.max_admitted_in_window(),
                },
            )
        elif self.path == "/_fake/requests":
            self._send_json(200, [r.body for r in fake.requests()])
        elif self.path == "/_fake/partials":
            self._send_json(
                200,
                [
                    {"prompt": p, "index": i, "sent_at": at}
                    for p, i, at in fake._partials_snapshot()
                ],
            )
        elif self.path == "/_fake/received":
            self._send_json(
                200, [{"prompt": r.prompt, "received_at": r.received_at} for r in fake.requests()]
            )
        elif self.path.startswith("/v1/models/"):
            self._retrieve_model(self.path.removeprefix("/v1/models/"))
        else:
            self._send_json(
                404, {"error": {"message": "Not found", "type": "invalid_request_error"}}
            )

    def do_POST(self) -> None:
        body_bytes = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path == "/_fake/reset":
            self.server.fake.reset()
            self._send_json(200, {})
        elif self.path in (GENERATIONS_PATH, EDITS_PATH):
            try:
                if self.path == EDITS_PATH:
                    body, files = self._edit_form(body_bytes)
                    self._serve(body, files, events="image_edit")
                else:
                    self._serve(self._json_body(body_bytes), None, events="image_generation")
            except _Reply as reply:
                self._send_error_step(reply.step)
        else:
            self._send_error_step(
                Step("error", 404, type="invalid_request_error", message="Unknown path.")
            )

    @staticmethod
    def _json_body(body_bytes: bytes) -> dict[str, Any]:
        try:
            body = json.loads(body_bytes)
        except ValueError:
            raise _invalid(None, "We could not parse the JSON body of your request.") from None
        if not isinstance(body, dict):
            raise _invalid(None, "The body must be a JSON object.")
        return body

    def _edit_form(self, body_bytes: bytes) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
        """``POST /v1/images/edits``: multipart form data, as the SDK sends it: scalar fields,
        ``image`` (one) or repeated ``image[]`` parts (up to 16), an optional ``mask``."""
        content_type = self.headers.get("content-type") or ""
        if not content_type.startswith("multipart/form-data"):
            raise _invalid(None, "Edits take multipart/form-data.")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body_bytes
        )
        body: dict[str, Any] = {}
        files: list[tuple[str, bytes]] = []
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            if part.get_filename() is not None:
                files.append((str(name), payload))
            elif name is not None:
                body[str(name)] = payload.decode()
        for key in ("n", "partial_images"):
            if key in body:
                body[key] = int(body[key]) if body[key].isdigit() else body[key]
        if "stream" in body:
            body["stream"] = body["stream"] == "true"
        images = [data for name, data in files if name in ("image", "image[]")]
        if not 1 <= len(images) <= 16:
            raise _invalid("image", "Provide 1 to 16 images.", "invalid_image_count")
        known = (b"\x89PNG", b"\xff\xd8", b"RIFF")  # png, jpeg, webp
        if any(not data.startswith(known) for data in images):
            raise _invalid("image", "Invalid image file.", "invalid_image_format")
        if body.get("input_fidelity") not in (None, "low", "high"):
            raise _invalid("input_fidelity", "Invalid value for 'input_fidelity'.")
        return body, files

    def _serve(
        self, body: dict[str, Any], files: list[tuple[str, bytes]] | None, *, events: str
    ) -> None:
        fake = self.server.fake
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise _invalid(
                "prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter"
            )
        headers = {k.lower(): v for k, v in self.headers.items() if k.lower() != "authorization"}
        call_number = fake._record(prompt, body, headers, files)
        key = self._bearer_key()
        if not key:
            raise _Reply(
                Step(
                    "error",
                    401,
                    type="invalid_request_error",
                    message="You didn't provide an API key.",
                )
            )
        try:
            script = parse_directives(prompt)
        except DirectiveError as exc:
            raise _invalid("prompt", f"fake server: {exc}", "bad_fake_directive") from None
        if (refusal := fake._admit()) is not None:
            fake._count_rate_limited(prompt)
            raise _Reply(refusal)
        fake._sleep(script.delay)
        step = script.step_for(call_number)
        if step.kind == "ok":
            step = fake._draw_fault() or step
        if step.kind == "kill-caller":
            host, port = self.server.server_address[:2]
            if fake._kill_caller(self.client_address[:2], (str(host), int(port))) is None:
                message = "fake server: kill-caller found no killable caller"
                raise _invalid("prompt", message, "bad_fake_directive")
            self.close_connection = True
            return
        if step.kind == "drop":
            self.close_connection = True
            return
        if step.kind == "hang":
            fake._sleep(step.seconds)
            self.close_connection = True
            return
        if step.kind == "error":
            if step.status == 429 and step.code == "rate_limit_exceeded":
                fake._count_rate_limited(prompt)
            if step.status == 401 and step.message:
                step = replace(step, message=step.message.format(masked=_mask(key)))
            raise _Reply(step)
        if step.kind == "bad-json":
            self._send_raw(200, b'{"created": 1, "data": [', "application/json")
            return
        if step.kind in ("cut", "stall"):
            self._send_partial(step)
            return
        width, height = _validate(body, prompt)
        if body.get("stream") is True and step.kind == "ok":
            if self._send_stream(body, prompt, width, height, script, events):
                fake._count_success(prompt)
            return
        fake._sleep(fake._generation_delay())
        self._send_image(body, prompt, width, height, step.kind)
        if step.kind == "ok":
            fake._count_success(prompt)

    def _retrieve_model(self, model: str) -> None:
        """``GET /v1/models/{id}``: the cheap call ``doctor`` uses to test the key and model.

        A key starting ``sk-rejected`` gets 401, a model id containing ``unknown`` gets 404.
        """
        key = self._bearer_key()
        if not key or key.startswith("sk-rejected"):
            self._send_json(
                401,
                {
                    "error": {
                        "message": "Incorrect API key provided.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
            )
        elif "unknown" in model:
            self._send_json(
                404,
                {
                    "error": {
                        "message": f"The model `{model}` does not exist.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "model_not_found",
                    }
                },
            )
        else:
            self._send_json(
                200, {"id": model, "object": "model", "created": 1760000000, "owned_by": "openai"}
            )

    def _bearer_key(self) -> str:
        scheme, _, key = (self.headers.get("authorization") or "").partition(" ")
        return key.strip() if scheme.lower() == "bearer" else ""

    def _send_image(
        self, body: dict[str, Any], prompt: str, width: int, height: int, kind: str
    ) -> None:
        quality = body.get("quality") or "auto"
        quality = "medium" if quality == "auto" else quality
        padded_to = self.server.fake.image_bytes
        image = {
            "b64_json": "!!! not base64 !!!"
            if kind == "bad-b64"
            else _png_b64(width, height, padded_to)
        }
        data = [] if kind == "no-data" else [image] * int(body.get("n") or 1)
        input_tokens = len(prompt.split())
        output_tokens = _OUTPUT_TOKENS.get(quality, 1056) * int(body.get("n") or 1)
        self._send_json(
            200,
            {
                "created": int(time.time()),
                "data": data,
                "background": "transparent"
                if body.get("background") == "transparent"
                else "opaque",
                "output_format": body.get("output_format") or "png",
                "quality": quality,
                "size": f"{width}x{height}",
                "usage": {
                    "input_tokens": input_tokens,
                    "input_tokens_details": {"image_tokens": 0, "text_tokens": input_tokens},
                    "output_tokens": output_tokens,
                    "total_tokens": input_tokens + output_tokens,
                },
            },
        )

    def _send_error_step(self, step: Step) -> None:
        headers = {}
        if step.retry_after is not None:
            headers["retry-after"] = step.retry_after
        if step.retry_after_ms is not None:
            headers["retry-after-ms"] = step.retry_after_ms
        error = {"message": step.message, "type": step.type, "param": step.param, "code": step.code}
        self._send_json(step.status, {"error": error}, headers)

    def _send_stream(
        self,
        body: dict[str, Any],
        prompt: str,
        width: int,
        height: int,
        script: Script,
        events: str = "image_generation",
    ) -> bool:
        """Server-sent events: ``partial_images`` partial images, ``partial_every`` seconds
        apart, then the completed event with usage; or the scripted stream fault. Whether the
        image was sent. The connection closes at the end (no content length)."""
        fake = self.server.fake
        partials = body.get("partial_images") or 0
        if not isinstance(partials, int) or not 0 <= partials <= 3:
            raise _invalid("partial_images", "partial_images must be between 0 and 3.")
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("x-request-id", f"req_fake_{uuid.uuid4().hex}")
        self.send_header("connection", "close")
        self.end_headers()
        self.close_connection = True
        quality = body.get("quality") or "auto"
        common = {
            "created_at": int(time.time()),
            "background": "opaque",
            "output_format": body.get("output_format") or "png",
            "quality": "medium" if quality == "auto" else quality,
            "size": f"{width}x{height}",
        }
        fake._sleep(fake._generation_delay())
        for index in range(partials):
            if script.stream_fault and index == script.stream_fault_after:
                return self._stream_fault(script.stream_fault)
            fake._sleep(script.partial_every)
            self._send_event(
                {
                    "type": f"{events}.partial_image",
                    "b64_json": _png_b64(max(16, width // 8), max(16, height // 8)),
                    "partial_image_index": index,
                    **common,
                }
            )
            fake._record_partial(prompt, index)
        if script.stream_fault:
            return self._stream_fault(script.stream_fault)
        fake._sleep(script.partial_every)
        input_tokens = len(prompt.split())
        output_tokens = _OUTPUT_TOKENS.get(common["quality"], 1056)
        self._send_event(
            {
                "type": f"{events}.completed",
                "b64_json": _png_b64(width, height, fake.image_bytes),
                **common,
                "usage": {
                    "input_tokens": input_tokens,
                    "input_tokens_details": {"image_tokens": 0, "text_tokens": input_tokens},
                    "output_tokens": output_tokens,
                    "total_tokens": input_tokens + output_tokens,
                },
            }
        )
        return True

    def _stream_fault(self, kind: str) -> bool:
        if kind in ("moderation", "server"):
            code = "moderation_blocked" if kind == "moderation" else "server_error"
            error = {"type": "image_generation_user_error", "code": code, "message": "Scripted."}
            self._send_event({"type": "error", "error": error})
        elif kind in ("flat-moderation", "flat"):
            code = "moderation_blocked" if kind == "flat-moderation" else "server_error"
            self._send_event({"type": "error", "code": code, "message": "Scripted."})
        elif kind == "unknown":
            self._send_event({"type": "image_generation.mystery", "b64_json": ""})
        elif kind == "cut":
            self.wfile.write(b'data: {"type": "image_generation.partial_im')
            self.wfile.flush()
        return False

    def _send_event(self, event: dict[str, Any]) -> None:
        frame = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
        self.wfile.write(frame)
        self.wfile.flush()

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send_raw(status, json.dumps(payload).encode(), "application/json", headers)

    def _send_partial(self, step: Step) -> None:
        """A 200 announcing a whole body, half of it sent, then a close (or a wait first)."""
        encoded = json.dumps({"created": 1, "data": [{"b64_json": "A" * 4096}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(encoded)))
        self.send_header("x-request-id", f"req_fake_{uuid.uuid4().hex}")
        self.end_headers()
        self.wfile.write(encoded[: len(encoded) // 2])
        self.wfile.flush()
        if step.kind == "stall":
            self.server.fake._sleep(step.seconds)
        self.close_connection = True

    def _send_raw(
        self,
        status: int,
        encoded: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(encoded)))
        self.send_header("x-request-id", f"req_fake_{uuid.uuid4().hex}")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(encoded)


def _validate(body: dict[str, Any], prompt: str) -> tuple[int, int]:
    """Check the parameters the real API would reject; return the image size."""
    if len(prompt) > 32000:
        raise _invalid("prompt", "The prompt is too long.", "string_above_max_length")
    if "response_format" in body:
        raise _invalid(
            "response_format", "Unknown parameter: 'response_format'.", "unknown_parameter"
        )
    for name, allowed in (
        ("quality", _QUALITIES),
        ("background", _BACKGROUNDS),
        ("output_format", _FORMATS),
    ):
        if body.get(name) is not None and body[name] not in allowed:
            raise _invalid(name, f"Invalid value for '{name}'.")
    if body.get("background") == "transparent" and body.get("output_format") == "jpeg":
        raise _invalid("background", "Transparent background requires png or webp.")
    n = body.get("n", 1)
    if n is not None and (not isinstance(n, int) or not 1 <= n <= 10):
        raise _invalid("n", "n must be between 1 and 10.")
    size = body.get("size") or "auto"
    if size == "auto":
        return 1024, 1024
    match = _SIZE.match(str(size))
    if match is None:
        raise _invalid("size", "Invalid value for 'size'.")
    width, height = int(match.group(1)), int(match.group(2))
    if (
        width % 16
        or height % 16
        or not 16 <= min(width, height)
        or max(width, height) > 3840
        or max(width, height) > 3 * min(width, height)
    ):
        raise _invalid("size", "Invalid value for 'size'.")
    return width, height


def _pid_of_peer(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The pid of the local process whose TCP socket is ``client`` connected to ``server``."""
    for proc in psutil.Process().children(recursive=True):
        try:
            connections = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for conn in connections:
            if conn.laddr and conn.raddr and tuple(conn.laddr) == client:
                if tuple(conn.raddr) == server:
                    return int(proc.pid)
    return None


def _most_within(times: list[float], window: float) -> int:
    """The most of ``times`` (ascending) within any half-open span of ``window`` seconds."""
    most, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= window:
            first += 1
        most = max(most, last - first + 1)
    return most


def _is_descendant(pid: int) -> bool:
    """The default ``killable``: only processes this server's own process started."""
    try:
        return any(child.pid == pid for child in psutil.Process().children(recursive=True))
    except psutil.Error:
        return False


def _mask(key: str) -> str:
    """How the real API shows a rejected key: a prefix and the last four characters."""
    if len(key) <= 8:
        return "*" * len(key)
    return key[:3] + "*" * (len(key) - 7) + key[-4:]


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; print the base URL first so a parent process can read it."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.fake_openai", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--delay", type=float, default=0.0, help="seconds per successful generation"
    )
    parser.add_argument(
        "--delay-jitter", type=float, default=0.0, help="extra random seconds, up to this"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for the delay jitter")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    parser.add_argument(
        "--fault-rate", type=float, default=0.0, help="share of would-be successes that fail"
    )
    parser.add_argument("--fault-seed", type=int, default=None, help="seed for fault choices")
    parser.add_argument(
        "--fault-hang", type=float, default=_DEFAULT_HANG_SECONDS, help="seconds a hang fault lasts"
    )
    parser.add_argument(
        "--fault-retry-after", type=float, default=0.5, help="retry-after of a 429 fault"
    )
    parser.add_argument(
        "--image-bytes", type=int, default=0, help="pad each image to about this many bytes"
    )
    parser.add_argument(
        "--rate-limit", type=int, default=None, help="admit at most N calls per --rate-window"
    )
    parser.add_argument(
        "--rate-window", type=float, default=60.0, help="seconds of the sliding rate window"
    )
    args = parser.parse_args(argv)

    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    fake = FakeOpenAI(
        host=args.host,
        port=args.port,
        default_delay_seconds=args.delay,
        delay_jitter_seconds=args.delay_jitter,
        seed=args.seed,
        verbose=args.verbose,
        fault_rate=args.fault_rate,
        fault_seed=args.fault_seed,
        fault_hang_seconds=args.fault_hang,
        fault_retry_after_seconds=args.fault_retry_after,
        image_bytes=args.image_bytes,
        rate_limit=args.rate_limit,
        rate_window_seconds=args.rate_window,
    )
    with fake:
        print(fake.base_url, flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
