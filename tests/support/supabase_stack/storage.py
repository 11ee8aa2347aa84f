"""An in-memory stand-in for Supabase Storage's HTTP API (`<project>/storage/v1/...`), covering
the endpoints the `storage3` 2.34.1 client calls for buckets and objects, with the same paths,
methods, bodies and error shapes, so the real client can be tested against it.

Served (paths relative to /storage/v1):
    GET  /bucket                      list_buckets
    GET  /bucket/{id}                 get_bucket
    POST /bucket                      create_bucket
    POST /object/{bucket}/{path}      upload (multipart cacheControl + file; `x-upsert: true`
                                      overwrites, otherwise an existing object is a Duplicate)
    PUT  /object/{bucket}/{path}      update (the object must exist)
    GET  /object/{bucket}/{path}      download (also /object/authenticated/...)
    GET  /object/info/{bucket}/{path} info (storage3's exists())
    DELETE /object/{bucket}           remove, JSON {"prefixes": [...]}
    POST /object/sign/{bucket}/{path} create_signed_url, JSON {"expiresIn": ...}
    GET  /object/sign/{bucket}/{path}?token=...   download through a signed URL (no auth)
    GET  /object/public/{bucket}/{path}           download from a public bucket (no auth)

Errors use the real server's shape and quirk: HTTP 400 (500 for server faults) with the
meaningful code as a string in the body, e.g. a duplicate upload answers 400
`{"statusCode": "409", "error": "Duplicate", "message": "The resource already exists"}`.

Authorization (`Authorization: Bearer <jwt>`, HS256 with the project's JWT secret) stands in for
the RLS policies on storage.objects that the project is expected to have, reduced to one rule:
    * service_role may do everything (on Supabase it bypasses RLS);
    * a user token (role authenticated, sub = user id) may only *read* objects whose name starts
      with `<sub>/`, and *upload* only into the bucket `image-inputs` under `<sub>/` (the
      migrations' own-folder policy for users' input images); its other uploads and updates are
      refused as an RLS violation (400, statusCode
      "403"), its removes delete nothing, and it sees no buckets;
    * anon, or any other role, may read nothing and write nothing.
Reads the rule hides answer "Object not found", as RLS-filtered rows do on the real server.

What the real Storage server does that this does not:
    * no SQL: RLS policies on storage.objects / storage.buckets are not evaluated, the rule above
      is hard-coded, and a change to the project's real storage policies will not show up here;
      nothing is written to the storage schema of the test database;
    * no S3 or file backend: objects live in this process's memory and vanish with it;
    * no resumable (TUS) or S3-protocol uploads, no signed upload URLs, no move/copy/list,
      no bucket update/empty/delete, no range requests, no image transformations (/render);
    * signed-URL tokens have the real shape (HS256 over {"url": "<bucket>/<path>", "iat", "exp"}
      with the JWT secret) but are this module's own, not checked against the real server;
    * bucket ids and object keys are not validated (the real server rejects some characters);
    * no apikey check, no rate limits, no CDN or cache headers beyond Cache-Control and ETag;
    * responses carry only the fields storage3 reads, not every field the real server returns.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import jwt as pyjwt
from aiohttp import BodyPartReader, hdrs, web

#: the bucket of users' input images, where a user may upload into their own folder
INPUTS_BUCKET = "image-inputs"

SERVICE_ROLE = "service_role"
DEFAULT_CONTENT_TYPE = "application/octet-stream"


class StoredObject(NamedTuple):
    """An object's bytes and the content type it was uploaded with."""

    data: bytes
    content_type: str


@dataclass
class StorageRequest:
    """One request as FakeStorage saw it, for tests to assert on."""

    method: str
    path: str  # after /storage/v1, e.g. "/object/generated/u1/a.png"
    content_type: str | None  # the stored object's for uploads, else the request's header
    upsert: bool | None  # the x-upsert flag of uploads (POST/PUT object), else None
    role: str | None  # the JWT's role claim; None when the token is missing or invalid
    status: int = 0  # the HTTP status answered


@dataclass
class Bucket:
    id: str
    public: bool = False
    file_size_limit: int | None = None
    allowed_mime_types: list[str] | None = None
    created_at: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        stamp = _iso(self.created_at)
        return {
            "id": self.id,
            "name": self.id,
            "owner": "",
            "public": self.public,
            "type": "STANDARD",
            "file_size_limit": self.file_size_limit,
            "allowed_mime_types": self.allowed_mime_types,
            "created_at": stamp,
            "updated_at": stamp,
        }


@dataclass
class _Meta:
    id: str
    cache_control: str
    created_at: float
    updated_at: float


class _Refusal(Exception):
    """An error answer in the real server's shape."""

    def __init__(self, status_code: str, error: str, message: str, http_status: int = 400) -> None:
        super().__init__(message)
        self.body = {"statusCode": status_code, "error": error, "message": message}
        self.http_status = http_status


def _not_found() -> _Refusal:
    return _Refusal("404", "not_found", "Object not found")


def _no_bucket() -> _Refusal:
    return _Refusal("404", "Bucket not found", "Bucket not found")


def _rls(table: str = "objects") -> _Refusal:
    return _Refusal(
        "403", "Unauthorized", f'new row violates row-level security policy for table "{table}"'
    )


def _duplicate() -> _Refusal:
    return _Refusal("409", "Duplicate", "The resource already exists")


class FakeStorage:
    """Supabase Storage's object and bucket API in memory; `handle` serves one request."""

    def __init__(
        self,
        jwt_secret: str,
        buckets: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secret = jwt_secret
        self._clock = clock
        self.buckets: dict[str, Bucket] = {}
        self.objects: dict[str, StoredObject] = {}  # "<bucket>/<path>" -> object
        self.requests: list[StorageRequest] = []
        self._meta: dict[str, _Meta] = {}
        for bucket_id in buckets:
            self.add_bucket(bucket_id)

    def add_bucket(
        self,
        bucket_id: str,
        *,
        public: bool = False,
        file_size_limit: int | None = None,
        allowed_mime_types: list[str] | None = None,
    ) -> Bucket:
        """Create a bucket directly (as a migration inserting into storage.buckets would)."""
        bucket = Bucket(bucket_id, public, file_size_limit, allowed_mime_types, self._clock())
        self.buckets[bucket_id] = bucket
        return bucket

    def put_object(self, key: str, data: bytes, content_type: str) -> None:
        """Store an object directly under "<bucket>/<path>", bypassing HTTP and authorization."""
        now = self._clock()
        self.objects[key] = StoredObject(data, content_type)
        self._meta[key] = _Meta(str(uuid.uuid4()), "max-age=3600", now, now)

    async def handle(self, request: web.Request, path: str) -> web.StreamResponse:
        """Serve `request`, whose path below /storage/v1/ is `path` (already percent-decoded)."""
        record = StorageRequest(
            method=request.method,
            path="/" + path,
            content_type=request.headers.get(hdrs.CONTENT_TYPE),
            upsert=None,
            role=None,
        )
        self.requests.append(record)
        try:
            response = await self._route(request, path.split("/"), record)
        except _Refusal as refusal:
            response = web.json_response(refusal.body, status=refusal.http_status)
        except BaseException:
            record.status = 500
            raise
        record.status = response.status
        return response

    async def _route(
        self, request: web.Request, parts: list[str], record: StorageRequest
    ) -> web.StreamResponse:
        method = request.method
        match parts:
            case ["object", "sign", bucket, *name] if name and method == "GET":
                return self._signed_download(request, bucket, "/".join(name))
            case ["object", "public", bucket, *name] if name and method == "GET":
                return self._public_download(request, bucket, "/".join(name))
        claims = self._claims(request)
        record.role = claims.get("role")
        match parts:
            case ["bucket"] if method == "GET":
                return self._list_buckets(claims)
            case ["bucket"] if method == "POST":
                return self._create_bucket(claims, await _json_body(request))
            case ["bucket", bucket] if method == "GET":
                return web.json_response(self._visible_bucket(claims, bucket).as_json())
            case ["object", "sign", bucket, *name] if name and method == "POST":
                body = await _json_body(request)
                return self._sign(claims, bucket, "/".join(name), body)
            case ["object", "info", bucket, *name] if name and method == "GET":
                return self._info(claims, bucket, "/".join(name))
            case ["object", "authenticated", bucket, *name] if name and method == "GET":
                return self._download(request, claims, bucket, "/".join(name))
            case ["object", bucket] if method == "DELETE":
                return self._remove(claims, bucket, await _json_body(request))
            case ["object", bucket, *name] if name and method in ("POST", "PUT"):
                return await self._upload(request, claims, bucket, "/".join(name), record)
            case ["object", bucket, *name] if name and method == "GET":
                return self._download(request, claims, bucket, "/".join(name))
        # Fastify's own 404, which storage3 cannot parse into a StorageApiError either.
        return web.json_response(
            {
                "statusCode": 404,
                "error": "Not Found",
                "message": f"Route {method}:/{'/'.join(parts)} not found",
            },
            status=404,
        )

    # --- authorization -------------------------------------------------------------------

    def _claims(self, request: web.Request) -> dict[str, Any]:
        header = request.headers.get(hdrs.AUTHORIZATION, "")
        token = header[len("Bearer ") :] if header.startswith("Bearer ") else ""
        return self._verify(token)

    def _verify(self, token: str) -> dict[str, Any]:
        """The token's claims; refuses as the real server does (messages from jsonwebtoken)."""
        if not token:
            raise _Refusal("400", "InvalidJWT", "jwt must be provided")
        try:
            claims: dict[str, Any] = pyjwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                # Expiry is checked against our clock below; storage ignores the audience.
                options={"verify_exp": False, "verify_aud": False},
            )
        except pyjwt.InvalidSignatureError:
            raise _Refusal("400", "InvalidJWT", "invalid signature") from None
        except pyjwt.InvalidTokenError:
            raise _Refusal("400", "InvalidJWT", "jwt malformed") from None
        exp = claims.get("exp")
        if isinstance(exp, int | float) and exp <= self._clock():
            raise _Refusal("400", "InvalidJWT", "jwt expired")
        return claims

    @staticmethod
    def _may_read(claims: dict[str, Any], name: str) -> bool:
        role = claims.get("role")
        if role == SERVICE_ROLE:
            return True
        sub = claims.get("sub")
        return role == "authenticated" and bool(sub) and name.startswith(f"{sub}/")

    @staticmethod
    def _may_write(claims: dict[str, Any], bucket_id: str, name: str) -> bool:
        if claims.get("role") == SERVICE_ROLE:
            return True
        sub = claims.get("sub")
        return (
            claims.get("role") == "authenticated"
            and bool(sub)
            and bucket_id == INPUTS_BUCKET
            and name.startswith(f"{sub}/")
        )

    # --- buckets -------------------------------------------------------------------------

    def _list_buckets(self, claims: dict[str, Any]) -> web.Response:
        visible = self.buckets.values() if claims.get("role") == SERVICE_ROLE else ()
        return web.json_response([bucket.as_json() for bucket in visible])

    def _visible_bucket(self, claims: dict[str, Any], bucket_id: str) -> Bucket:
        bucket = self.buckets.get(bucket_id)
        if bucket is None or claims.get("role") != SERVICE_ROLE:
            raise _no_bucket()
        return bucket

    def _create_bucket(self, claims: dict[str, Any], body: dict[str, Any]) -> web.Response:
        if claims.get("role") != SERVICE_ROLE:
            raise _rls("buckets")
        bucket_id = body.get("id") or body.get("name")
        if not isinstance(bucket_id, str) or not bucket_id:
            raise _Refusal("400", "Bad Request", "body must have required property 'name'")
        if bucket_id in self.buckets:
            raise _duplicate()
        self.add_bucket(
            bucket_id,
            public=bool(body.get("public", False)),
            file_size_limit=body.get("file_size_limit"),
            allowed_mime_types=body.get("allowed_mime_types"),
        )
        return web.json_response({"name": bucket_id})

    def _bucket(self, bucket_id: str) -> Bucket:
        bucket = self.buckets.get(bucket_id)
        if bucket is None:
            raise _no_bucket()
        return bucket

    # --- objects -------------------------------------------------------------------------

    async def _upload(
        self,
        request: web.Request,
        claims: dict[str, Any],
        bucket_id: str,
        name: str,
        record: StorageRequest,
    ) -> web.Response:
        is_update = request.method == "PUT"
        upsert = request.headers.get("x-upsert", "false").lower() == "true"
        record.upsert = upsert
        bucket = self._bucket(bucket_id)
        data, content_type, cache_control = await _read_upload(request)
        record.content_type = content_type
        if not self._may_write(claims, bucket_id, name):
            raise _rls()
        if bucket.allowed_mime_types and content_type not in bucket.allowed_mime_types:
            raise _Refusal("415", "invalid_mime_type", f"mime type {content_type} is not supported")
        if bucket.file_size_limit is not None and len(data) > bucket.file_size_limit:
            raise _Refusal(
                "413", "Payload too large", "The object exceeded the maximum allowed size"
            )
        key = f"{bucket_id}/{name}"
        exists = key in self.objects
        if is_update and not exists:
            raise _not_found()
        if not is_update and exists and not upsert:
            raise _duplicate()
        now = self._clock()
        previous = self._meta.get(key)
        self.objects[key] = StoredObject(data, content_type)
        self._meta[key] = _Meta(
            id=previous.id if previous else str(uuid.uuid4()),
            cache_control=cache_control,
            created_at=previous.created_at if previous else now,
            updated_at=now,
        )
        return web.json_response({"Id": self._meta[key].id, "Key": key})

    def _readable(self, claims: dict[str, Any], bucket_id: str, name: str) -> str:
        self._bucket(bucket_id)
        key = f"{bucket_id}/{name}"
        if key not in self.objects or not self._may_read(claims, name):
            raise _not_found()
        return key

    def _sign(
        self, claims: dict[str, Any], bucket_id: str, name: str, body: dict[str, Any]
    ) -> web.Response:
        try:
            expires_in = int(body["expiresIn"])
        except (KeyError, TypeError, ValueError):
            raise _Refusal(
                "400", "Bad Request", "body must have required property 'expiresIn'"
            ) from None
        if expires_in < 1:
            raise _Refusal("400", "Bad Request", "body/expiresIn must be >= 1")
        key = self._readable(claims, bucket_id, name)
        now = int(self._clock())
        token = pyjwt.encode(
            {"url": key, "iat": now, "exp": now + expires_in}, self._secret, algorithm="HS256"
        )
        signed = f"/object/sign/{urllib.parse.quote(key, safe='/')}?token={token}"
        return web.json_response({"signedURL": signed})

    def _signed_download(self, request: web.Request, bucket_id: str, name: str) -> web.Response:
        token = request.query.get("token")
        if not token:
            raise _Refusal("400", "Bad Request", "querystring must have required property 'token'")
        claims = self._verify(token)
        key = f"{bucket_id}/{name}"
        if claims.get("url") != key:
            raise _Refusal("400", "InvalidSignature", "The url do not match the signature")
        if key not in self.objects:
            raise _not_found()
        return self._object_response(request, key)

    def _public_download(self, request: web.Request, bucket_id: str, name: str) -> web.Response:
        bucket = self.buckets.get(bucket_id)
        if bucket is None or not bucket.public:
            raise _no_bucket()
        key = f"{bucket_id}/{name}"
        if key not in self.objects:
            raise _not_found()
        return self._object_response(request, key)

    def _download(
        self, request: web.Request, claims: dict[str, Any], bucket_id: str, name: str
    ) -> web.Response:
        return self._object_response(request, self._readable(claims, bucket_id, name))

    def _info(self, claims: dict[str, Any], bucket_id: str, name: str) -> web.Response:
        key = self._readable(claims, bucket_id, name)
        return web.json_response(self._describe(key))

    def _remove(self, claims: dict[str, Any], bucket_id: str, body: dict[str, Any]) -> web.Response:
        self._bucket(bucket_id)
        prefixes = body.get("prefixes")
        if not isinstance(prefixes, list) or not prefixes:
            raise _Refusal("400", "Bad Request", "body/prefixes must NOT have fewer than 1 items")
        removed = []
        if claims.get("role") == SERVICE_ROLE:  # RLS hides every row from anyone else
            for name in prefixes:
                key = f"{bucket_id}/{name}"
                if key in self.objects:
                    removed.append(self._describe(key))
                    del self.objects[key]
                    del self._meta[key]
        return web.json_response(removed)

    def _describe(self, key: str) -> dict[str, Any]:
        bucket_id, name = key.split("/", 1)
        stored, meta = self.objects[key], self._meta[key]
        return {
            "id": meta.id,
            "name": name,
            "bucket_id": bucket_id,
            "owner": "",
            "created_at": _iso(meta.created_at),
            "updated_at": _iso(meta.updated_at),
            "last_accessed_at": _iso(meta.updated_at),
            "size": len(stored.data),
            "content_type": stored.content_type,
            "cache_control": meta.cache_control,
            "etag": _etag(stored.data),
            "metadata": {
                "size": len(stored.data),
                "mimetype": stored.content_type,
                "cacheControl": meta.cache_control,
                "eTag": _etag(stored.data),
            },
        }

    def _object_response(self, request: web.Request, key: str) -> web.Response:
        stored, meta = self.objects[key], self._meta[key]
        headers = {
            hdrs.CONTENT_TYPE: stored.content_type,
            hdrs.CACHE_CONTROL: meta.cache_control,
            hdrs.ETAG: _etag(stored.data),
            hdrs.LAST_MODIFIED: datetime.fromtimestamp(meta.updated_at, UTC).strftime(
                "%a, %d %b %Y %H:%M:%S GMT"
            ),
        }
        if "download" in request.query:
            filename = request.query["download"] or key.rsplit("/", 1)[-1]
            headers[hdrs.CONTENT_DISPOSITION] = f'attachment; filename="{filename}"'
        return web.Response(body=stored.data, headers=headers)


async def _read_upload(request: web.Request) -> tuple[bytes, str, str]:
    """(bytes, content type, cache-control) of an upload: multipart as storage3 sends it, or a
    raw body with Content-Type and Cache-Control headers as storage-js sends some."""
    if request.content_type != "multipart/form-data":
        raw = await request.read()
        content_type = request.headers.get(hdrs.CONTENT_TYPE, DEFAULT_CONTENT_TYPE)
        return raw, content_type, request.headers.get(hdrs.CACHE_CONTROL, "max-age=3600")
    data: bytes | None = None
    content_type = DEFAULT_CONTENT_TYPE
    cache_control = "3600"
    async for part in await request.multipart():
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "file":
            data = bytes(await part.read(decode=False))
            content_type = part.headers.get(hdrs.CONTENT_TYPE, DEFAULT_CONTENT_TYPE)
        elif part.name == "cacheControl":
            cache_control = await part.text()
        else:
            await part.release()
    if data is None:
        raise _Refusal("400", "InvalidRequest", "No content provided")
    return data, content_type, f"max-age={cache_control}"


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise _Refusal("400", "Bad Request", "Body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _Refusal("400", "Bad Request", "body must be object")
    return body


def _etag(data: bytes) -> str:
    return f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")
