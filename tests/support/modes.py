"""One end-to-end rig per deployment mode, so the same tests prove both:

* ``postgres``: the daemon on DATABASE_URL (LISTEN/NOTIFY, images in a local directory); the
  frontend inserts with the ``authenticated`` role through RLS, as PostgREST would.
* ``supabase``: the daemon given only SUPABASE_URL and the service-role key (PostgREST rpc,
  Realtime wake-ups, Storage); the frontend inserts over HTTP through the real PostgREST with a
  user's JWT, as supabase-js does. Realtime and Storage are the local stand-ins.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from listener.runtime.wiring import MODES as MODE_PLANS
from listener.runtime.wiring import PushKind
from tests.support.daemon_process import Daemon, listener_env
from tests.support.fake_openai import FakeOpenAI
from tests.support.pg import as_user
from tests.support.queue_helpers import reply_of
from tests.support.supabase_stack import SupabaseStack, anon_key, new_jwt_secret, service_role_key
from tests.support.supabase_stack.realtime import FakeRealtime, install_trigger_sql

Conn = psycopg.Connection[dict[str, Any]]
BUCKET = "generated-images"
#: users' uploads for edits (the Supabase modes' bucket; the postgres mode's directory)
INPUTS = "image-inputs"
#: the modes the end-to-end suite runs in (hybrid shares its queue and wake-ups with postgres
#: and its storage with supabase)
MODES = ("postgres", "supabase")
#: the log event that says a daemon's push channel is up
READY_EVENTS = {PushKind.LISTEN: "listening", PushKind.REALTIME: "realtime_subscribed"}


@dataclass
class ModeRig:
    """The daemon's environment plus the frontend's way in, for one mode."""

    mode: str
    env: dict[str, str]
    db: Conn
    fake: FakeOpenAI
    stack: SupabaseStack | None = None
    realtime: FakeRealtime | None = None
    daemons: list[Daemon] = field(default_factory=list)

    @property
    def ready_event(self) -> str:
        return READY_EVENTS[MODE_PLANS[self.mode].push]

    def start(self, **overrides: str) -> Daemon:
        daemon = Daemon({**self.env, **overrides})
        self.daemons.append(daemon)
        started = daemon.wait_for_event("daemon_started")
        assert started["mode"] == self.mode
        daemon.wait_for_event(self.ready_event)
        return daemon

    def insert_request(
        self,
        user: uuid.UUID,
        chat: uuid.UUID,
        prompt: str,
        options: dict[str, Any] | None = None,
    ) -> uuid.UUID:
        """As the frontend: RLS-checked insert (over PostgREST in Supabase mode)."""
        row = {
            "chat_id": str(chat),
            "role": "user",
            "message_type": "image",
            "content": prompt,
            "options": options or {},
        }
        if self.stack is None:
            with as_user(self.db, user):
                inserted = self.db.execute(
                    "insert into public.messages (chat_id, role, content, message_type, options)"
                    " values (%s, 'user', %s, 'image', %s::jsonb) returning id",
                    (chat, prompt, json.dumps(options or {})),
                ).fetchone()
            assert inserted is not None
            return uuid.UUID(str(inserted["id"]))
        response = httpx.post(
            f"{self.stack.url}/rest/v1/messages",
            json=row,
            headers=self._user_headers(user) | {"Prefer": "return=representation"},
            timeout=10,
        )
        assert response.status_code == 201, response.text
        return uuid.UUID(response.json()[0]["id"])

    def position(self, user: uuid.UUID, request: uuid.UUID) -> int | None:
        """As the frontend: the request's place in line (over PostgREST in Supabase mode)."""
        if self.stack is None:
            with as_user(self.db, user):
                row = self.db.execute(
                    "select public.image_request_position(%s) as p", (request,)
                ).fetchone()
            assert row is not None
            return None if row["p"] is None else int(row["p"])
        response = httpx.post(
            f"{self.stack.url}/rest/v1/rpc/image_request_position",
            json={"request_id": str(request)},
            headers=self._user_headers(user),
            timeout=10,
        )
        assert response.status_code == 200, response.text
        value = response.json()
        return None if value is None else int(value)

    def refused_insert(self, user: uuid.UUID, chat: uuid.UUID, prompt: str) -> str:
        """As the frontend, an insert that a limit must refuse: HTTP 429 over PostgREST,
        SQLSTATE IL429 in SQL. The refusal's message; nothing may have been stored."""
        before = self._count_requests()
        if self.stack is None:
            with pytest.raises(psycopg.Error) as caught, as_user(self.db, user):
                self.db.execute(
                    "insert into public.messages (chat_id, role, content, message_type)"
                    " values (%s, 'user', %s, 'image')",
                    (chat, prompt),
                )
            assert caught.value.sqlstate == "IL429", caught.value
            message = caught.value.diag.message_primary or ""
        else:
            response = httpx.post(
                f"{self.stack.url}/rest/v1/messages",
                json={
                    "chat_id": str(chat),
                    "role": "user",
                    "message_type": "image",
                    "content": prompt,
                },
                headers=self._user_headers(user),
                timeout=10,
            )
            assert response.status_code == 429, response.text
            assert response.json()["code"] == "IL429"
            message = response.json()["message"]
        assert self._count_requests() == before, "a refused insert stored something"
        return str(message)

    def _count_requests(self) -> int:
        """Users' messages only: a running listener adds replies meanwhile."""
        row = self.db.execute(
            "select count(*) as n from public.messages where role = 'user'"
        ).fetchone()
        assert row is not None
        return int(row["n"])

    def delete_request(self, user: uuid.UUID, request_id: uuid.UUID) -> None:
        """As the frontend: the owner deletes (cancels) the request."""
        if self.stack is None:
            with as_user(self.db, user):
                self.db.execute("delete from public.messages where id = %s", (request_id,))
            return
        response = httpx.delete(
            f"{self.stack.url}/rest/v1/messages",
            params={"id": f"eq.{request_id}"},
            headers=self._user_headers(user),
            timeout=10,
        )
        assert response.status_code == 204, response.text

    def _user_headers(self, user: uuid.UUID) -> dict[str, str]:
        assert self.stack is not None
        return {
            "apikey": self.stack.anon_key,
            "Authorization": f"Bearer {self.stack.user_token(user)}",
        }

    def fetch_image(self, url: str) -> bytes:
        """What the frontend does with ``image_url``."""
        if url.startswith("file://"):
            return Path(url.removeprefix("file://")).read_bytes()
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200, response.text
        return response.content

    def upload_input(self, user: uuid.UUID, name: str, data: bytes) -> str:
        """As the frontend: put a picture into the user's own folder of the input store (a
        user-token upload to the image-inputs bucket, or a file in the input directory). Its
        object path, as a request's ``references`` or ``mask`` names it."""
        path = f"{user}/{name}"
        if self.stack is None:
            target = Path(self.env["IMAGE_LISTENER_IMAGE_DIR"]).parent / "inputs" / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            return path
        response = httpx.post(
            f"{self.stack.url}/storage/v1/object/{INPUTS}/{path}",
            files={"file": (name, data, "image/png")},
            headers=self._user_headers(user),
            timeout=10,
        )
        assert response.status_code == 200, response.text
        return path

    def stored_images(self) -> list[str]:
        """Every image the mode's storage holds."""
        if self.stack is None:
            root = Path(self.env["IMAGE_LISTENER_IMAGE_DIR"])
            return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
        return sorted(key for key in self.stack.storage.objects if key.startswith(f"{BUCKET}/"))

    def wait_final(self, request_id: uuid.UUID, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            replies = reply_of(self.db, request_id)
            assert len(replies) <= 1, replies
            if replies and replies[0]["status"] in ("complete", "failed"):
                return replies[0]
            time.sleep(0.05)
        raise AssertionError(
            f"{request_id} not final after {timeout}s: {reply_of(self.db, request_id)}"
        )

    def stop_all(self) -> None:
        for daemon in self.daemons:
            daemon.stop()


def build_rig(
    mode: str,
    *,
    database_url: str,
    db: Conn,
    fake: FakeOpenAI,
    image_dir: Path,
    make_stack: Any,
) -> Iterator[ModeRig]:
    """Generator for a fixture: the rig, then everything stopped."""
    env = listener_env(database_url, fake.base_url, image_dir)
    if not MODE_PLANS[mode].uses_supabase:
        rig = ModeRig(mode, env, db, fake)
    else:
        secret = new_jwt_secret()
        db.execute(install_trigger_sql())
        realtime = FakeRealtime(database_url, api_keys={anon_key(secret), service_role_key(secret)})
        stack = make_stack(realtime=realtime, jwt_secret=secret, buckets=[BUCKET, INPUTS])
        env.pop("DATABASE_URL")
        env |= {
            "SUPABASE_URL": stack.url,
            "SUPABASE_SERVICE_ROLE_KEY": stack.service_role_key,
            "IMAGE_LISTENER_LISTEN_PROBE_SECONDS": "1",
        }
        rig = ModeRig(mode, env, db, fake, stack=stack, realtime=realtime)
    try:
        yield rig
    finally:
        rig.stop_all()
