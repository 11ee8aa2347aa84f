"""An edit's input images, read once per attempt: the image of the ``edit_of`` reply (where
its metadata says it is stored), then the references from the input store, in order, and the
mask. Something missing ends the request ``failed`` with a reason naming it: another try would
find it missing too. The bytes are never logged; operator details name inputs by position."""

from __future__ import annotations

from core.errors import InvalidRequest, StoredObjectMissing
from core.models import EditInputs, EditSpec, InputImage
from core.ports import ImageStorage, JobStore

#: what the API is told each file is, by extension (the database allowed only these)
CONTENT_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
}


async def load_edit_inputs(
    spec: EditSpec, *, queue: JobStore, images: ImageStorage, inputs: ImageStorage
) -> EditInputs:
    """The images to send with ``images.edit``, in the order the request gave them."""
    parts: list[InputImage] = []
    if spec.edit_of is not None:
        gone = InvalidRequest(
            "edit_of: the reply's image is not stored any more",
            public_message="The image to edit no longer exists.",
        )
        where = await queue.image_of_reply(spec.edit_of)
        location = where.get("location") if where is not None else None
        if not isinstance(location, str) or not location:
            raise gone
        try:
            data = await images.read(location)
        except StoredObjectMissing as exc:
            raise gone from exc
        parts.append(_part("edit-of", location, data))
    for number, path in enumerate(spec.references, 1):
        parts.append(_part(f"reference-{number}", path, await _read_input(inputs, path, number)))
    mask = None
    if spec.mask is not None:
        mask = _part("mask", spec.mask, await _read_input(inputs, spec.mask, None))
    return EditInputs(images=tuple(parts), mask=mask)


async def _read_input(inputs: ImageStorage, path: str, number: int | None) -> bytes:
    try:
        return await inputs.read(path)
    except StoredObjectMissing as exc:
        which = "the mask" if number is None else f"reference {number}"
        raise InvalidRequest(
            f"{which} is not in the input store",
            public_message=f"The {'mask' if number is None else 'reference'} image {path} was "
            "not found: upload it first.",
        ) from exc


def _part(name: str, path: str, data: bytes) -> InputImage:
    extension = path.rsplit(".", 1)[-1].lower()
    content_type = CONTENT_TYPES.get(extension, "image/png")
    return InputImage(name=f"{name}.{extension}", data=data, content_type=content_type)
