"""Pure request validation: the listener's second line behind the database's insert checks."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from core.errors import InvalidRequest
from core.models import ClaimedJob, object_path
from core.validation import check_size, clean_prompt, generation_params, safety_identifier

USER = uuid.UUID("0b5e1d2c-0000-4000-8000-00000000000a")


def job(prompt: str = "a cat", **options: Any) -> ClaimedJob:
    return ClaimedJob(
        request_id=uuid.uuid4(),
        reply_id=uuid.uuid4(),
        chat_id=uuid.uuid4(),
        user_id=USER,
        prompt=prompt,
        options=options,
        attempt=1,
        lease_expires_at=datetime.now(UTC),
    )


def test_defaults_fill_what_the_request_leaves_out() -> None:
    params = generation_params(job("  a cat \n"), model="m", default_size="1024x1024")
    assert (params.prompt, params.size, params.output_format) == ("a cat", "1024x1024", "png")
    assert params.quality is None
    assert params.background is None


def test_request_options_are_applied() -> None:
    request = job(size="1536x1024", quality="high", background="transparent", output_format="webp")
    params = generation_params(request, model="m", default_size="1024x1024")
    assert (params.size, params.quality, params.background, params.output_format) == (
        "1536x1024",
        "high",
        "transparent",
        "webp",
    )


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"colour": "red"}, "Unknown image option(s): colour"),
        ({"size": "big"}, "size"),
        ({"size": "1000x1000"}, "multiples of 16"),
        ({"size": "4096x4096"}, "larger than"),
        ({"size": "3072x768"}, "aspect ratio"),
        ({"size": "1024x1024\n"}, "size"),
        ({"size": 1024}, "size"),
        ({"quality": "ultra"}, "quality"),
        ({"background": True}, "background"),
        ({"output_format": "gif"}, "output_format"),
        ({"background": "transparent", "output_format": "jpeg"}, "png or webp"),
    ],
)
def test_bad_options_are_refused_with_a_user_safe_reason(
    options: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        generation_params(job(**options), model="m", default_size="1024x1024")
    assert fragment in caught.value.public_message


@pytest.mark.parametrize("prompt", ["", "   ", "\u3000\u00a0\n", "x" * 32_001])
def test_empty_or_overlong_prompts_are_refused(prompt: str) -> None:
    with pytest.raises(InvalidRequest):
        clean_prompt(prompt)


def test_prompt_limit_counts_characters_after_trimming() -> None:
    assert clean_prompt(" " * 10 + "é" * 32_000 + " ") == "é" * 32_000


def test_size_auto_is_accepted() -> None:
    assert check_size("auto") == "auto"


def test_safety_identifier_is_stable_and_does_not_reveal_the_user() -> None:
    user = uuid.uuid4()
    assert safety_identifier(user) == safety_identifier(str(user))
    assert str(user) not in safety_identifier(user)
    assert safety_identifier(user) != safety_identifier(uuid.uuid4())


def test_object_path_is_built_from_ids_only() -> None:
    hostile = job("../../etc/passwd", output_format="png")
    path = object_path(hostile, "jpeg")
    assert path == f"{hostile.user_id}/{hostile.chat_id}/{hostile.request_id}.jpg"


def test_claimed_job_reads_postgrest_json_rows() -> None:
    """PostgREST hands back strings; the driver hands back native types: both build the same."""
    native = job(size="auto")
    row = {
        "request_id": str(native.request_id),
        "reply_id": str(native.reply_id),
        "chat_id": str(native.chat_id),
        "user_id": str(native.user_id),
        "prompt": native.prompt,
        "options": dict(native.options),
        "attempt": 1,
        "lease_expires_at": native.lease_expires_at.isoformat(),
    }
    assert ClaimedJob.from_row(row) == native


@pytest.mark.parametrize(
    ("options", "expected"),
    [({}, 2), ({"partial_images": 0}, 0), ({"partial_images": 3}, 3), ({"partial_images": 1.0}, 1)],
)
def test_partial_images_comes_from_the_request_or_the_default(
    options: dict[str, Any], expected: int
) -> None:
    params = generation_params(
        job(**options), model="m", default_size="1024x1024", default_partial_images=2
    )
    assert params.partial_images == expected


@pytest.mark.parametrize("value", [4, -1, 1.5, "2", True])
def test_partial_images_outside_0_to_3_is_refused_with_a_user_safe_reason(value: object) -> None:
    with pytest.raises(InvalidRequest) as refused:
        generation_params(job(partial_images=value), model="m", default_size="1024x1024")
    assert refused.value.public_message == (
        "The option partial_images must be a whole number from 0 to 3."
    )


def test_edit_options_become_an_edit_spec_with_the_users_own_paths() -> None:
    request = job(
        edit_of="6f1c4b1e-0000-4000-8000-000000000001",
        references=[f"{USER}/a.png", f"{USER}/trips/b.JPG"],
        mask=f"{USER}/m.png",
        input_fidelity="high",
    )
    edit = generation_params(request, model="m", default_size="1024x1024").edit
    assert edit is not None
    assert str(edit.edit_of) == "6f1c4b1e-0000-4000-8000-000000000001"
    assert edit.references == (f"{USER}/a.png", f"{USER}/trips/b.JPG")
    assert (edit.mask, edit.input_fidelity) == (f"{USER}/m.png", "high")
    assert generation_params(job(), model="m", default_size="1024x1024").edit is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"edit_of": "nope"}, "The option edit_of must be the id of a complete image reply"),
        ({"references": []}, "The option references must be a list of 1 to 16 object paths."),
        ({"references": ["someone/a.png"]}, "must name an object in your own folder"),
        ({"references": [f"{USER}/../x/a.png"]}, "must name an object in your own folder"),
        ({"references": [f"{USER}/a.gif"]}, "must end in .png, .jpg, .jpeg, .webp"),
        ({"mask": f"{USER}/m.png"}, "The option mask needs edit_of or references."),
        ({"input_fidelity": "low"}, "The option input_fidelity needs edit_of or references."),
    ],
)
def test_edit_options_the_database_would_refuse_fail_with_a_user_safe_reason(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        generation_params(job(**options), model="m", default_size="1024x1024")
    assert message in refused.value.public_message
