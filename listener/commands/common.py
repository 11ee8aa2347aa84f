"""What every ``image-listener`` command shares: the one-line failure, settings and logging,
the database to use (the configured one, or the embedded one of ``dev``), the event loop, and
one call of the queue for the admin commands."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from core.errors import ImageListenerError, first_line
from listener.commands import embedded
from listener.ops.logging import configure_logging
from listener.settings import Settings, load_settings, retired_variables, unknown_variables

if TYPE_CHECKING:
    from listener.queue.calls import QueueCalls

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class CommandFailed(click.ClickException):
    """A one-line failure: ``image-listener: error: <reason>`` and exit status 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"image-listener: error: {self.format_message()}", err=True)


def command_settings(*, logs_to_stderr: bool = False) -> Settings:
    """Settings from the environment, and logging configured once.

    One-shot commands (migrate, doctor, ask) log to stderr so that their stdout is only their
    answer; the daemon logs to stdout, as a service's log stream.
    """
    try:
        settings = load_settings()
    except ImageListenerError as exc:
        raise CommandFailed(str(exc)) from exc
    configure_logging(
        settings.log_format,
        settings.log_level,
        stream=sys.stderr if logs_to_stderr else None,
        secrets=settings.secret_values(),
    )
    _warn_about_unread_variables()
    return settings


def _warn_about_unread_variables() -> None:
    """A typo'd or retired IMAGE_LISTENER_* variable changes nothing: say so, once, at start."""
    import structlog

    log = structlog.get_logger("listener.cli")
    for variable in unknown_variables():
        log.warning("unknown_setting", variable=variable, advice="no setting has this name")
    for variable, where in retired_variables().items():
        log.warning("retired_setting", variable=variable, advice=where)


def data_dir_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--data-dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=embedded.DEFAULT_DATA_DIR,
        show_default=True,
        help=help_text,
    )


#: the --data-dir of every command that talks to the database
dev_data_dir = data_dir_option(
    "The embedded database of `dev` to use when no database is configured."
)


def settings_with_database(data_dir: Path) -> Settings:
    """Settings for a command that talks to the database: as configured, or, when no database
    is configured at all, the embedded one that ``dev`` made in ``data_dir`` (joined for the
    command's length), with one line on stderr saying which database that is."""
    settings = command_settings(logs_to_stderr=True)
    if not embedded.no_database_configured(settings):
        return settings
    if not embedded.existing(data_dir):
        raise CommandFailed(
            "no database configured (DATABASE_URL, or SUPABASE_URL and "
            f"SUPABASE_SERVICE_ROLE_KEY) and no embedded database of `dev` in {data_dir}: "
            "set one, or start `image-listener dev` first"
        )
    try:
        server, conninfo = embedded.start(data_dir)
    except ImageListenerError as exc:
        raise CommandFailed(first_line(exc)) from exc
    click.get_current_context().with_resource(server)  # left when the command ends
    click.echo(
        f"image-listener: using the embedded database of `dev` in {data_dir} (no DATABASE_URL set)",
        err=True,
    )
    return settings.model_copy(update={"database_url": conninfo})


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop where it is installed (not on Windows): its loop and transports
    in C cut the daemon's CPU per request; the behaviour is asyncio's either way."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def admin_call(action: Callable[[QueueCalls], Awaitable[T]], data_dir: Path) -> T:
    from listener.commands import admin

    settings = settings_with_database(data_dir)
    try:
        return run_loop(admin.run(settings, action))
    except ImageListenerError as exc:
        raise CommandFailed(first_line(exc)) from exc
