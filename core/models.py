"""Values that flow through the pipeline: a claimed job, what to ask the model, what came back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

#: output_format -> (file extension, content type)
IMAGE_FORMATS: Mapping[str, tuple[str, str]] = {
    "png": ("png", "image/png"),
    "jpeg": ("jpg", "image/jpeg"),
    "webp": ("webp", "image/webp"),
}


@dataclass(frozen=True)
class ClaimedJob:
    """One image request handed to this worker under a lease; ``attempt`` is the fencing token."""

    request_id: UUID
    reply_id: UUID
    chat_id: UUID
    user_id: UUID
    prompt: str
    options: Mapping[str, Any]
    attempt: int
    lease_expires_at: datetime
    #: when the user inserted the request (end-to-end latency is measured from here)
    requested_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ClaimedJob:
        """Build from a claim row, whether the driver decoded it or it came as JSON (PostgREST)."""
        expires = row["lease_expires_at"]
        requested = row.get("requested_at")
        return cls(
            request_id=as_uuid(row["request_id"]),
            reply_id=as_uuid(row["reply_id"]),
            chat_id=as_uuid(row["chat_id"]),
            user_id=as_uuid(row["user_id"]),
            prompt=str(row["prompt"]),
            options=row["options"] if row["options"] is not None else {},
            attempt=int(row["attempt"]),
            lease_expires_at=as_timestamp(expires),
            requested_at=None if requested is None else as_timestamp(requested),
        )


@dataclass(frozen=True)
class EditSpec:
    """What an edit starts from, as the request's options give it (checked)."""

    #: a complete image reply of the same chat: its image is the first input
    edit_of: UUID | None = None
    #: the user's uploads, object paths in their folder of the input store, in order
    references: tuple[str, ...] = ()
    #: a PNG in the input store whose transparent pixels mark what to change (first input)
    mask: str | None = None
    input_fidelity: str | None = None


@dataclass(frozen=True)
class InputImage:
    """One image sent to an edit: ``name`` is the file name of its multipart part."""

    name: str
    data: bytes
    content_type: str


@dataclass(frozen=True)
class EditInputs:
    """The images of one edit, read once per attempt: the edited image first, then the
    references in order; the mask applies to the first."""

    images: tuple[InputImage, ...]
    mask: InputImage | None = None


@dataclass(frozen=True)
class GenerationParams:
    """Exactly what is sent to the image model for one request."""

    model: str
    prompt: str
    size: str
    output_format: str
    quality: str | None = None
    background: str | None = None
    #: a stable hash of the end user's id, never the id itself
    safety_identifier: str | None = None
    #: partial images to stream while generating (0: one plain call, no previews)
    partial_images: int = 0
    #: an edit's inputs (images.edit); None for a generation from the prompt alone
    edit: EditSpec | None = None


@dataclass(frozen=True)
class TokenUsage:
    """Token counts the provider reported for one generation."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    #: the input split the provider reports (``input_tokens_details``); priced differently
    input_text_tokens: int | None = None
    input_image_tokens: int | None = None


@dataclass(frozen=True)
class GeneratedImage:
    """Decoded image bytes plus what the provider said about them."""

    data: bytes
    output_format: str
    usage: TokenUsage = field(default_factory=TokenUsage)
    provider_request_id: str | None = None

    @property
    def extension(self) -> str:
        return IMAGE_FORMATS[self.output_format][0]

    @property
    def content_type(self) -> str:
        return IMAGE_FORMATS[self.output_format][1]


@dataclass(frozen=True)
class StoredImage:
    """Where an image ended up: ``url`` for the user, ``location`` for us (to re-sign or remove)."""

    url: str
    location: str
    content_type: str
    size_bytes: int
    #: the Supabase Storage bucket, when there is one (with ``location`` it allows re-signing)
    bucket: str | None = None


def as_timestamp(value: object) -> datetime:
    """A timestamp as the driver decodes it, or as ISO text (PostgREST's JSON)."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def as_uuid(value: object) -> UUID:
    """A uuid as the driver decodes it, or as text (PostgREST's JSON)."""
    return value if isinstance(value, UUID) else UUID(str(value))


@dataclass(frozen=True)
class PartialImage:
    """One preview the provider streamed while generating (``index`` from 0)."""

    index: int
    data: bytes
    output_format: str


def preview_path(job: ClaimedJob, index: int, output_format: str) -> str:
    """Where a preview is stored: beside the final image, deleted once that is stored."""
    extension = IMAGE_FORMATS[output_format][0]
    return f"{job.user_id}/{job.chat_id}/{job.request_id}.preview-{index}.{extension}"


def object_path(job: ClaimedJob, output_format: str) -> str:
    """Storage path built from ids only, so no prompt or option can steer where a file lands."""
    extension = IMAGE_FORMATS[output_format][0]
    return f"{job.user_id}/{job.chat_id}/{job.request_id}.{extension}"
