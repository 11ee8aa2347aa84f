"""Hostile input from the frontend. Whatever a signed-in user puts in an insert is either refused
by the database with a clear message (a SQLSTATE and text naming the problem) or ends in exactly
one final reply once a listener has drained the queue; the worker never crashes and logs no
stack trace for a user's mistake.

Property-based (hypothesis) over prompt and options, checked against a reference reading of the
README's contract; then adversarial rows (wrong casing, spoofed roles, someone else's chat, forged
replies, updates, deletes, bursts) both in SQL as PostgREST runs them (tests.support.pg.as_user) and
through the real PostgREST. Accepted rows of many examples are drained once per test.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import OperatorError
from listener.queue.calls import QueueCalls
from listener.queue.postgrest import RpcTransport
from listener.supabase_client import supabase_client
from tests.support.fake_openai import FakeOpenAI
from tests.support.module_stack import module_stack
from tests.support.pg import PostgresServer, as_service_role, as_user
from tests.support.queue_helpers import job_of, new_chat, reply_of
from tests.support.supabase_stack import SupabaseStack
from tests.support.worker_rig import Rig

Conn = psycopg.Connection[dict[str, Any]]

MAX_PROMPT = 32_000
ALLOWED_KEYS = (
    "size",
    "quality",
    "background",
    "output_format",
    "partial_images",
    "edit_of",
    "references",
    "mask",
    "input_fidelity",
)
#: the edit options' rules are checked exactly in tests/sql/test_edits.py; here, a refusal of
#: one of them must at least name it
EDIT_REFUSAL = re.compile(r"option (edit_of|references|mask|input_fidelity)[ :].*", re.S)
CHOICES = {
    "quality": ("low", "medium", "high", "auto"),
    "background": ("transparent", "opaque", "auto"),
    "output_format": ("png", "jpeg", "webp"),
}
#: exactly what Python's str.strip() removes, which the README calls "trimming"
UNICODE_WHITESPACE = "".join(ch for ch in map(chr, range(0x3001)) if ch.isspace())
#: stands for SQL NULL in `options` (Python None is the JSON value null)
SQL_NULL = object()
INSERT = (
    "insert into public.messages (chat_id, role, content, message_type, options)"
    " values (%s, 'user', %s, 'image', %s::jsonb) returning id"
)
NOT_AN_OBJECT = "options must be a JSON object"
SIZE_SHAPE = 'option size must be "auto" or "WIDTHxHEIGHT" such as "1024x1024"'
UNKNOWN_OPTION = re.compile(
    r"unknown image option\(s\): .*; allowed: size, quality, background, output_format,"
    r" partial_images, edit_of, references, mask, input_fidelity",
    re.S,
)
TRANSPARENT_JPEG = "a transparent background needs output_format png or webp"
PARTIAL_IMAGES = "option partial_images must be a whole number from 0 to 3"
CHOICE = {
    key: f"option {key} must be one of {', '.join(allowed)}" for key, allowed in CHOICES.items()
}
RLS_VIOLATION = 'new row violates row-level security policy for table "messages"'


# --- the contract as the README states it: the reference the database is checked against ----


def size_refusals(size: object) -> set[str]:
    """Messages a bad ``size`` may be refused with ("auto" or WIDTHxHEIGHT, multiples of 16, at
    most 3840 a side and 3840x2160 in area, ratio within 3:1); empty when it is valid."""
    if size == "auto":
        return set()
    # WIDTHxHEIGHT: plain ASCII decimals, no sign, no leading zero, lower-case x, nothing else
    match = re.fullmatch(r"([1-9][0-9]*)x([1-9][0-9]*)", size) if isinstance(size, str) else None
    if match is None:
        return {SIZE_SHAPE}
    too_big = f"option size {size}: at most 3840 pixels a side and 3840x2160 in all"
    not_multiples = f"option size {size}: width and height must be multiples of 16"
    # the database's pattern takes 2 to 5 digits a side: outside that either message names it
    if max(len(match[1]), len(match[2])) > 5:
        return {SIZE_SHAPE, too_big}
    if min(len(match[1]), len(match[2])) == 1:
        return {SIZE_SHAPE, not_multiples}
    width, height = int(match[1]), int(match[2])
    if width % 16 or height % 16:
        return {not_multiples}
    if max(width, height) > 3840 or width * height > 3840 * 2160:
        return {too_big}
    if max(width, height) > 3 * min(width, height):
        return {f"option size {size}: the aspect ratio must be between 1:3 and 3:1"}
    return set()


def contract_refusals(prompt: str, options: object) -> set[str | re.Pattern[str]]:
    """Every message the database may refuse this request with (it reports the first problem
    it finds); empty when the README's contract says the request is valid."""
    problems: set[str | re.Pattern[str]] = set()
    stripped = prompt.strip()
    if not stripped:
        problems.add("the image prompt is empty")
    elif len(stripped) > MAX_PROMPT:
        problems.add(
            f"the image prompt is too long: {len(stripped)} characters, the limit is {MAX_PROMPT}"
        )
    if not isinstance(options, dict):
        return problems | {NOT_AN_OBJECT}
    if any(key not in ALLOWED_KEYS for key in options):
        problems.add(UNKNOWN_OPTION)
    if "size" in options:
        problems |= size_refusals(options["size"])
    for key, allowed in CHOICES.items():
        if key in options and options[key] not in allowed:
            problems.add(CHOICE[key])
    if options.get("background") == "transparent" and options.get("output_format") == "jpeg":
        problems.add(TRANSPARENT_JPEG)
    if any(key in options for key in ("edit_of", "references", "mask")):
        problems.add(EDIT_REFUSAL)  # no reply or upload of the user exists here: refused
    if "input_fidelity" in options:
        problems.add(EDIT_REFUSAL)  # without edit_of or references it is refused too
    if "partial_images" in options:
        value = options["partial_images"]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or value not in (0, 1, 2, 3):
            problems.add(PARTIAL_IMAGES)
    return problems


def has_nul(value: object) -> bool:
    """A NUL anywhere in a JSON value's strings (PostgreSQL's jsonb cannot store it)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(has_nul(k) or has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_nul(v) for v in value)
    return False


def matches_one(message: str, allowed: set[str | re.Pattern[str]]) -> bool:
    return any(p.fullmatch(message) if isinstance(p, re.Pattern) else p == message for p in allowed)


# --- inserting as a signed-in user, and what came of it ---------------------------------------


@dataclass(frozen=True)
class Refused:
    """An insert the driver or the database turned down."""

    sqlstate: str | None  # None: refused by the driver before anything was sent
    message: str
    detail: str | None = None


def options_param(options: object) -> str | None:
    return None if options is SQL_NULL else json.dumps(options)


def try_insert(db: Conn, user: uuid.UUID, chat: uuid.UUID, prompt: str, options: object) -> Any:
    """The request's id, or how it was refused. Only the driver's and database's own errors
    count as a refusal: anything else (a crash) propagates and fails the test."""
    try:
        with as_user(db, user):
            row = db.execute(INSERT, (chat, prompt, options_param(options))).fetchone()
    except psycopg.Error as exc:
        return Refused(exc.sqlstate, exc.diag.message_primary or str(exc), exc.diag.message_detail)
    except UnicodeEncodeError as exc:  # a lone surrogate cannot be encoded as UTF-8
        return Refused(None, str(exc))
    assert row is not None
    return row["id"]


def check_refusal_is_expected(outcome: Any, prompt: str, options: object) -> bool:
    """Assert the outcome is what the contract says; True when the request was accepted."""
    if "\x00" in prompt:
        assert outcome == Refused(None, "PostgreSQL text fields cannot contain NUL (0x00) bytes")
        return False
    if options is not SQL_NULL and has_nul(options):
        assert isinstance(outcome, Refused), outcome
        assert (outcome.sqlstate, outcome.message) == (
            "22P05",
            "unsupported Unicode escape sequence",
        )
        assert outcome.detail == "\\u0000 cannot be converted to text."
        return False
    expected = contract_refusals(prompt, None if options is SQL_NULL else options)
    if not expected:
        assert isinstance(outcome, uuid.UUID), f"a valid request was refused: {outcome}"
        return True
    assert isinstance(outcome, Refused), f"accepted although {expected}"
    assert outcome.sqlstate == "23514", outcome
    assert matches_one(outcome.message, expected), (outcome.message, expected)
    return False


def assert_no_stack_trace_logged(logs: list[dict[str, Any]]) -> None:
    """A user's mistake is a `request_finished` line, never an error or a traceback."""
    bad = [
        event
        for event in logs
        if event.get("exc_info")
        or event.get("exception")
        or event.get("log_level") in ("error", "critical")
        or "Traceback" in repr(event)
    ]
    assert bad == []


async def drain(rig: Rig) -> list[dict[str, Any]]:
    """Run the in-process worker until the queue is empty; its structlog events."""
    with structlog.testing.capture_logs() as logs:
        await rig.drain(limit_seconds=60)
    assert_no_stack_trace_logged(logs)
    return logs


def only_final_reply(db: Conn, request: uuid.UUID) -> dict[str, Any]:
    replies = reply_of(db, request)
    assert len(replies) == 1, replies
    assert replies[0]["status"] in ("complete", "failed"), replies[0]
    assert job_of(db, request) is None, "a final request leaves no job behind"
    return replies[0]


def assert_user_safe(error: str, options: dict[str, Any]) -> None:
    """What a user reads: short plain sentences, no stack, no exception name, no SQL (apart
    from the user's own option names, which it may quote)."""
    assert 0 < len(error) < 400, error
    for key in sorted(options, key=len, reverse=True):
        error = error.replace(key[:40], "")
    for leak in ("Traceback", "Error:", "psycopg", "SQLSTATE", "exc_info"):
        assert leak not in error, error


@pytest.fixture
def rig(database_url: str, fake_openai: FakeOpenAI, tmp_path: Path) -> Rig:
    return Rig(database_url, fake_openai, tmp_path / "images")


# --- strategies -----------------------------------------------------------------------------

#: characters a frontend's users really type or paste, and some that trip parsers up
SPECIAL = [
    "\U0001f600",  # emoji
    "\U0001f469\u200d\U0001f4bb",  # ZWJ sequence
    "\U0001f3f3\ufe0f\u200d\U0001f308",  # flag with variation selector
    "\u05e9\u05dc\u05d5\u05dd",  # Hebrew (RTL)
    "\u0645\u0631\u062d\u0628\u0627",  # Arabic (RTL)
    "\u200e",
    "\u200f",
    "\u202a",
    "\u202b",
    "\u202e",  # right-to-left override
    "\u2066",
    "\u2069",
    "a\u0301",  # combining acute
    "\u0301\u0302\u0303",  # combining marks with no base
    "Z\u0334\u0321\u031b\u0356\u0350a\u0338l\u0337g\u0336o\u0335",  # zalgo
    "\u200b",  # zero-width space: not whitespace, not trimmed
    "\ufeff",  # byte order mark: not whitespace either
    "\u2060",
    "\u180e",  # was whitespace in old Unicode versions
    "\uffff",
    "\ufffe",
    "\U0010fffd",
    "\x1b[31m",
    "'; drop table public.messages; --",
    '"',
    "\\",
    "%s",
    "$1",
    "\r\n",
]
#: any Unicode text that UTF-8 can encode: lone surrogates have a test of their own
TEXT_CHARS = st.characters(codec="utf-8")
PROMPT_PIECES = st.sampled_from(SPECIAL) | TEXT_CHARS
WHITESPACE = st.text(alphabet=UNICODE_WHITESPACE, max_size=4)
BULK_UNITS = ["a", "\u00e9", "\U0001f600", "\u05e9", "a\u0301", "\U0001f469\u200d\U0001f4bb"]


def _bulk(unit: str, target: int, left: str, right: str) -> str:
    """``target`` code points of ``unit`` (topped up with "a"), padded with whitespace."""
    n = target // len(unit)
    return left + unit * n + "a" * (target - n * len(unit)) + right


PROMPTS = st.one_of(
    st.lists(PROMPT_PIECES, max_size=30).map("".join),
    st.builds(
        lambda left, core, right: left + core + right, WHITESPACE, st.text(TEXT_CHARS), WHITESPACE
    ),
    st.builds(
        _bulk,
        st.sampled_from(BULK_UNITS),
        st.sampled_from([0, 1, MAX_PROMPT - 1, MAX_PROMPT, MAX_PROMPT + 1]),
        WHITESPACE,
        WHITESPACE,
    ),
).filter(lambda prompt: "[fake:" not in prompt)  # the fake OpenAI server's directives

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(TEXT_CHARS, max_size=12),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(TEXT_CHARS, max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
HUGE_VALUES = st.sampled_from(
    ["x" * 40_000, "\U0001f525" * 20_000, "1024x1024" * 1000, 10**1000, -(10**300), 1e308]
)
SIZES = st.sampled_from(
    [
        *["auto", "1024x1024", "1536x1024", "16x16", "3840x2160", "2160x3840", "1024x3072"],
        *["3088x1024", "3840x3840", "1000x1000", "0x0", "0016x16", "-16x16", "16x16x16"],
        *["1024X1024", "1024\u00d71024", "\uff11\uff10\uff12\uff14x\uff11\uff10\uff12\uff14"],
        *["\u0661\u0660\u0662\u0664x\u0661\u0660\u0662\u0664", "1024x1024\n", " 1024x1024"],
        *["Auto", "AUTO", "", "99984x99984", "100000x16", "1024x1024\x00"],
    ]
) | st.builds(
    "{}x{}".format,
    st.integers(0, 5000) | st.integers(1, 240).map(lambda k: 16 * k),
    st.integers(0, 5000) | st.integers(1, 240).map(lambda k: 16 * k),
)
OPTION_VALUES = {
    "size": SIZES | JSON_VALUES | HUGE_VALUES,
    **{
        key: st.sampled_from([*allowed, allowed[0].upper(), f" {allowed[0]}", f"{allowed[0]}\n"])
        | st.sampled_from(["hd", "standard", "1", "\u200b" + allowed[-1]])
        | JSON_VALUES
        | HUGE_VALUES
        for key, allowed in CHOICES.items()
    },
}
OPTION_OBJECTS = st.fixed_dictionaries({}, optional=OPTION_VALUES)
UNKNOWN_KEYS = st.text(TEXT_CHARS, max_size=10) | st.sampled_from(
    ["Size", "n", "model", "prompt", "size ", "\uff53ize", "x" * 1000, "\x00", "\u202esize"]
)
VALID_OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "size": st.sampled_from(["auto", "1024x1024", "1536x1024", "16x16", "2160x3840"]),
        **{key: st.sampled_from(allowed) for key, allowed in CHOICES.items()},
    },
).filter(lambda o: not (o.get("background") == "transparent" and o.get("output_format") == "jpeg"))
OPTIONS = st.one_of(
    VALID_OPTIONS,  # about half the examples should pass, to be served end to end
    VALID_OPTIONS,
    VALID_OPTIONS,
    OPTION_OBJECTS,
    OPTION_OBJECTS,
    st.builds(
        lambda known, extra: {**extra, **known},
        OPTION_OBJECTS,
        st.dictionaries(UNKNOWN_KEYS, JSON_VALUES | HUGE_VALUES, min_size=1, max_size=3),
    ),
    JSON_VALUES,  # anything at all, objects or not
    st.just(SQL_NULL),
)


def core_leniency(options: object) -> object:
    """core/validation treats a JSON null quality/background/output_format as "not given" (the
    database refuses it, so only a row that bypassed the trigger reaches the worker with one)."""
    if not isinstance(options, dict):
        return options
    return {k: v for k, v in options.items() if not (v is None and k in CHOICES)}


# --- property-based ---------------------------------------------------------------------------


async def test_random_requests_are_refused_clearly_or_answered_exactly_once(
    db: Conn, rig: Rig, fake_openai: FakeOpenAI
) -> None:
    """Refused ones are refused with the message the contract predicts; accepted ones complete
    with the trimmed prompt sent once. Then the refused ones are inserted again around the
    validation trigger: the worker's own validation must fail each with a user-safe reason."""
    user, chat = new_chat(db)
    accepted: dict[uuid.UUID, tuple[str, Any]] = {}
    bypass: list[tuple[str, Any]] = []

    @settings(
        max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "200")),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(prompt=PROMPTS, options=OPTIONS)
    def insert_one(prompt: str, options: Any) -> None:
        outcome = try_insert(db, user, chat, prompt, options)
        if check_refusal_is_expected(outcome, prompt, options):
            accepted[outcome] = (prompt, options)
        elif (
            isinstance(outcome, Refused)
            and outcome.sqlstate == "23514"
            and isinstance(options, dict)
        ):
            bypass.append((prompt, options))

    insert_one()
    assert accepted, "hypothesis generated no valid request at all"
    assert bypass, "hypothesis generated no request refused by the trigger"

    bypassed: dict[uuid.UUID, tuple[str, Any]] = {}
    db.execute("alter table public.messages disable trigger messages_validate")
    try:
        for prompt, options in bypass:
            request = try_insert(db, user, chat, prompt, options)
            assert isinstance(request, uuid.UUID), request
            bypassed[request] = (prompt, options)
    finally:
        db.execute("alter table public.messages enable trigger messages_validate")

    await drain(rig)

    sent: Counter[str] = Counter()
    for request, (prompt, options) in accepted.items():
        reply = only_final_reply(db, request)
        assert reply["status"] == "complete", (prompt[:80], options, reply["error"])
        assert reply["content"] == f'Image generated from prompt: "{prompt}"'
        assert reply["metadata"]["size"] == options.get("size", "1024x1024")
        sent[prompt.strip()] += 1
    for request, (prompt, options) in bypassed.items():
        reply = only_final_reply(db, request)
        if not contract_refusals(prompt, core_leniency(options)):
            assert reply["status"] == "complete"
            sent[prompt.strip()] += 1
            continue
        assert reply["status"] == "failed", (prompt[:80], options)
        assert reply["metadata"]["error_code"] == "invalid_request"
        assert_user_safe(reply["error"], options)
    assert Counter(fake_openai.call_counts()) == sent, "each valid request sent once, trimmed"


def test_lone_surrogates_are_refused_by_the_driver_before_anything_is_sent(db: Conn) -> None:
    """A Python str holding a lone surrogate is not Unicode text: the driver cannot encode it as
    UTF-8 and refuses it (UnicodeEncodeError, "surrogates not allowed") before sending; the
    connection stays usable and nothing is stored. Over HTTP the same escape is invalid JSON
    (test_anon_and_bad_bodies_through_postgrest)."""
    user, chat = new_chat(db)

    @settings(max_examples=30, deadline=None)
    @given(
        prompt=st.builds(
            lambda before, lone, after: before + lone + after,
            st.text(max_size=5),
            st.characters(categories=["Cs"]),
            st.text(max_size=5),
        ),
        options=st.sampled_from([{}, {"size": "auto"}]),
    )
    def insert_one(prompt: str, options: Any) -> None:
        outcome = try_insert(db, user, chat, prompt, options)
        assert isinstance(outcome, Refused)
        assert outcome.sqlstate is None
        if "\x00" in prompt:  # refused for whichever the driver meets first
            assert outcome.message.startswith(("PostgreSQL text fields cannot", "'utf-8' codec"))
            return
        assert re.fullmatch(
            r"'utf-8' codec can't encode character '\\ud[89a-f][0-9a-f]{2}' in position \d+:"
            r" surrogates not allowed",
            outcome.message,
        ), outcome.message

    insert_one()
    assert db.execute("select count(*) as n from public.messages").fetchone() == {"n": 0}
    assert isinstance(try_insert(db, user, chat, "still usable", {}), uuid.UUID)


NUL_DETAIL = "\\u0000 cannot be converted to text."
SURROGATE_DETAIL = "Unicode low surrogate must follow a high surrogate."
RAW_REFUSALS = [
    pytest.param(
        "a\x00b",
        "{}",
        Refused(None, "PostgreSQL text fields cannot contain NUL (0x00) bytes"),
        id="nul-in-prompt",
    ),
    pytest.param(
        "fox",
        '{"size": "\\u0000"}',
        Refused("22P05", "unsupported Unicode escape sequence", NUL_DETAIL),
        id="nul-in-option-value",
    ),
    pytest.param(
        "fox",
        '{"\\u0000": 1}',
        Refused("22P05", "unsupported Unicode escape sequence", NUL_DETAIL),
        id="nul-in-option-key",
    ),
    pytest.param(
        "fox",
        '{"size": "\\ud800"}',
        Refused("22P02", "invalid input syntax for type json", SURROGATE_DETAIL),
        id="lone-high-surrogate-escape",
    ),
    pytest.param(
        "fox",
        '{"size": "\\udc00"}',
        Refused("22P02", "invalid input syntax for type json", SURROGATE_DETAIL),
        id="lone-low-surrogate-escape",
    ),
]


@pytest.mark.parametrize(("prompt", "raw", "expected"), RAW_REFUSALS)
def test_nul_and_surrogate_escapes_are_refused_with_a_message_naming_them(
    shared_db: Conn, shared_world: World, prompt: str, raw: str, expected: Refused
) -> None:
    """NUL in text is refused by the driver; NUL or a lone surrogate escape inside JSON options
    by PostgreSQL (22P05, 22P02), each with a message and detail naming it."""
    with pytest.raises(psycopg.Error) as refused, as_user(shared_db, shared_world.owner):
        shared_db.execute(INSERT, (shared_world.chat, prompt, raw))
    diag = refused.value.diag
    got = Refused(
        refused.value.sqlstate, diag.message_primary or str(refused.value), diag.message_detail
    )
    assert got == expected


DEEP = "[" * 3000 + "]" * 3000
HUGE_INT = "1" + "0" * 5000
INVALID_JSON = re.compile("invalid input syntax for type json")
RAW_REFUSED = [
    pytest.param(f'{{"size": {DEEP}}}', "23514", SIZE_SHAPE, id="deep-nesting-as-size"),
    pytest.param(f'{{"nest": {DEEP}}}', "23514", UNKNOWN_OPTION, id="deep-nesting-unknown-key"),
    pytest.param(f'{{"quality": {HUGE_INT}}}', "23514", CHOICE["quality"], id="huge-int"),
    pytest.param('{"quality": 1e400}', "23514", CHOICE["quality"], id="1e400"),
    pytest.param('{"quality": NaN}', "22P02", INVALID_JSON, id="nan-token"),
    pytest.param('{"quality": Infinity}', "22P02", INVALID_JSON, id="infinity-token"),
    pytest.param('{"size": "auto",}', "22P02", INVALID_JSON, id="trailing-comma"),
    pytest.param('{"size": "\\ud83d\\ude00"}', "23514", SIZE_SHAPE, id="escaped-surrogate-pair"),
]


@pytest.mark.parametrize(("raw", "sqlstate", "message"), RAW_REFUSED)
def test_raw_json_options_are_refused_with_a_message_naming_the_problem(
    shared_db: Conn, shared_world: World, raw: str, sqlstate: str, message: Any
) -> None:
    """JSON texts no Python dict produces (deep nesting, huge numbers, bad tokens): refused with
    a SQLSTATE and a short message naming the problem (never echoing the huge value)."""
    with pytest.raises(psycopg.Error) as refused, as_user(shared_db, shared_world.owner):
        shared_db.execute(INSERT, (shared_world.chat, "a fox", raw))
    text = refused.value.diag.message_primary or ""
    assert refused.value.sqlstate == sqlstate
    assert matches_one(text, {message}), text


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param('{"size": "big", "size": "auto"}', id="duplicate-key-last-wins"),
        pytest.param(' {"size": "auto"} ', id="outer-whitespace"),
        pytest.param('{"size": "\\u0061uto"}', id="escaped-auto"),
    ],
)
async def test_raw_json_options_that_mean_a_valid_request_are_served(
    db: Conn, rig: Rig, raw: str
) -> None:
    user, chat = new_chat(db)
    with as_user(db, user):
        row = db.execute(INSERT, (chat, "a fox", raw)).fetchone()
    assert row is not None
    await drain(rig)
    assert only_final_reply(db, row["id"])["status"] == "complete"


# --- the worker against rows that bypassed the trigger ---------------------------------------

POISON_OPTIONS = [
    pytest.param(f'{{"nest": {DEEP}}}', id="nesting-deeper-than-python-recursion"),
    pytest.param(f'{{"n": {HUGE_INT}}}', id="integer-longer-than-python-int-parses"),
]


@pytest.mark.parametrize("raw", POISON_OPTIONS)
async def test_options_the_driver_cannot_decode_fail_alone_without_crashing_the_worker(
    db: Conn, rig: Rig, raw: str
) -> None:
    """A row that slipped past the trigger with options PostgreSQL stores but Python's json
    cannot load. Before the fix the claim itself raised (RecursionError / ValueError) and the
    worker died; the jobs claimed with it were leased and their attempts counted, so they were
    taken over together again and again until every one of them was failed as exhausted."""
    user, chat = new_chat(db)
    db.execute("alter table public.messages disable trigger messages_validate")
    try:
        with as_user(db, user):
            poison = db.execute(INSERT, (chat, "poison", raw)).fetchone()
    finally:
        db.execute("alter table public.messages enable trigger messages_validate")
    assert poison is not None
    neighbours = []
    for i in range(3):  # claimed in the same batch as the poison (concurrency 4)
        outcome = try_insert(db, user, chat, f"neighbour {i}", {})
        assert isinstance(outcome, uuid.UUID)
        neighbours.append(outcome)

    await drain(rig)

    reply = only_final_reply(db, poison["id"])
    assert reply["status"] == "failed"
    assert reply["metadata"]["error_code"] == "invalid_request"
    assert reply["error"] == "The options are invalid."
    for request in neighbours:
        assert only_final_reply(db, request)["status"] == "complete"


@pytest.mark.parametrize("raw", POISON_OPTIONS)
async def test_supabase_claim_of_undecodable_options_is_an_error_not_a_crash(
    db: Conn, supabase_stack: SupabaseStack, raw: str
) -> None:
    """Over PostgREST the whole claim answer is one JSON document, so the poisoned row cannot be
    singled out on our side (see the report: the SQL could); the claim must still fail as one
    of our errors, which the worker logs and backs off from, instead of killing the daemon."""
    user, chat = new_chat(db)
    db.execute("alter table public.messages disable trigger messages_validate")
    try:
        with as_user(db, user):
            db.execute(INSERT, (chat, "poison", raw))
    finally:
        db.execute("alter table public.messages enable trigger messages_validate")
    async with supabase_client(
        supabase_stack.url, supabase_stack.service_role_key, http_timeout=10
    ) as client:
        store = QueueCalls(RpcTransport(client, call_timeout=10))
        with pytest.raises(OperatorError, match="could not be decoded"):
            await store.claim("hostile-test", 4, 30, 3)


# --- adversarial rows, in SQL and through the real PostgREST ---------------------------------


@dataclass(frozen=True)
class World:
    owner: uuid.UUID
    stranger: uuid.UUID
    chat: uuid.UUID  # the owner's
    stranger_chat: uuid.UUID
    request: uuid.UUID  # the owner's request
    reply: uuid.UUID  # its assistant reply
    stranger_request: uuid.UUID


def build_world(db: Conn) -> World:
    owner, chat = new_chat(db)
    stranger, stranger_chat = new_chat(db)
    ids = []
    for user, in_chat in ((owner, chat), (stranger, stranger_chat)):
        outcome = try_insert(db, user, in_chat, "a red fox", {})
        assert isinstance(outcome, uuid.UUID)
        ids.append(outcome)
    with as_service_role(db):
        row = db.execute(  # the reply the insert created ('queued'), as a claim leaves it
            "update public.messages set status = 'generating', content = 'Generating image...'"
            " where reply_to = %s returning id",
            (ids[0],),
        ).fetchone()
    assert row is not None
    return World(owner, stranger, chat, stranger_chat, ids[0], row["id"], ids[1])


@pytest.fixture(scope="module")
def shared_world(shared_db: Conn) -> World:
    return build_world(shared_db)


@pytest.fixture(scope="module")
def shared_stack(pg_server: PostgresServer, shared_db: Conn) -> Iterator[SupabaseStack]:
    """The real PostgREST in front of shared_db."""
    yield from module_stack(pg_server, shared_db.info.dbname)


def user_headers(stack: SupabaseStack, user: uuid.UUID | None) -> dict[str, str]:
    """What supabase-js sends: the anon key, plus the user's access token when signed in."""
    token = stack.anon_key if user is None else stack.user_token(user)
    return {"apikey": stack.anon_key, "Authorization": f"Bearer {token}"}


@dataclass(frozen=True)
class Forged:
    """A row a frontend could send, the SQLSTATE it must be refused with, and the HTTP status
    PostgREST must answer with."""

    row: dict[str, Any]
    sqlstate: str
    message: str
    http_status: int


def _row(world: World, **changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "chat_id": str(world.chat),
        "role": "user",
        "message_type": "image",
        "content": "a red fox",
    }
    for key, value in changes.items():
        row[key] = (
            str(getattr(world, value[1:])) if isinstance(value, str) and value[:1] == "@" else value
        )
    return row


CASING = "message_type must be 'text' or 'image' in lower case (got '{}')"
ROLE = "role must be one of user, assistant, system (got {})"
CHAT_NOT_FOUND = "chat {chat_id} not found"
FORGED = {
    "message-type-IMAGE": ({"message_type": "IMAGE"}, "23514", CASING.format("IMAGE"), 400),
    "message-type-Image": ({"message_type": "Image"}, "23514", CASING.format("Image"), 400),
    "message-type-trailing-space": (
        {"message_type": "image "},
        "23514",
        CASING.format("image "),
        400,
    ),
    "role-assistant": ({"role": "assistant"}, "42501", RLS_VIOLATION, 403),
    "role-system": ({"role": "system"}, "42501", RLS_VIOLATION, 403),
    "role-Assistant": ({"role": "Assistant"}, "23514", ROLE.format("'Assistant'"), 400),
    "role-USER": ({"role": "USER"}, "23514", ROLE.format("'USER'"), 400),
    "role-null": ({"role": None}, "23514", ROLE.format("null"), 400),
    # someone else's chat gets exactly the answer of a chat that does not exist
    "someone-elses-chat": ({"chat_id": "@stranger_chat"}, "23514", CHAT_NOT_FOUND, 400),
    "chat-that-does-not-exist": (
        {"chat_id": "00000000-0000-4000-8000-000000000000"},
        "23514",
        CHAT_NOT_FOUND,
        400,
    ),
    "no-chat-id": ({"chat_id": None}, "23502", "chat_id is required", 400),
    "claims-to-be-the-reply": (
        {
            "role": "assistant",
            "reply_to": "@request",
            "status": "complete",
            "image_url": "https://evil.example/x.png",
            "metadata": {"model": "forged"},
        },
        "42501",
        RLS_VIOLATION,
        403,
    ),
    "user-row-with-reply-to": ({"reply_to": "@request"}, "42501", RLS_VIOLATION, 403),
    "user-row-with-status": ({"status": "complete"}, "42501", RLS_VIOLATION, 403),
    "user-row-with-metadata": ({"metadata": {"attempt": 1}}, "42501", RLS_VIOLATION, 403),
    "null-content": (
        {"content": None},
        "23502",
        'null value in column "content" of relation "messages" violates not-null constraint',
        400,
    ),
    "own-reply-id": ({"id": "@reply"}, "23505", "duplicate key value violates", 409),
    "someone-elses-request-id": (
        {"id": "@stranger_request"},
        "23505",
        "duplicate key value violates",
        409,
    ),
}


def _forged(world: World, case: str) -> Forged:
    changes, sqlstate, message, status = FORGED[case]
    row = _row(world, **changes)
    return Forged(row, sqlstate, message.replace("{chat_id}", str(row["chat_id"])), status)


def _insert_sql(db: Conn, user: uuid.UUID, row: dict[str, Any]) -> None:
    names = ", ".join(row)
    values = ", ".join("%s::jsonb" if k in ("metadata", "options") else "%s" for k in row)
    params = [json.dumps(v) if isinstance(v, dict) else v for v in row.values()]
    with as_user(db, user):
        db.execute(f"insert into public.messages ({names}) values ({values})", params)


def _snapshot(db: Conn) -> list[dict[str, Any]]:
    return db.execute(
        "select m.*, j.state, j.attempts from public.messages m"
        " left join image_queue.jobs j on j.request_id = m.id order by m.id"
    ).fetchall()


@pytest.mark.parametrize("case", list(FORGED))
def test_forged_row_is_refused_alike_in_sql_and_through_postgrest(
    shared_db: Conn, shared_world: World, shared_stack: SupabaseStack, case: str
) -> None:
    """The same row, inserted by the owner in SQL (role + JWT claims) and over HTTP: the same
    SQLSTATE and message both ways, the HTTP status PostgREST maps it to, nothing changed."""
    forged = _forged(shared_world, case)
    before = _snapshot(shared_db)

    with pytest.raises(psycopg.Error) as refused:
        _insert_sql(shared_db, shared_world.owner, forged.row)
    assert refused.value.sqlstate == forged.sqlstate
    assert (refused.value.diag.message_primary or "").startswith(forged.message)

    response = httpx.post(
        f"{shared_stack.url}/rest/v1/messages",
        json=forged.row,
        headers=user_headers(shared_stack, shared_world.owner),
        timeout=10,
    )
    assert response.status_code == forged.http_status, response.text
    body = response.json()
    assert body["code"] == forged.sqlstate
    assert body["message"].startswith(forged.message)
    assert _snapshot(shared_db) == before


def test_owner_cannot_edit_a_reply_or_a_request_through_postgrest(
    shared_db: Conn, shared_world: World, shared_stack: SupabaseStack
) -> None:
    """PATCH and upsert need UPDATE, which no client role has on messages: 403 / 42501."""
    before = _snapshot(shared_db)
    url = f"{shared_stack.url}/rest/v1/messages"
    headers = user_headers(shared_stack, shared_world.owner)
    attempts = [
        httpx.patch(
            url,
            params={"id": f"eq.{shared_world.reply}"},
            json={"status": "complete", "image_url": "https://evil.example/x.png"},
            headers=headers,
        ),
        httpx.patch(
            url, params={"id": f"eq.{shared_world.request}"}, json={"content": "x"}, headers=headers
        ),
        httpx.post(  # an upsert onto the reply's id
            url,
            json=_row(shared_world, id="@reply", content="overwritten"),
            headers=headers | {"Prefer": "resolution=merge-duplicates"},
        ),
    ]
    for response in attempts:
        assert response.status_code == 403, response.text
        assert response.json()["code"] == "42501"
        assert response.json()["message"] == "permission denied for table messages"
    ignored = httpx.post(  # ON CONFLICT DO NOTHING: needs no UPDATE, and must change nothing
        url,
        json=_row(shared_world, id="@stranger_request", content="overwritten"),
        headers=headers | {"Prefer": "resolution=ignore-duplicates,return=representation"},
    )
    assert (ignored.status_code, ignored.json()) == (201, [])
    assert _snapshot(shared_db) == before


def test_deletes_reach_only_the_users_own_requests(db: Conn, supabase_stack: SupabaseStack) -> None:
    """A stranger's delete of the owner's request (by id, or with a match-all filter) deletes
    nothing of the owner's; the owner cannot delete the assistant reply; the owner's own delete
    cancels the request with its job and reply."""
    world = build_world(db)
    url = f"{supabase_stack.url}/rest/v1/messages"
    as_stranger = user_headers(supabase_stack, world.stranger)
    as_owner = user_headers(supabase_stack, world.owner)
    prefer = {"Prefer": "return=representation"}

    by_id = httpx.delete(url, params={"id": f"eq.{world.request}"}, headers=as_stranger | prefer)
    assert (by_id.status_code, by_id.json()) == (200, [])
    everything = httpx.delete(url, params={"id": "not.is.null"}, headers=as_stranger | prefer)
    assert [row["id"] for row in everything.json()] == [str(world.stranger_request)]
    reply = httpx.delete(url, params={"id": f"eq.{world.reply}"}, headers=as_owner | prefer)
    assert (reply.status_code, reply.json()) == (200, [])
    assert job_of(db, world.request) is not None
    assert len(reply_of(db, world.request)) == 1

    own = httpx.delete(url, params={"id": f"eq.{world.request}"}, headers=as_owner | prefer)
    assert [row["id"] for row in own.json()] == [str(world.request)]
    assert job_of(db, world.request) is None
    assert reply_of(db, world.request) == []


def test_anon_and_bad_bodies_through_postgrest(
    shared_db: Conn, shared_world: World, shared_stack: SupabaseStack
) -> None:
    """Without a user token: 401 / 42501. NUL in JSON text: 400 / 22P05. A lone surrogate
    escape or invalid UTF-8 in the body: 400 / PGRST102. Nothing is stored."""
    before = _snapshot(shared_db)
    url = f"{shared_stack.url}/rest/v1/messages"
    owner = user_headers(shared_stack, shared_world.owner) | {"Content-Type": "application/json"}
    row = json.dumps(_row(shared_world))

    anon = httpx.post(
        url,
        content=row,
        headers=user_headers(shared_stack, None) | {"Content-Type": "application/json"},
    )
    assert (anon.status_code, anon.json()["code"]) == (401, "42501")
    assert anon.json()["message"] == "permission denied for table messages"
    bodies = {
        row.replace('"a red fox"', '"a \\u0000 fox"'): (400, "22P05"),
        row.replace('"a red fox"', '"a \\ud800 fox"'): (400, "PGRST102"),
        row.replace(
            '"message_type": "image"', '"message_type": "image", "options": {"\\u0000": 1}'
        ): (
            400,
            "22P05",
        ),
    }
    for body, (status, code) in bodies.items():
        response = httpx.post(url, content=body.encode(), headers=owner)
        assert (response.status_code, response.json()["code"]) == (status, code), body
    invalid_utf8 = row.encode().replace(b"a red fox", b"a \xff\xfe fox")
    response = httpx.post(url, content=invalid_utf8, headers=owner)
    assert (response.status_code, response.json()["code"]) == (400, "PGRST102")
    assert _snapshot(shared_db) == before


# --- bursts -----------------------------------------------------------------------------------

BURST = 2000


async def test_a_burst_in_one_statement_is_all_or_nothing_and_each_gets_one_reply(
    db: Conn, rig: Rig, supabase_stack: SupabaseStack, fake_openai: FakeOpenAI
) -> None:
    """Thousands of requests in one INSERT (SQL) and one bulk POST (PostgREST): a single bad
    row, or a single row in someone else's chat, refuses the whole statement; the good bursts
    are accepted whole, and after one drain every request has exactly one complete reply."""
    user, chat = new_chat(db)
    _stranger, stranger_chat = new_chat(db)
    insert_many = (
        "insert into public.messages (chat_id, role, content, message_type, options)"
        " select case when g = %(odd)s then %(other)s else %(chat)s end, 'user',"
        "        'burst ' || g, case when g = %(bad)s then 'IMAGE' else 'image' end,"
        '        \'{"quality": "low"}\'::jsonb'
        " from generate_series(1, %(n)s) as g"
    )
    args = {"chat": chat, "other": stranger_chat, "n": BURST, "odd": 0, "bad": 0}
    with pytest.raises(psycopg.errors.CheckViolation, match="in lower case"), as_user(db, user):
        db.execute(insert_many, args | {"bad": BURST - 1})
    with (
        pytest.raises(psycopg.errors.CheckViolation, match=f"chat {stranger_chat} not found"),
        as_user(db, user),
    ):
        db.execute(insert_many, args | {"odd": BURST // 2})
    assert db.execute("select count(*) as n from public.messages").fetchone() == {"n": 0}

    with as_user(db, user):
        db.execute(insert_many, args)
    rows = [
        {"chat_id": str(chat), "role": "user", "message_type": "image", "content": f"bulk {i}"}
        for i in range(BURST // 4)
    ]
    url = f"{supabase_stack.url}/rest/v1/messages"
    headers = user_headers(supabase_stack, user)
    bad_rows = [*rows[:-1], {**rows[-1], "role": "Assistant"}]
    async with httpx.AsyncClient(headers=headers, timeout=30) as http:
        refused = await http.post(url, json=bad_rows)
        accepted = await http.post(url, json=rows)
    assert (refused.status_code, refused.json()["code"]) == (400, "23514")
    assert accepted.status_code == 201, accepted.text
    total = BURST + len(rows)
    assert db.execute("select count(*) as n from image_queue.jobs").fetchone() == {"n": total}

    await drain(rig)

    summary = db.execute(
        "select count(*) as requests, count(r.id) as replies,"
        " count(*) filter (where r.status = 'complete') as complete,"
        " (select count(*) from image_queue.jobs) as jobs,"
        " (select count(*) from public.messages where reply_to is not null) as all_replies"
        " from public.messages q left join public.messages r on r.reply_to = q.id"
        " where q.role = 'user'"
    ).fetchone()
    assert summary == {
        "requests": total,
        "replies": total,
        "complete": total,
        "jobs": 0,
        "all_replies": total,
    }
    assert fake_openai.total_calls == total
    assert set(fake_openai.call_counts().values()) == {1}


def test_a_forged_created_at_does_not_move_the_request_in_the_queue(db: Conn) -> None:
    """created_at/updated_at are the frontend's to display; the queue keeps its own clock."""
    user, chat = new_chat(db)
    with as_user(db, user):
        row = db.execute(
            "insert into public.messages (chat_id, role, content, message_type, created_at)"
            " values (%s, 'user', 'backdated', 'image', '2000-01-01Z') returning id",
            (chat,),
        ).fetchone()
    assert row is not None
    job = job_of(db, row["id"])
    assert job is not None
    assert db.execute(
        "select %s >= now() - interval '1 minute' as fresh", (job["run_at"],)
    ).fetchone() == {"fresh": True}


def test_a_huge_prompt_is_refused_with_its_length_not_echoed(
    shared_world: World, shared_stack: SupabaseStack, shared_db: Conn
) -> None:
    """Half a megabyte of prompt (the local gateway takes up to 1 MiB) costs one 400 whose
    message is a line long."""
    row = _row(shared_world, content="\u00e9" * 250_000)
    response = httpx.post(
        f"{shared_stack.url}/rest/v1/messages",
        json=row,
        headers=user_headers(shared_stack, shared_world.owner),
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["message"] == (
        "the image prompt is too long: 250000 characters, the limit is 32000"
    )


def test_a_huge_role_is_refused_without_echoing_it_whole(
    shared_world: World, shared_stack: SupabaseStack
) -> None:
    """message_type is echoed shortened to 40 characters; role must be too, or one request
    makes PostgreSQL log and PostgREST return a message as large as the user's input."""
    response = httpx.post(
        f"{shared_stack.url}/rest/v1/messages",
        json=_row(shared_world, role="x" * 100_000),
        headers=user_headers(shared_stack, shared_world.owner),
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["message"].startswith("role must be one of user, assistant, system")
    assert len(response.json()["message"]) < 300
