"""The ``image-listener`` command and its subcommands:

=================  ================================================================
``migrate``        apply ``migrations/`` to DATABASE_URL (:mod:`listener.migrate`)
``run``            the daemon (:mod:`listener.runtime.daemon`); ``--drain`` exits when idle
``dev``            an embedded PostgreSQL, migrated, with the daemon on it
``doctor``         check every dependency of the mode, one line each
``ask``            insert a request as a frontend would and wait for its reply
``status``         the queue snapshot (:mod:`listener.commands.admin`)
``retry``          a failed request, or all failed since a time, get a new attempt
``cancel``         stop a queued or running request
``requeue-stuck``  jobs with an expired lease go back to the queue now
``quota``          per-user limits: ``set``, ``show``, ``remove`` (:mod:`.limits`)
``usage``          images, tokens and USD by user, or one user's by day
``prices``         USD per 1M tokens by model: ``set``, ``show``
``budget``         the fleet's provider budget: show, ``--set N``, ``--clear`` (:mod:`.budget`)
=================  ================================================================

Every command exits 0 on success and non-zero on failure with a one-line reason on stderr
(``image-listener: error: ...``); secrets never appear in that line.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path
from uuid import UUID

import click

from core.errors import ImageListenerError, first_line
from core.ports import ImageGenerator
from listener.commands import embedded
from listener.commands.budget import budget
from listener.commands.common import (
    CommandFailed,
    admin_call,
    command_settings,
    data_dir_option,
    dev_data_dir,
    run_loop,
    settings_with_database,
)
from listener.commands.limits import prices, quota, usage
from listener.settings import Settings


def _this_command() -> str:
    """How to run this CLI again from this directory, as a user would paste it: the bare name
    when the PATH finds this very installation, else the path of its script (relative when it
    lies below here), else ``python -m listener``."""
    script = Path(sys.executable).parent / "image-listener"
    found = shutil.which("image-listener")
    if found is not None and Path(found).resolve() == script.resolve():
        return "image-listener"
    if not script.exists():
        return f"{shlex.quote(sys.executable)} -m listener"
    try:
        return shlex.quote(str(script.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(script))


def _openai_generator(settings: Settings) -> ImageGenerator:
    from listener.generators.openai import OpenAIImageGenerator, build_openai_client

    client = build_openai_client(
        settings.require_openai_api_key(),
        settings.openai_base_url,
        settings.openai_timeout_seconds,
    )
    return OpenAIImageGenerator(client)


def _offline_generator() -> ImageGenerator:
    from listener.generators.offline import OfflineImageGenerator

    return OfflineImageGenerator()


def _run(settings: Settings, generator: ImageGenerator, *, drain: bool) -> None:
    from listener.runtime.daemon import run_daemon

    try:
        run_loop(run_daemon(settings, generator, drain=drain))
    except ImageListenerError as exc:
        raise CommandFailed(first_line(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Turn a Supabase/PostgreSQL `messages` table into an image-generation API."""


def main() -> None:
    """Entry point: a bug still ends with one line on stderr (its traceback goes to the log)."""
    try:
        cli.main(standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("image-listener: error: aborted", err=True)
        sys.exit(1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        import structlog

        structlog.get_logger("listener.cli").exception("command_crashed")
        click.echo(
            f"image-listener: error: unexpected {type(exc).__name__}: {first_line(exc)}", err=True
        )
        sys.exit(1)


@cli.command()
@dev_data_dir
def migrate(data_dir: Path) -> None:
    """Apply migrations/ to DATABASE_URL (idempotent; records what was applied)."""
    from listener.migrate import apply_migrations

    settings = settings_with_database(data_dir)
    try:
        applied = apply_migrations(settings.require_database_url())
    except ImageListenerError as exc:
        raise CommandFailed(first_line(exc)) from exc
    for migration in applied:
        click.echo(f"applied {migration.version}_{migration.name}")
    click.echo(f"{len(applied)} migration(s) applied; the database is up to date")


@cli.command()
@click.option("--drain", is_flag=True, help="Exit once the queue is empty (batch jobs, tests).")
@click.option("--offline", is_flag=True, help="Use the offline placeholder generator, not OpenAI.")
def run(drain: bool, offline: bool) -> None:
    """Run the daemon against DATABASE_URL until SIGTERM/SIGINT."""
    settings = command_settings()
    try:
        generator = _offline_generator() if offline else _openai_generator(settings)
    except ImageListenerError as exc:
        raise CommandFailed(first_line(exc)) from exc
    _run(settings, generator, drain=drain)


@cli.command()
@click.option("--offline", is_flag=True, help="No OpenAI key needed: draw labelled placeholders.")
@data_dir_option("Where the embedded PostgreSQL keeps its data.")
def dev(offline: bool, data_dir: Path) -> None:
    """Start an embedded PostgreSQL, migrate it, and run the listener on it."""
    from listener.migrate import apply_migrations

    settings = command_settings()
    if not offline and settings.openai_api_key is None:
        raise CommandFailed(
            "OPENAI_API_KEY is not set: set it to generate real images, "
            "or run `image-listener dev --offline` for labelled placeholders"
        )
    try:
        generator = _offline_generator() if offline else _openai_generator(settings)
        handle, conninfo = embedded.start(data_dir)
        applied = apply_migrations(conninfo)
    except ImageListenerError as exc:
        raise CommandFailed(first_line(exc)) from exc
    click.echo(f"embedded PostgreSQL: {conninfo}")
    click.echo(f"migrations applied now: {len(applied)}; images go to {settings.image_dir}")
    ask_again = [_this_command(), "ask", shlex.quote("a lighthouse at dawn")]
    if data_dir != embedded.DEFAULT_DATA_DIR:
        ask_again += ["--data-dir", shlex.quote(str(data_dir))]
    click.echo(f"try it from another terminal here: {' '.join(ask_again)}")
    sys.stdout.flush()
    dev_settings = settings.model_copy(update={"database_url": conninfo})
    try:
        _run(dev_settings, generator, drain=False)
    finally:
        del handle


@cli.command()
@click.option("--offline", is_flag=True, help="Skip the OpenAI check.")
@dev_data_dir
def doctor(offline: bool, data_dir: Path) -> None:
    """Check each configured dependency and print one line for each."""
    from listener.commands.doctor import run_checks

    settings = settings_with_database(data_dir)
    try:
        results = run_loop(run_checks(settings, offline=offline))
    except ImageListenerError as exc:
        raise CommandFailed(first_line(exc)) from exc
    for result in results:
        click.echo(result.line())
    failed = [result.name for result in results if not result.ok]
    if failed:
        raise CommandFailed(f"{len(failed)} of {len(results)} checks failed: {', '.join(failed)}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot as JSON.")
@click.option("--failures", default=10, show_default=True, help="Recent failures to list.")
@dev_data_dir
def status(as_json: bool, failures: int, data_dir: Path) -> None:
    """Queue depth by state, oldest request, leases by worker, recent failures, and the
    fleet's provider budget (its rate, a pause)."""
    from listener.commands import admin
    from listener.queue.calls import queue_snapshot

    snapshot = admin_call(lambda queue: queue_snapshot(queue, failures), data_dir)
    click.echo(admin.as_json(snapshot) if as_json else admin.render_status(snapshot))


@cli.command()
@click.argument("request_id", required=False, type=click.UUID)
@click.option(
    "--failed-since",
    metavar="WHEN",
    help="Retry every request that failed since WHEN (ISO time, or 30m / 2h / 1d ago).",
)
@dev_data_dir
def retry(request_id: UUID | None, failed_since: str | None, data_dir: Path) -> None:
    """Give a failed request a new attempt (its one reply row goes back to 'queued')."""
    from listener.commands import admin

    if (request_id is None) == (failed_since is None):
        raise click.UsageError("give either REQUEST_ID or --failed-since")
    if failed_since is not None:
        try:
            since = admin.parse_since(failed_since)
        except ImageListenerError as exc:
            raise CommandFailed(first_line(exc)) from exc
        count = admin_call(lambda queue: queue.retry_failed(since), data_dir)
        click.echo(f"retried {count} failed request(s) since {since.isoformat()}")
        return
    assert request_id is not None
    result = admin_call(lambda queue: queue.retry(request_id), data_dir)
    if result != "retried":
        reasons = {
            "not_found": "no such image request",
            "in_progress": "it is still queued or running",
            "not_failed": "its reply is not 'failed'",
        }
        raise CommandFailed(f"request {request_id} not retried: {reasons.get(result, result)}")
    click.echo(f"request {request_id} retried")


@cli.command()
@click.argument("request_id", type=click.UUID)
@click.option("--reason", help="Shown to the user as the reply's error.")
@dev_data_dir
def cancel(request_id: UUID, reason: str | None, data_dir: Path) -> None:
    """Stop a queued or running request; its reply ends 'failed' with the reason."""
    result = admin_call(lambda queue: queue.cancel(request_id, reason), data_dir)
    if result != "cancelled":
        reasons = {"not_found": "no such request", "not_queued": "it is not queued or running"}
        raise CommandFailed(f"request {request_id} not cancelled: {reasons.get(result, result)}")
    click.echo(f"request {request_id} cancelled")


@cli.command("requeue-stuck")
@dev_data_dir
def requeue_stuck(data_dir: Path) -> None:
    """Put every job whose lease has expired back in the queue now."""
    count = admin_call(lambda queue: queue.requeue_stuck(), data_dir)
    click.echo(f"requeued {count} job(s) with an expired lease")


@cli.command()
@click.argument("prompt")
@click.option("--size", help='"auto" or WIDTHxHEIGHT, e.g. 1536x1024.')
@click.option("--quality", type=click.Choice(["low", "medium", "high", "auto"]))
@click.option("--background", type=click.Choice(["transparent", "opaque", "auto"]))
@click.option("--output-format", type=click.Choice(["png", "jpeg", "webp"]))
@click.option(
    "--email",
    default="ask@image-listener.local",
    show_default=True,
    help="The user the request is made as (created if needed).",
)
@click.option(
    "--timeout",
    type=float,
    default=300.0,
    show_default=True,
    help="Seconds to wait for the final reply.",
)
@click.option("--edit-of", type=click.UUID, help="Edit the image of this reply (same chat).")
@click.option(
    "--reference",
    "references",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="A picture to start from (png/jpg/jpeg/webp); repeatable. Copied into your folder of "
    "the input store first.",
)
@click.option(
    "--mask",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="A PNG whose transparent pixels mark what to change in the first input image.",
)
@dev_data_dir
def ask(
    prompt: str,
    size: str | None,
    quality: str | None,
    background: str | None,
    output_format: str | None,
    email: str,
    timeout: float,
    edit_of: UUID | None,
    references: tuple[Path, ...],
    mask: Path | None,
    data_dir: Path,
) -> None:
    """Insert an image request as a frontend would, wait for the reply, print it."""
    from listener.commands import ask as asking

    settings = settings_with_database(data_dir)
    try:
        conninfo = settings.require_database_url()
    except ImageListenerError as exc:
        raise CommandFailed(f"{first_line(exc)} (ask inserts over SQL)") from exc
    options: dict[str, object] = {
        key: value
        for key, value in (
            ("size", size),
            ("quality", quality),
            ("background", background),
            ("output_format", output_format),
        )
        if value is not None
    }
    try:
        if edit_of is not None:
            options["edit_of"] = str(edit_of)
        if references or mask is not None:
            user = asking.ensure_user(conninfo, email)
            inputs = settings.input_directory
            if references:
                options["references"] = asking.put_inputs(inputs, user, references)
            if mask is not None:
                [options["mask"]] = asking.put_inputs(inputs, user, [mask])
        request_id = asking.submit(conninfo, prompt, options, email)
        click.echo(f"request {request_id} queued; waiting for the reply...", err=True)
        reply = asking.wait_for_reply(conninfo, request_id, timeout)
    except ImageListenerError as exc:
        raise CommandFailed(first_line(exc)) from exc
    if reply is None:
        raise CommandFailed(
            f"no final reply to request {request_id} within {timeout:g}s: is a listener running?"
        )
    if reply.status == "complete":
        click.echo(f"complete {reply.image_url}")
        click.echo(f'reply {reply.id} (edit it: ask --edit-of {reply.id} "...")', err=True)
        return
    raise CommandFailed(f"request {request_id} failed: {reply.error}")


cli.add_command(quota)
cli.add_command(usage)
cli.add_command(prices)
cli.add_command(budget)

if __name__ == "__main__":
    main()
