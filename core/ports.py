"""The I/O the pipeline needs, as small Protocols: one real implementation each lives in listener/."""

from __future__ import annotations

from typing import Protocol

from core.models import GeneratedImage, GenerationParams, StoredImage


class ImageGenerator(Protocol):
    """Turns parameters into image bytes; raises only errors from :mod:`core.errors`."""

    async def generate(self, params: GenerationParams) -> GeneratedImage:
        """Run one generation call (no retries: the caller owns the retry policy)."""
        ...


class ImageStorage(Protocol):
    """Keeps generated images. ``store`` overwrites the same path, so a retried attempt never duplicates."""

    async def store(self, path: str, image: GeneratedImage) -> StoredImage:
        """Write ``image`` at ``path`` (built by :func:`core.models.object_path`)."""
        ...

    async def remove(self, location: str) -> None:
        """Delete a stored image; removing one that is already gone is not an error."""
        ...
