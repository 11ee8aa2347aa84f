"""What a finished attempt writes back: reply metadata, and the log summary of one request."""

from __future__ import annotations

from typing import Any

from core.models import GeneratedImage, GenerationParams, StoredImage


def completion_metadata(
    params: GenerationParams,
    image: GeneratedImage,
    stored: StoredImage,
    *,
    attempt: int,
    duration_seconds: float,
) -> dict[str, Any]:
    """The reply's ``metadata`` on success: enough to audit cost and to re-sign or find the file.
    (The completion adds ``cost_usd``, priced in the database from ``usage``.)"""
    usage = {
        key: value
        for key, value in (
            ("input_tokens", image.usage.input_tokens),
            ("output_tokens", image.usage.output_tokens),
            ("total_tokens", image.usage.total_tokens),
            ("input_text_tokens", image.usage.input_text_tokens),
            ("input_image_tokens", image.usage.input_image_tokens),
        )
        if value is not None
    }
    return {
        "model": params.model,
        "size": params.size,
        "quality": params.quality or "auto",
        "background": params.background or "auto",
        "output_format": image.output_format,
        "usage": usage,
        "attempt": attempt,
        "duration_ms": round(duration_seconds * 1000),
        "storage": {
            "bucket": stored.bucket,
            "location": stored.location,
            "content_type": stored.content_type,
            "bytes": stored.size_bytes,
        },
        "provider_request_id": image.provider_request_id,
        **_edit_fields(params),
    }


def _edit_fields(params: GenerationParams) -> dict[str, Any]:
    """What an edit was made from (ids and the user's own paths, never image bytes)."""
    if params.edit is None:
        return {}
    edit = params.edit
    return {
        "edit": {
            "edit_of": None if edit.edit_of is None else str(edit.edit_of),
            "references": list(edit.references),
            "mask": edit.mask is not None,
            "input_fidelity": edit.input_fidelity,
        }
    }


def failure_metadata(code: str, *, attempt: int, duration_seconds: float) -> dict[str, Any]:
    """Reply ``metadata`` after a failed attempt (operator detail stays in the job row)."""
    return {
        "error_code": code,
        "attempt": attempt,
        "duration_ms": round(duration_seconds * 1000),
    }
