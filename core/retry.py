"""Retry decisions as pure functions: the listener carries them out, it never re-decides.

There are two levels of retry, and this module owns both:

* **within an attempt** — a few quick calls to the provider while the job is leased
  (:func:`retry_within_attempt`, :func:`wait_before_retry`), carried out by
  ``listener.generators.retrying.RetryingGenerator``;
* **across attempts** — once an attempt has failed, the job is either put back for later or
  given up (:func:`decide_after_failure`). The attempt count lives in the database, so a crash
  cannot reset it.

Time and randomness are passed in (a float in ``[0, 1)`` or a :class:`random.Random`), so every
decision is reproducible in tests.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from core.errors import ImageListenerError, PermanentError, RateLimited, TransientError

#: Either a ready draw in ``[0, 1)`` or a generator to draw one from.
Randomness = float | random.Random

# 2**64 already dwarfs every cap; a bounded exponent keeps float maths from overflowing.
_MAX_EXPONENT = 64

_GENERIC_PUBLIC_MESSAGE = ImageListenerError.public_message
_GENERIC_CODE = ImageListenerError.code


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: quick calls within one attempt, then slower attempts across leases."""

    #: calls to the provider within one job attempt (1 = no quick retries)
    tries_per_attempt: int = 3
    #: first quick-retry delay; doubles per retry. One second clears most provider blips.
    base_delay: float = 1.0
    #: ceiling for a quick-retry delay: beyond this the lease is better spent on a new attempt
    max_delay: float = 30.0
    #: a provider retry-after longer than this ends the attempt instead of sleeping through it
    #: (the OpenAI SDK uses the same 120 s bound for its own retries)
    max_retry_after: float = 120.0
    #: delay before the second attempt; doubles per attempt
    attempt_backoff_base: float = 10.0
    #: ceiling for the delay between attempts (ten minutes keeps a stuck job visible, not lost)
    attempt_backoff_max: float = 600.0
    #: share of each backoff that is random: 0 = none, 1 = "full jitter", 0.5 = half fixed, half
    #: random — spreads out retries from many workers without ever retrying almost at once
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.tries_per_attempt < 1:
            raise ValueError(f"tries_per_attempt must be at least 1, got {self.tries_per_attempt}")
        for name in (
            "base_delay",
            "max_delay",
            "max_retry_after",
            "attempt_backoff_base",
            "attempt_backoff_max",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter!r}")


@dataclass(frozen=True)
class RetryLater:
    """Put the job back; the next attempt may start after ``delay_seconds``."""

    delay_seconds: float


@dataclass(frozen=True)
class GiveUp:
    """Stop trying; ``public_message`` is safe to show the user, ``code`` is stable for metadata."""

    public_message: str
    code: str


Decision = RetryLater | GiveUp


def is_retryable(error: BaseException) -> bool:
    """True only for the transient branch of the error tree: the same call may succeed later."""
    return isinstance(error, TransientError)


def retry_within_attempt(error: BaseException, policy: RetryPolicy) -> bool:
    """Whether to call the provider again in this attempt: for transient errors, except a rate
    limit.

    A rate limit is not slept through by one worker: the request goes back to the queue with its
    attempt and the whole fleet pauses until the provider's retry-after
    (``image_jobs_rate_limited``), so that no listener keeps the provider's window full. The
    policy sets how many calls and how long between them (:func:`wait_before_retry`).
    """
    del policy  # how many calls and how long between them: the caller's stop and wait
    return is_retryable(error) and not isinstance(error, RateLimited)


def wait_before_retry(
    error: BaseException, retry_number: int, policy: RetryPolicy, rand: Randomness
) -> float:
    """Seconds to wait before quick retry ``retry_number`` (1 = before the second call).

    The provider's retry-after wins when it is within ``policy.max_retry_after`` (it knows when
    its window resets); otherwise exponential backoff from ``base_delay``, jittered, capped at
    ``max_delay``.
    """
    if retry_number < 1:
        raise ValueError(f"retry_number must be at least 1, got {retry_number}")
    retry_after = _retry_after(error)
    if retry_after is not None and retry_after <= policy.max_retry_after:
        return retry_after
    return _backoff(policy.base_delay, retry_number, policy.max_delay, policy.jitter, rand)


def decide_after_failure(
    error: BaseException,
    attempt: int,
    max_attempts: int,
    policy: RetryPolicy,
    rand: Randomness,
) -> Decision:
    """Retry the job later or give up, after attempt number ``attempt`` (1-based) failed.

    Permanent errors give up at once with their own public message. Transient errors retry with
    exponential backoff across attempts (never sooner than the provider's retry-after) until
    ``max_attempts`` is reached. The same limit is enforced in SQL for attempts that never got
    here (their worker died): ``public.image_jobs_claim`` ends a job claimed ``max_attempts``
    times with its own failed reply (ARCHITECTURE.md, "Rules that live in two places").
    Exceptions outside the error tree are bugs or surprises: they are retried like transient
    errors, but the user only ever sees a generic message.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be at least 1, got {attempt}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")

    if isinstance(error, PermanentError):
        return GiveUp(public_message=error.public_message, code=error.code)

    if attempt >= max_attempts:
        return _give_up_exhausted(error, attempt)

    delay = _backoff(
        policy.attempt_backoff_base, attempt, policy.attempt_backoff_max, policy.jitter, rand
    )
    retry_after = _retry_after(error)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return RetryLater(delay_seconds=delay)


def _give_up_exhausted(error: BaseException, attempts: int) -> GiveUp:
    if isinstance(error, TransientError):
        noun = "attempt" if attempts == 1 else "attempts"
        return GiveUp(
            public_message=(
                f"The image service kept failing after {attempts} {noun}. Please try again later."
            ),
            code=error.code,
        )
    # Not from our error tree (a bug, or a library error nobody translated): say nothing
    # specific, since its text was never vetted for users.
    return GiveUp(public_message=_GENERIC_PUBLIC_MESSAGE, code=_GENERIC_CODE)


def _retry_after(error: BaseException) -> float | None:
    """The provider's retry-after in seconds, if it gave a usable one (negative means now)."""
    if not isinstance(error, RateLimited) or error.retry_after is None:
        return None
    if not math.isfinite(error.retry_after):
        return None  # a nonsense hint is ignored rather than trusted to mean "never"
    return max(0.0, error.retry_after)


def _backoff(base: float, step: int, cap: float, jitter: float, rand: Randomness) -> float:
    """``base * 2**(step-1)`` capped at ``cap``, with the ``jitter`` share of it randomised."""
    ceiling = min(cap, base * 2.0 ** min(step - 1, _MAX_EXPONENT))
    return ceiling * (1.0 - jitter + jitter * _draw(rand))


def _draw(rand: Randomness) -> float:
    if isinstance(rand, random.Random):
        return rand.random()
    if not 0.0 <= rand < 1.0:
        raise ValueError(f"a random draw must be in [0, 1), got {rand!r}")
    return rand
