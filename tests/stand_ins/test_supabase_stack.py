"""The local Supabase stand-in, proved with the real `supabase` 2.34.1 client: the real PostgREST
behind the gateway enforces the migrations' grants, RLS and triggers, and FakeStorage answers
storage3 the way the hosted Storage API does. Needs the PostgREST binary (skips without it)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx
import jwt as pyjwt
import psycopg
import pytest
from aiohttp import web
from postgrest.exceptions import APIError
from storage3.exceptions import StorageApiError
from supabase import AsyncClient, AsyncClientOptions, acreate_client

from tests.support.pg import create_user
from tests.support.queue_helpers import insert_request, job_of, new_chat
from tests.support.supabase_stack import SupabaseStack
from tests.support.supabase_stack.fixtures import StackFactory

Conn = psycopg.Connection[dict[str, Any]]
BUCKET = "generated"
PNG_1 = b"\x89PNG\r\n\x1a\n first image"
PNG_2 = b"\x89PNG\r\n\x1a\n second image, longer"


@asynccontextmanager
async def client(
    stack: SupabaseStack, key: str, token: str | None = None
) -> AsyncIterator[AsyncClient]:
    """The real client against the stack; `token` signs requests in as a user.

    We pass our own httpx client: without one, supabase 2.34.1 hands `timeout=` to the
    postgrest and storage3 constructors, which raise DeprecationWarning (an error here).
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=10.0) as http:
        options = AsyncClientOptions(httpx_client=http, headers=headers)
        yield await acreate_client(stack.url, key, options)


async def test_service_role_key_may_call_the_queue_rpc(
    supabase_stack: SupabaseStack, db: Conn
) -> None:
    """rpc() with the service key reaches PostgREST as service_role, which may execute it."""
    async with client(supabase_stack, supabase_stack.service_role_key) as sb:
        empty = await sb.rpc("image_jobs_next_due").execute()
        user_id, chat_id = new_chat(db)
        insert_request(db, user_id, chat_id)
        due = await sb.rpc("image_jobs_next_due").execute()

    assert empty.data is None
    assert isinstance(due.data, str)  # the queued job's run_at
    calls = supabase_stack.rest_calls
    assert [(c.method, c.path, c.status, c.forwarded) for c in calls] == [
        ("POST", "/rpc/image_jobs_next_due", 200, True)
    ] * 2


async def test_anon_key_is_refused_the_queue_rpc(supabase_stack: SupabaseStack) -> None:
    """The same rpc with the anon key fails in PostgreSQL: 42501, HTTP 401 from PostgREST."""
    async with client(supabase_stack, supabase_stack.anon_key) as sb:
        with pytest.raises(APIError) as refused:
            await sb.rpc("image_jobs_next_due").execute()

    assert refused.value.code == "42501"
    assert "permission denied for function image_jobs_next_due" in str(refused.value.message)
    assert supabase_stack.rest_calls[-1].status == 401


async def test_user_inserts_chat_and_request_and_the_trigger_enqueues_a_job(
    supabase_stack: SupabaseStack, db: Conn
) -> None:
    """A signed-in user's inserts pass RLS (auth.uid() from the token) and enqueue a job."""
    user_id = create_user(db)
    token = supabase_stack.user_token(user_id)
    async with client(supabase_stack, supabase_stack.anon_key, token) as sb:
        chat = (await sb.table("chats").insert({"title": "foxes"}).execute()).data[0]
        request = (
            await sb.table("messages")
            .insert(
                {
                    "chat_id": chat["id"],
                    "role": "user",
                    "content": "a red fox in the snow",
                    "message_type": "image",
                    "options": {"size": "1024x1024"},
                }
            )
            .execute()
        ).data[0]

    assert chat["user_id"] == str(user_id)
    job = job_of(db, uuid.UUID(request["id"]))
    assert job is not None
    assert (job["state"], job["user_id"], str(job["chat_id"])) == ("queued", user_id, chat["id"])


async def test_bad_request_is_rejected_with_400_and_the_trigger_message(
    supabase_stack: SupabaseStack, db: Conn
) -> None:
    """The validation trigger's exception reaches the client as HTTP 400 with its message."""
    user_id, chat_id = new_chat(db)
    token = supabase_stack.user_token(user_id)
    async with client(supabase_stack, supabase_stack.anon_key, token) as sb:
        with pytest.raises(APIError) as rejected:
            await (
                sb.table("messages")
                .insert(
                    {
                        "chat_id": str(chat_id),
                        "role": "user",
                        "content": "a fox",
                        "message_type": "image",
                        "options": {"size": "huge"},
                    }
                )
                .execute()
            )

    assert rejected.value.code == "23514"
    assert rejected.value.message == (
        'option size must be "auto" or "WIDTHxHEIGHT" such as "1024x1024"'
    )
    assert supabase_stack.rest_calls[-1].status == 400
    assert db.execute("select count(*) as n from public.messages").fetchone() == {"n": 0}


async def test_upsert_twice_keeps_one_object_and_the_signed_url_serves_it(
    supabase_stack: SupabaseStack,
) -> None:
    """Two upserts leave one object with the second bytes and content type; the signed URL
    downloads exactly those bytes without any auth header."""
    supabase_stack.storage.add_bucket(BUCKET)
    path = "u1/c1/r1.png"
    async with client(supabase_stack, supabase_stack.service_role_key) as sb:
        bucket = sb.storage.from_(BUCKET)
        options: Any = {"content-type": "image/png", "upsert": "true"}
        await bucket.upload(path, PNG_1, options)
        uploaded = await bucket.upload(path, PNG_2, options)
        signed = await bucket.create_signed_url(path, 60)
    async with httpx.AsyncClient(timeout=10.0) as http:
        download = await http.get(signed["signedURL"])

    assert uploaded.full_path == f"{BUCKET}/{path}"
    assert supabase_stack.storage.objects == {f"{BUCKET}/{path}": (PNG_2, "image/png")}
    uploads = [r for r in supabase_stack.storage.requests if r.method == "POST" and r.upsert]
    assert [(r.path, r.content_type, r.role, r.status) for r in uploads] == [
        (f"/object/{BUCKET}/{path}", "image/png", "service_role", 200)
    ] * 2
    assert signed["signedURL"].startswith(f"{supabase_stack.url}/storage/v1/object/sign/")
    assert (download.status_code, download.content) == (200, PNG_2)
    assert download.headers["content-type"] == "image/png"


async def test_upload_without_upsert_over_an_existing_object_is_a_duplicate(
    supabase_stack: SupabaseStack,
) -> None:
    """Without x-upsert the second upload fails like the real server (400, body "409")."""
    supabase_stack.storage.add_bucket(BUCKET)
    async with client(supabase_stack, supabase_stack.service_role_key) as sb:
        bucket = sb.storage.from_(BUCKET)
        await bucket.upload("a.png", PNG_1, {"content-type": "image/png"})
        with pytest.raises(StorageApiError) as duplicate:
            await bucket.upload("a.png", PNG_2, {"content-type": "image/png"})

    assert (duplicate.value.status, duplicate.value.code, duplicate.value.message) == (
        "409",
        "Duplicate",
        "The resource already exists",
    )
    assert supabase_stack.storage.requests[-1].status == 400
    assert supabase_stack.storage.objects[f"{BUCKET}/a.png"].data == PNG_1


async def test_a_user_token_cannot_upload_and_reads_only_its_own_prefix(
    supabase_stack: SupabaseStack,
) -> None:
    """A user's upload is refused as an RLS violation; it may sign its own objects only."""
    storage = supabase_stack.storage
    storage.add_bucket(BUCKET)
    user_id, other_id = uuid.uuid4(), uuid.uuid4()
    storage.put_object(f"{BUCKET}/{user_id}/mine.png", PNG_1, "image/png")
    storage.put_object(f"{BUCKET}/{other_id}/theirs.png", PNG_1, "image/png")
    token = supabase_stack.user_token(user_id)
    async with client(supabase_stack, supabase_stack.anon_key, token) as sb:
        bucket = sb.storage.from_(BUCKET)
        with pytest.raises(StorageApiError) as refused:
            await bucket.upload(f"{user_id}/new.png", PNG_2, {"content-type": "image/png"})
        own = await bucket.create_signed_url(f"{user_id}/mine.png", 60)
        with pytest.raises(StorageApiError) as hidden:
            await bucket.create_signed_url(f"{other_id}/theirs.png", 60)

    assert (refused.value.status, refused.value.code) == ("403", "Unauthorized")
    assert f"{BUCKET}/{user_id}/new.png" not in storage.objects
    assert storage.requests[0].role == "authenticated"
    assert own["signedURL"]
    assert (hidden.value.status, hidden.value.message) == ("404", "Object not found")


async def test_bucket_api_and_remove_answer_in_shapes_storage3_parses(
    supabase_stack: SupabaseStack,
) -> None:
    """create/get/list buckets and remove parse into storage3's types; a user sees no bucket."""
    async with client(supabase_stack, supabase_stack.service_role_key) as sb:
        await sb.storage.create_bucket(BUCKET)
        bucket = await sb.storage.get_bucket(BUCKET)
        listed = await sb.storage.list_buckets()
        files = sb.storage.from_(BUCKET)
        await files.upload("x/1.png", PNG_1, {"content-type": "image/png"})
        exists = await files.exists("x/1.png")
        removed = await files.remove(["x/1.png", "x/never-there.png"])
        gone = await files.exists("x/1.png")
    async with client(supabase_stack, supabase_stack.anon_key, supabase_stack.user_token(1)) as sb:
        users_buckets = await sb.storage.list_buckets()

    assert (bucket.id, bucket.public) == (BUCKET, False)
    assert [b.id for b in listed] == [BUCKET]
    assert (exists, gone) == (True, False)
    assert [r["name"] for r in removed] == ["x/1.png"]
    assert supabase_stack.storage.objects == {}
    assert users_buckets == []


async def test_signed_url_with_a_forged_or_expired_token_is_refused(
    supabase_stack: SupabaseStack,
) -> None:
    """Tokens are checked: a wrong signature or a past exp answers 400 InvalidJWT, no bytes."""
    supabase_stack.storage.add_bucket(BUCKET)
    key = f"{BUCKET}/a.png"
    supabase_stack.storage.put_object(key, PNG_1, "image/png")
    url = f"{supabase_stack.url}/storage/v1/object/sign/{key}"
    past = int(time.time()) - 10
    expired = pyjwt.encode({"url": key, "iat": past - 60, "exp": past}, supabase_stack.jwt_secret)
    forged = pyjwt.encode({"url": key, "exp": past + 3600}, "not-the-secret-" * 3)
    async with httpx.AsyncClient(timeout=10.0) as http:
        answers = [(await http.get(url, params={"token": t})) for t in (expired, forged)]

    assert [(a.status_code, a.json()) for a in answers] == [
        (400, {"statusCode": "400", "error": "InvalidJWT", "message": "jwt expired"}),
        (400, {"statusCode": "400", "error": "InvalidJWT", "message": "invalid signature"}),
    ]


async def test_rest_fault_hooks_fail_and_hold_calls(supabase_stack: SupabaseStack) -> None:
    """rest_fail_next answers without forwarding; rest_pause holds a call until rest_resume."""
    async with client(supabase_stack, supabase_stack.service_role_key) as sb:
        supabase_stack.rest_fail_next(1, status=503)
        with pytest.raises(APIError) as failed:
            await sb.rpc("image_jobs_next_due").execute()

        supabase_stack.rest_pause()
        held = asyncio.create_task(sb.rpc("image_jobs_next_due").execute())
        async with asyncio.timeout(5):
            await supabase_stack.wait_rest_held(1)
        assert not held.done()
        supabase_stack.rest_resume()
        async with asyncio.timeout(5):
            released = await held

    assert failed.value.code == "PGRST000"
    assert released.data is None
    calls = [(c.status, c.forwarded) for c in supabase_stack.rest_calls]
    assert calls == [(503, False), (200, True)]


async def test_gateway_checks_the_apikey_and_routes_like_kong(
    supabase_stack: SupabaseStack,
) -> None:
    """REST needs a known apikey (401 otherwise); no Realtime given -> 404 on its path."""
    base = supabase_stack.url
    async with httpx.AsyncClient(timeout=10.0) as http:
        missing = await http.get(f"{base}/rest/v1/chats")
        wrong = await http.get(f"{base}/rest/v1/chats", headers={"apikey": "nope"})
        anon = await http.get(f"{base}/rest/v1/chats", headers={"apikey": supabase_stack.anon_key})
        realtime = await http.get(f"{base}/realtime/v1/websocket")

    assert (missing.status_code, missing.json()["message"]) == (
        401,
        "No API key found in request",
    )
    assert (wrong.status_code, wrong.json()["message"]) == (401, "Invalid API key")
    # anon has no grant on chats: PostgreSQL refuses, PostgREST says 401 / 42501.
    assert (anon.status_code, anon.json()["code"]) == (401, "42501")
    assert realtime.status_code == 404


class EchoRealtime:
    """The smallest RealtimeServer: records where its lifecycle ran and echoes text frames."""

    def __init__(self) -> None:
        self.lifecycle: list[tuple[str, str]] = []

    async def start(self) -> None:
        self.lifecycle.append(("start", threading.current_thread().name))

    async def stop(self) -> None:
        self.lifecycle.append(("stop", threading.current_thread().name))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(f"{request.query['apikey']}:{message.data}")
        return ws


async def test_a_realtime_server_is_served_on_the_websocket_path(
    make_supabase_stack: StackFactory,
) -> None:
    """The websocket path reaches the given server; start/stop run on the gateway's loop."""
    echo = EchoRealtime()
    stack = make_supabase_stack(realtime=echo)
    ws_url = stack.url.replace("http", "ws") + "/realtime/v1/websocket"
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(ws_url, params={"apikey": "k", "vsn": "1.0.0"}) as ws,
    ):
        await ws.send_str("hello")
        reply = await asyncio.wait_for(ws.receive_str(), 5)
    stack.stop()

    assert reply == "k:hello"
    thread = "supabase-stack-gateway"
    assert echo.lifecycle == [("start", thread), ("stop", thread)]


def test_api_keys_are_a_pure_function_of_secret_and_role(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Realtime stand-in and the gateway mint the keys they accept separately: minted a
    second apart, they must still be the same key (they were not, when iat was the time)."""
    from tests.support.supabase_stack import jwt as stack_jwt

    first = stack_jwt.service_role_key("s" * 40), stack_jwt.anon_key("s" * 40)
    later = time.time() + 1.5
    monkeypatch.setattr(stack_jwt.time, "time", lambda: later)
    assert (stack_jwt.service_role_key("s" * 40), stack_jwt.anon_key("s" * 40)) == first
