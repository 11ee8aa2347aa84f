"""Unit tests of core.retry: pure decisions, no I/O, randomness passed in."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import (
    ImageListenerError,
    InvalidRequest,
    OperatorError,
    PermanentError,
    PolicyRefusal,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    TransientError,
)
from core.retry import (
    GiveUp,
    RetryLater,
    RetryPolicy,
    decide_after_failure,
    is_retryable,
    retry_within_attempt,
    wait_before_retry,
)

NO_JITTER = RetryPolicy(jitter=0.0)
TRANSIENT = [
    TransientError("t"),
    RateLimited("r"),
    ProviderUnavailable("u"),
    ProviderTimeout("o"),
]
PERMANENT = [
    PermanentError("p"),
    InvalidRequest("i"),
    PolicyRefusal("m"),
    OperatorError("k"),
]


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__)
def test_transient_errors_are_retryable(error: Exception) -> None:
    """Every class of the transient branch may be retried."""
    assert is_retryable(error)


@pytest.mark.parametrize(
    "error",
    [*PERMANENT, ImageListenerError("root"), ValueError("bug"), KeyboardInterrupt()],
    ids=lambda e: type(e).__name__,
)
def test_only_transient_errors_are_retryable(error: BaseException) -> None:
    """Permanent errors, the root class and foreign exceptions are never retried in-attempt."""
    assert not is_retryable(error)


def test_wait_honours_provider_retry_after() -> None:
    """A retry-after hint is used as-is, whatever the backoff would have been."""
    error = RateLimited("429", retry_after=7.5)
    assert wait_before_retry(error, 1, RetryPolicy(), 0.9) == 7.5
    assert wait_before_retry(error, 5, RetryPolicy(), 0.0) == 7.5


def test_wait_honours_retry_after_up_to_the_limit_inclusive() -> None:
    """Exactly ``max_retry_after`` is still the wait."""
    error = RateLimited("429", retry_after=120.0)
    assert wait_before_retry(error, 1, RetryPolicy(), 0.0) == 120.0


def test_retry_after_beyond_the_limit_ends_the_attempt() -> None:
    """A retry-after longer than ``max_retry_after`` is not slept through within an attempt."""
    error = RateLimited("429", retry_after=121.0)
    assert not retry_within_attempt(error, RetryPolicy())
    # If asked anyway, the wait falls back to the capped backoff rather than 121 s.
    assert wait_before_retry(error, 1, NO_JITTER, 0.0) == 1.0


def test_a_rate_limit_is_never_retried_within_the_attempt() -> None:
    """Whatever its hint: the request goes back to the queue and the fleet pauses instead."""
    for hint in (None, 0.0, 1.0, 120.0):
        assert not retry_within_attempt(RateLimited("429", retry_after=hint), RetryPolicy())


def test_retry_within_attempt_follows_is_retryable_otherwise() -> None:
    """Apart from rate limits, in-attempt retry is exactly the transient branch."""
    assert all(
        retry_within_attempt(e, RetryPolicy()) for e in TRANSIENT if not isinstance(e, RateLimited)
    )
    assert not any(retry_within_attempt(e, RetryPolicy()) for e in PERMANENT)
    assert not retry_within_attempt(RuntimeError("bug"), RetryPolicy())


def test_negative_retry_after_means_retry_now() -> None:
    """A retry-after in the past (an HTTP date behind our clock) waits zero, not negative."""
    assert wait_before_retry(RateLimited("429", retry_after=-3.0), 1, RetryPolicy(), 0.5) == 0.0


@pytest.mark.parametrize("hint", [math.nan, math.inf])
def test_nonsense_retry_after_is_ignored(hint: float) -> None:
    """NaN/inf hints fall back to backoff instead of sleeping forever or crashing."""
    error = RateLimited("429", retry_after=hint)
    assert wait_before_retry(error, 2, NO_JITTER, 0.0) == 2.0
    decision = decide_after_failure(error, 1, 5, NO_JITTER, 0.0)
    assert decision == RetryLater(delay_seconds=10.0)


def test_backoff_doubles_and_is_capped_at_max_delay() -> None:
    """Without jitter the quick-retry delays are 1, 2, 4, ... and never exceed max_delay."""
    delays = [wait_before_retry(ProviderUnavailable("503"), n, NO_JITTER, 0.3) for n in range(1, 9)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_rate_limit_without_hint_uses_backoff() -> None:
    """A 429 with no retry-after backs off like any transient error."""
    assert wait_before_retry(RateLimited("429"), 3, NO_JITTER, 0.0) == 4.0


def test_partial_jitter_keeps_the_fixed_share() -> None:
    """With jitter=0.5 the delay lies in [d/2, d): never a near-instant retry."""
    policy = RetryPolicy(jitter=0.5)
    error = ProviderTimeout("slow")
    assert wait_before_retry(error, 3, policy, 0.0) == 2.0
    assert wait_before_retry(error, 3, policy, 0.5) == 3.0
    assert 3.99 < wait_before_retry(error, 3, policy, 0.999) < 4.0


def test_full_jitter_spans_zero_to_ceiling() -> None:
    """With jitter=1 ("full jitter") the delay is the ceiling times the draw."""
    policy = RetryPolicy(jitter=1.0)
    assert wait_before_retry(ProviderTimeout("slow"), 2, policy, 0.0) == 0.0
    assert wait_before_retry(ProviderTimeout("slow"), 2, policy, 0.25) == 0.5


def test_random_generator_is_accepted_and_reproducible() -> None:
    """A seeded ``random.Random`` gives the same delays twice, all within bounds."""
    first = [
        wait_before_retry(ProviderUnavailable("x"), n, RetryPolicy(), random.Random(7))
        for n in (1, 2, 3)
    ]
    second = [
        wait_before_retry(ProviderUnavailable("x"), n, RetryPolicy(), random.Random(7))
        for n in (1, 2, 3)
    ]
    assert first == second
    assert all(
        0.5 * 2 ** (n - 1) <= d < 2 ** (n - 1) for n, d in zip((1, 2, 3), first, strict=True)
    )


@pytest.mark.parametrize("draw", [1.0, -0.01, 2.0])
def test_draw_outside_unit_interval_is_rejected(draw: float) -> None:
    """A float draw must be in [0, 1): a wrong caller fails loudly instead of over-sleeping."""
    with pytest.raises(ValueError, match="random draw"):
        wait_before_retry(ProviderUnavailable("x"), 1, RetryPolicy(), draw)


def test_retry_number_starts_at_one() -> None:
    """retry_number 0 is a caller bug (retry 1 precedes the second call)."""
    with pytest.raises(ValueError, match="retry_number"):
        wait_before_retry(ProviderUnavailable("x"), 0, RetryPolicy(), 0.0)


@given(
    retry_number=st.integers(min_value=1, max_value=10_000),
    draw=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    jitter=st.floats(min_value=0.0, max_value=1.0),
)
def test_quick_retry_delay_always_within_zero_and_max_delay(
    retry_number: int, draw: float, jitter: float
) -> None:
    """For any retry number (even huge: no overflow) and draw, 0 <= delay <= max_delay."""
    policy = RetryPolicy(jitter=jitter)
    delay = wait_before_retry(ProviderUnavailable("x"), retry_number, policy, draw)
    assert 0.0 <= delay <= policy.max_delay


@pytest.mark.parametrize("error", PERMANENT, ids=lambda e: type(e).__name__)
def test_permanent_error_gives_up_at_once_with_its_own_message(error: PermanentError) -> None:
    """Permanent errors give up on the first attempt, carrying their public message and code."""
    decision = decide_after_failure(error, 1, 5, RetryPolicy(), 0.5)
    assert decision == GiveUp(public_message=error.public_message, code=error.code)


def test_permanent_error_keeps_a_custom_public_message() -> None:
    """A boundary-chosen public message (e.g. naming the bad option) reaches the user."""
    error = InvalidRequest(
        "status=400 param=size", public_message="The 'size' option was rejected."
    )
    decision = decide_after_failure(error, 2, 5, RetryPolicy(), 0.5)
    assert decision == GiveUp(
        public_message="The 'size' option was rejected.", code="invalid_request"
    )


def test_transient_error_retries_later_with_backoff_across_attempts() -> None:
    """Attempt k (before the last) waits attempt_backoff_base * 2**(k-1), capped."""
    delays = [
        decide_after_failure(ProviderUnavailable("503"), attempt, 100, NO_JITTER, 0.0)
        for attempt in (1, 2, 3, 6, 7, 50)
    ]
    assert delays == [
        RetryLater(10.0),
        RetryLater(20.0),
        RetryLater(40.0),
        RetryLater(320.0),
        RetryLater(600.0),
        RetryLater(600.0),
    ]


def test_attempt_backoff_is_jittered() -> None:
    """Across attempts the delay is jittered too, so workers do not retry in lockstep."""
    policy = RetryPolicy(jitter=0.5)
    low = decide_after_failure(ProviderTimeout("t"), 2, 5, policy, 0.0)
    high = decide_after_failure(ProviderTimeout("t"), 2, 5, policy, 0.999)
    assert isinstance(low, RetryLater)
    assert isinstance(high, RetryLater)
    assert low.delay_seconds == 10.0
    assert 19.9 < high.delay_seconds < 20.0


def test_retry_later_waits_at_least_the_provider_retry_after() -> None:
    """The next attempt never starts before the provider said it may, even beyond the cap."""
    decision = decide_after_failure(RateLimited("429", retry_after=900.0), 1, 5, NO_JITTER, 0.0)
    assert decision == RetryLater(900.0)
    # ... and a short hint does not shorten our own backoff.
    decision = decide_after_failure(RateLimited("429", retry_after=2.0), 1, 5, NO_JITTER, 0.0)
    assert decision == RetryLater(10.0)


def test_exhausted_transient_error_gives_up_with_attempt_count() -> None:
    """After max_attempts the user hears that the service kept failing, and nothing internal."""
    error = ProviderUnavailable("status=503 request_id=req_internal_123")
    decision = decide_after_failure(error, 3, 3, RetryPolicy(), 0.5)
    assert isinstance(decision, GiveUp)
    assert decision.code == "provider_unavailable"
    assert "kept failing after 3 attempts" in decision.public_message
    assert "req_internal_123" not in decision.public_message


def test_exhaustion_message_for_a_single_attempt_is_singular() -> None:
    """max_attempts=1 reads "after 1 attempt", not "1 attempts"."""
    decision = decide_after_failure(RateLimited("429"), 1, 1, RetryPolicy(), 0.5)
    assert isinstance(decision, GiveUp)
    assert "after 1 attempt." in decision.public_message
    assert decision.code == "rate_limited"


def test_attempt_beyond_max_still_gives_up() -> None:
    """An attempt count past the maximum (e.g. lowered config) gives up rather than retrying."""
    decision = decide_after_failure(ProviderTimeout("t"), 9, 3, RetryPolicy(), 0.5)
    assert isinstance(decision, GiveUp)


def test_unknown_exception_is_retried_like_a_transient_error() -> None:
    """A foreign exception (a bug, an untranslated library error) gets another attempt."""
    decision = decide_after_failure(KeyError("boom"), 1, 3, NO_JITTER, 0.0)
    assert decision == RetryLater(10.0)


def test_unknown_exception_gives_up_with_a_generic_message() -> None:
    """On exhaustion a foreign exception's text never reaches the user."""
    decision = decide_after_failure(RuntimeError("db password=hunter2"), 3, 3, RetryPolicy(), 0.5)
    assert decision == GiveUp(
        public_message=ImageListenerError.public_message, code=ImageListenerError.code
    )
    assert "hunter2" not in decision.public_message


@pytest.mark.parametrize(("attempt", "max_attempts"), [(0, 3), (1, 0)])
def test_attempt_numbers_are_validated(attempt: int, max_attempts: int) -> None:
    """Attempts are 1-based; zero means the caller is confused, so fail loudly."""
    with pytest.raises(ValueError, match="attempt"):
        decide_after_failure(ProviderTimeout("t"), attempt, max_attempts, RetryPolicy(), 0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tries_per_attempt": 0},
        {"base_delay": -1.0},
        {"max_delay": math.inf},
        {"max_retry_after": math.nan},
        {"attempt_backoff_base": -0.1},
        {"attempt_backoff_max": -5.0},
        {"jitter": 1.5},
        {"jitter": -0.1},
    ],
)
def test_policy_rejects_nonsense_values(kwargs: dict[str, float]) -> None:
    """A bad policy fails at construction (i.e. at startup), not in the middle of a retry."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_defaults_match_the_documented_ones() -> None:
    """Defaults other modules rely on: 3 quick tries, 1 s..30 s, 120 s hint limit, 10 s..600 s."""
    policy = RetryPolicy()
    assert (
        policy.tries_per_attempt,
        policy.base_delay,
        policy.max_delay,
        policy.max_retry_after,
        policy.attempt_backoff_base,
        policy.attempt_backoff_max,
    ) == (3, 1.0, 30.0, 120.0, 10.0, 600.0)
