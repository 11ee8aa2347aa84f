"""structlog set up once for the whole process, plus the helpers that keep secrets out of logs.

Our events and those of libraries (httpx, psycopg, ...) go through one stdlib handler, so both
come out in the same format on the same stream. Libraries are held at WARNING: their INFO lines
(one per HTTP request, say) would drown ours.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO

import structlog
import structlog.tracebacks
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "[REDACTED]"
LOG_FORMATS = ("auto", "json", "console")

#: a processor that hands the event dict on (structlog's ``Processor`` may also return text)
EventDictProcessor = Callable[[WrappedLogger, str, EventDict], EventDict]

#: libraries whose INFO/DEBUG output is noise for an operator
NOISY_LIBRARIES = (
    "httpx",
    "httpx2",
    "httpcore2",
    "storage3",
    "pgserver",
    "httpcore",
    "openai",
    "psycopg",
    "websockets",
    "realtime",
    "supabase",
    "postgrest",
    "hpack",
)


class _ListenerHandler(logging.StreamHandler[TextIO]):
    """Our root handler, a class of its own so a second configure_logging replaces it."""


def redact_secrets(secrets: Iterable[str]) -> EventDictProcessor:
    """A processor that replaces every occurrence of ``secrets`` in string values with [REDACTED].

    A last line of defence: code must not log secrets in the first place. Values that are not
    plain data (an exception, say) are checked through ``str()`` because that is how they render.
    """
    # longest first, so a secret that contains another is blanked whole
    ordered = sorted({secret for secret in secrets if secret}, key=len, reverse=True)
    if not ordered:
        return _pass_through
    pattern = re.compile("|".join(re.escape(secret) for secret in ordered))

    def scrub(value: object) -> object:
        if isinstance(value, str):
            return pattern.sub(REDACTED, value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, Mapping):
            return {key: scrub(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(scrub(item) for item in value)
        text = str(value)
        return pattern.sub(REDACTED, text) if pattern.search(text) else value

    def processor(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        for key, value in event_dict.items():
            event_dict[key] = scrub(value)
        return event_dict

    return processor


def _pass_through(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    return event_dict


def prompt_fields(prompt: str, log_prompts: bool) -> dict[str, object]:
    """How a prompt appears in logs: length and a short hash, the text only if the operator opts in.

    The hash lets an operator match log lines to a row without the log holding user content.
    """
    digest = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    fields: dict[str, object] = {"prompt_length": len(prompt), "prompt_sha256": digest}
    if log_prompts:
        fields["prompt"] = prompt
    return fields


def _level_number(level: str) -> int:
    number = logging.getLevelNamesMapping().get(level.upper())
    if number is None:
        raise ValueError(f"unknown log level {level!r}")
    return number


def configure_logging(
    fmt: str,
    level: str,
    stream: TextIO | None = None,
    *,
    secrets: Iterable[str] = (),
) -> None:
    """Route structlog and stdlib logging to ``stream`` (stdout by default) in one format.

    ``fmt`` is json, console, or auto (JSON unless the stream is a terminal). Calling it again
    replaces the previous configuration rather than adding a second handler.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(LOG_FORMATS)}")
    threshold = _level_number(level)
    out: TextIO = sys.stdout if stream is None else stream
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if as_json:
        # no locals: they hold prompts and keys, and their truncated reprs would slip past redaction
        exceptions: Processor = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        renderer = structlog.processors.JSONRenderer(default=str)
    else:
        # rendered to text before redaction, so a secret in an exception message is caught too
        exceptions = structlog.processors.format_exc_info
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())

    handler = _ListenerHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                exceptions,
                redact_secrets(secrets),
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ListenerHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(threshold)
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(max(threshold, logging.WARNING))

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # not cached: loggers made at import time must follow a later reconfiguration (tests)
        cache_logger_on_first_use=False,
    )


def get_logger(**initial: Any) -> structlog.stdlib.BoundLogger:
    """A bound logger; a typed shorthand for ``structlog.get_logger``."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(**initial)
    return logger
