"""SDK errors become :mod:`core.errors` here, once, for the generator and ``doctor``: every
``openai.OpenAIError`` (and a stream's error event, and a failed body read) is translated with
its ``detail`` holding what an operator needs to follow up (status, provider code and type,
param, provider request id) and never the provider's free text or any header, so neither a
key nor a prompt can leak into logs through it.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Mapping
from typing import Any

import httpx2
import openai

from core.errors import (
    ImageListenerError,
    InvalidRequest,
    OperatorError,
    PolicyRefusal,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)

#: 429 codes/types that mean "no money left", which waiting does not fix.
BILLING_CODES = frozenset(
    {
        "insufficient_quota",
        "billing_hard_limit_reached",
        "billing_not_active",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
    }
)

#: 400 codes of the provider's safety system (GPT Image, and the DALL-E era code).
MODERATION_CODES = frozenset({"moderation_blocked", "content_policy_violation"})

# Only a plain identifier is echoed to users as the rejected option's name.
_SAFE_PARAM = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


def stream_event_error(event: Any, request_id: str | None) -> ImageListenerError:
    """A stream event that is neither a partial image nor the completed image: a flat error
    event (``{"type": "error", "code": ...}``) or a type this code does not know."""
    extra = getattr(event, "model_extra", None) or {}
    kind = str(getattr(event, "type", None))[:60]
    code = extra.get("code")
    nested = extra.get("error")
    if code is None and isinstance(nested, dict):
        code = nested.get("code")
    detail = f"openai stream event type={kind} code={str(code)[:60]} request_id={request_id}"
    if code in MODERATION_CODES:
        return PolicyRefusal(detail)
    return ProviderUnavailable(detail)


def translate_openai_error(exc: openai.OpenAIError, *, secret: str = "") -> ImageListenerError:
    """Map an SDK error onto the core error tree (the caller raises it ``from exc``).

    ``secret`` (the API key) is scrubbed from the detail as a last guard, although the detail
    is built only from short provider fields that should never contain it.
    """
    error = _translate(exc)
    if secret and secret in error.detail:
        error.detail = error.detail.replace(secret, "[redacted]")
        error.args = (error.detail,)
    return error


def _translate(exc: openai.OpenAIError) -> ImageListenerError:
    if isinstance(exc, openai.APIConnectionError):
        # APITimeoutError is an APIConnectionError. The aiohttp transport maps every
        # ClientConnectionError (a dropped connection too) to a connect *timeout*, so the
        # innermost cause decides, not the SDK's class.
        cause = _innermost_cause(exc)
        if _is_timeout(cause) or (cause is None and isinstance(exc, openai.APITimeoutError)):
            return ProviderTimeout("openai images.generate timed out before the provider answered")
        name = type(cause).__name__ if cause is not None else "unknown"
        return ProviderUnavailable(f"openai images.generate connection failed ({name})")
    if isinstance(exc, openai.APIStatusError):
        return _translate_status(exc)
    if isinstance(exc, openai.APIError):
        # A body-level error without an HTTP status (e.g. an error event in a stream).
        detail = f"openai images.generate failed: {_describe(exc)}"
        if exc.code in MODERATION_CODES:
            return PolicyRefusal(detail)
        return ProviderUnavailable(detail)
    # Raised before any request (e.g. missing credentials): our configuration is wrong.
    return OperatorError(f"openai client error ({type(exc).__name__})")


def body_read_error(exc: TimeoutError | httpx2.HTTPError) -> ImageListenerError:
    """Our own body deadline, or the transport's error while reading the body."""
    cause = _innermost_cause(exc) or exc
    if isinstance(exc, TimeoutError) or _is_timeout(cause):
        return ProviderTimeout("openai images.generate: the response body did not arrive in time")
    return ProviderUnavailable(
        f"openai images.generate: reading the response failed ({type(cause).__name__})"
    )


def _innermost_cause(exc: BaseException) -> BaseException | None:
    """The exception at the bottom of the ``__cause__`` chain (``None`` without one)."""
    seen: set[int] = set()
    cause = exc.__cause__
    while cause is not None and cause.__cause__ is not None and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__
    return cause


def _is_timeout(cause: BaseException | None) -> bool:
    """A read/connect/pool timeout of either transport (httpx2 or aiohttp), by class name so
    that aiohttp's exception classes need not be imported here."""
    if cause is None:
        return False
    if isinstance(cause, TimeoutError):  # asyncio's and aiohttp's socket timeouts
        return True
    return any("Timeout" in klass.__name__ for klass in type(cause).__mro__)


def _translate_status(exc: openai.APIStatusError) -> ImageListenerError:
    status = exc.status_code
    detail = f"openai images.generate failed: {_describe(exc)}"
    if status == 429:
        if exc.code in BILLING_CODES or exc.type in BILLING_CODES:
            return OperatorError(detail)
        retry_after = parse_retry_after(exc.response.headers)
        return RateLimited(f"{detail} retry_after={retry_after}", retry_after=retry_after)
    if status >= 500 or status in (408, 409):
        return ProviderUnavailable(detail)
    if status == 400 and exc.code in MODERATION_CODES:
        return PolicyRefusal(detail)
    if status in (400, 413, 422):
        if exc.param == "model":
            # The configured model was rejected: operators must pick another, users cannot.
            return OperatorError(detail)
        return InvalidRequest(detail, public_message=_invalid_request_message(exc.param))
    # 401 bad key, 403 no access or unverified organisation, 404 unknown/retired model or wrong
    # base URL, and any other 4xx: nothing the user can change.
    return OperatorError(detail)


def _describe(exc: openai.APIError) -> str:
    """Operator detail from short structured fields only: never the message, never headers."""
    status = getattr(exc, "status_code", None)
    request_id = getattr(exc, "request_id", None)
    return (
        f"status={status} code={exc.code} type={exc.type} param={exc.param} request_id={request_id}"
    )


def _invalid_request_message(param: str | None) -> str:
    if param and _SAFE_PARAM.match(param):
        return f"The image request is not valid: the '{param}' option was rejected."
    return InvalidRequest.public_message


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the provider asked us to wait: ``retry-after-ms``, else ``retry-after``.

    ``retry-after`` may be seconds (OpenAI sends floats) or an HTTP date. Unparseable,
    negative or non-finite values give ``None``/``0`` rather than an absurd wait.
    """
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            continue
        if math.isfinite(value):
            return max(0.0, value / divisor)
    raw_date = headers.get("retry-after")
    if raw_date is None:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(raw_date)
    except (TypeError, ValueError, IndexError):
        return None
    current = time.time() if now is None else now
    return max(0.0, parsed.timestamp() - current)
