"""A stand-in for Supabase Realtime's ``postgres_changes``: an aiohttp websocket handler that
speaks the Phoenix channel protocol (vsn 1.0.0, JSON text frames) the way realtime-py 2.34.1
expects, and relays real inserts from the test database.

How a change reaches a client here: an AFTER trigger installed by :func:`install_trigger` calls
``pg_notify('fake_realtime', <change as JSON>)``; :class:`FakeRealtime` LISTENs on a dedicated
psycopg connection and sends a ``postgres_changes`` frame to every joined channel with a
matching binding: event (or ``*``), schema, table (absent or ``*``: any) and ``filter``, with the
operators ``eq, neq, lt, lte, gt, gte, in, is, like, ilike``, the ``not.`` prefix and commas for
AND. A filter it cannot parse (``match``, ``imatch``, ``isdistinct`` included) gets a ``system``
error after the join, which realtime-py turns into CHANNEL_ERROR and rejoins. ``select`` is
echoed but the whole row is sent.

Using it under pytest with ``filterwarnings = error``: realtime-py 2.34.1 reads ``e.code`` of
websockets' ConnectionClosedError, deprecated in websockets 15; the DeprecationWarning, turned
into an exception, kills realtime-py's listen task silently on any abnormal close (1006, 1011,
keepalive timeout): no CHANNEL_ERROR, no reconnect. Ignore ``ConnectionClosed\\.(code|reason) is
deprecated`` (DeprecationWarning) where a test drops connections.

What the real server does that this one does not (do not read more into a green test):

* It reads the WAL through a logical replication slot and the ``supabase_realtime``
  publication; a table outside the publication sends nothing there, but sends here. Changes are
  produced at commit in commit order in both, but ``commit_timestamp`` here is the
  transaction's start (``now()``), and NOTIFY's queue is not a replication slot: nothing survives
  a restart of this process.
* It checks RLS per subscriber (each change is re-read with the subscriber's JWT claims) and
  column privileges; here every valid key sees every row, like the ``service_role``.
* Its record size limit is 1,024 KB; pg_notify's is 8,000 bytes. Above the limit both do the
  same thing: the record keeps only the fields whose JSON text is at most 64 bytes and
  ``errors`` is ``["Error 413: Payload Too Large"]``; here that happens above ~7,900 bytes (a
  long prompt is enough). The filter is applied to that truncated record here, to the full row
  there. Filter values are compared as numbers when both sides are numbers, else as text (case
  folded for ``uuid`` columns); the real server casts both to the column's type.
* ``old_record`` (UPDATE/DELETE) holds the primary key only, as with ``REPLICA IDENTITY
  DEFAULT``; a table with ``REPLICA IDENTITY FULL`` would get the whole old row there.
* Binding ids are fresh integers per join; the real server derives them from a hash of the
  binding, so they are stable across rejoins.
* No broadcast, presence, Broadcast Replay or ``private`` channels, no JWT verification or
  expiry (a token is valid iff it is one of ``api_keys``), no rate limits (messages/s, joins,
  channels per connection), no vsn 2.0.0 binary frames, no delivery during a disconnect (the
  real one has no replay for postgres_changes either). The join reply is sent as soon as the
  LISTEN is up, so the "writes in the first seconds after SUBSCRIBED are lost" race of the real
  server does not happen here.
* Error texts (bad token, bad filter) follow the real shapes (``phx_reply`` status ``error``
  with a ``reason``; ``system`` status ``error``), not necessarily the real wording.

Fault injection (coroutines, to be run on the loop that serves the handler; each is counted in
:attr:`FakeRealtime.faults`): :meth:`~FakeRealtime.drop_connections` (TCP abort, the client sees
1006), :meth:`~FakeRealtime.close_channels` (``phx_close``: realtime-py drops the channel and
never rejoins), :meth:`~FakeRealtime.send_channel_error` (``phx_error``: realtime-py rejoins
after 1, 2, 5, 10 s), :meth:`~FakeRealtime.go_silent` / :meth:`~FakeRealtime.resume` (half-open:
nothing is read, answered or relayed, websocket pings included, the TCP connection stays up),
:meth:`~FakeRealtime.pause_relay` / :meth:`~FakeRealtime.resume_relay` (changes are dropped
silently) and :meth:`~FakeRealtime.delay_subscribed` (join replies come late).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import psycopg
from aiohttp import WSMsgType, web

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "fake_realtime"
PAYLOAD_TOO_LARGE = "Error 413: Payload Too Large"
VSN = "1.0.0"
# Bounds: how often the relay loop looks at the stop flag, how long a send or a close may take
# before the socket is aborted, and how long to wait before reconnecting the LISTEN connection.
POLL_SECONDS = 0.2
SEND_TIMEOUT_SECONDS = 5.0
CLOSE_TIMEOUT_SECONDS = 2.0
RELISTEN_DELAY_SECONDS = 0.5

Frame = dict[str, Any]


# --- the database side --------------------------------------------------------------------


def install_trigger_sql(
    table: str = "public.messages", operations: Iterable[str] = ("INSERT",)
) -> str:
    """SQL creating the notify function (schema ``fake_realtime``) and its AFTER trigger on
    ``table`` for ``operations`` (INSERT, UPDATE, DELETE). Idempotent."""
    ops = [op.upper() for op in operations]
    if not ops or any(op not in ("INSERT", "UPDATE", "DELETE") for op in ops):
        raise ValueError(f"operations must be INSERT, UPDATE or DELETE, got {ops}")
    qualified = ".".join('"' + part.replace('"', '""') + '"' for part in table.split("."))
    return _TRIGGER_SQL.format(table=qualified, events=" or ".join(ops))


async def install_trigger(
    conninfo: str, table: str = "public.messages", operations: Iterable[str] = ("INSERT",)
) -> None:
    """Install :func:`install_trigger_sql` in the database at ``conninfo`` (as its owner)."""
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute(install_trigger_sql(table, operations).encode())


# The change is built the way realtime.apply_rls builds it (columns with type names, UTC
# commit_timestamp with milliseconds, the 64-byte rule above the size limit), but from a row
# trigger instead of the WAL. pg_notify raises at 8000 bytes, which would abort the user's
# insert, so the payload is shrunk until it fits.
_TRIGGER_SQL = """
create schema if not exists fake_realtime;

create or replace function fake_realtime.notify_change() returns trigger
language plpgsql
security definer
set search_path = ''
as $fn$
declare
  max_bytes constant integer := 7900;
  new_row jsonb := case when tg_op = 'DELETE' then null else to_jsonb(new) end;
  old_key jsonb;
  change jsonb;
begin
  if tg_op <> 'INSERT' then
    select coalesce(jsonb_object_agg(o.key, o.value), '{{}}'::jsonb) into old_key
    from jsonb_each(to_jsonb(old)) as o
    where o.key in (
      select a.attname from pg_catalog.pg_index i
      join pg_catalog.pg_attribute a on a.attrelid = i.indrelid and a.attnum = any (i.indkey)
      where i.indrelid = tg_relid and i.indisprimary);
  end if;
  change := jsonb_build_object(
    'schema', tg_table_schema,
    'table', tg_table_name,
    'type', tg_op,
    'commit_timestamp',
      pg_catalog.to_char(now() at time zone 'utc', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
    'errors', null,
    'columns', (
      select coalesce(jsonb_agg(jsonb_build_object('name', a.attname, 'type', t.typname)
                                order by a.attnum), '[]'::jsonb)
      from pg_catalog.pg_attribute a join pg_catalog.pg_type t on t.oid = a.atttypid
      where a.attrelid = tg_relid and a.attnum > 0 and not a.attisdropped));
  if new_row is not null then
    change := change || jsonb_build_object('record', new_row);
  end if;
  if old_key is not null then
    change := change || jsonb_build_object('old_record', old_key);
  end if;
  if octet_length(change::text) > max_bytes then
    change := change || jsonb_build_object('errors', jsonb_build_array('{too_large}'));
    if new_row is not null then
      change := change || jsonb_build_object('record', (
        select coalesce(jsonb_object_agg(f.key, f.value), '{{}}'::jsonb)
        from jsonb_each(new_row) as f where octet_length(f.value::text) <= 64));
    end if;
  end if;
  if octet_length(change::text) > max_bytes then
    change := (change - 'record' - 'old_record') || jsonb_build_object('columns', '[]'::jsonb);
  end if;
  perform pg_notify('{channel}', change::text);
  return null;
end
$fn$;

revoke all on function fake_realtime.notify_change() from public;

drop trigger if exists fake_realtime_notify on {table};
create trigger fake_realtime_notify
  after {events} on {table}
  for each row execute function fake_realtime.notify_change();
""".replace("{channel}", NOTIFY_CHANNEL).replace("{too_large}", PAYLOAD_TOO_LARGE)


# --- bindings and filters (pure) ----------------------------------------------------------

FILTER_OPERATORS = ("eq", "neq", "lt", "lte", "gt", "gte", "in", "is", "like", "ilike")
_ORDER_TESTS = {
    "eq": lambda order: order == 0,
    "neq": lambda order: order != 0,
    "lt": lambda order: order < 0,
    "lte": lambda order: order <= 0,
    "gt": lambda order: order > 0,
    "gte": lambda order: order >= 0,
}


@dataclass(frozen=True)
class Condition:
    """One ``column=[not.]op.value`` term of a filter."""

    column: str
    op: str
    values: tuple[str, ...]
    negated: bool = False

    @classmethod
    def parse(cls, text: str) -> Condition:
        column, eq_sign, rest = text.partition("=")
        negated = rest.startswith("not.")
        op, dot, value = rest.removeprefix("not.").partition(".")
        if not (column and eq_sign and dot) or op not in FILTER_OPERATORS:
            raise ValueError(
                f"filter {text!r}: expected column=[not.]op.value, op in {FILTER_OPERATORS}"
            )
        if op == "in":
            if not (value.startswith("(") and value.endswith(")")):
                raise ValueError(f"filter {text!r}: 'in' takes a list such as in.(a,b)")
            items = tuple(item.strip().strip('"') for item in value[1:-1].split(","))
            return cls(column, op, items, negated)
        if op == "is" and value not in ("null", "true", "false"):
            raise ValueError(f"filter {text!r}: 'is' takes null, true or false")
        return cls(column, op, (value,), negated)

    def matches(self, row: Mapping[str, Any], column_type: str | None = None) -> bool:
        actual = row.get(self.column)
        if self.op == "is":
            expected = {"null": None, "true": True, "false": False}[self.values[0]]
            return (actual is expected) != self.negated
        if actual is None:
            return False  # SQL: a comparison with null is null, and so is its negation
        if self.op == "in":
            result = any(_compare(actual, v, column_type) == 0 for v in self.values)
        elif self.op in ("like", "ilike"):
            pattern = "".join(
                ".*" if ch == "%" else "." if ch == "_" else re.escape(ch) for ch in self.values[0]
            )
            flags = re.IGNORECASE | re.DOTALL if self.op == "ilike" else re.DOTALL
            result = re.fullmatch(pattern, _as_text(actual), flags) is not None
        else:
            result = _ORDER_TESTS[self.op](_compare(actual, self.values[0], column_type))
        return result != self.negated


@dataclass(frozen=True)
class RowFilter:
    """A postgres_changes ``filter``: conditions joined by commas, all of which must hold,
    e.g. ``message_type=eq.image`` or ``n=gt.1,status=not.in.(a,b)``."""

    conditions: tuple[Condition, ...]

    @classmethod
    def parse(cls, text: str) -> RowFilter:
        terms, depth, start = [], 0, 0
        for i, ch in enumerate(text):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                terms.append(text[start:i])
                start = i + 1
        terms.append(text[start:])
        return cls(tuple(Condition.parse(term) for term in terms))

    def matches(
        self, row: Mapping[str, Any], column_types: Mapping[str, str] | None = None
    ) -> bool:
        types = column_types or {}
        return all(c.matches(row, types.get(c.column)) for c in self.conditions)


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else json.dumps(value)


def _compare(actual: Any, expected: str, column_type: str | None) -> int:
    """-1, 0 or 1: as numbers when both sides are numbers, else as text."""
    if isinstance(actual, int | float) and not isinstance(actual, bool):
        with contextlib.suppress(InvalidOperation):
            a, b = Decimal(str(actual)), Decimal(expected)
            return (a > b) - (a < b)
    text = _as_text(actual)
    if column_type == "uuid":
        text, expected = text.casefold(), expected.casefold()
    return (text > expected) - (text < expected)


@dataclass(frozen=True)
class Binding:
    """One ``postgres_changes`` entry of a join, as the client sent it, plus its server id."""

    id: int
    spec: Mapping[str, Any]
    filter: RowFilter | None
    error: str | None = None

    @classmethod
    def from_spec(cls, binding_id: int, spec: Mapping[str, Any]) -> Binding:
        text = spec.get("filter")
        if not text:
            return cls(binding_id, spec, None)
        try:
            return cls(binding_id, spec, RowFilter.parse(str(text)))
        except ValueError as exc:
            return cls(binding_id, spec, None, str(exc))

    def reply_entry(self) -> dict[str, Any]:
        """The join reply's entry: the client's binding echoed exactly, plus ``id``."""
        return {**self.spec, "id": self.id}

    def matches(self, change: Mapping[str, Any]) -> bool:
        if self.error is not None:
            return False
        kind = change.get("type")
        if self.spec.get("event") not in ("*", kind):
            return False
        if self.spec.get("schema", "public") not in ("*", change.get("schema")):
            return False
        if self.spec.get("table") not in (None, "*", change.get("table")):
            return False
        if self.filter is None:
            return True
        row = change.get("old_record" if kind == "DELETE" else "record") or {}
        types = {c.get("name"): c.get("type") for c in change.get("columns") or ()}
        return self.filter.matches(row, types)


def reply_frame(
    topic: str, ref: str | None, join_ref: str | None, status: str, response: Mapping[str, Any]
) -> Frame:
    return {
        "topic": topic,
        "event": "phx_reply",
        "payload": {"status": status, "response": dict(response)},
        "ref": ref,
        "join_ref": join_ref,
    }


def system_frame(topic: str, status: str, message: str) -> Frame:
    channel = topic.removeprefix("realtime:")
    payload = {"extension": "postgres_changes", "status": status, "message": message}
    return {
        "topic": topic,
        "event": "system",
        "payload": {**payload, "channel": channel},
        "ref": None,
    }


def change_frame(topic: str, ids: list[int], change: Mapping[str, Any]) -> Frame:
    return {
        "topic": topic,
        "event": "postgres_changes",
        "ref": None,
        "payload": {"ids": ids, "data": dict(change)},
    }


# --- connections --------------------------------------------------------------------------


@dataclass
class _Channel:
    topic: str
    join_ref: str | None
    bindings: list[Binding]
    #: changes are relayed only once this event is set (see FakeRealtime.delay_streaming)
    streaming: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class _Connection:
    ws: web.WebSocketResponse
    transport: asyncio.Transport | None
    channels: dict[str, _Channel] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def abort(self) -> None:
        self.gone.set()
        if self.transport is not None:
            self.transport.abort()


class FakeRealtime:
    """Serves ``/realtime/v1/websocket``; relays the test database's changes (see module doc)."""

    def __init__(self, database_conninfo: str, *, api_keys: Collection[str] | None = None) -> None:
        self._conninfo = database_conninfo
        self._api_keys = frozenset(api_keys) if api_keys is not None else None
        self._connections: set[_Connection] = set()
        self._ids = itertools.count(1001)
        self._db: psycopg.AsyncConnection[Any] | None = None
        self._relay_task: asyncio.Task[None] | None = None
        self._running = False
        self._audible = asyncio.Event()
        self._audible.set()
        self._relay_paused = False
        self._join_delay = 0.0
        self._stream_delay = 0.0
        self.joins = 0
        """Join requests answered ``ok`` (rejoins included)."""
        self.rejected_joins = 0
        self.heartbeats = 0
        """Heartbeats answered."""
        self.notifications = 0
        """Changes received from the database (relayed or not)."""
        self.events_sent = 0
        """``postgres_changes`` frames sent."""
        self.events_dropped = 0
        """Changes not relayed because of :meth:`pause_relay` or :meth:`go_silent`."""
        self.last_bindings: list[dict[str, Any]] = []
        """The ``postgres_changes`` entries of the last join reply (with their ids)."""
        self.faults: Counter[str] = Counter()

    @property
    def connections(self) -> int:
        """Open websocket connections."""
        return len(self._connections)

    @property
    def joined_channels(self) -> int:
        return sum(len(conn.channels) for conn in self._connections)

    async def start(self) -> None:
        """LISTEN on the database (raises if it cannot); from then on changes are relayed."""
        if self._running:
            raise RuntimeError("FakeRealtime is already started")
        self._db = await self._listen()
        self._audible = asyncio.Event()  # bound to the loop that serves us from here on
        self._audible.set()
        self._running = True
        self._relay_task = asyncio.create_task(self._relay(), name="fake-realtime-relay")

    async def stop(self) -> None:
        """Close every socket (1001) and the LISTEN connection, and wait for all of it."""
        self._running = False
        await self.resume()
        connections = list(self._connections)
        await asyncio.gather(*(self._close(conn) for conn in connections))
        done = [asyncio.ensure_future(conn.done.wait()) for conn in connections]
        if done:
            _, pending = await asyncio.wait(done, timeout=CLOSE_TIMEOUT_SECONDS)
            for waiter in pending:
                waiter.cancel()
            await asyncio.gather(*done, return_exceptions=True)
        relay, self._relay_task = self._relay_task, None
        try:
            if relay is not None:  # a crash of the relay loop is raised here, not swallowed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(relay, POLL_SECONDS * 10)  # cancels it on timeout
        finally:
            if self._db is not None:
                await self._db.close()
                self._db = None

    async def _close(self, conn: _Connection) -> None:
        try:
            await asyncio.wait_for(
                conn.ws.close(code=1001, message=b"server stopping"), CLOSE_TIMEOUT_SECONDS
            )
        except TimeoutError:
            conn.abort()
        self._connections.discard(conn)

    # --- fault injection ---

    async def drop_connections(self) -> int:
        """Abort every socket without a close frame (the client sees 1006); returns how many."""
        self.faults["drop_connections"] += 1
        dropped = list(self._connections)
        for conn in dropped:
            self._connections.discard(conn)
            conn.abort()
        return len(dropped)

    async def close_channels(self) -> int:
        """Send ``phx_close`` on every joined channel and forget them; returns how many."""
        self.faults["close_channels"] += 1
        return await self._end_channels("phx_close")

    async def send_channel_error(self) -> int:
        """Send ``phx_error`` on every joined channel and forget them; returns how many."""
        self.faults["send_channel_error"] += 1
        return await self._end_channels("phx_error")

    async def _end_channels(self, event: str) -> int:
        count = 0
        for conn in list(self._connections):
            channels, conn.channels = list(conn.channels.values()), {}
            for channel in channels:
                frame = {
                    "topic": channel.topic,
                    "event": event,
                    "payload": {},
                    "ref": channel.join_ref,
                    "join_ref": channel.join_ref,
                }
                await self._send(conn, frame)
                count += 1
        return count

    async def go_silent(self) -> None:
        """Half-open: stop reading sockets, answering (pings and heartbeats too) and relaying.
        New connections still complete the websocket handshake, then are not read either."""
        self.faults["go_silent"] += 1
        self._audible.clear()
        for conn in self._connections:
            if conn.transport is not None and not conn.transport.is_closing():
                conn.transport.pause_reading()

    async def resume(self) -> None:
        """End :meth:`go_silent`: frames the clients sent meanwhile are read and answered now."""
        self._audible.set()
        for conn in self._connections:
            if conn.transport is not None and not conn.transport.is_closing():
                conn.transport.resume_reading()

    async def pause_relay(self) -> None:
        """Drop database changes silently (the sockets stay healthy)."""
        self.faults["pause_relay"] += 1
        self._relay_paused = True

    async def resume_relay(self) -> None:
        self._relay_paused = False

    async def delay_subscribed(self, seconds: float) -> None:
        """Answer later joins after ``seconds`` (0 restores prompt replies)."""
        self.faults["delay_subscribed"] += 1
        self._join_delay = max(0.0, seconds)

    async def delay_streaming(self, seconds: float) -> None:
        """For later joins: reply SUBSCRIBED at once but relay nothing for ``seconds``, then
        send "Subscribed to PostgreSQL" — the real server's window in which SUBSCRIBED has
        arrived but its replication listener is not ready yet (0 restores the default)."""
        self.faults["delay_streaming"] += 1
        self._stream_delay = max(0.0, seconds)

    # --- the websocket endpoint ---

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET /realtime/v1/websocket?apikey=...&vsn=1.0.0``."""
        if not self._running:
            return web.json_response({"message": "realtime is not running"}, status=503)
        key = request.query.get("apikey") or request.headers.get("apikey")
        if self._api_keys is not None and key not in self._api_keys:
            return web.json_response({"message": "Invalid API key"}, status=401)
        if request.query.get("vsn", VSN) != VSN:
            return web.json_response({"message": f"only vsn={VSN} is spoken here"}, status=400)
        # autoping off: pongs are sent by the read loop, so go_silent() withholds them too.
        ws = web.WebSocketResponse(autoping=False, timeout=CLOSE_TIMEOUT_SECONDS)
        if not ws.can_prepare(request).ok:
            return web.json_response({"message": "expected a websocket upgrade"}, status=400)
        await ws.prepare(request)
        conn = _Connection(ws, request.transport)
        self._connections.add(conn)
        if not self._audible.is_set() and conn.transport is not None:
            conn.transport.pause_reading()
        try:
            await self._read(conn)
        finally:
            self._connections.discard(conn)
            try:
                pending = list(conn.tasks)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                if not ws.closed and not conn.gone.is_set():
                    await ws.close()
            finally:
                conn.done.set()
        return ws

    async def _read(self, conn: _Connection) -> None:
        while await self._audible_for(conn):
            msg = await conn.ws.receive()
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return
            # A frame already buffered when go_silent() was called waits here until resume().
            if not await self._audible_for(conn):
                return
            if msg.type is WSMsgType.PING:
                await conn.ws.pong(msg.data)
            elif msg.type is WSMsgType.TEXT:
                await self._dispatch(conn, msg.data)

    async def _audible_for(self, conn: _Connection) -> bool:
        """Wait while silent; False once the connection is being dropped or closed."""
        if not self._audible.is_set() and not conn.gone.is_set():
            waiters = [
                asyncio.ensure_future(self._audible.wait()),
                asyncio.ensure_future(conn.gone.wait()),
            ]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)
        return not conn.gone.is_set()

    async def _dispatch(self, conn: _Connection, text: str) -> None:
        try:
            frame = json.loads(text)
            topic, event = str(frame["topic"]), str(frame["event"])
            payload = frame.get("payload") or {}
            ref, join_ref = frame.get("ref"), frame.get("join_ref")
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("fake_realtime_bad_frame %r", text[:200])
            return
        if topic == "phoenix" and event == "heartbeat":
            self.heartbeats += 1
            await self._send(conn, reply_frame(topic, ref, None, "ok", {}))
        elif event == "phx_join":
            await self._join(conn, topic, payload, ref, join_ref or ref)
        elif topic not in conn.channels:
            if ref is not None:
                await self._send(
                    conn, reply_frame(topic, ref, join_ref, "error", {"reason": "unmatched topic"})
                )
        elif event == "phx_leave":
            del conn.channels[topic]
            await self._send(conn, reply_frame(topic, ref, join_ref, "ok", {}))
        elif event == "access_token":
            await self._refresh_token(conn, conn.channels[topic], payload.get("access_token"))
        # broadcast and presence are not implemented: ignored, as a channel without them would.

    def _token_ok(self, token: object) -> bool:
        return token is None or self._api_keys is None or token in self._api_keys

    async def _join(
        self,
        conn: _Connection,
        topic: str,
        payload: Mapping[str, Any],
        ref: str | None,
        join_ref: str | None,
    ) -> None:
        if not self._token_ok(payload.get("access_token")):
            self.rejected_joins += 1
            reason = "InvalidJWTToken: the access_token is not a key this server accepts"
            await self._send(conn, reply_frame(topic, ref, join_ref, "error", {"reason": reason}))
            return
        specs = ((payload.get("config") or {}).get("postgres_changes")) or []
        bindings = [Binding.from_spec(next(self._ids), spec) for spec in specs]
        channel = _Channel(topic, join_ref, bindings)
        if self._join_delay > 0:
            task = asyncio.create_task(self._answer_join(conn, channel, ref, self._join_delay))
            conn.tasks.add(task)
            task.add_done_callback(conn.tasks.discard)
        else:
            await self._answer_join(conn, channel, ref, 0.0)

    async def _answer_join(
        self, conn: _Connection, channel: _Channel, ref: str | None, delay: float
    ) -> None:
        if delay:
            await asyncio.sleep(delay)
            if not await self._audible_for(conn):
                return
        conn.channels[channel.topic] = channel
        self.joins += 1
        entries = [binding.reply_entry() for binding in channel.bindings]
        self.last_bindings = entries
        response = {"postgres_changes": entries}
        await self._send(conn, reply_frame(channel.topic, ref, channel.join_ref, "ok", response))
        errors = [b.error for b in channel.bindings if b.error is not None]
        if errors:
            message = "Unable to subscribe to changes with given parameters: " + "; ".join(errors)
            await self._send(conn, system_frame(channel.topic, "error", message))
        elif channel.bindings and self._stream_delay > 0:
            task = asyncio.create_task(self._start_streaming(conn, channel, self._stream_delay))
            conn.tasks.add(task)
            task.add_done_callback(conn.tasks.discard)
        elif channel.bindings:
            await self._start_streaming(conn, channel, 0.0)

    async def _start_streaming(self, conn: _Connection, channel: _Channel, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        channel.streaming.set()
        await self._send(conn, system_frame(channel.topic, "ok", "Subscribed to PostgreSQL"))

    async def _refresh_token(self, conn: _Connection, channel: _Channel, token: object) -> None:
        # Accepted silently; a bad one ends the channel like an expired JWT does on the server.
        if not self._token_ok(token):
            del conn.channels[channel.topic]
            await self._send(conn, system_frame(channel.topic, "error", "Invalid token"))
            close = {
                "topic": channel.topic,
                "event": "phx_close",
                "payload": {},
                "ref": channel.join_ref,
                "join_ref": channel.join_ref,
            }
            await self._send(conn, close)

    async def _send(self, conn: _Connection, frame: Frame) -> None:
        if conn.ws.closed or conn.gone.is_set():
            return
        try:
            async with conn.send_lock:
                await asyncio.wait_for(conn.ws.send_str(json.dumps(frame)), SEND_TIMEOUT_SECONDS)
        except TimeoutError:
            log.warning("fake_realtime_slow_client_aborted")
            conn.abort()
        except ConnectionError:
            conn.gone.set()

    # --- the database side ---

    async def _listen(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        await conn.execute(f"listen {NOTIFY_CHANNEL}")
        return conn

    async def _relay(self) -> None:
        """Relay notifications until stopped; a lost LISTEN connection is reopened (changes
        committed meanwhile are lost, as they are when the real server's slot is recreated)."""
        while self._running:
            try:
                if self._db is None or self._db.closed:
                    self._db = await self._listen()
                async for note in self._db.notifies(timeout=POLL_SECONDS):
                    await self._on_change(note.payload)
            except psycopg.Error as exc:
                log.warning("fake_realtime_listen_lost %s", exc)
                if self._db is not None:
                    await self._db.close()
                    self._db = None
                await asyncio.sleep(RELISTEN_DELAY_SECONDS)

    async def _on_change(self, payload: str) -> None:
        try:
            change = json.loads(payload)
        except ValueError:
            log.warning("fake_realtime_bad_notification %r", payload[:200])
            return
        self.notifications += 1
        if self._relay_paused or not self._audible.is_set():
            self.events_dropped += 1
            return
        for conn in list(self._connections):
            for channel in list(conn.channels.values()):
                ids = [b.id for b in channel.bindings if b.matches(change)]
                if ids and not channel.streaming.is_set():
                    self.events_dropped += 1  # subscribed, but not streaming yet
                elif ids:
                    await self._send(conn, change_frame(channel.topic, ids, change))
                    self.events_sent += 1
