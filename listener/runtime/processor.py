"""Carry one claimed request from prompt to final reply: generate, store, write back.

The decisions (parameters, retry or give up, reply metadata) come from ``core``; this module
only performs them in order and logs one summary line per attempt. It never lets an error
escape except cancellation: every failure becomes a fenced ``fail`` write.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from core.errors import DatabaseUnavailable, ImageListenerError, OperatorError, RateLimited
from core.lease import Lease
from core.models import ClaimedJob, TokenUsage, object_path
from core.outcome import completion_metadata, failure_metadata
from core.ports import ImageGenerator, ImageStorage, JobStore, WriteResult
from core.retry import GiveUp, RetryPolicy, decide_after_failure
from core.validation import generation_params, safety_identifier
from listener.ops.logging import prompt_fields
from listener.ops.metrics import Metrics
from listener.runtime.edits import load_edit_inputs
from listener.runtime.previews import PreviewRefused, PreviewWriter

log = structlog.get_logger("listener.processor")
T = TypeVar("T")


@dataclass
class AttemptSummary:
    """What one attempt came to, for its log line and metrics."""

    outcome: str = "unknown"
    usage: TokenUsage | None = None
    error_code: str | None = None
    error_detail: str | None = None
    retry_in: float | None = None
    operator_error: bool = False
    cost_usd: float | None = None
    previews: int = 0


@dataclass(frozen=True)
class ProcessorConfig:
    """The settings one attempt needs."""

    worker_id: str
    model: str
    default_size: str
    max_attempts: int
    lease_seconds: float
    log_prompts: bool
    retry_policy: RetryPolicy
    #: previews for requests that do not ask (IMAGE_LISTENER_PARTIAL_IMAGES)
    default_partial_images: int = 0


class JobProcessor:
    """Runs one attempt of one job; ``process`` returns the outcome name that was logged."""

    def __init__(
        self,
        *,
        store: JobStore,
        generator: ImageGenerator,
        storage: ImageStorage,
        config: ProcessorConfig,
        inputs: ImageStorage | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: random.Random | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._generator = generator
        self._storage = storage
        #: users' uploads for edits (references, masks); None: edits cannot be served
        self._inputs = inputs
        self._config = config
        self._clock = clock
        self._rand = rand or random.Random()
        self._metrics = metrics

    async def process(self, job: ClaimedJob, lease: Lease | None = None) -> str:
        """Run one attempt; returns the outcome that was logged (and counted).

        ``lease`` is the worker's view of this job's lease, renewed in place (see
        :mod:`core.lease`); without it the lease is always re-checked before the image is stored.
        """
        started = self._clock()
        # Each job runs in its own task, hence its own context copy: these fields reach every
        # log line of this attempt, the provider retries' included.
        structlog.contextvars.bind_contextvars(request_id=str(job.request_id), attempt=job.attempt)
        summary = AttemptSummary()
        previews = PreviewWriter(
            job, store=self._store, storage=self._storage, worker_id=self._config.worker_id
        )
        try:
            await self._attempt(job, started, summary, lease, previews)
        except PreviewRefused as refused:  # the request was deleted, or the lease is gone
            summary.outcome = (
                "cancelled" if refused.result is WriteResult.CANCELLED else "lease_lost"
            )
        except RateLimited as limited:
            await self._hand_back_rate_limited(job, limited, summary)
        except ImageListenerError as exc:
            await self._record_failure(job, exc, started, summary)
        except Exception as exc:  # a bug of ours: keep the stack for operators, not the user
            log.exception("request_attempt_crashed")
            await self._record_failure(job, exc, started, summary)
        summary.previews = previews.shown
        await previews.remove(summary.outcome)
        duration = self._clock() - started
        self._report(job, summary, duration)
        return summary.outcome

    def _report(self, job: ClaimedJob, summary: AttemptSummary, duration: float) -> None:
        """The one summary line per attempt, with what operators filter on; and the metrics."""
        usage = summary.usage
        fields: dict[str, object] = {
            "outcome": summary.outcome,
            "chat_id": str(job.chat_id),
            "user": safety_identifier(job.user_id)[:16],
            "model": self._config.model,
            "duration_ms": round(duration * 1000),
            **prompt_fields(job.prompt, self._config.log_prompts),
        }
        if usage is not None:
            fields["input_tokens"] = usage.input_tokens
            fields["output_tokens"] = usage.output_tokens
        if summary.previews:
            fields["previews"] = summary.previews
        if summary.outcome == "complete":
            # priced by the database; null for a model without a price (doctor says so too)
            fields["cost_usd"] = summary.cost_usd
        if summary.error_code is not None:
            fields["error_code"] = summary.error_code
            fields["error_detail"] = summary.error_detail
        if summary.retry_in is not None:
            fields["retry_in_s"] = round(summary.retry_in, 3)
        if summary.operator_error:
            # Bad key, unknown model, no quota: the user got a polite reply, operators must act.
            log.error("operator_action_required", **fields)
        log.info("request_finished", **fields)
        if self._metrics is not None:
            self._metrics.observe_attempt(
                job,
                outcome=summary.outcome,
                error_code=summary.error_code,
                duration_seconds=duration,
                model=self._config.model,
                usage=usage,
                cost_usd=summary.cost_usd,
            )

    async def _attempt(
        self,
        job: ClaimedJob,
        started: float,
        summary: AttemptSummary,
        lease: Lease | None,
        previews: PreviewWriter,
    ) -> None:
        config = self._config
        params = generation_params(
            job,
            model=config.model,
            default_size=config.default_size,
            default_partial_images=config.default_partial_images,
        )
        # (debug only: bench/ times the wake-up to this line, as the peers time handler entry)
        log.debug("generation_started")
        on_partial = previews.show if params.partial_images else None
        edit_inputs = None
        if params.edit is not None:
            if self._inputs is None:
                raise OperatorError("an edit needs an input store, and none is configured")
            edit_inputs = await load_edit_inputs(
                params.edit, queue=self._store, images=self._storage, inputs=self._inputs
            )
        image = await self._generator.generate(params, on_partial, edit_inputs)
        summary.usage = image.usage
        # Fence before touching storage: a worker that lost its lease must not overwrite the
        # image the new holder may already have stored at the same path. Within the trusted
        # share of a fresh lease nobody else can hold it, and the round trip is skipped.
        fresh = lease is not None and lease.certainly_held(self._clock(), config.lease_seconds)
        if not fresh:
            held = await self._store.extend(
                config.worker_id, [(job.request_id, job.attempt)], config.lease_seconds
            )
            if job.request_id not in held:
                summary.outcome = "lease_lost_before_store"
                return
        stored = await self._storage.store(object_path(job, image.output_format), image)
        metadata = completion_metadata(
            params,
            image,
            stored,
            attempt=job.attempt,
            duration_seconds=self._clock() - started,
        )
        # Stored: the bytes (1.5 MB for a large image) must not wait with us for a database
        # connection; with hundreds finishing together they would add up to gigabytes.
        del image
        completion = await self._write(
            lambda: self._store.complete(job, config.worker_id, stored.url, metadata)
        )
        result = completion.write
        if result is WriteResult.CANCELLED:
            # The request was deleted while we worked: leave nothing behind.
            await self._storage.remove(stored.location)
            summary.outcome = "cancelled"
        elif result is WriteResult.LEASE_LOST:
            summary.outcome = "lease_lost"
        else:
            summary.outcome = "complete"
            summary.cost_usd = completion.cost_usd

    async def _write(self, call: Callable[[], Awaitable[T]]) -> T:
        """A final write survives a database blip: retried for up to half a lease.

        Safe to repeat: the write is fenced, so a repeat after a lost reply only reports
        ``lease_lost`` and changes nothing. If the database stays away, the error escapes, the
        lease runs out and another attempt takes the job.
        """
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(DatabaseUnavailable),
            stop=stop_after_delay(self._config.lease_seconds / 2),
            wait=wait_exponential(multiplier=0.2, max=5),
            reraise=True,
        ):
            with attempt:
                return await call()
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def _hand_back_rate_limited(
        self, job: ClaimedJob, limited: RateLimited, summary: AttemptSummary
    ) -> None:
        """A rate limit is nobody's fault: the request goes back to the queue with its attempt
        and its place in line, and the whole fleet pauses until the provider's retry-after."""
        result = await self._write(
            lambda: self._store.rate_limited(
                job,
                self._config.worker_id,
                retry_after=limited.retry_after,
                detail=limited.detail,
            )
        )
        summary.outcome = "rate_limited" if result is WriteResult.DONE else result.value
        summary.error_code = limited.code
        summary.error_detail = limited.detail
        summary.retry_in = limited.retry_after
        if self._metrics is not None:
            self._metrics.observe_rate_limited()

    async def _record_failure(
        self, job: ClaimedJob, error: BaseException, started: float, summary: AttemptSummary
    ) -> None:
        config = self._config
        decision = decide_after_failure(
            error, job.attempt, config.max_attempts, config.retry_policy, self._rand
        )
        detail = error.detail if isinstance(error, ImageListenerError) else type(error).__name__
        code = error.code if isinstance(error, ImageListenerError) else "internal_error"
        duration = self._clock() - started
        if isinstance(decision, GiveUp):
            public_error, retry_in = decision.public_message, None
            code = decision.code
        else:
            public_error, retry_in = error_public_message(error), decision.delay_seconds
        metadata = failure_metadata(code, attempt=job.attempt, duration_seconds=duration)
        result = await self._write(
            lambda: self._store.fail(
                job,
                config.worker_id,
                public_error=public_error,
                detail=detail,
                retry_in_seconds=retry_in,
                metadata=metadata,
            )
        )
        if result is WriteResult.DONE:
            summary.outcome = "failed" if retry_in is None else "retrying"
        else:
            summary.outcome = result.value
        summary.error_code = code
        summary.error_detail = detail
        summary.retry_in = retry_in
        summary.operator_error = isinstance(error, OperatorError)


def error_public_message(error: BaseException) -> str:
    """User-safe text for ``error``: only our own errors carry vetted text."""
    if isinstance(error, ImageListenerError):
        return error.public_message
    return ImageListenerError.public_message
