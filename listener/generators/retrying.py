"""Quick retries within one job attempt: the project's only retry layer around the provider.

The decisions (what to retry, how long to wait) come from :mod:`core.retry`; tenacity only
carries them out. The SDK client is built with ``max_retries=0``, so retries never multiply.
Each retry is logged here (``provider_retry``, logger ``listener.retrying``) and counted in
the daemon's metrics.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from core.errors import ImageListenerError
from core.models import EditInputs, GeneratedImage, GenerationParams
from core.ports import ImageGenerator, PartialSink
from core.retry import RetryPolicy, retry_within_attempt, wait_before_retry
from listener.ops.metrics import Metrics

log = structlog.get_logger("listener.retrying")
Sleep = Callable[[float], Awaitable[None]]


class RetryingGenerator:
    """An :class:`~core.ports.ImageGenerator` that retries transient failures of another one.

    Up to ``policy.tries_per_attempt`` calls; permanent errors, unknown exceptions and a
    retry-after beyond ``policy.max_retry_after`` end it at once. The last error is re-raised
    unchanged, so the caller can pass it to :func:`core.retry.decide_after_failure`.
    """

    def __init__(
        self,
        inner: ImageGenerator,
        policy: RetryPolicy,
        *,
        metrics: Metrics | None = None,
        rand: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._inner = inner
        self._policy = policy
        self._metrics = metrics
        self._rand = rand if rand is not None else random.Random()
        self._sleep = sleep

    async def generate(
        self,
        params: GenerationParams,
        on_partial: PartialSink | None = None,
        inputs: EditInputs | None = None,
    ) -> GeneratedImage:
        """Call the wrapped generator until it succeeds or the policy says stop (a stream that
        failed midway starts over, its previews with it)."""
        # A fresh controller per call: tenacity keeps per-run state, and calls run concurrently.
        retrying = AsyncRetrying(
            retry=retry_if_exception(self._should_retry),
            wait=self._wait,
            stop=stop_after_attempt(self._policy.tries_per_attempt),
            sleep=self._sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._inner.generate(params, on_partial, inputs)
        raise AssertionError("unreachable: tenacity either returns a result or re-raises")

    def _should_retry(self, error: BaseException) -> bool:
        return retry_within_attempt(error, self._policy)

    def _wait(self, retry_state: RetryCallState) -> float:
        return wait_before_retry(
            _failure(retry_state), retry_state.attempt_number, self._policy, self._rand
        )

    def _before_sleep(self, retry_state: RetryCallState) -> None:
        """Say so before each wait; retry 1 precedes the second call."""
        error = _failure(retry_state)
        code = error.code if isinstance(error, ImageListenerError) else type(error).__name__
        if self._metrics is not None:
            self._metrics.observe_provider_retry(code)
        log.info(
            "provider_retry",
            retry=retry_state.attempt_number,
            delay_s=round(retry_state.upcoming_sleep, 3),
            error_code=code,
        )


def _failure(retry_state: RetryCallState) -> BaseException:
    outcome = retry_state.outcome
    error = outcome.exception() if outcome is not None else None
    if error is None:
        raise AssertionError("tenacity asked for a retry delay without a failed call")
    return error
