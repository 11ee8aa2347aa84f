"""The real :class:`core.ports.ImageGenerator`: OpenAI's Images API through the official SDK.

This is the boundary where SDK errors become :mod:`core.errors`: every ``openai.OpenAIError``
is raised again ``from exc`` as what :mod:`listener.generators.openai_errors` translates it to.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx2
import openai

from core.errors import (
    ProviderUnavailable,
)
from core.models import (
    IMAGE_FORMATS,
    EditInputs,
    GeneratedImage,
    GenerationParams,
    PartialImage,
    TokenUsage,
)
from core.ports import PartialSink
from listener.generators.http import AioHttpClient
from listener.generators.openai_errors import (
    body_read_error,
    stream_event_error,
    translate_openai_error,
)

#: Used when no base URL is configured, so the SDK never falls back to ``OPENAI_BASE_URL``:
#: configuration is read in one place (the CLI settings), not by libraries behind our back.
DEFAULT_BASE_URL = "https://api.openai.com/v1"

#: Connecting should be quick even when generating is slow; a dead host fails in seconds.
_CONNECT_TIMEOUT_SECONDS = 10.0

#: The API sends nothing until the image is done, then the whole answer at once: a body that
#: takes longer than this after its headers is a stalled connection, not a slow model.
_BODY_READ_SECONDS = 60.0

#: Bodies up to this size are decoded on the event loop (a thread hop costs more than that).
_INLINE_DECODE_BYTES = 64 * 1024


def build_openai_client(
    api_key: str, base_url: str | None, timeout_seconds: float
) -> openai.AsyncOpenAI:
    """An SDK client whose own retries are off: :mod:`core.retry` is the only retry layer.

    ``timeout_seconds`` bounds each read/write; it must exceed a whole generation, since the
    API sends nothing until the image is done. HTTP goes through the SDK's aiohttp transport
    (``openai[aiohttp]``): the default httpx2/httpcore2/anyio stack cost 0.79 ms of CPU per
    call against 0.54 ms for aiohttp (``bench/FINDINGS.md``), and the listener is CPU-bound on
    exactly this call when the provider is fast. Its sessions read with a small buffer, so
    that answers waiting for a body slot stay in the kernel (:mod:`listener.generators.http`).
    """
    if not math.isfinite(timeout_seconds) or timeout_seconds <= 0:
        raise ValueError(f"timeout_seconds must be a positive number, got {timeout_seconds!r}")
    return openai.AsyncOpenAI(
        api_key=api_key,
        base_url=base_url or DEFAULT_BASE_URL,
        timeout=openai.Timeout(
            timeout_seconds, connect=min(timeout_seconds, _CONNECT_TIMEOUT_SECONDS)
        ),
        max_retries=0,
        http_client=AioHttpClient(),
    )


class OpenAIImageGenerator:
    """Generates one image per call with ``client.images.generate``; raises only core errors.

    The response is taken as a stream and its body read under one of ``body_slots``: with
    hundreds of calls in flight and answers of ~2 MB, the bodies still waiting for a slot stay
    in their sockets (aiohttp pauses reading), so memory is bounded by the slots, not by the
    calls in flight. A large body is decoded in a thread under one of ``decode_slots``: the
    JSON parse and base64 decode (~3 ms for 2 MB) hold the GIL, so more threads would only
    queue the event loop behind them.
    """

    def __init__(
        self, client: openai.AsyncOpenAI, *, body_slots: int = 8, decode_slots: int = 2
    ) -> None:
        self._client = client
        self._body_slots = asyncio.Semaphore(body_slots)
        self._decode_slots = asyncio.Semaphore(decode_slots)

    async def generate(
        self,
        params: GenerationParams,
        on_partial: PartialSink | None = None,
        inputs: EditInputs | None = None,
    ) -> GeneratedImage:
        """One call, no retries; SDK errors come out as :mod:`core.errors` types. With
        ``inputs`` the call is ``images.edit`` (multipart: the images as ``image[]`` parts in
        order, the mask, ``input_fidelity``), else ``images.generate``. With
        ``params.partial_images`` and ``on_partial`` it is streamed (see :meth:`_streamed`)."""
        call = _Call.of(params, inputs)
        if params.partial_images > 0 and on_partial is not None:
            return await self._streamed(call, params, on_partial)
        try:
            async with call.streaming_response(self._client) as response:
                request_id = response.request_id
                async with self._body_slots:
                    async with asyncio.timeout(_BODY_READ_SECONDS):
                        body = await _read_body(response)
                    if len(body) <= _INLINE_DECODE_BYTES:
                        return decode_images_response(body, request_id, params.output_format)
                    async with self._decode_slots:
                        return await asyncio.to_thread(
                            decode_images_response, body, request_id, params.output_format
                        )
        except openai.OpenAIError as exc:
            raise translate_openai_error(exc, secret=self._client.api_key) from exc
        except (TimeoutError, httpx2.HTTPError) as exc:
            # Reading the body comes after the SDK's own error mapping.
            raise body_read_error(exc) from exc

    async def _streamed(
        self, call: _Call, params: GenerationParams, on_partial: PartialSink
    ) -> GeneratedImage:
        """``stream=True``: each ``*.partial_image`` event goes to ``on_partial`` as it
        arrives, and the ``*.completed`` event is the image (``image_generation.*`` for a
        generation, ``image_edit.*`` for an edit).

        The SDK's traps, each handled here: a stream is never retried by the SDK (our retry
        layer starts the call over); an error event with a nested ``error`` object is raised as
        a plain ``openai.APIError`` (translated as usual: moderation is a refusal, the rest
        transient); a flat error event, or any unknown ``type``, is yielded silently as a
        partial-image event, so every event's ``type`` is checked; and a stream that ends
        without its ``completed`` event is a failure, not an image. Whatever ``on_partial``
        raises (the lease is gone, the request deleted) closes the stream and propagates.
        """
        try:
            stream = await call.stream(self._client, params.partial_images)
            async with stream:
                request_id = stream.response.headers.get("x-request-id")
                async for event in stream:
                    kind = getattr(event, "type", None)
                    if kind == f"{call.events}.partial_image":
                        await on_partial(_partial(event, params.output_format))
                    elif kind == f"{call.events}.completed":
                        return await self._completed(event, request_id, params.output_format)
                    else:
                        raise stream_event_error(event, request_id)
        except openai.OpenAIError as exc:
            raise translate_openai_error(exc, secret=self._client.api_key) from exc
        except (TimeoutError, httpx2.HTTPError) as exc:
            raise body_read_error(exc) from exc
        raise ProviderUnavailable(
            f"openai images.{call.method}: the stream ended without its completed event"
        )

    async def _completed(
        self, event: Any, request_id: str | None, requested_format: str
    ) -> GeneratedImage:
        payload = event.model_dump(mode="json", exclude={"b64_json"})
        encoded = getattr(event, "b64_json", None)
        if not isinstance(encoded, str) or len(encoded) <= _INLINE_DECODE_BYTES:
            return image_from_payload(payload, encoded, request_id, requested_format)
        async with self._decode_slots:  # a 2 MB base64 decode holds the GIL for ~2 ms
            return await asyncio.to_thread(
                image_from_payload, payload, encoded, request_id, requested_format
            )

    async def aclose(self) -> None:
        """Close the HTTP client's connections (the daemon calls this on the way out)."""
        await self._client.close()


def _partial(event: Any, requested_format: str) -> PartialImage:
    """A partial-image event's preview (a few hundred KB: decoded on the loop)."""
    try:
        data = base64.b64decode(str(event.b64_json), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProviderUnavailable("openai stream sent a partial image that is not base64") from exc
    index = event.partial_image_index
    reported = getattr(event, "output_format", None)
    output_format = reported if isinstance(reported, str) and reported in IMAGE_FORMATS else None
    return PartialImage(
        index=index if isinstance(index, int) and index >= 0 else 0,
        data=data,
        output_format=output_format or requested_format,
    )


@dataclass(frozen=True)
class _Call:
    """One Images API call: ``images.generate`` with its keyword arguments, or ``images.edit``
    with the input images as multipart file parts."""

    method: str
    events: str
    kwargs: dict[str, Any]

    @classmethod
    def of(cls, params: GenerationParams, inputs: EditInputs | None) -> _Call:
        kwargs: dict[str, Any] = {"prompt": params.prompt, "model": params.model, "n": 1}
        kwargs |= _optional(params)
        if inputs is None:
            return cls("generate", "image_generation", kwargs)
        images = [(image.name, image.data, image.content_type) for image in inputs.images]
        kwargs["image"] = images if len(images) > 1 else images[0]
        if inputs.mask is not None:
            kwargs["mask"] = (inputs.mask.name, inputs.mask.data, inputs.mask.content_type)
        fidelity = params.edit.input_fidelity if params.edit is not None else None
        if fidelity is not None:
            kwargs["input_fidelity"] = fidelity
        return cls("edit", "image_edit", kwargs)

    def streaming_response(self, client: openai.AsyncOpenAI) -> Any:
        """The call with its response taken as a stream of bytes (read under a body slot)."""
        return getattr(client.images.with_streaming_response, self.method)(**self.kwargs)

    async def stream(self, client: openai.AsyncOpenAI, partial_images: int) -> Any:
        """The call as server-sent events with ``partial_images`` previews."""
        method = getattr(client.images, self.method)
        return await method(**self.kwargs, stream=True, partial_images=partial_images)


def _optional(params: GenerationParams) -> dict[str, Any]:
    """The optional parameters that are set: omitted ones stay out of the request body."""
    values = {
        "size": params.size,
        "output_format": params.output_format,
        "quality": params.quality,
        "background": params.background,
        "safety_identifier": params.safety_identifier,
    }
    return {name: value for name, value in values.items() if value is not None}


async def _read_body(response: Any) -> bytearray:
    """The body in one growing buffer: the SDK's ``read`` keeps every 16 KiB chunk until it
    joins them, so each body slot held the body twice at the end of its read."""
    body = bytearray()
    async for chunk in response.iter_bytes():
        body += chunk
    return body


def decode_images_response(
    body: bytes | bytearray, request_id: str | None, requested_format: str
) -> GeneratedImage:
    """The first image of an Images API JSON body, decoded; a pure function, run in a thread
    for large bodies so that a 2 MB ``json.loads`` and base64 decode do not stall the loop.

    A 200 without usable image data is a provider fault, not the user's: it is reported as
    transient, so the next call (which the API bills separately) gets a chance.
    """
    spliced = _splice_image(body)
    if spliced is not None:
        rest, view = spliced
        return image_from_payload(rest, view, request_id, requested_format)
    try:
        payload = json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        # a proxy's error page or a truncated answer: the provider side's fault, may not repeat
        raise ProviderUnavailable(
            "openai images.generate returned a response body that is not valid JSON"
            f" (request_id={request_id})"
        ) from exc
    payload = payload if isinstance(payload, dict) else {}
    data = payload.get("data")
    first = data[0] if isinstance(data, list) and data else None
    encoded = first.get("b64_json") if isinstance(first, dict) else None
    return image_from_payload(payload, encoded, request_id, requested_format)


#: where the first image's base64 starts: ``"b64_json"``, the colon, the opening quote
_B64_JSON_VALUE = re.compile(rb'"b64_json"[ \t\r\n]*:[ \t\r\n]*"')


def _splice_image(body: bytes | bytearray) -> tuple[dict[str, Any], memoryview] | None:
    """The answer's JSON without its image, and the image's base64 as a view of ``body``;
    ``None`` when that cannot be proven, and the caller parses the whole body as JSON.

    Parsing the whole body holds it, its text and the base64 string (2 MB each) before the
    image is decoded. Base64 needs no JSON escapes: the value runs from the opening quote to
    the next quote, unless it holds a backslash (``\\/`` is legal JSON). The rest, with that
    value emptied, must parse and name the emptied value as ``data[0].b64_json``: a match
    anywhere else (another item, a nested object) leaves that field non-empty.
    """
    match = _B64_JSON_VALUE.search(body)
    if match is None:
        return None
    start = match.end()
    end = body.find(b'"', start)
    if end <= start or body.find(b"\\", start, end) >= 0:
        return None
    try:
        payload = json.loads(body[:start] + body[end:])
    except ValueError:
        return None
    data = payload.get("data") if isinstance(payload, dict) else None
    first = data[0] if isinstance(data, list) and data else None
    if not isinstance(first, dict) or first.get("b64_json") != "":
        return None
    return payload, memoryview(body)[start:end]


def image_from_payload(
    payload: Mapping[str, Any], encoded: object, request_id: str | None, requested_format: str
) -> GeneratedImage:
    """The image of a JSON answer, or of a stream's ``completed`` event: base64 ``encoded``
    (a string, or a view of the body's ASCII) decoded, with the format and token usage the
    payload reports."""
    if not isinstance(encoded, str | memoryview) or not encoded:
        raise ProviderUnavailable(
            f"openai images.generate returned no b64_json image (request_id={request_id})"
        )
    try:
        # not base64.b64decode: it copies a string or a view into bytes first (2 MB more)
        image = binascii.a2b_base64(encoded, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise ProviderUnavailable(
            f"openai images.generate returned invalid base64 image data (request_id={request_id})"
        ) from exc
    if not image:
        raise ProviderUnavailable(
            f"openai images.generate returned an empty image (request_id={request_id})"
        )
    reported = payload.get("output_format")
    output_format = reported if isinstance(reported, str) and reported in IMAGE_FORMATS else None
    usage = payload.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("input_tokens_details")
    details = details if isinstance(details, dict) else {}
    return GeneratedImage(
        data=image,
        output_format=output_format or requested_format,
        usage=TokenUsage(
            input_tokens=_count(usage.get("input_tokens")),
            output_tokens=_count(usage.get("output_tokens")),
            total_tokens=_count(usage.get("total_tokens")),
            input_text_tokens=_count(details.get("text_tokens")),
            input_image_tokens=_count(details.get("image_tokens")),
        ),
        provider_request_id=request_id,
    )


def _count(value: object) -> int | None:
    """A token count as reported, or ``None`` when it is missing or not a whole number."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value
