"""``image-listener quota | usage | prices``: the per-user limits, what users spent, and the
price table, each one function of the limits migration called over the mode's transport
(service role only). This module parses the options, makes the call and formats the answer."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from uuid import UUID

import click

from core.errors import ImageListenerError, first_line
from listener.commands.admin import parse_since
from listener.commands.common import CommandFailed, admin_call, dev_data_dir

#: what a limit option takes besides a number
UNLIMITED = "none"


def limit_value(text: str | None, *, whole: bool, option: str) -> float | int | None:
    """``none`` (unlimited) or a number >= 0 (a whole one for counts)."""
    if text is None or text.strip().lower() == UNLIMITED:
        return None
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise click.BadParameter(
            f"{text!r}: give a number or {UNLIMITED}", param_hint=option
        ) from None
    if not value.is_finite() or value < 0 or (whole and value != value.to_integral_value()):
        kind = "a whole number" if whole else "a number"
        raise click.BadParameter(f"{text!r}: give {kind} >= 0 or {UNLIMITED}", param_hint=option)
    return int(value) if whole else float(value)


def render_limits(shown: Mapping[str, Any]) -> str:
    """``quota show``: the default, and a user's override and quota."""
    lines = [f"default   {_limits_line(shown.get('default'))}"]
    if not shown.get("any_limit"):
        lines.append(
            "          (no limit is set for anyone: every user may generate without bound)"
        )
    user = shown.get("user")
    if user:
        override = user.get("override")
        lines.append(
            f"override  {_limits_line(override)}" if override else "override  (none: the default)"
        )
        quota = user.get("quota") or {}
        lines += [
            f"user      {user['user_id']}",
            f"  pending        {quota.get('pending')} of {_limit(quota.get('max_pending'))}",
            f"  last 24 hours  {quota.get('today')} of {_limit(quota.get('per_day'))}",
            f"  this month     {_usd(quota.get('spent_this_month'))} of "
            f"{_limit(quota.get('usd_per_month'), usd=True)}",
            f"  next request   {_next(quota.get('next_request_at'))}",
        ]
    return "\n".join(lines)


def render_usage(rows: Sequence[Mapping[str, Any]], *, by: str) -> str:
    """``usage``: images, tokens and USD per user (or per day)."""
    header = f"{by:<36} {'images':>7} {'input tokens':>13} {'output tokens':>14} {'USD':>12}"
    lines = [header]
    for row in rows:
        unpriced = f"  ({row['unpriced']} without a price)" if row.get("unpriced") else ""
        lines.append(
            f"{row['key']:<36} {row['images']:>7} {row['input_tokens']:>13} "
            f"{row['output_tokens']:>14} {float(row['usd']):>12.4f}{unpriced}"
        )
    if not rows:
        lines.append("(no complete image in this period)")
    return "\n".join(lines)


def render_prices(rows: Sequence[Mapping[str, Any]]) -> str:
    """``prices show``: USD per 1M tokens by model."""
    lines = [f"{'model':<32} {'input text':>11} {'input image':>12} {'output image':>13}"]
    for row in rows:
        lines.append(
            f"{row['model']:<32} {float(row['input_text_usd_per_1m']):>11g} "
            f"{float(row['input_image_usd_per_1m']):>12g} "
            f"{float(row['output_image_usd_per_1m']):>13g}"
        )
    return "\n".join(lines)


def _limits_line(limits: Mapping[str, Any] | None) -> str:
    limits = limits or {}
    return (
        f"max_pending {_limit(limits.get('max_pending'))}, "
        f"per_day {_limit(limits.get('per_day'))}, "
        f"usd_per_month {_limit(limits.get('usd_per_month'), usd=True)}"
    )


def _limit(value: object, *, usd: bool = False) -> str:
    if value is None:
        return "unlimited"
    return _usd(value) if usd else str(value)


def _usd(value: object) -> str:
    return f"{float(str(value)):.2f} USD" if value is not None else "0.00 USD"


def _next(value: object) -> str:
    if value is None:
        return "now"
    if str(value) == "infinity":
        return "when one of the pending requests is finished"
    return str(value)


@click.group()
def quota() -> None:
    """Per-user limits: the default for everyone, and overrides."""


def _target(default: bool, user: UUID | None) -> UUID | None:
    if default == (user is not None):
        raise click.UsageError("give either --default or --user USER_ID")
    return user


@quota.command("set")
@click.option("--default", "is_default", is_flag=True, help="Change the default for every user.")
@click.option("--user", type=click.UUID, help="Change (or create) this user's override.")
@click.option("--max-pending", metavar="N|none", help="Unfinished requests at once.")
@click.option("--per-day", metavar="N|none", help="Requests in the last 24 hours.")
@click.option("--usd-per-month", metavar="X|none", help="Spend this calendar month (UTC).")
@dev_data_dir
def quota_set(
    is_default: bool,
    user: UUID | None,
    max_pending: str | None,
    per_day: str | None,
    usd_per_month: str | None,
    data_dir: Path,
) -> None:
    """Set limits; options left out keep their value (a new override starts from the default)."""
    target = _target(is_default, user)
    changes: dict[str, float | int | None] = {}
    for key, text, whole in (
        ("max_pending", max_pending, True),
        ("per_day", per_day, True),
        ("usd_per_month", usd_per_month, False),
    ):
        if text is not None:
            option = "--" + key.replace("_", "-")
            changes[key] = limit_value(text, whole=whole, option=option)
    if not changes:
        raise click.UsageError("give at least one of --max-pending, --per-day, --usd-per-month")
    shown = admin_call(lambda queue: queue.quota_set(target, changes), data_dir)
    click.echo(render_limits(shown))


@quota.command("show")
@click.option("--user", type=click.UUID, help="Also this user's override, usage and quota.")
@click.option("--json", "as_json", is_flag=True, help="Print it as JSON.")
@dev_data_dir
def quota_show(user: UUID | None, as_json: bool, data_dir: Path) -> None:
    """The default limits, and a user's override and quota."""
    shown = admin_call(lambda queue: queue.quota_show(user), data_dir)
    click.echo(json.dumps(shown, indent=2, default=str) if as_json else render_limits(shown))


@quota.command("remove")
@click.option("--user", type=click.UUID, required=True, help="The user whose override goes.")
@dev_data_dir
def quota_remove(user: UUID, data_dir: Path) -> None:
    """Drop a user's override: the default applies to them again."""
    if not admin_call(lambda queue: queue.quota_remove(user), data_dir):
        raise CommandFailed(f"user {user} has no override")
    click.echo(f"user {user}: override removed; the default applies")


@click.command()
@click.option(
    "--since",
    default="30d",
    show_default=True,
    help="ISO time, or a duration back from now (90m, 2h, 30d).",
)
@click.option("--user", type=click.UUID, help="One user's usage, by day (UTC).")
@click.option("--json", "as_json", is_flag=True, help="Print it as JSON.")
@dev_data_dir
def usage(since: str, user: UUID | None, as_json: bool, data_dir: Path) -> None:
    """Images, tokens and USD of complete images, by user (or one user's, by day)."""
    try:
        start = parse_since(since, option="--since")
    except ImageListenerError as exc:
        raise CommandFailed(first_line(exc)) from exc
    rows = admin_call(lambda queue: queue.usage(start, user), data_dir)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    click.echo(render_usage(rows, by="day (UTC)" if user else "user"))


@click.group()
def prices() -> None:
    """USD per 1M tokens by model: what each image is priced at."""


def _price(text: str, option: str) -> Decimal:
    value = limit_value(text, whole=False, option=option)
    if value is None:
        raise click.BadParameter("a price cannot be unlimited", param_hint=option)
    return Decimal(str(value))


@prices.command("set")
@click.argument("model")
@click.option("--input-text", required=True, metavar="USD", help="Per 1M input text tokens.")
@click.option("--input-image", required=True, metavar="USD", help="Per 1M input image tokens.")
@click.option("--output-image", required=True, metavar="USD", help="Per 1M output image tokens.")
@dev_data_dir
def prices_set(
    model: str, input_text: str, input_image: str, output_image: str, data_dir: Path
) -> None:
    """Set (or add) a model's prices; later completions are priced with them."""
    text = _price(input_text, "--input-text")
    image = _price(input_image, "--input-image")
    output = _price(output_image, "--output-image")
    row = admin_call(
        lambda queue: queue.prices_set(
            model, input_text=text, input_image=image, output_image=output
        ),
        data_dir,
    )
    click.echo(render_prices([row]))


@prices.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print them as JSON.")
@dev_data_dir
def prices_show(as_json: bool, data_dir: Path) -> None:
    """Every model's prices."""
    rows = admin_call(lambda queue: queue.prices(), data_dir)
    click.echo(json.dumps(rows, indent=2, default=str) if as_json else render_prices(rows))
