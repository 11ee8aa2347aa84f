"""``image-listener budget``: the fleet's provider budget (how many provider calls all listeners
together may start per minute), shown or set by the operator. One function of the budget
migration each, called over the mode's transport (service role only); the rules are in
``migrations/20261205160000_provider_budget.sql``."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from listener.commands.common import admin_call, dev_data_dir

_SOURCES = {
    "operator": "set by the operator (image-listener budget --set)",
    "listeners": "the smallest IMAGE_LISTENER_PROVIDER_IMAGES_PER_MINUTE of the listeners",
    "learned": "learned from the provider's 429s (no budget set)",
    "none": "none: no budget set, no 429 seen",
}


def render_budget(budget: Mapping[str, Any], *, now: datetime | None = None) -> str:
    """The budget as the lines ``status`` and ``budget`` print."""
    now = now or datetime.now(UTC)
    source = str(budget.get("source") or "none")
    rate = budget.get("per_minute")
    lines = [
        "provider budget",
        f"  rate     {_rate(rate):>12}   {_SOURCES.get(source, source)}",
    ]
    if rate is not None:
        lines.append(
            f"  tokens   {float(budget.get('tokens') or 0):>12.2f}   (calls that may start now)"
        )
    learned = budget.get("learned_per_minute")
    if learned is not None and source != "learned":
        lines.append(f"  learned  {_rate(learned):>12}   (used when no budget is set)")
    until = budget.get("paused_until")
    if until is not None:
        left = (datetime.fromisoformat(str(until)) - now).total_seconds()
        lines.append(f"  PAUSED   for {max(left, 0):.1f} s more (a rate-limit 429), until {until}")
    else:
        lines.append("  paused   no")
    lines.append(
        f"  429s     {budget.get('rate_limited', 0):>12}   in {budget.get('pauses', 0)} pause(s); "
        f"last {budget.get('last_rate_limited_at') or 'never'}"
    )
    return "\n".join(lines)


def _rate(value: object) -> str:
    return "unlimited" if value is None else f"{float(str(value)):g}/min"


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: give a number of images per minute") from None
    if not math.isfinite(value) or value <= 0:
        raise click.BadParameter(f"{text!r}: give a number of images per minute above 0")
    return value


@click.command()
@click.option(
    "--set",
    "set_to",
    metavar="N",
    help="Images per minute for the whole fleet; wins over every listener's setting.",
)
@click.option("--clear", is_flag=True, help="Drop the operator's value: the listeners' decide.")
@click.option(
    "--forget-learned",
    is_flag=True,
    help="Forget the rate learned from 429s and any pause (after a tier upgrade, say).",
)
@click.option("--json", "as_json", is_flag=True, help="Print it as JSON.")
@dev_data_dir
def budget(
    set_to: str | None, clear: bool, forget_learned: bool, as_json: bool, data_dir: Path
) -> None:
    """The fleet's provider budget: show it, or set the operator's value."""
    if set_to is not None and clear:
        raise click.UsageError("give --set N or --clear, not both")
    if set_to is not None or clear or forget_learned:
        rate = None if set_to is None else _positive(set_to)

        async def change(queue: Any) -> dict[str, Any]:
            current = await queue.provider_budget()
            value = rate if (set_to is not None or clear) else current.get("operator_per_minute")
            result: dict[str, Any] = await queue.provider_budget_set(
                value, forget_learned=forget_learned
            )
            return result

        shown = admin_call(change, data_dir)
    else:
        shown = admin_call(lambda queue: queue.provider_budget(), data_dir)
    click.echo(json.dumps(shown, indent=2, default=str) if as_json else render_budget(shown))
