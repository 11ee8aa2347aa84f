"""Which I/O each deployment mode uses, and building it: the only module that knows the modes.

The mode follows from which settings are present (:meth:`Settings.mode`); this table says what
it means. The daemon, ``doctor``, the admin commands and the tests all read it, so a new mode
or a new transport is one row here:

==========  ==========================  =======================  ========================
mode        queue calls                 wake-ups                 images
==========  ==========================  =======================  ========================
postgres    SQL over DATABASE_URL       LISTEN/NOTIFY            local directory
supabase    PostgREST rpc (service key) Supabase Realtime        Supabase Storage
hybrid      SQL over DATABASE_URL       LISTEN/NOTIFY            Supabase Storage
==========  ==========================  =======================  ========================

``IMAGE_LISTENER_WAKEUP=poll`` replaces the wake-up column with the worker's own timer in any
mode.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

import psycopg
from supabase import AsyncClient

from core.errors import DatabaseUnavailable, OperatorError, first_line
from core.ports import ImageStorage, WakeupSource
from listener import migrate
from listener.queue.calls import QueueCalls, QueueTransport
from listener.queue.postgres import SqlTransport, connect_per_call, open_pool
from listener.queue.postgrest import RpcTransport
from listener.settings import Mode, Settings
from listener.storage.local import LocalDirectoryStorage
from listener.storage.supabase import INPUTS_BUCKET, SupabaseStorage
from listener.supabase_client import supabase_client
from listener.wakeups.listen import PgNotificationSource
from listener.wakeups.polling import PollingOnly
from listener.wakeups.realtime import RealtimeWakeupSource

#: bound on any single queue call of the worker (claim, renew, complete, fail)
DB_CALL_TIMEOUT_SECONDS = 10.0
#: bound on a one-shot command's call (status, retry, cancel, ...)
COMMAND_CALL_TIMEOUT_SECONDS = 30.0


class QueueKind(StrEnum):
    """How the queue functions are called."""

    SQL = "sql"
    POSTGREST = "postgrest"


class PushKind(StrEnum):
    """The mode's push channel for wake-ups."""

    LISTEN = "listen"
    REALTIME = "realtime"


class ImagesKind(StrEnum):
    """Where generated images are stored."""

    LOCAL = "local"
    SUPABASE = "supabase"


@dataclass(frozen=True)
class Plan:
    """One row of the mode table, plus whether the push channel is switched off."""

    mode: Mode
    queue: QueueKind
    push: PushKind
    images: ImagesKind
    #: IMAGE_LISTENER_WAKEUP=poll: no push channel, the worker's timer claims every tick
    poll_only: bool = False

    @property
    def uses_supabase(self) -> bool:
        """Whether a Supabase client (project URL + service-role key) is needed."""
        return self.queue is QueueKind.POSTGREST or self.images is ImagesKind.SUPABASE

    @property
    def uses_database_url(self) -> bool:
        return self.queue is QueueKind.SQL


#: the mode table
MODES: Mapping[Mode, Plan] = {
    "postgres": Plan("postgres", QueueKind.SQL, PushKind.LISTEN, ImagesKind.LOCAL),
    "supabase": Plan("supabase", QueueKind.POSTGREST, PushKind.REALTIME, ImagesKind.SUPABASE),
    "hybrid": Plan("hybrid", QueueKind.SQL, PushKind.LISTEN, ImagesKind.SUPABASE),
}


def plan_for(settings: Settings) -> Plan:
    """The plan the settings select (an error naming the variable when they select none)."""
    plan = MODES[settings.mode()]
    return replace(plan, poll_only=True) if settings.wakeup == "poll" else plan


@dataclass(frozen=True)
class Transports:
    """The I/O of one daemon, built from its plan."""

    queue: QueueCalls
    wakeups: WakeupSource
    images: ImageStorage
    #: users' uploads for edits: the image-inputs bucket, or the input directory
    inputs: ImageStorage


async def open_transports(
    settings: Settings, plan: Plan, resources: contextlib.AsyncExitStack
) -> Transports:
    """Connect everything the plan needs and check that the database has the contract; what
    needs closing is closed by ``resources``."""
    supabase = await _open_supabase(settings, resources) if plan.uses_supabase else None
    transport: QueueTransport
    if plan.queue is QueueKind.SQL:
        transport = await _open_sql(settings, resources)
    else:
        assert supabase is not None
        transport = RpcTransport(supabase, call_timeout=DB_CALL_TIMEOUT_SECONDS)
    queue = QueueCalls(transport)
    if plan.queue is QueueKind.POSTGREST:
        await check_rpc_ready(queue)
    return Transports(
        queue=queue,
        wakeups=wakeup_source(settings, plan),
        images=image_storage(settings, plan, supabase),
        inputs=input_store(settings, plan, supabase),
    )


def wakeup_source(settings: Settings, plan: Plan) -> WakeupSource:
    """The plan's push channel, or the do-nothing source when polling only."""
    probe_timeout = min(5.0, settings.listen_probe_seconds)
    if plan.poll_only:
        return PollingOnly()
    if plan.push is PushKind.LISTEN:
        return PgNotificationSource(
            settings.require_database_url(),
            probe_seconds=settings.listen_probe_seconds,
            probe_timeout=probe_timeout,
            fallback_poll_seconds=settings.poll_only_seconds,
        )
    url, key = settings.require_supabase()
    return RealtimeWakeupSource(
        url, key, probe_seconds=settings.listen_probe_seconds, probe_timeout=probe_timeout
    )


def image_storage(settings: Settings, plan: Plan, supabase: AsyncClient | None) -> ImageStorage:
    """The plan's image store (Supabase Storage needs the client of :func:`open_transports`)."""
    if plan.images is ImagesKind.LOCAL:
        return LocalDirectoryStorage(settings.image_dir, settings.image_base_url)
    if supabase is None:
        raise OperatorError("Supabase Storage needs a Supabase client")
    return SupabaseStorage(
        supabase, bucket=settings.storage_bucket, signed_url_seconds=settings.signed_url_seconds
    )


def input_store(settings: Settings, plan: Plan, supabase: AsyncClient | None) -> ImageStorage:
    """Where users' uploads for edits are read: beside the plan's image store."""
    if plan.images is ImagesKind.LOCAL:
        return LocalDirectoryStorage(settings.input_directory, None)
    if supabase is None:
        raise OperatorError("Supabase Storage needs a Supabase client")
    return SupabaseStorage(
        supabase, bucket=INPUTS_BUCKET, signed_url_seconds=settings.signed_url_seconds
    )


@contextlib.asynccontextmanager
async def command_queue(
    settings: Settings, *, call_timeout: float = COMMAND_CALL_TIMEOUT_SECONDS
) -> AsyncIterator[QueueCalls]:
    """The queue for a one-shot command (status, retry, doctor, ...): over DATABASE_URL with a
    connection per call, or over PostgREST, as the mode says."""
    plan = plan_for(settings)
    if plan.queue is QueueKind.SQL:
        connection = connect_per_call(
            settings.require_database_url(), connect_timeout=min(10.0, call_timeout)
        )
        yield QueueCalls(SqlTransport(connection, call_timeout=call_timeout))
        return
    url, key = settings.require_supabase()
    async with supabase_client(url, key, http_timeout=call_timeout) as client:
        yield QueueCalls(RpcTransport(client, call_timeout=call_timeout))


async def check_migrated(conninfo: str) -> None:
    """Refuse to start against a database that lacks the contract (or is behind this release)."""

    def _pending() -> list[migrate.Migration]:
        try:
            with psycopg.connect(conninfo, connect_timeout=10) as conn:
                return migrate.pending(conn)
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"cannot reach the database: {first_line(exc)}") from exc

    missing = await asyncio.to_thread(_pending)
    if missing:
        names = ", ".join(f"{m.version}_{m.name}" for m in missing)
        raise OperatorError(
            f"the database is missing {len(missing)} migration(s) ({names}): "
            "run `image-listener migrate` (or `supabase db push`) first"
        )


async def check_rpc_ready(queue: QueueCalls) -> None:
    """Over PostgREST: the queue functions exist and this key may execute them."""
    try:
        await queue.next_due()
    except OperatorError as exc:
        raise OperatorError(
            f"{exc.detail}: are the migrations applied (`supabase db push`) and is "
            "SUPABASE_SERVICE_ROLE_KEY the service-role key?"
        ) from exc


async def _open_supabase(settings: Settings, resources: contextlib.AsyncExitStack) -> AsyncClient:
    url, key = settings.require_supabase()
    return await resources.enter_async_context(
        supabase_client(url, key, http_timeout=DB_CALL_TIMEOUT_SECONDS * 6)
    )


async def _open_sql(settings: Settings, resources: contextlib.AsyncExitStack) -> SqlTransport:
    conninfo = settings.require_database_url()
    await check_migrated(conninfo)
    pool = open_pool(conninfo, max_size=min(settings.concurrency + 2, 10), timeout=10)
    try:
        await pool.open(wait=True, timeout=30)
    except Exception as exc:
        raise DatabaseUnavailable(f"cannot open the database pool: {exc}") from exc
    resources.push_async_callback(pool.close)
    return SqlTransport.over_pool(pool, call_timeout=DB_CALL_TIMEOUT_SECONDS)
