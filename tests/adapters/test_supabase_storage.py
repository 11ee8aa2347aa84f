"""SupabaseStorage with the real storage3 client against the local Storage stand-in."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from supabase import AsyncClient

from core.errors import StorageMisconfigured, StorageUnavailable
from core.models import GeneratedImage
from listener.storage.supabase import SupabaseStorage
from listener.supabase_client import supabase_client
from tests.support.supabase_stack import SupabaseStack

BUCKET = "generated-images"


@pytest.fixture
async def client(supabase_stack: SupabaseStack) -> AsyncIterator[AsyncClient]:
    supabase_stack.storage.add_bucket(BUCKET)
    async with supabase_client(
        supabase_stack.url, supabase_stack.service_role_key, http_timeout=10
    ) as sb:
        yield sb


def storage(client: AsyncClient, bucket: str = BUCKET) -> SupabaseStorage:
    return SupabaseStorage(client, bucket=bucket, signed_url_seconds=120, call_timeout=10)


async def test_store_uploads_with_content_type_and_returns_a_signed_url_that_downloads(
    client: AsyncClient, supabase_stack: SupabaseStack
) -> None:
    image = GeneratedImage(data=b"\xff\xd8jpeg bytes", output_format="jpeg")
    stored = await storage(client).store("u/c/r.jpg", image)
    assert (stored.bucket, stored.location, stored.content_type) == (
        BUCKET,
        "u/c/r.jpg",
        "image/jpeg",
    )
    assert stored.url.startswith(f"{supabase_stack.url}/storage/v1/object/sign/{BUCKET}/u/c/r.jpg?")
    async with httpx.AsyncClient() as http:
        downloaded = await http.get(stored.url)
    assert downloaded.content == image.data
    assert downloaded.headers["content-type"].startswith("image/jpeg")
    [upload] = [r for r in supabase_stack.storage.requests if r.method == "POST" and r.upsert]
    assert upload.role == "service_role"


async def test_a_retried_attempt_overwrites_instead_of_duplicating(
    client: AsyncClient, supabase_stack: SupabaseStack
) -> None:
    first = GeneratedImage(data=b"first", output_format="png")
    second = GeneratedImage(data=b"second", output_format="png")
    await storage(client).store("u/c/r.png", first)
    await storage(client).store("u/c/r.png", second)
    assert {k: v.data for k, v in supabase_stack.storage.objects.items()} == {
        f"{BUCKET}/u/c/r.png": b"second"
    }


async def test_remove_deletes_and_is_idempotent(
    client: AsyncClient, supabase_stack: SupabaseStack
) -> None:
    await storage(client).store("u/c/r.png", GeneratedImage(data=b"x", output_format="png"))
    await storage(client).remove("u/c/r.png")
    await storage(client).remove("u/c/r.png")
    assert supabase_stack.storage.objects == {}


async def test_a_missing_bucket_is_an_operator_error(client: AsyncClient) -> None:
    with pytest.raises(StorageMisconfigured, match="status=4"):
        await storage(client, bucket="nope").store(
            "u/c/r.png", GeneratedImage(data=b"x", output_format="png")
        )


async def test_storage_failures_from_the_server_are_transient(
    supabase_stack: SupabaseStack,
) -> None:
    async with supabase_client(
        "http://127.0.0.1:9", supabase_stack.service_role_key, http_timeout=2
    ) as unreachable:
        with pytest.raises(StorageUnavailable):
            await storage(unreachable).store(
                "u/c/r.png", GeneratedImage(data=b"x", output_format="png")
            )
