"""The one error tree of image-listener.

    ImageListenerError
    ├── TransientError            worth another try: the same call may succeed later
    │   ├── RateLimited           the provider asked us to slow down (may carry retry_after)
    │   ├── ProviderUnavailable   5xx, 408/409, dropped connection
    │   └── ProviderTimeout       no answer within the timeout
    └── PermanentError            another try gives the same answer
        ├── InvalidRequest        the user's request cannot be served as asked
        ├── PolicyRefusal         the provider's safety system refused the prompt
        ├── UnsafeStoragePath     a storage path that would escape its root (a bug)
        ├── StoredObjectMissing   an object to read is not in storage (an input image)
        └── OperatorError         our configuration is wrong (bad key, unknown model, no quota)
            └── StorageMisconfigured

    TransientError also has DatabaseUnavailable and StorageUnavailable.

Lower errors (SDK, driver, filesystem) are translated at the boundary with ``raise ... from exc``.
Every error carries ``public_message``: text that is safe to show the end user (no key, no stack,
no internal detail). ``str(error)`` is for operators and must never contain a secret either.
Failures decided in SQL write user-visible text of their own (``image_jobs_claim`` for
exhausted attempts, ``image_jobs_cancel``'s default reason): keep the tone of both in step
(ARCHITECTURE.md, "Rules that live in two places").
"""

from __future__ import annotations


class ImageListenerError(Exception):
    """Root of every error this project raises on purpose."""

    public_message = "The image could not be generated because of an internal error."
    #: short stable code stored in reply metadata and logs
    code = "internal_error"

    def __init__(self, detail: str, *, public_message: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if public_message is not None:
            self.public_message = public_message


class TransientError(ImageListenerError):
    """A failure that another attempt may not repeat."""

    public_message = "The image service is temporarily unavailable. Please try again later."
    code = "temporarily_unavailable"


class RateLimited(TransientError):
    """The provider throttled us; ``retry_after`` is its hint in seconds, if it gave one."""

    public_message = "The image service is busy right now. Please try again in a few minutes."
    code = "rate_limited"

    def __init__(
        self,
        detail: str,
        *,
        retry_after: float | None = None,
        public_message: str | None = None,
    ) -> None:
        super().__init__(detail, public_message=public_message)
        self.retry_after = retry_after


class ProviderUnavailable(TransientError):
    """The provider answered 5xx/408/409 or the connection broke."""

    code = "provider_unavailable"


class ProviderTimeout(TransientError):
    """The provider did not answer in time."""

    public_message = "The image service took too long to answer. Please try again later."
    code = "provider_timeout"


class PermanentError(ImageListenerError):
    """A failure that repeating the same request cannot fix."""

    public_message = "The image could not be generated."
    code = "permanent_error"


class InvalidRequest(PermanentError):
    """The request itself is unusable (bad option, prompt the provider rejects as malformed)."""

    public_message = "The image request is not valid."
    code = "invalid_request"


class PolicyRefusal(PermanentError):
    """The provider's safety system refused the prompt or the image."""

    public_message = (
        "The image was not generated because the request was flagged by the safety system. "
        "Please rephrase your prompt."
    )
    code = "moderation_blocked"


class OperatorError(PermanentError):
    """Our side is misconfigured: bad API key, unknown model, no quota. Operators must act."""

    public_message = (
        "The image service is not available because of a configuration problem. "
        "The operators have been notified."
    )
    code = "service_misconfigured"


class DatabaseUnavailable(TransientError):
    """The database could not be reached or the call timed out; the same call may work later."""

    code = "database_unavailable"


class StorageUnavailable(TransientError):
    """Image storage failed (disk full, I/O error, storage service down); may work later."""

    public_message = "The image could not be saved right now. Please try again later."
    code = "storage_unavailable"


class StorageMisconfigured(OperatorError):
    """Image storage refuses us (permissions, read-only filesystem, missing bucket, bad key)."""

    code = "storage_misconfigured"


class StoredObjectMissing(PermanentError):
    """An object to read is not in storage (an input image that was never uploaded, or was
    deleted): another try finds it missing too. The reader names which, for the user."""

    public_message = "An input image was not found."
    code = "input_missing"


class UnsafeStoragePath(PermanentError):
    """A storage path that is malformed or would leave the image directory: a bug, never retried."""

    public_message = "The image could not be stored."
    code = "unsafe_storage_path"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text (driver errors append multi-line context)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
