"""Edits end to end, in both deployment modes: generate, then edit that image with the user's
own uploads and a mask, then edit the edit; what reaches the provider is exactly the stored
image, each reference and the mask, in order; a missing reference ends the request 'failed'
with a reason the user can read, without a retry."""

from __future__ import annotations

import pytest

from core.png import read_png_size, solid_png
from tests.support.modes import ModeRig
from tests.support.queue_helpers import new_chat

pytestmark = pytest.mark.e2e


@pytest.fixture
def rig(mode_rig: ModeRig) -> ModeRig:
    return mode_rig


def test_generate_then_edit_with_references_and_a_mask_then_edit_the_edit(rig: ModeRig) -> None:
    rig.start()
    user, chat = new_chat(rig.db)
    first = rig.wait_final(rig.insert_request(user, chat, "a harbour at noon"))
    assert first["status"] == "complete"
    stored_first = rig.fetch_image(first["image_url"])

    cat, holes = solid_png(64, 32), solid_png(1024, 1024)
    cat_path = rig.upload_input(user, "pets/cat.png", cat)
    mask_path = rig.upload_input(user, "mask.png", holes)
    prompt = "make it night, add the cat"
    request = rig.insert_request(
        user,
        chat,
        prompt,
        {
            "edit_of": str(first["id"]),
            "references": [cat_path],
            "mask": mask_path,
            "input_fidelity": "high",
            "size": "1024x1024",
        },
    )
    edit = rig.wait_final(request)
    assert edit["status"] == "complete", edit
    received = rig.fake.last_request(prompt)
    assert received.files == [("image[]", stored_first), ("image[]", cat), ("mask", holes)]
    assert received.body["input_fidelity"] == "high"
    assert edit["metadata"]["edit"] == {
        "edit_of": str(first["id"]),
        "references": [cat_path],
        "mask": True,
        "input_fidelity": "high",
    }
    assert read_png_size(rig.fetch_image(edit["image_url"])) == (1024, 1024)

    again = rig.wait_final(
        rig.insert_request(user, chat, "and now at dawn", {"edit_of": str(edit["id"])})
    )
    assert again["status"] == "complete"
    assert rig.fake.last_request("and now at dawn").files == [
        ("image", rig.fetch_image(edit["image_url"]))
    ]


def test_a_reference_that_was_never_uploaded_fails_the_request_naming_it(rig: ModeRig) -> None:
    rig.start()
    user, chat = new_chat(rig.db)
    present = rig.upload_input(user, "here.png", solid_png(32, 32))
    missing = f"{user}/never-uploaded.png"
    prompt = "combine them"
    reply = rig.wait_final(
        rig.insert_request(user, chat, prompt, {"references": [present, missing]})
    )
    assert reply["status"] == "failed"
    assert reply["error"] == f"The reference image {missing} was not found: upload it first."
    assert reply["metadata"]["error_code"] == "invalid_request"
    assert rig.fake.calls(prompt) == 0, "nothing was sent, and nothing is retried"
