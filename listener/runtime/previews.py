"""Partial images on their way to the reply: store each one, show it through the fenced
``preview`` write, and delete them once the attempt's outcome makes them useless.

A preview is best effort: one that cannot be stored or shown is logged and skipped, and the
generation goes on. What stops the generation is the database answering that the lease is no
longer ours, or that the request was deleted: then :class:`PreviewRefused` leaves the
generator's ``on_partial`` and closes the stream.
"""

from __future__ import annotations

import structlog

from core.errors import ImageListenerError
from core.models import ClaimedJob, GeneratedImage, PartialImage, preview_path
from core.ports import ImageStorage, JobStore, WriteResult

log = structlog.get_logger("listener.processor")

#: attempt outcomes after which nobody will show the previews again: delete them. After
#: ``retrying`` the reply still shows one until the next attempt's; after ``lease_lost`` the
#: new holder may be writing the very same paths.
REMOVE_AFTER = frozenset({"complete", "failed", "cancelled"})


class PreviewRefused(Exception):
    """The database refused a preview: the lease is gone or the request was deleted."""

    def __init__(self, result: WriteResult) -> None:
        super().__init__(result.value)
        self.result = result


class PreviewWriter:
    """``show`` is the generator's ``on_partial`` for one attempt of one job."""

    def __init__(
        self, job: ClaimedJob, *, store: JobStore, storage: ImageStorage, worker_id: str
    ) -> None:
        self._job = job
        self._store = store
        self._storage = storage
        self._worker_id = worker_id
        #: storage locations written, to delete once the outcome is final
        self.locations: list[str] = []
        self.shown = 0

    async def show(self, partial: PartialImage) -> None:
        path = preview_path(self._job, partial.index, partial.output_format)
        try:
            stored = await self._storage.store(
                path, GeneratedImage(data=partial.data, output_format=partial.output_format)
            )
        except ImageListenerError as exc:
            log.warning("preview_not_stored", index=partial.index, reason=exc.detail)
            return
        if stored.location not in self.locations:
            self.locations.append(stored.location)
        try:
            result = await self._store.preview(
                self._job, self._worker_id, stored.url, partial.index
            )
        except ImageListenerError as exc:
            log.warning("preview_not_shown", index=partial.index, reason=exc.detail)
            return
        if result is not WriteResult.DONE:
            raise PreviewRefused(result)
        self.shown += 1
        log.debug("preview_shown", index=partial.index)

    async def remove(self, outcome: str) -> None:
        """Delete the stored previews when ``outcome`` leaves no use for them."""
        if outcome not in REMOVE_AFTER:
            return
        for location in self.locations:
            try:
                await self._storage.remove(location)
            except ImageListenerError as exc:
                log.warning("preview_not_removed", reason=exc.detail)
        self.locations.clear()
