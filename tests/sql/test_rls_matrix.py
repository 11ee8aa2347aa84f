"""Who may do what, as one table: roles (anon, the chat's owner, a stranger, service_role) x
objects (public.chats, public.messages, image_queue.jobs, and every function the migrations
create in public and image_queue) x operations (select, insert, update, delete, execute).

Every cell states its outcome and is checked: allowed, with its effect on the data, or denied
and how (42501 permission denied, 42501 row-level security violation, or 0 rows because RLS
hides them). tests/sql/test_rls.py holds the scenario tests; this is the systematic view. The list
of functions comes from pg_proc, so a function added by a migration fails
test_the_matrix_covers_every_function_the_migrations_create until it has its row here.

Each cell runs in a transaction that is rolled back, so all share one database and one world.
The last tests repeat the queue's cells through the real PostgREST.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest

from tests.support.module_stack import module_stack
from tests.support.pg import PostgresServer, as_service_role, as_user, create_user
from tests.support.supabase_stack import SupabaseStack

Conn = psycopg.Connection[dict[str, Any]]

ROLES = ("anon", "owner", "stranger", "service_role")
CLIENT_ROLES = ("anon", "owner", "stranger")


# --- outcomes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Denied:
    """Refused with 42501 and this message (permission denied, or an RLS WITH CHECK)."""

    message: str


@dataclass(frozen=True)
class Rows:
    """Ran; returned or affected ``n`` rows (0: RLS hid them), with its effect if n > 0."""

    n: int


@dataclass(frozen=True)
class Returns:
    """A function call that ran and returned this value."""

    value: Any


@dataclass(frozen=True)
class Executes:
    """A function call that reached the function body: it returned, or raised its own error
    (called with NULL arguments, a queue function may refuse them), never 42501."""


@dataclass(frozen=True)
class Refused:
    """Refused before RLS by a trigger that names the problem (``{param}`` filled from the world),
    with the same answer whatever the hidden rows hold."""

    sqlstate: str
    message: str


Outcome = Denied | Refused | Rows | Returns | Executes


def no_table(table: str) -> Denied:
    return Denied(f"permission denied for table {table}")


def rls(table: str) -> Denied:
    return Denied(f'new row violates row-level security policy for table "{table}"')


NO_QUEUE_SCHEMA = Denied("permission denied for schema image_queue")


def no_function(name: str) -> Denied:
    return Denied(f"permission denied for function {name}")


# --- the world every cell sees ----------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """The owner's chat with a queued request and its reply; the stranger has a chat too."""

    owner: uuid.UUID
    stranger: uuid.UUID
    owner_chat: uuid.UUID
    stranger_chat: uuid.UUID
    request: uuid.UUID
    reply: uuid.UUID

    def params(self) -> dict[str, uuid.UUID]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _one(conn: Conn, sql: str, params: Any = ()) -> uuid.UUID:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    value = row["id"]
    assert isinstance(value, uuid.UUID)
    return value


@pytest.fixture(scope="module")
def world(shared_db: Conn) -> World:
    owner, stranger = create_user(shared_db), create_user(shared_db)
    chats = []
    for user in (owner, stranger):
        with as_user(shared_db, user):
            chats.append(_one(shared_db, "insert into public.chats default values returning id"))
    with as_user(shared_db, owner):
        request = _one(
            shared_db,
            "insert into public.messages (chat_id, role, content, message_type)"
            " values (%s, 'user', 'a red fox', 'image') returning id",
            (chats[0],),
        )
    with as_service_role(shared_db):
        # the reply the insert created ('queued'), as a claim leaves it
        reply = _one(
            shared_db,
            "update public.messages set status = 'generating', content = 'Generating image...'"
            " where reply_to = %s returning id",
            (request,),
        )
    return World(owner, stranger, chats[0], chats[1], request, reply)


def _claims(role: str, world: World) -> tuple[str, dict[str, str]]:
    """The PostgreSQL role and JWT claims PostgREST would use for this caller."""
    if role == "anon":
        return "anon", {"role": "anon"}
    if role == "service_role":
        return "service_role", {"role": "service_role"}
    user = world.owner if role == "owner" else world.stranger
    return "authenticated", {"sub": str(user), "role": "authenticated"}


@contextmanager
def acting_as(conn: Conn, role: str, world: World) -> Iterator[None]:
    """As PostgREST runs a request (role + claims), in a transaction that is always rolled back.
    Inside, ``_observe`` switches back to the superuser to look at the effect."""
    pg_role, claims = _claims(role, world)
    with conn.transaction(force_rollback=True):
        conn.execute(f"set local role {pg_role}")
        conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        yield


# --- tables -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableOp:
    """One operation on one table, and the superuser's query that shows whether it took effect."""

    sql: str
    effect: str | None  # returns one boolean "took effect"; None for reads


TABLE_OPS: dict[str, dict[str, TableOp]] = {
    "chats": {
        "select": TableOp("select id from public.chats where id = %(owner_chat)s", None),
        "insert": TableOp(
            "insert into public.chats (user_id, title) values (%(owner)s, 'matrix')",
            "select exists (select 1 from public.chats where title = 'matrix')",
        ),
        "update": TableOp(
            "update public.chats set title = 'matrix' where id = %(owner_chat)s",
            "select title = 'matrix' from public.chats where id = %(owner_chat)s",
        ),
        "delete": TableOp(
            "delete from public.chats where id = %(owner_chat)s",
            "select not exists (select 1 from public.chats where id = %(owner_chat)s)",
        ),
    },
    "messages": {
        "select": TableOp("select id from public.messages where chat_id = %(owner_chat)s", None),
        # an image request in the owner's chat: taking effect means stored *and* enqueued
        "insert": TableOp(
            "insert into public.messages (chat_id, role, content, message_type)"
            " values (%(owner_chat)s, 'user', 'matrix', 'image')",
            "select exists (select 1 from public.messages m"
            " join image_queue.jobs j on j.request_id = m.id where m.content = 'matrix')",
        ),
        "update": TableOp(
            "update public.messages set content = 'matrix' where id = %(reply)s",
            "select content = 'matrix' from public.messages where id = %(reply)s",
        ),
        # deleting the request cancels it: its reply and its job go with it
        "delete": TableOp(
            "delete from public.messages where id = %(request)s",
            "select not exists (select 1 from public.messages"
            "   where id = %(request)s or reply_to = %(request)s)"
            " and not exists (select 1 from image_queue.jobs where request_id = %(request)s)",
        ),
    },
    "jobs": {
        "select": TableOp("select request_id from image_queue.jobs", None),
        "insert": TableOp(
            "insert into image_queue.jobs (request_id, chat_id, user_id)"
            " values (%(reply)s, %(owner_chat)s, %(owner)s)",
            "select exists (select 1 from image_queue.jobs where request_id = %(reply)s)",
        ),
        "update": TableOp(
            "update image_queue.jobs set attempts = 99 where request_id = %(request)s",
            "select attempts = 99 from image_queue.jobs where request_id = %(request)s",
        ),
        "delete": TableOp(
            "delete from image_queue.jobs where request_id = %(request)s",
            "select not exists (select 1 from image_queue.jobs where request_id = %(request)s)",
        ),
    },
}

TABLE_MATRIX: dict[str, dict[str, dict[str, Outcome]]] = {
    "chats": {
        "select": {
            "anon": no_table("chats"),
            "owner": Rows(1),
            "stranger": Rows(0),
            "service_role": Rows(1),
        },
        "insert": {  # a chat that belongs to the owner
            "anon": no_table("chats"),
            "owner": Rows(1),
            "stranger": rls("chats"),
            "service_role": Rows(1),
        },
        "update": {  # the title only: no client role may update user_id (test_rls)
            "anon": no_table("chats"),
            "owner": Rows(1),
            "stranger": Rows(0),
            "service_role": Rows(1),
        },
        "delete": {
            "anon": no_table("chats"),
            "owner": Rows(1),
            "stranger": Rows(0),
            "service_role": Rows(1),
        },
    },
    "messages": {
        "select": {
            "anon": no_table("messages"),
            "owner": Rows(2),
            "stranger": Rows(0),
            "service_role": Rows(2),
        },
        "insert": {
            "anon": no_table("messages"),
            "owner": Rows(1),
            # as if the owner's chat did not exist (migrations/20261205100000_chat_not_found.sql)
            "stranger": Refused("23514", "chat {owner_chat} not found"),
            "service_role": Rows(1),
        },
        "update": {  # nobody but the service role updates a message, not even the owner
            "anon": no_table("messages"),
            "owner": no_table("messages"),
            "stranger": no_table("messages"),
            "service_role": Rows(1),
        },
        "delete": {  # the owner's delete of the request cancels it
            "anon": no_table("messages"),
            "owner": Rows(1),
            "stranger": Rows(0),
            "service_role": Rows(1),
        },
    },
    # The job table is reached through the queue functions only; even the service role has no
    # USAGE on the schema (every state change is one SQL function).
    "jobs": {op: {role: NO_QUEUE_SCHEMA for role in ROLES} for op in TABLE_OPS["jobs"]},
}


def _table_cells() -> list[Any]:
    return [
        pytest.param(role, table, op, outcome, id=f"{role}-{table}-{op}")
        for table, ops in TABLE_MATRIX.items()
        for op, by_role in ops.items()
        for role, outcome in by_role.items()
    ]


def _observe(conn: Conn, effect: str | None, params: dict[str, Any]) -> bool | None:
    if effect is None:
        return None
    conn.execute("reset role")
    row = conn.execute(effect, params).fetchone()
    assert row is not None
    return bool(next(iter(row.values())))


@pytest.mark.parametrize(("role", "table", "op", "expected"), _table_cells())
def test_table_cell(
    shared_db: Conn, world: World, role: str, table: str, op: str, expected: Outcome
) -> None:
    spec = TABLE_OPS[table][op]
    params = world.params()
    with acting_as(shared_db, role, world):
        try:
            with shared_db.transaction():  # a savepoint: the effect is still observable after
                cur = shared_db.execute(spec.sql, params)
                count = len(cur.fetchall()) if op == "select" else cur.rowcount
                error = None
        except psycopg.Error as exc:
            count, error = None, exc
        took_effect = _observe(shared_db, spec.effect, params)

    if isinstance(expected, Denied | Refused):
        assert error is not None, f"allowed ({count} rows) but should be denied"
        sqlstate = expected.sqlstate if isinstance(expected, Refused) else "42501"
        assert error.sqlstate == sqlstate
        assert error.diag.message_primary == expected.message.format(**params)
        assert took_effect in (None, False)
        return
    assert isinstance(expected, Rows)
    assert error is None, f"denied: {error}"
    assert count == expected.n
    assert took_effect in (None, expected.n > 0)


# --- functions --------------------------------------------------------------------------------


def _service_role_only(name: str) -> dict[str, Outcome]:
    return {**{role: no_function(name) for role in CLIENT_ROLES}, "service_role": Executes()}


def _nobody(name: str) -> dict[str, Outcome]:
    """Trigger functions: run by their triggers, executable by no API role at all."""
    return {role: no_function(name) for role in ROLES}


#: the functions in public that only the service role may call: each is a door to image_queue
SERVICE_ROLE_FUNCTIONS = (
    "image_jobs_claim",
    "image_jobs_extend",
    "image_jobs_complete",
    "image_jobs_fail",
    "image_jobs_release",
    "image_jobs_next_due",
    # operator commands (status, retry, cancel, requeue-stuck)
    "image_queue_status",
    "image_jobs_retry",
    "image_jobs_retry_failed",
    "image_jobs_cancel",
    "image_jobs_requeue_stuck",
    # limits, usage and prices (quota, usage, prices commands; the priced completion)
    "image_jobs_complete_priced",
    "image_quota_set",
    "image_quota_remove",
    "image_quota_show",
    "image_usage",
    "image_prices_set",
    "image_prices",
    # previews (the fenced write of a partial image)
    "image_jobs_preview",
    # edits: where an edit_of reply's image is stored
    "image_reply_image",
    # the provider budget (the claim within it, a 429's pause, the next start, the budget command)
    "image_jobs_claim_within_budget",
    "image_jobs_rate_limited",
    "image_jobs_next_start",
    "image_provider_budget",
    "image_provider_budget_set",
)

#: every function the migrations create in public and image_queue, by qualified name
FUNCTION_MATRIX: dict[str, dict[str, Outcome]] = {
    "public.messages_validate": _nobody("messages_validate"),
    "public.messages_require_own_chat": _nobody("messages_require_own_chat"),
    "public.messages_status_changed": _nobody("messages_status_changed"),
    "public.messages_touch_updated_at": _nobody("messages_touch_updated_at"),
    # image_queue is not even USAGE-able by the API roles, so its functions fail on the schema
    "image_queue.enqueue_image_request": {role: NO_QUEUE_SCHEMA for role in ROLES},
    "image_queue.lost_reason": {role: NO_QUEUE_SCHEMA for role in ROLES},
    **{
        f"image_queue.{name}": {role: NO_QUEUE_SCHEMA for role in ROLES}
        for name in (
            "cost_usd",
            "limits_for",
            "quota_of",
            "refuse",
            "minute_utc",
            "enforce_limits",
            "queued_content",
            "reply_queued",
            "budget_in_force",
            "budget_tokens",
        )
    },
    # a request's place in line, for its owner only (others: "not found", as for no request)
    "public.image_request_position": {
        "anon": no_function("image_request_position"),
        "owner": Executes(),
        "stranger": Executes(),
        "service_role": no_function("image_request_position"),
    },
    # a signed-in user's own quota; nobody else's, and not for anon or the service role
    "public.my_image_quota": {
        "anon": no_function("my_image_quota"),
        "owner": Executes(),
        "stranger": Executes(),
        "service_role": no_function("my_image_quota"),
    },
    "public.is_chat_owner": {
        "anon": no_function("is_chat_owner"),
        "owner": Returns(True),
        "stranger": Returns(False),
        "service_role": Returns(False),  # no sub claim: nobody owns anything
    },
    **{f"public.{name}": _service_role_only(name) for name in SERVICE_ROLE_FUNCTIONS},
}

#: SECURITY DEFINER where it is needed, and why; every other function runs as its caller
DEFINER_NEEDED = {
    # inserts into image_queue.jobs, which the inserting user (authenticated) cannot reach
    "image_queue.enqueue_image_request": "writes the job table for the inserting user",
    # the messages policies call it: with definer rights its lookup of chats is neither filtered
    # nor recursed into by chats' own RLS
    "public.is_chat_owner": "policy helper reading chats past RLS",
    # the service role has no USAGE on image_queue: the queue functions are its only way in, and
    # they write assistant replies however the caller's grants change
    **{f"public.{name}": "the only door to image_queue" for name in SERVICE_ROLE_FUNCTIONS},
    # reads the signed-in user's own limits and ledger rows in image_queue, and nothing else
    "public.my_image_quota": "a user's own quota from image_queue",
    "public.image_request_position": "a user's own request's place in image_queue",
}

_OUR_FUNCTIONS = """
select n.nspname || '.' || p.proname as name, p.oid::regprocedure::text as signature,
       p.prosecdef as definer, p.proconfig as config, pg_get_userbyid(p.proowner) as owner,
       p.prorettype = 'trigger'::regtype as is_trigger,
       coalesce((select array_agg(format_type(t, null) order by i)
                 from unnest(p.proargtypes::oid[]) with ordinality as a (t, i)), '{}') as types,
       -- the inputs (a RETURNS TABLE function lists its outputs after them)
       coalesce(p.proargnames[1:p.pronargs], '{}') as arg_names
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
where n.nspname in ('public', 'image_queue')
  and not exists (select 1 from pg_depend d where d.objid = p.oid and d.deptype = 'e')
order by 1, 2
"""


def our_functions(conn: Conn) -> list[dict[str, Any]]:
    """Every function in public and image_queue that is not an extension's."""
    return conn.execute(_OUR_FUNCTIONS).fetchall()


def _call(function: dict[str, Any], world: World) -> tuple[str, list[Any]]:
    """A call with NULL arguments of the right types (the privilege check comes first), except
    is_chat_owner, which gets the owner's chat so that its answer means something."""
    if function["name"] == "public.is_chat_owner":
        return "select public.is_chat_owner(%s) as result", [world.owner_chat]
    casts = ", ".join(f"null::{t}" for t in function["types"])
    return f"select {function['signature'].split('(')[0]}({casts}) as result", []


def test_the_matrix_covers_every_function_the_migrations_create(shared_db: Conn) -> None:
    names = {f["name"] for f in our_functions(shared_db)}
    assert names == set(FUNCTION_MATRIX), "add the new function's row to FUNCTION_MATRIX"


def _function_cells() -> list[Any]:
    return [
        pytest.param(role, name, outcome, id=f"{role}-{name.split('.')[1]}-execute")
        for name, by_role in FUNCTION_MATRIX.items()
        for role, outcome in by_role.items()
    ]


@pytest.mark.parametrize(("role", "name", "expected"), _function_cells())
def test_function_cell(
    shared_db: Conn, world: World, role: str, name: str, expected: Outcome
) -> None:
    overloads = [f for f in our_functions(shared_db) if f["name"] == name]
    assert overloads, f"{name} no longer exists: remove its row"
    for function in overloads:
        sql, params = _call(function, world)
        with acting_as(shared_db, role, world):
            try:
                with shared_db.transaction():
                    row = shared_db.execute(sql, params).fetchone()
                    error = None
            except psycopg.Error as exc:
                row, error = None, exc
        if isinstance(expected, Denied):
            assert error is not None, f"{function['signature']} ran as {role}"
            assert (error.sqlstate, error.diag.message_primary) == ("42501", expected.message)
        elif isinstance(expected, Returns):
            assert error is None, error
            assert row == {"result": expected.value}
        else:
            assert error is None or error.sqlstate != "42501", error


def test_security_definer_only_where_needed_and_every_search_path_pinned(shared_db: Conn) -> None:
    """A definer function resolving names through a schema its caller can write to can be
    hijacked; pinning search_path to '' (every name qualified) rules that out for all."""
    functions = our_functions(shared_db)
    definers = {f["name"] for f in functions if f["definer"]}
    assert definers == set(DEFINER_NEEDED)
    unpinned = [f["signature"] for f in functions if f["config"] != ['search_path=""']]
    assert unpinned == []
    owned_by_api_roles = [f["signature"] for f in functions if f["owner"] in ROLES]
    assert owned_by_api_roles == []


# --- the queue through the real PostgREST -----------------------------------------------------


@pytest.fixture(scope="module")
def stack(pg_server: PostgresServer, shared_db: Conn) -> Iterator[SupabaseStack]:
    yield from module_stack(pg_server, shared_db.info.dbname)


def _headers(stack: SupabaseStack, role: str, world: World) -> dict[str, str]:
    """What a client sends: the anon key (with a user's token) or the service-role key."""
    if role == "service_role":
        token = key = stack.service_role_key
    else:
        key = stack.anon_key
        user = {"owner": world.owner, "stranger": world.stranger}.get(role)
        token = stack.anon_key if user is None else stack.user_token(user)
    return {"apikey": key, "Authorization": f"Bearer {token}"}


CLAIM_ARGS = {"p_worker": "intruder", "p_limit": 10, "p_lease_seconds": 600, "p_max_attempts": 5}


@pytest.mark.parametrize(("role", "status"), [("anon", 401), ("owner", 403), ("stranger", 403)])
def test_claim_through_postgrest_is_refused_to_client_keys(
    shared_db: Conn, world: World, stack: SupabaseStack, role: str, status: int
) -> None:
    """With the anon key, or the anon key plus a user's token: PostgreSQL refuses EXECUTE
    (42501), which PostgREST answers 401 (anonymous) or 403 (signed in); nothing is leased."""
    response = httpx.post(
        f"{stack.url}/rest/v1/rpc/image_jobs_claim",
        json=CLAIM_ARGS,
        headers=_headers(stack, role, world),
        timeout=10,
    )
    assert response.status_code == status, response.text
    assert response.json()["code"] == "42501"
    assert response.json()["message"] == "permission denied for function image_jobs_claim"
    leased = shared_db.execute(
        "select count(*) as n from image_queue.jobs where lease_holder = 'intruder'"
    ).fetchone()
    assert leased == {"n": 0}


@pytest.mark.parametrize("role", CLIENT_ROLES)
def test_every_public_function_through_postgrest_matches_the_matrix(
    shared_db: Conn, world: World, stack: SupabaseStack, role: str
) -> None:
    """Each function in public, called over /rpc with its argument names (all null, except
    is_chat_owner's): the cells denied in SQL are denied over HTTP too (401/403 with 42501, or
    404 PGRST202 where PostgREST does not expose it at all, as for trigger functions)."""
    for function in our_functions(shared_db):
        schema, name = function["name"].split(".")
        if schema != "public":
            continue
        args = {arg: None for arg in function["arg_names"]}
        if name == "is_chat_owner":
            args = {"p_chat_id": str(world.owner_chat)}
        response = httpx.post(
            f"{stack.url}/rest/v1/rpc/{name}",
            json=args,
            headers=_headers(stack, role, world),
            timeout=10,
        )
        expected = FUNCTION_MATRIX[function["name"]][role]
        if isinstance(expected, Returns):
            assert (response.status_code, response.json()) == (200, expected.value), name
            continue
        if isinstance(expected, Executes):  # ran: answered, or refused by its own rule
            assert response.status_code not in (401, 403), (name, response.text)
            assert response.json() is None or "42501" not in response.text, (name, response.text)
            continue
        assert isinstance(expected, Denied), name
        code = response.json()["code"]
        assert (response.status_code, code) in {
            (401 if role == "anon" else 403, "42501"),
            (404, "PGRST202"),
        }, (name, response.text)
        if code == "42501":
            assert response.json()["message"] == expected.message


@pytest.mark.parametrize("role", ROLES)
def test_the_job_table_is_not_exposed_by_postgrest(
    world: World, stack: SupabaseStack, role: str
) -> None:
    """image_queue is not in PostgREST's schemas: GET /jobs is 404 for every key, and asking
    for the schema by header is refused (406 PGRST106) rather than served."""
    headers = _headers(stack, role, world)
    plain = httpx.get(f"{stack.url}/rest/v1/jobs", headers=headers, timeout=10)
    assert plain.status_code == 404, plain.text
    read = httpx.get(
        f"{stack.url}/rest/v1/jobs", headers=headers | {"Accept-Profile": "image_queue"}, timeout=10
    )
    write = httpx.post(
        f"{stack.url}/rest/v1/jobs",
        json={"request_id": str(world.reply)},
        headers=headers | {"Content-Profile": "image_queue"},
        timeout=10,
    )
    for switched in (read, write):
        assert (switched.status_code, switched.json()["code"]) == (406, "PGRST106"), switched.text
    lost_reason = httpx.post(
        f"{stack.url}/rest/v1/rpc/lost_reason",
        json={"p_request_id": str(world.request)},
        headers=headers | {"Content-Profile": "image_queue"},
        timeout=10,
    )
    assert (lost_reason.status_code, lost_reason.json()["code"]) == (406, "PGRST106")
