"""Turn a claimed request into the exact generation parameters, or a user-safe refusal.

The database rejects malformed requests at insert time; this is the second line, so a row
written around the contract (by the service role, or before a migration) still ends as a
``failed`` reply with a clear reason instead of crashing the worker.

The same rules live in SQL, on purpose: ``public.messages_validate`` in
``migrations/20261127080100_chats_and_messages.sql`` (ARCHITECTURE.md, "Rules that live in two
places"). Change both together; ``tests/e2e/test_hostile_input.py`` drives both with the same
hostile rows.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from core.errors import InvalidRequest
from core.models import IMAGE_FORMATS, ClaimedJob, EditSpec, GenerationParams

MAX_PROMPT_CHARS = 32_000
ALLOWED_OPTIONS = (
    "size",
    "quality",
    "background",
    "output_format",
    "partial_images",
    "edit_of",
    "references",
    "mask",
    "input_fidelity",
)
#: the Images API takes at most 16 input images
MAX_REFERENCES = 16
REFERENCE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
INPUT_FIDELITIES = ("low", "high")
#: the Images API streams at most three partial images
MAX_PARTIAL_IMAGES = 3
QUALITIES = ("low", "medium", "high", "auto")
BACKGROUNDS = ("transparent", "opaque", "auto")
_SIZE = re.compile(r"([1-9][0-9]{1,4})x([1-9][0-9]{1,4})")
_SAFETY_NAMESPACE = b"image-listener:safety-identifier:"


def clean_prompt(prompt: str) -> str:
    """The prompt as sent to the model: trimmed, 1 to 32,000 characters."""
    text = prompt.strip()
    if not text:
        raise InvalidRequest("empty prompt", public_message="The image prompt is empty.")
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidRequest(
            f"prompt of {len(text)} characters",
            public_message=f"The image prompt is too long (the limit is {MAX_PROMPT_CHARS:,} "
            "characters).",
        )
    return text


def check_size(size: object) -> str:
    """``auto`` or ``WxH`` with multiples of 16, at most 3840x2160 in area, ratio within 3:1."""
    if not isinstance(size, str):
        raise _bad_option("size", 'must be "auto" or "WIDTHxHEIGHT"')
    if size == "auto":
        return size
    match = _SIZE.fullmatch(size)
    if match is None:
        raise _bad_option("size", 'must be "auto" or "WIDTHxHEIGHT"')
    width, height = int(match[1]), int(match[2])
    if width % 16 or height % 16:
        raise _bad_option("size", "width and height must be multiples of 16")
    if max(width, height) > 3840 or width * height > 3840 * 2160:
        raise _bad_option("size", "is larger than 3840x2160")
    if max(width, height) > 3 * min(width, height):
        raise _bad_option("size", "aspect ratio must be between 1:3 and 3:1")
    return size


def _choice(options: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> str | None:
    value = options.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or value not in allowed:
        raise _bad_option(key, "must be one of " + ", ".join(allowed))
    return value


def _partial_images(options: Mapping[str, Any], default: int) -> int:
    """A whole number 0..3 (JSON ``2`` or ``2.0``, never ``true``), else ``default``."""
    value = options.get("partial_images")
    if value is None:
        return default
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or not 0 <= value <= MAX_PARTIAL_IMAGES:
        raise _bad_option("partial_images", "must be a whole number from 0 to 3")
    return int(value)


def edit_spec(options: Mapping[str, Any], user_id: UUID) -> EditSpec | None:
    """The edit a request asks for, or None: the rules of the database's insert check, but
    for ``edit_of`` only the shape (the reply itself is checked against the database when the
    listener loads it)."""
    if not any(key in options for key in ("edit_of", "references", "mask", "input_fidelity")):
        return None
    edit_of = options.get("edit_of")
    source: UUID | None = None
    if edit_of is not None:
        try:
            source = UUID(edit_of) if isinstance(edit_of, str) else None
        except ValueError:
            source = None
        if source is None:
            raise _bad_option("edit_of", "must be the id of a complete image reply in this chat")
    references = options.get("references")
    paths: tuple[str, ...] = ()
    if references is not None:
        if not isinstance(references, list) or not 1 <= len(references) <= MAX_REFERENCES:
            raise _bad_option("references", "must be a list of 1 to 16 object paths")
        paths = tuple(
            _input_path("references", p, user_id, REFERENCE_EXTENSIONS) for p in references
        )
    mask = options.get("mask")
    if mask is not None:
        if source is None and not paths:
            raise _bad_option("mask", "needs edit_of or references")
        mask = _input_path("mask", mask, user_id, ("png",))
    if source is None and not paths:
        raise _bad_option("input_fidelity", "needs edit_of or references")
    return EditSpec(
        edit_of=source,
        references=paths,
        mask=mask,
        input_fidelity=_choice(options, "input_fidelity", INPUT_FIDELITIES),
    )


def _input_path(key: str, path: object, user_id: UUID, extensions: tuple[str, ...]) -> str:
    """``<user_id>/<name>.<ext>``: the user's own folder, no "..", no absolute path, no
    backslash, no empty part, no control character."""
    if not isinstance(path, str):
        raise _bad_option(key, "must hold object paths (strings)")
    folder = f"{user_id}/"
    parts = path.split("/")
    if (
        not path.startswith(folder)
        or len(path) > 1024
        or len(path) == len(folder)
        or any(part in ("", "..") for part in parts)
        or "\\" in path
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in path)
    ):
        raise _bad_option(key, "must name an object in your own folder (<your user id>/<name>)")
    name = parts[-1]
    extension = name.rsplit(".", 1)[1].lower() if "." in name else ""
    if extension not in extensions:
        raise _bad_option(key, "must end in ." + ", .".join(extensions))
    return path


def _bad_option(key: str, reason: str) -> InvalidRequest:
    return InvalidRequest(
        f"option {key} rejected: {reason}", public_message=f"The option {key} {reason}."
    )


def safety_identifier(user_id: object) -> str:
    """A stable hash of the end user's id: lets the provider track abuse without learning who."""
    return hashlib.sha256(_SAFETY_NAMESPACE + str(user_id).encode()).hexdigest()[:32]


def generation_params(
    job: ClaimedJob, *, model: str, default_size: str, default_partial_images: int = 0
) -> GenerationParams:
    """Everything the model call needs; raises InvalidRequest with a user-safe reason."""
    options = job.options
    if not isinstance(options, Mapping):
        raise InvalidRequest("options is not an object", public_message="The options are invalid.")
    unknown = sorted(str(k) for k in options if k not in ALLOWED_OPTIONS)
    if unknown:
        raise InvalidRequest(
            f"unknown options {unknown[:5]}",
            public_message="Unknown image option(s): "
            + ", ".join(k[:40] for k in unknown[:5])
            + ". Allowed: "
            + ", ".join(ALLOWED_OPTIONS)
            + ".",
        )
    size = check_size(options["size"]) if "size" in options else default_size
    output_format = _choice(options, "output_format", tuple(IMAGE_FORMATS)) or "png"
    background = _choice(options, "background", BACKGROUNDS)
    if background == "transparent" and output_format == "jpeg":
        raise _bad_option("background", "transparent needs output_format png or webp")
    return GenerationParams(
        model=model,
        prompt=clean_prompt(job.prompt),
        size=size,
        output_format=output_format,
        quality=_choice(options, "quality", QUALITIES),
        background=background,
        partial_images=_partial_images(options, default_partial_images),
        edit=edit_spec(options, job.user_id),
        safety_identifier=safety_identifier(job.user_id),
    )
