"""Logging: one format for our events and libraries', secrets blanked, prompts hashed by default."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from listener.ops.logging import (
    NOISY_LIBRARIES,
    REDACTED,
    configure_logging,
    get_logger,
    prompt_fields,
    redact_secrets,
)

SECRET = "sk-test-4f9Qx2LmZ7"


class _Terminal(io.StringIO):
    """A stream that claims to be a terminal, to exercise the "auto" format choice."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state; put it back so other tests are unaffected."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    library_levels = {name: logging.getLogger(name).level for name in NOISY_LIBRARIES}
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    for name, library_level in library_levels.items():
        logging.getLogger(name).setLevel(library_level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def _json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_auto_format_writes_json_lines_when_stream_is_not_a_terminal() -> None:
    stream = io.StringIO()
    configure_logging("auto", "info", stream)
    get_logger().info("image_stored", size_bytes=123)
    (line,) = _json_lines(stream)
    assert line["event"] == "image_stored"
    assert line["size_bytes"] == 123
    assert line["level"] == "info"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", line["timestamp"])


def test_auto_format_is_human_readable_on_a_terminal() -> None:
    stream = _Terminal()
    configure_logging("auto", "info", stream)
    get_logger().info("image_stored", size_bytes=123)
    output = stream.getvalue()
    assert "image_stored" in output
    assert "size_bytes" in output
    with pytest.raises(json.JSONDecodeError):
        json.loads(output)


def test_explicit_formats_override_terminal_detection() -> None:
    json_on_terminal = _Terminal()
    configure_logging("json", "info", json_on_terminal)
    get_logger().info("hello")
    assert json.loads(json_on_terminal.getvalue())["event"] == "hello"

    console_on_pipe = io.StringIO()
    configure_logging("console", "info", console_on_pipe)
    get_logger().info("hello")
    assert "hello" in console_on_pipe.getvalue()
    assert not console_on_pipe.getvalue().startswith("{")


def test_context_variables_are_merged_into_every_line() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream)
    structlog.contextvars.bind_contextvars(request_id="r-1", attempt=2, worker="w-1")
    get_logger().info("claimed")
    (line,) = _json_lines(stream)
    assert (line["request_id"], line["attempt"], line["worker"]) == ("r-1", 2, "w-1")


def test_level_threshold_drops_lower_events() -> None:
    stream = io.StringIO()
    configure_logging("json", "warning", stream)
    log = get_logger()
    log.info("dropped")
    log.warning("kept")
    assert [line["event"] for line in _json_lines(stream)] == ["kept"]


def test_library_logs_are_held_at_warning_and_rendered_like_ours() -> None:
    """httpx/psycopg INFO chatter is dropped even at debug; their warnings come out as JSON."""
    stream = io.StringIO()
    configure_logging("json", "debug", stream)
    logging.getLogger("httpx").info("HTTP Request: POST https://api.openai.com")
    logging.getLogger("psycopg").debug("connection opened")
    logging.getLogger("psycopg").warning("pool %s is exhausted", "main")
    (line,) = _json_lines(stream)
    assert line == {
        "event": "pool main is exhausted",
        "logger": "psycopg",
        "level": "warning",
        "timestamp": line["timestamp"],
    }


def test_reconfiguring_replaces_the_handler_instead_of_duplicating_lines() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", "info", first)
    configure_logging("json", "info", second)
    get_logger().info("once")
    assert first.getvalue() == ""
    assert len(_json_lines(second)) == 1


def test_secrets_are_redacted_everywhere_in_a_line() -> None:
    """Event text, nested values, exception messages and library logs all lose the secret."""
    stream = io.StringIO()
    configure_logging("json", "info", stream, secrets=[SECRET, ""])
    log = get_logger()
    log.info(f"calling with {SECRET}", headers={"authorization": [f"Bearer {SECRET}"]})
    try:
        raise RuntimeError(f"provider rejected key {SECRET}")
    except RuntimeError:
        log.exception("generation_failed")
    logging.getLogger("httpx").warning("retrying with key=%s", SECRET)
    output = stream.getvalue()
    assert SECRET not in output
    lines = _json_lines(stream)
    assert lines[0]["event"] == f"calling with {REDACTED}"
    assert lines[0]["headers"] == {"authorization": [f"Bearer {REDACTED}"]}
    assert lines[1]["exception"][0]["exc_value"] == f"provider rejected key {REDACTED}"
    assert lines[2]["event"] == f"retrying with key={REDACTED}"


def test_console_format_redacts_secrets_in_tracebacks_too() -> None:
    stream = io.StringIO()
    configure_logging("console", "info", stream, secrets=[SECRET])
    try:
        raise RuntimeError(f"bad key {SECRET}")
    except RuntimeError:
        get_logger().exception("generation_failed")
    assert "RuntimeError: bad key [REDACTED]" in stream.getvalue()
    assert SECRET not in stream.getvalue()


def test_json_tracebacks_do_not_include_local_variables() -> None:
    """Locals hold prompts and keys; truncated reprs of them would also escape redaction."""
    stream = io.StringIO()
    configure_logging("json", "info", stream)

    def failing() -> None:
        api_key_in_a_local = "local-secret-value"
        raise ValueError(f"length {len(api_key_in_a_local)}")

    try:
        failing()
    except ValueError:
        get_logger().exception("failed")
    (line,) = _json_lines(stream)
    assert line["exception"][0]["exc_type"] == "ValueError"
    assert "local-secret-value" not in stream.getvalue()


def test_redact_secrets_prefers_the_longest_match_and_leaves_other_values_alone() -> None:
    processor = redact_secrets(["abc", "abcdef"])
    event = processor(
        None, "info", {"event": "x abcdef y abc", "n": 3, "t": ("abc",), "none": None}
    )
    assert event == {
        "event": f"x {REDACTED} y {REDACTED}",
        "n": 3,
        "t": (REDACTED,),
        "none": None,
    }


def test_redact_secrets_checks_objects_through_their_text() -> None:
    processor = redact_secrets([SECRET])
    untouched = ValueError("harmless")
    event = processor(None, "info", {"error": ValueError(SECRET), "other": untouched})
    assert event["error"] == REDACTED
    assert event["other"] is untouched


def test_redact_secrets_without_secrets_changes_nothing() -> None:
    event = {"event": "anything", "value": ""}
    assert redact_secrets(["", ""])(None, "info", dict(event)) == event


def test_prompt_fields_hash_the_prompt_by_default() -> None:
    prompt = "a watercolour fox"
    fields = prompt_fields(prompt, log_prompts=False)
    assert fields == {
        "prompt_length": len(prompt),
        "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest()[:16],
    }


def test_prompt_fields_include_the_text_only_when_opted_in() -> None:
    assert prompt_fields("a fox", log_prompts=True)["prompt"] == "a fox"


def test_logged_prompt_fields_carry_no_prompt_text() -> None:
    """What the worker logs for a request identifies the prompt without revealing it."""
    with capture_logs() as captured:
        get_logger().info("request_claimed", **prompt_fields("my private idea", log_prompts=False))
    (entry,) = captured
    assert "my private idea" not in repr(entry)
    assert entry["prompt_length"] == len("my private idea")


def test_unknown_format_or_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="log format"):
        configure_logging("xml", "info", io.StringIO())
    with pytest.raises(ValueError, match="log level"):
        configure_logging("json", "loud", io.StringIO())
