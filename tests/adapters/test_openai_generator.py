"""The real openai SDK against the local fake server: success, error mapping, retries, secrets.

Every test uses real HTTP on 127.0.0.1 through ``build_openai_client``; behaviour is scripted by
``[fake:...]`` directives in the prompt (see tests/support/fake_openai.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import subprocess
import sys
import threading
import time
import traceback
import tracemalloc
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from core.errors import (
    ImageListenerError,
    InvalidRequest,
    OperatorError,
    PolicyRefusal,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from core.models import (
    EditInputs,
    EditSpec,
    GeneratedImage,
    GenerationParams,
    InputImage,
    PartialImage,
)
from core.png import read_png_size, solid_png
from core.ports import PartialSink
from core.retry import GiveUp, RetryLater, RetryPolicy, decide_after_failure
from listener.generators import openai as openai_generator
from listener.generators.openai import OpenAIImageGenerator, build_openai_client
from listener.generators.openai_errors import parse_retry_after
from listener.generators.retrying import RetryingGenerator
from listener.ops.metrics import Metrics
from tests.support.fake_openai import FakeOpenAI, parse_directives

API_KEY = "sk-test-SECRET-abc123"
#: short, so a hang turns into a timeout quickly; generous enough for a loaded CI machine
CLIENT_TIMEOUT = 0.5
NO_JITTER = RetryPolicy(jitter=0.0)
REPO_ROOT = Path(__file__).resolve().parents[2]


def params(prompt: str, **overrides: str | None) -> GenerationParams:
    values: dict[str, str | None] = {
        "size": "1024x1024",
        "output_format": "png",
        "quality": "low",
        "background": None,
        "safety_identifier": None,
        **overrides,
    }
    return GenerationParams(
        model="gpt-image-2",
        prompt=prompt,
        size=values["size"] or "auto",
        output_format=values["output_format"] or "png",
        quality=values["quality"],
        background=values["background"],
        safety_identifier=values["safety_identifier"],
    )


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = build_openai_client(API_KEY, fake.base_url, CLIENT_TIMEOUT)
    yield sdk
    await sdk.close()


@pytest.fixture
def generator(client: openai.AsyncOpenAI) -> OpenAIImageGenerator:
    return OpenAIImageGenerator(client)


class RecordingSleep:
    """Stands in for asyncio.sleep: records the delays and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def retrying(
    inner: OpenAIImageGenerator, sleep: RecordingSleep, *, tries_per_attempt: int = 3
) -> RetryingGenerator:
    """Default policy without jitter, so the recorded delays are exact."""
    policy = RetryPolicy(jitter=0.0, tries_per_attempt=tries_per_attempt)
    return RetryingGenerator(inner, policy, rand=random.Random(0), sleep=sleep)


async def expect_error(generator: OpenAIImageGenerator, prompt: str) -> ImageListenerError:
    with pytest.raises(ImageListenerError) as caught:
        await generator.generate(params(prompt))
    return caught.value


# --- success -------------------------------------------------------------------------------


async def test_success_returns_png_of_requested_size_and_sends_every_param(
    fake: FakeOpenAI, generator: OpenAIImageGenerator
) -> None:
    """A generation decodes b64_json to a PNG of the asked size; every set param was sent."""
    image = await generator.generate(
        params(
            "a lighthouse at dusk",
            size="1536x1024",
            quality="high",
            background="opaque",
            output_format="png",
            safety_identifier="user-hash-9f2c",
        )
    )
    assert read_png_size(image.data) == (1536, 1024)
    assert image.output_format == "png"
    assert image.provider_request_id is not None
    assert image.provider_request_id.startswith("req_fake_")
    assert image.usage.output_tokens == 4160
    assert image.usage.total_tokens == image.usage.output_tokens + (image.usage.input_tokens or 0)

    body = fake.last_request("a lighthouse at dusk").body
    assert body == {
        "model": "gpt-image-2",
        "prompt": "a lighthouse at dusk",
        "size": "1536x1024",
        "quality": "high",
        "background": "opaque",
        "output_format": "png",
        "safety_identifier": "user-hash-9f2c",
        "n": 1,
    }


async def test_unset_params_are_omitted_and_auto_size_gives_1024_square(
    fake: FakeOpenAI, generator: OpenAIImageGenerator
) -> None:
    """None-valued options are left out of the body (the API then uses its defaults)."""
    image = await generator.generate(
        params("a fox", size="auto", quality=None, background=None, safety_identifier=None)
    )
    assert read_png_size(image.data) == (1024, 1024)
    body = fake.last_request("a fox").body
    assert set(body) == {"model", "prompt", "size", "output_format", "n"}


async def test_fake_delay_directive_delays_the_answer(generator: OpenAIImageGenerator) -> None:
    """[fake:delay=...] holds the response, so latency-sensitive code can be tested."""
    started = time.monotonic()
    await generator.generate(params("slow cat [fake:delay=0.2]"))
    assert time.monotonic() - started >= 0.2


# --- error mapping -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("directive", "expected", "code"),
    [
        ("[fake:status=429]", RateLimited, "rate_limited"),
        ("[fake:status=billing]", OperatorError, "service_misconfigured"),
        (
            "[fake:status=429:code=billing_hard_limit_reached]",
            OperatorError,
            "service_misconfigured",
        ),
        ("[fake:status=500]", ProviderUnavailable, "provider_unavailable"),
        ("[fake:status=502]", ProviderUnavailable, "provider_unavailable"),
        ("[fake:status=503]", ProviderUnavailable, "provider_unavailable"),
        ("[fake:status=408]", ProviderUnavailable, "provider_unavailable"),
        ("[fake:status=409]", ProviderUnavailable, "provider_unavailable"),
        ("[fake:moderation]", PolicyRefusal, "moderation_blocked"),
        ("[fake:status=400:code=content_policy_violation]", PolicyRefusal, "moderation_blocked"),
        ("[fake:status=400]", InvalidRequest, "invalid_request"),
        ("[fake:status=422]", InvalidRequest, "invalid_request"),
        ("[fake:status=400:param=model]", OperatorError, "service_misconfigured"),
        ("[fake:status=401]", OperatorError, "service_misconfigured"),
        ("[fake:status=403]", OperatorError, "service_misconfigured"),
        ("[fake:status=404-model]", OperatorError, "service_misconfigured"),
        ("[fake:drop]", ProviderUnavailable, "provider_unavailable"),
        ("[fake:hang=5]", ProviderTimeout, "provider_timeout"),
        ("[fake:bad-b64]", ProviderUnavailable, "provider_unavailable"),
        ("[fake:status=bad-json]", ProviderUnavailable, "provider_unavailable"),
        # the body breaks off after a 200's headers: read after the SDK's error mapping
        ("[fake:fail=cut]", ProviderUnavailable, "provider_unavailable"),
        ("[fake:fail=stall:seconds=5]", ProviderTimeout, "provider_timeout"),
    ],
)
async def test_each_provider_failure_maps_to_one_core_error_after_one_call(
    fake: FakeOpenAI,
    generator: OpenAIImageGenerator,
    directive: str,
    expected: type[ImageListenerError],
    code: str,
) -> None:
    """Each SDK outcome becomes the right core error, chained from the SDK error; the SDK
    itself never retries (max_retries=0), so the server sees exactly one call."""
    prompt = f"a cat {directive}"
    error = await expect_error(generator, prompt)
    assert type(error) is expected
    assert error.code == code
    assert error.__cause__ is not None
    assert fake.calls(prompt) == 1


async def test_a_success_without_image_data_is_a_transient_provider_fault(
    fake: FakeOpenAI, generator: OpenAIImageGenerator
) -> None:
    """A 200 whose data list is empty (no b64_json) is the provider's fault: ProviderUnavailable,
    so the retry layer gets another go instead of failing the user's request."""
    prompt = "a cat [fake:status=no-data]"
    error = await expect_error(generator, prompt)
    assert type(error) is ProviderUnavailable
    assert "no b64_json" in error.detail
    assert fake.calls(prompt) == 1


async def test_rate_limit_carries_retry_after_from_seconds_header(
    generator: OpenAIImageGenerator,
) -> None:
    """retry-after (seconds, may be fractional) becomes RateLimited.retry_after."""
    error = await expect_error(generator, "x [fake:status=429:retry-after=7.5]")
    assert isinstance(error, RateLimited)
    assert error.retry_after == 7.5


async def test_rate_limit_prefers_retry_after_ms(generator: OpenAIImageGenerator) -> None:
    """retry-after-ms is more precise, so it wins over retry-after."""
    error = await expect_error(generator, "x [fake:status=429:retry-after-ms=250:retry-after=9]")
    assert isinstance(error, RateLimited)
    assert error.retry_after == 0.25


def test_retry_after_parses_http_dates_and_ignores_garbage() -> None:
    """An HTTP-date retry-after counts from now; unusable values give None (plain backoff)."""
    assert (
        parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"}, now=1445412500.0)
        == 10.0
    )
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "inf"}) is None
    assert parse_retry_after({"retry-after": "-4"}) == 0.0
    assert parse_retry_after({}) is None


async def test_error_detail_names_status_code_and_request_id(
    generator: OpenAIImageGenerator,
) -> None:
    """Operators get status, provider code and request id to follow up with the provider."""
    error = await expect_error(generator, "x [fake:status=429]")
    assert "status=429" in error.detail
    assert "code=rate_limit_exceeded" in error.detail
    assert "request_id=req_fake_" in error.detail
    assert str(error) == error.detail


async def test_invalid_request_names_the_rejected_option_not_provider_text(
    generator: OpenAIImageGenerator,
) -> None:
    """A 400 the API raises on validation (size 1000x1000 is not a multiple of 16) names the
    option for the user, but the provider's own wording stays out of the public message."""
    with pytest.raises(InvalidRequest) as caught:
        await generator.generate(params("a cat", size="1000x1000"))
    assert caught.value.public_message == (
        "The image request is not valid: the 'size' option was rejected."
    )
    assert "Invalid value" in str(caught.value.__cause__)  # the provider text exists...
    assert "Invalid value" not in caught.value.public_message  # ...but is not shown


async def test_dotted_param_gets_the_generic_invalid_request_message(
    generator: OpenAIImageGenerator,
) -> None:
    """A param like ``image.0.url`` is not a plain identifier, so the generic message is used."""
    error = await expect_error(generator, "x [fake:status=400:param=image.0.url]")
    assert isinstance(error, InvalidRequest)
    assert error.public_message == InvalidRequest.public_message


LEAK_PROMPTS = [
    "[fake:status=401]",
    "[fake:status=403]",
    "[fake:status=404-model]",
    "[fake:status=429:retry-after=3]",
    "[fake:status=billing]",
    "[fake:status=500]",
    "[fake:moderation]",
    "[fake:status=400:param=size]",
    "[fake:drop]",
    "[fake:hang=5]",
    "[fake:bad-b64]",
    # a pathological provider echoing the key in a structured field: scrubbed from our detail
    f"[fake:status=400:code={API_KEY}]",
]


async def test_api_key_appears_in_no_error_text(generator: OpenAIImageGenerator) -> None:
    """For every failure kind, the key is absent from str, detail, public message, repr and the
    formatted traceback including the chained SDK error (the 401 body echoes a masked key)."""
    for directive in LEAK_PROMPTS:
        error = await expect_error(generator, f"a cat {directive}")
        texts = [
            str(error),
            error.detail,
            error.public_message,
            repr(error),
            "".join(traceback.format_exception(error)),
        ]
        for text in texts:
            assert API_KEY not in text, (directive, text)
    assert "SECRET" not in "".join(traceback.format_exception(error))


# --- retrying generator --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("directive", "seconds"), [("retry-after=0.2", 0.2), ("retry-after-ms=300", 0.3)]
)
async def test_a_rate_limit_is_not_retried_within_the_attempt(
    fake: FakeOpenAI, generator: OpenAIImageGenerator, directive: str, seconds: float
) -> None:
    """A 429 ends the attempt at once with the provider's hint: the request goes back to the
    queue and the fleet pauses (the processor's job), no worker sleeps through it alone."""
    sleep = RecordingSleep()
    prompt = f"a cat [fake:fail=429:{directive}]"
    with pytest.raises(RateLimited) as raised:
        await retrying(generator, sleep).generate(params(prompt))
    assert raised.value.retry_after == pytest.approx(seconds)
    assert sleep.delays == []
    assert fake.calls(prompt) == 1


async def test_retry_really_sleeps_with_the_default_sleep(
    fake: FakeOpenAI, generator: OpenAIImageGenerator
) -> None:
    """Without an injected sleep, the backoff is actually waited (asyncio.sleep)."""
    prompt = "a cat [fake:fail=500]"
    wrapper = RetryingGenerator(generator, RetryPolicy(base_delay=0.2, jitter=0.0))
    started = time.monotonic()
    await wrapper.generate(params(prompt))
    assert time.monotonic() - started >= 0.2
    assert fake.calls(prompt) == 2


async def test_retries_server_errors_and_dropped_connections_with_backoff(
    fake: FakeOpenAI, generator: OpenAIImageGenerator
) -> None:
    """A 500 then a dropped connection are retried with 1 s, 2 s backoff; each retry is logged
    as ``provider_retry`` and counted in the metrics by its error code."""
    sleep = RecordingSleep()
    metrics = Metrics()
    wrapper = RetryingGenerator(generator, NO_JITTER, metrics=metrics, sleep=sleep)
    prompt = "a cat [fake:fail=500,drop]"
    with capture_logs() as logs:
        image = await wrapper.generate(params(prompt))
    assert isinstance(image, GeneratedImage)
    assert sleep.delays == [1.0, 2.0]
    retries = [
        (entry["retry"], entry["delay_s"], entry["error_code"])
        for entry in logs
        if entry["event"] == "provider_retry"
    ]
    assert retries == [(1, 1.0, "provider_unavailable"), (2, 2.0, "provider_unavailable")]
    counted = metrics.registry.get_sample_value(
        "image_listener_provider_retries_total", {"reason": "provider_unavailable"}
    )
    assert counted == 2.0
    assert fake.calls(prompt) == 3


async def test_retries_a_timeout_then_succeeds(
    fake: FakeOpenAI, generator: OpenAIImageGenerator
) -> None:
    """A call that hangs past the client timeout is retried, and the next one succeeds."""
    sleep = RecordingSleep()
    prompt = "a cat [fake:hang=5]"
    await retrying(generator, sleep).generate(params(prompt))
    assert fake.calls(prompt) == 2
    assert sleep.delays == [1.0]


@pytest.mark.parametrize(
    ("directive", "expected"),
    [
        ("[fake:moderation]", PolicyRefusal),
        ("[fake:status=400]", InvalidRequest),
        ("[fake:status=401]", OperatorError),
        ("[fake:status=404-model]", OperatorError),
        ("[fake:status=billing]", OperatorError),
    ],
)
async def test_permanent_errors_are_not_retried(
    fake: FakeOpenAI,
    generator: OpenAIImageGenerator,
    directive: str,
    expected: type[ImageListenerError],
) -> None:
    """Permanent failures end the attempt on the first call: no sleep, one request."""
    sleep = RecordingSleep()
    prompt = f"a cat {directive}"
    with pytest.raises(expected):
        await retrying(generator, sleep).generate(params(prompt))
    assert fake.calls(prompt) == 1
    assert sleep.delays == []


async def test_gives_up_after_tries_per_attempt_with_the_last_error(
    fake: FakeOpenAI, generator: OpenAIImageGenerator
) -> None:
    """After tries_per_attempt failures the last error (not the first) is re-raised as-is."""
    sleep = RecordingSleep()
    prompt = "a cat [fake:fail=500,503,429:retry-after=0.1]"
    with pytest.raises(RateLimited) as caught:
        await retrying(generator, sleep).generate(params(prompt))
    assert caught.value.retry_after == 0.1
    assert fake.calls(prompt) == 3
    assert sleep.delays == [1.0, 2.0]


async def test_tries_per_attempt_bounds_the_calls(
    fake: FakeOpenAI, generator: OpenAIImageGenerator
) -> None:
    """With tries_per_attempt=2 a provider that always fails sees exactly two calls."""
    sleep = RecordingSleep()
    prompt = "a cat [fake:status=503]"
    with pytest.raises(ProviderUnavailable):
        await retrying(generator, sleep, tries_per_attempt=2).generate(params(prompt))
    assert fake.calls(prompt) == 2


async def test_long_retry_after_ends_the_attempt_and_schedules_a_later_one(
    fake: FakeOpenAI, generator: OpenAIImageGenerator
) -> None:
    """A retry-after over max_retry_after is not slept through: the attempt ends after one
    call, and the attempt-level decision waits at least that long."""
    sleep = RecordingSleep()
    prompt = "a cat [fake:status=429:retry-after=500]"
    with pytest.raises(RateLimited) as caught:
        await retrying(generator, sleep).generate(params(prompt))
    assert fake.calls(prompt) == 1
    assert sleep.delays == []
    decision = decide_after_failure(caught.value, 1, 5, NO_JITTER, 0.0)
    assert isinstance(decision, RetryLater)
    assert decision.delay_seconds >= 500


async def test_exhausted_attempts_give_a_user_safe_message(
    generator: OpenAIImageGenerator,
) -> None:
    """End to end through the SDK: a provider that keeps failing ends in a safe GiveUp."""
    with pytest.raises(ProviderUnavailable) as caught:
        await retrying(generator, RecordingSleep()).generate(params("a cat [fake:status=500]"))
    decision = decide_after_failure(caught.value, 4, 4, RetryPolicy(), 0.5)
    assert isinstance(decision, GiveUp)
    assert "kept failing after 4 attempts" in decision.public_message
    assert "status=500" not in decision.public_message


class _Broken:
    """An ImageGenerator that fails with a foreign exception (a bug in a lower layer)."""

    def __init__(self) -> None:
        self.calls = 0

    async def generate(
        self,
        params: GenerationParams,
        on_partial: PartialSink | None = None,
        inputs: EditInputs | None = None,
    ) -> GeneratedImage:
        self.calls += 1
        raise KeyError("unexpected")


async def test_foreign_exceptions_are_not_retried_within_an_attempt() -> None:
    """A non-core exception propagates at once; only the attempt-level policy may retry it."""
    broken = _Broken()
    sleep = RecordingSleep()
    with pytest.raises(KeyError):
        await RetryingGenerator(broken, RetryPolicy(), sleep=sleep).generate(params("x"))
    assert broken.calls == 1
    assert sleep.delays == []


async def test_cancellation_is_not_retried(
    fake: FakeOpenAI, generator: OpenAIImageGenerator
) -> None:
    """Cancelling a generation (shutdown, lease lost) stops it instead of being retried."""
    prompt = "a cat [fake:delay=5]"
    task = asyncio.create_task(RetryingGenerator(generator, RetryPolicy()).generate(params(prompt)))
    # The count lives in the server's thread; there is no event to await, so poll briefly.
    while fake.calls(prompt) == 0:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.calls(prompt) == 1


async def test_concurrent_generations_retry_independently(
    fake: FakeOpenAI, generator: OpenAIImageGenerator
) -> None:
    """One RetryingGenerator serves concurrent calls; each keeps its own retry count."""
    sleep = RecordingSleep()
    wrapper = retrying(generator, sleep)
    prompts = [f"cat {i} [fake:fail=500]" for i in range(5)]
    images = await asyncio.gather(*(wrapper.generate(params(p)) for p in prompts))
    assert len(images) == 5
    assert all(fake.calls(p) == 2 for p in prompts)
    assert sleep.delays == [1.0] * 5


# --- the fake server itself ----------------------------------------------------------------


def test_directive_parser_builds_the_scripted_steps() -> None:
    """Steps run in prompt order, sugar expands, and status applies after the script."""
    script = parse_directives("x [fake:drop=2] [fake:fail=429:retry-after=1] [fake:status=401]")
    kinds = [script.step_for(n).kind for n in (1, 2, 3, 4, 5)]
    assert kinds == ["drop", "drop", "error", "error", "error"]
    assert script.step_for(3).retry_after == "1"
    assert script.step_for(4).status == 401
    assert parse_directives("plain prompt").step_for(1).kind == "ok"


async def test_unknown_directive_fails_loudly(generator: OpenAIImageGenerator) -> None:
    """A typo in a directive is a 400 naming bad_fake_directive, not a silent success."""
    error = await expect_error(generator, "x [fake:fial=500]")
    assert "code=bad_fake_directive" in error.detail


def test_calls_endpoint_reports_counts_per_prompt(fake: FakeOpenAI) -> None:
    """GET /_fake/calls returns {prompt: count} for out-of-process inspection."""
    body = json.dumps({"model": "m", "prompt": "hello"}).encode()
    request = urllib.request.Request(
        f"{fake.base_url}/images/generations",
        data=body,
        headers={"Authorization": "Bearer k", "Content-Type": "application/json"},
    )
    for _ in range(2):
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
    root = fake.base_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/_fake/calls", timeout=5) as response:
        assert json.load(response) == {"hello": 2}
    assert fake.total_calls == 2


def test_missing_bearer_key_is_rejected_with_401(fake: FakeOpenAI) -> None:
    """Like the real API, the fake refuses requests without an API key."""
    request = urllib.request.Request(
        f"{fake.base_url}/images/generations",
        data=json.dumps({"prompt": "hello"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    with caught.value:
        assert caught.value.code == 401


async def _generate_once(base_url: str, prompt: str) -> GeneratedImage:
    sdk = build_openai_client(API_KEY, base_url, 5.0)
    try:
        return await OpenAIImageGenerator(sdk).generate(params(prompt, size="auto"))
    finally:
        await sdk.close()


def test_fake_server_runs_as_a_subprocess_and_stops_on_sigterm() -> None:
    """`python -m tests.support.fake_openai --port 0` prints its base URL first, serves the SDK,
    and exits cleanly on SIGTERM (what end-to-end tests rely on)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_openai", "--port", "0"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:")
        assert base_url.endswith("/v1")
        image = asyncio.run(_generate_once(base_url, "subprocess cat"))
        assert read_png_size(image.data) == (1024, 1024)
        process.terminate()
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


async def test_large_bodies_are_decoded_off_the_event_loop_and_small_ones_on_it(
    client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1.5 MB answer's JSON parse and base64 decode take milliseconds: in a thread they do
    not stall every other request's timers; a 5 KB one is cheaper than the thread hop."""
    threads: list[str] = []
    real = openai_generator.decode_images_response

    def recording(body: bytes, request_id: str | None, requested: str) -> GeneratedImage:
        threads.append(threading.current_thread().name)
        return real(body, request_id, requested)

    monkeypatch.setattr(openai_generator, "decode_images_response", recording)
    with FakeOpenAI(image_bytes=1_500_000) as big_fake:
        sdk = build_openai_client(API_KEY, big_fake.base_url, 5.0)
        try:
            big = await OpenAIImageGenerator(sdk).generate(params("a big cat"))
        finally:
            await sdk.close()
    small = await OpenAIImageGenerator(client).generate(params("a small cat"))
    assert len(big.data) > 1_400_000
    assert small.data.startswith(b"\x89PNG")
    assert threads[0] != threading.main_thread().name
    assert threads[1] == threading.main_thread().name


async def test_an_answer_waiting_for_a_body_slot_stays_in_the_kernel() -> None:
    """What a ~2 MB answer waiting for a body slot holds in the process is what was read before
    aiohttp paused its socket: one read (at most 256 KB) with the client's small read buffer,
    against 512 KB or more with aiohttp's default; the rest waits in the kernel. With hundreds
    waiting, that was most of the listener's memory (bench/FINDINGS.md, "Large images")."""
    waiting = 4
    with FakeOpenAI(image_bytes=1_500_000) as big_fake:
        sdk = build_openai_client(API_KEY, big_fake.base_url, 5.0)
        try:
            await OpenAIImageGenerator(sdk).generate(params("a first cat"))  # the fake's cache
            tracemalloc.start()
            try:
                async with AsyncExitStack() as stack:
                    for i in range(waiting):
                        call = sdk.images.with_streaming_response.generate(
                            prompt=f"a waiting cat {i}", model="gpt-image-2"
                        )
                        await stack.enter_async_context(call)
                    await asyncio.sleep(0.5)  # the answers are sent at once: time to arrive
                    snapshot = tracemalloc.take_snapshot()
            finally:
                tracemalloc.stop()
        finally:
            await sdk.close()
    in_aiohttp = snapshot.filter_traces([tracemalloc.Filter(True, "*/aiohttp/*")])
    held = sum(stat.size for stat in in_aiohttp.statistics("filename"))
    assert held < waiting * 300_000


async def test_at_most_decode_slots_large_bodies_are_decoded_at_once(
    client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hundreds of answers landing together are decoded two at a time: each decode holds the
    GIL, so more threads would only make the event loop wait behind them."""
    active = 0
    peak = 0
    real = openai_generator.decode_images_response

    def slow(body: bytes, request_id: str | None, requested: str) -> GeneratedImage:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        time.sleep(0.02)  # on the loop for small bodies: nothing else can start meanwhile
        active -= 1
        return real(body, request_id, requested)

    monkeypatch.setattr(openai_generator, "decode_images_response", slow)
    monkeypatch.setattr(openai_generator, "_INLINE_DECODE_BYTES", 0)  # all in threads
    generator = OpenAIImageGenerator(client, decode_slots=2)
    images = await asyncio.gather(*(generator.generate(params(f"cat {i}")) for i in range(12)))
    assert len(images) == 12
    assert peak == 2


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"<html>502 Bad Gateway</html>", "not valid JSON"),
        (b"\xff\xfe not utf-8", "not valid JSON"),
        (b"[1, 2]", "no b64_json"),
        (b'{"data": []}', "no b64_json"),
        (b'{"data": [{"url": "https://example.com/x.png"}]}', "no b64_json"),
        (b'{"data": [{"b64_json": 42}]}', "no b64_json"),
        (b'{"data": [{"b64_json": "not base64!"}]}', "invalid base64"),
    ],
)
def test_a_200_without_a_usable_image_is_a_transient_provider_fault(
    body: bytes, detail: str
) -> None:
    """The body is parsed by us, not the SDK: whatever a proxy or a broken answer puts there
    becomes ProviderUnavailable naming the provider's request id, never a crash."""
    with pytest.raises(ProviderUnavailable) as caught:
        openai_generator.decode_images_response(body, "req_1", "png")
    assert detail in caught.value.detail
    assert "req_1" in caught.value.detail


_IMAGES = st.binary(min_size=1, max_size=300)
_TEXT = st.text(alphabet='ab"\\/:{} \n', max_size=20)


@given(
    image=_IMAGES,
    other=_IMAGES,
    text=_TEXT,
    decoy_first=st.booleans(),
    escape_slashes=st.booleans(),
    indent=st.sampled_from([None, 1]),
)
def test_the_image_is_taken_from_the_body_as_a_json_parser_would(
    image: bytes,
    other: bytes,
    text: str,
    decoy_first: bool,
    escape_slashes: bool,
    indent: int | None,
) -> None:
    """Large answers are decoded without parsing the base64 as JSON (see ``_splice_image``);
    whatever the layout (another ``b64_json`` before the image's, a string that spells the key,
    escaped slashes, whitespace), the image is ``data[0].b64_json``, as ``json.loads`` says."""
    encoded = base64.b64encode(image).decode()
    decoy = {"b64_json": base64.b64encode(other).decode(), "note": text}
    answer: dict[str, object] = {"revised": f'"b64_json":"{text}', "usage": {"input_tokens": 3}}
    items = [{"b64_json": encoded, "note": text}, decoy]
    answer = {"decoy": decoy, **answer, "data": items} if decoy_first else {"data": items, **answer}
    body = json.dumps(answer, indent=indent).encode()
    if escape_slashes:
        body = body.replace(b"/", b"\\/")
    decoded = openai_generator.decode_images_response(bytearray(body), "req_3", "png")
    assert decoded.data == image
    assert decoded.usage.input_tokens == 3


def test_decoding_a_large_answer_takes_little_more_memory_than_the_image() -> None:
    """Parsing a 2 MB answer as JSON holds its text and the base64 string (2 MB each) next to
    the image; decoded from the body itself, the image (1.5 MB) is nearly all that is new."""
    image = random.Random(4).randbytes(1_500_000)
    answer = {
        "created": 1,
        "background": "opaque",
        "data": [{"b64_json": base64.b64encode(image).decode()}],
        "output_format": "png",
        "usage": {"input_tokens": 5, "output_tokens": 1056, "total_tokens": 1061},
    }
    body = json.dumps(answer).encode()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        decoded = openai_generator.decode_images_response(body, "req_4", "png")
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert decoded.data == image
    assert decoded.usage.total_tokens == 1061
    assert peak < len(image) + 100_000


def test_reported_format_and_usage_are_taken_only_when_well_formed() -> None:
    png = base64.b64encode(b"\x89PNG\r\n\x1a\nrest").decode()
    good = json.dumps(
        {
            "data": [{"b64_json": png}],
            "output_format": "webp",
            "usage": {"input_tokens": 12, "output_tokens": 272, "total_tokens": 284},
        }
    ).encode()
    image = openai_generator.decode_images_response(good, "req_2", "png")
    assert image.output_format == "webp"
    assert (image.usage.input_tokens, image.usage.output_tokens) == (12, 272)
    assert image.usage.total_tokens == 284
    assert image.provider_request_id == "req_2"
    odd = json.dumps(
        {
            "data": [{"b64_json": png}],
            "output_format": "exe",
            "usage": {"input_tokens": True, "output_tokens": -3, "total_tokens": "9"},
        }
    ).encode()
    image = openai_generator.decode_images_response(odd, None, "png")
    assert image.output_format == "png"
    assert image.usage.input_tokens is None
    assert image.usage.output_tokens is None
    assert image.usage.total_tokens is None


# --- streamed generations (partial images) -----------------------------------------------------


class Partials:
    """An ``on_partial`` that keeps what it is handed, with the time it arrived."""

    def __init__(self) -> None:
        self.received: list[tuple[int, int, float]] = []

    async def __call__(self, partial: PartialImage) -> None:
        self.received.append((partial.index, len(partial.data), time.time()))
        assert read_png_size(partial.data) == (128, 128)


def streamed(prompt: str, partials: int = 2) -> GenerationParams:
    return replace(params(prompt), partial_images=partials)


async def test_a_stream_hands_over_each_partial_image_then_returns_the_final_one(
    fake: FakeOpenAI, generator: OpenAIImageGenerator
) -> None:
    sink = Partials()
    prompt = "a lighthouse [fake:partial-every=0.2]"
    image = await generator.generate(streamed(prompt, 3), sink)
    assert [index for index, _, _ in sink.received] == [0, 1, 2]
    assert read_png_size(image.data) == (1024, 1024)
    assert image.usage.output_tokens == 272
    assert image.usage.input_text_tokens == len(prompt.split())
    assert fake.last_request(prompt).body["stream"] is True
    assert fake.last_request(prompt).body["partial_images"] == 3
    # each handed over as it arrived, not all at the end (timings: bench/progress.py)
    sent = [at for _, at in fake.partials_sent(prompt)]
    arrived = [at for _, _, at in sink.received]
    assert all(a < next_sent for a, next_sent in zip(arrived, sent[1:], strict=False))


async def test_a_streamed_large_image_arrives_whole_through_the_small_read_buffer() -> None:
    """The completed event of a 1.5 MB image is one 2 MB server-sent-event line, read through
    the client's 16 KiB read buffer (``listener/generators/http.py``) and decoded in a thread."""
    sink = Partials()
    with FakeOpenAI(image_bytes=1_500_000) as big_fake:
        sdk = build_openai_client(API_KEY, big_fake.base_url, 5.0)
        try:
            image = await OpenAIImageGenerator(sdk).generate(streamed("a big lighthouse"), sink)
        finally:
            await sdk.close()
    assert len(sink.received) == 2
    assert len(image.data) > 1_400_000
    assert read_png_size(image.data) == (1024, 1024)


async def test_without_a_sink_or_with_zero_partials_the_call_is_not_streamed(
    fake: FakeOpenAI, generator: OpenAIImageGenerator
) -> None:
    await generator.generate(streamed("no sink", 2))
    await generator.generate(streamed("zero", 0), Partials())
    assert "stream" not in fake.last_request("no sink").body
    assert "stream" not in fake.last_request("zero").body


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("moderation", PolicyRefusal),
        ("server", ProviderUnavailable),
        ("flat-moderation", PolicyRefusal),
        ("flat", ProviderUnavailable),
        ("unknown", ProviderUnavailable),
        ("end", ProviderUnavailable),
        ("cut", ProviderUnavailable),
    ],
)
async def test_a_stream_that_fails_midway_maps_to_the_usual_outcome(
    generator: OpenAIImageGenerator, fault: str, error: type[Exception]
) -> None:
    """Moderation mid-stream is a refusal (no retry); the rest is transient (retried). An
    error event the SDK yields silently, an unknown event and a stream without its completed
    event are never taken for an image."""
    sink = Partials()
    with pytest.raises(error):
        await generator.generate(streamed(f"x [fake:stream-fail={fault}:after=1]"), sink)
    assert [index for index, _, _ in sink.received] == [0]


async def test_what_the_sink_raises_stops_the_stream_and_comes_out_unchanged(
    fake: FakeOpenAI, generator: OpenAIImageGenerator
) -> None:
    class Stop(Exception):
        pass

    async def refuse(partial: PartialImage) -> None:
        raise Stop

    prompt = "stop me [fake:partial-every=0.2]"
    with pytest.raises(Stop):
        await generator.generate(streamed(prompt, 3), refuse)
    await asyncio.sleep(0.5)
    assert len(fake.partials_sent(prompt)) < 3, "the stream was closed, not read to its end"


async def test_a_failed_stream_is_retried_whole_by_the_retry_layer(
    fake: FakeOpenAI, generator: OpenAIImageGenerator
) -> None:
    sink = Partials()
    prompt = "once more [fake:fail=500]"
    image = await retrying(generator, RecordingSleep()).generate(streamed(prompt), sink)
    assert read_png_size(image.data) == (1024, 1024)
    assert fake.calls(prompt) == 2


# --- edits (images.edit, multipart) ----------------------------------------------------------


def edit_inputs(count: int, *, mask: bool = False) -> EditInputs:
    images = tuple(
        InputImage(f"input-{i}.png", solid_png(16 * (i + 1), 16), "image/png") for i in range(count)
    )
    holes = InputImage("mask.png", solid_png(16, 16), "image/png") if mask else None
    return EditInputs(images=images, mask=holes)


def edited(prompt: str, *, fidelity: str | None = None, partials: int = 0) -> GenerationParams:
    spec = EditSpec(references=("u/a.png",), input_fidelity=fidelity)
    return replace(params(prompt), edit=spec, partial_images=partials)


async def test_an_edit_sends_every_input_image_in_order_with_the_mask_and_fidelity(
    fake: FakeOpenAI, generator: OpenAIImageGenerator
) -> None:
    inputs = edit_inputs(3, mask=True)
    image = await generator.generate(edited("make it night", fidelity="high"), None, inputs)
    assert read_png_size(image.data) == (1024, 1024)
    received = fake.last_request("make it night")
    assert received.files == [
        ("image[]", inputs.images[0].data),
        ("image[]", inputs.images[1].data),
        ("image[]", inputs.images[2].data),
        ("mask", inputs.mask.data if inputs.mask else b""),
    ]
    assert (received.body["prompt"], received.body["input_fidelity"]) == ("make it night", "high")
    assert received.body["size"] == "1024x1024"


async def test_an_edit_of_one_image_sends_it_as_image_and_may_stream(
    fake: FakeOpenAI, generator: OpenAIImageGenerator
) -> None:
    sink = Partials()
    image = await generator.generate(edited("one input", partials=2), sink, edit_inputs(1))
    assert read_png_size(image.data) == (1024, 1024)
    assert [index for index, _, _ in sink.received] == [0, 1]
    received = fake.last_request("one input")
    assert [name for name, _ in received.files] == ["image"]
    assert received.body["stream"] is True
