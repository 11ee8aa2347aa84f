"""Image storage in a private Supabase Storage bucket, handed to users as signed URLs.

The object path is ``<user_id>/<chat_id>/<request_id>.<ext>`` (from ids only); uploads use
``upsert`` so a retried attempt overwrites instead of duplicating. The URL expires after
``signed_url_seconds``; the bucket and path go into the reply's metadata so a frontend can
re-sign it (the storage policy lets the chat's owner read their own images).
"""

from __future__ import annotations

import asyncio

import httpx
from storage3.exceptions import StorageApiError
from supabase import AsyncClient

from core.errors import (
    ImageListenerError,
    StorageMisconfigured,
    StorageUnavailable,
    StoredObjectMissing,
)
from core.models import GeneratedImage, StoredImage

DEFAULT_BUCKET = "generated-images"
#: users' input images for edits (created by the migrations, own-folder policy)
INPUTS_BUCKET = "image-inputs"


def translate_storage_error(exc: Exception, action: str) -> ImageListenerError:
    """Storage API and transport errors into the core tree."""
    if isinstance(exc, StorageApiError):
        status = int(exc.status) if str(exc.status).isdigit() else 500
        detail = f"storage {action} failed: status={status} error={exc.code!r}"
        if status >= 500 or status in (408, 429):
            return StorageUnavailable(detail)
        return StorageMisconfigured(detail)  # 400/401/403/404: bucket, key or policy
    return StorageUnavailable(f"storage {action} failed: {type(exc).__name__}")


def _not_found(exc: StorageApiError) -> bool:
    """Storage answers a missing object (or one the key may not see) with 400 / "404"."""
    return str(exc.status) == "404" or str(exc.code).lower() in ("not_found", "nosuchkey")


class SupabaseStorage:
    """:class:`core.ports.ImageStorage` over Supabase Storage (``storage3``)."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        bucket: str,
        signed_url_seconds: int,
        call_timeout: float = 60.0,
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._signed_url_seconds = signed_url_seconds
        self._call_timeout = call_timeout

    async def store(self, path: str, image: GeneratedImage) -> StoredImage:
        bucket = self._client.storage.from_(self._bucket)
        try:
            async with asyncio.timeout(self._call_timeout):
                await bucket.upload(
                    path,
                    image.data,
                    {
                        "content-type": image.content_type,
                        "upsert": "true",
                        # immutable per request id, but overwritten by a retried attempt
                        "cache-control": "3600",
                    },
                )
                signed = await bucket.create_signed_url(path, self._signed_url_seconds)
        except TimeoutError as exc:
            raise StorageUnavailable(f"storage upload of {path} timed out") from exc
        except (StorageApiError, httpx.HTTPError) as exc:
            raise translate_storage_error(exc, "upload") from exc
        url = signed.get("signedURL") or signed.get("signedUrl")
        if not url:
            raise StorageUnavailable("storage sign answered without a URL")
        return StoredImage(
            url=str(url),
            location=path,
            content_type=image.content_type,
            size_bytes=len(image.data),
            bucket=self._bucket,
        )

    async def read(self, location: str) -> bytes:
        """Download ``location`` from the bucket; missing: StoredObjectMissing."""
        try:
            async with asyncio.timeout(self._call_timeout):
                data = await self._client.storage.from_(self._bucket).download(location)
        except TimeoutError as exc:
            raise StorageUnavailable(f"storage download of {location} timed out") from exc
        except StorageApiError as exc:
            if _not_found(exc):
                raise StoredObjectMissing(f"no object {location!r} in {self._bucket}") from exc
            raise translate_storage_error(exc, "download") from exc
        except httpx.HTTPError as exc:
            raise translate_storage_error(exc, "download") from exc
        return bytes(data)

    async def remove(self, location: str) -> None:
        try:
            async with asyncio.timeout(self._call_timeout):
                await self._client.storage.from_(self._bucket).remove([location])
        except TimeoutError as exc:
            raise StorageUnavailable(f"storage remove of {location} timed out") from exc
        except (StorageApiError, httpx.HTTPError) as exc:
            raise translate_storage_error(exc, "remove") from exc
