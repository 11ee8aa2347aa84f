"""How the fleet's provider budget reads to an operator (doctor, status, budget, /metrics) and
to the worker (``NextStart``): pure functions of what ``image_provider_budget()`` and
``image_jobs_next_start()`` answer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from core.budget import NextStart
from listener.commands.budget import render_budget
from listener.commands.doctor import Warn, budget_line
from listener.ops.metrics import LiveState, Metrics

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def shown(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "per_minute": None,
        "source": "none",
        "operator_per_minute": None,
        "listener_per_minute": None,
        "learned_per_minute": None,
        "tokens": None,
        "paused_until": None,
        "last_rate_limited_at": None,
        "rate_limited": 0,
        "pauses": 0,
        "decreases": 0,
    }
    return base | fields


@pytest.mark.parametrize(
    ("budget", "own", "warns", "says"),
    [
        (shown(), None, False, "none set and no 429 seen"),
        (shown(), 60.0, False, "60/min for the whole fleet once this listener claims"),
        (shown(per_minute=60.0, source="listeners"), 60.0, False, "60/min for the whole fleet"),
        (shown(per_minute=60.0, source="listeners"), 90.0, True, "the smallest setting wins"),
        (shown(per_minute=30.0, source="operator"), None, False, "30/min set by the operator"),
        (shown(per_minute=30.0, source="operator"), 60.0, True, "wins over this listener's"),
        (shown(per_minute=123.4, source="learned"), None, False, "123/min learned"),
        (
            shown(paused_until="2026-12-05T12:00:30+00:00", rate_limited=3, pauses=1),
            None,
            True,
            "the fleet is paused",
        ),
    ],
)
def test_the_doctor_line(budget: dict[str, Any], own: float | None, warns: bool, says: str) -> None:
    line = budget_line(budget, own)
    assert isinstance(line, Warn) is warns
    assert says in line


def test_the_status_lines_show_the_rate_its_source_and_a_pause() -> None:
    until = (NOW + timedelta(seconds=12.5)).isoformat()
    text = render_budget(
        shown(
            per_minute=300.0,
            source="listeners",
            tokens=0.4,
            paused_until=until,
            pauses=2,
            rate_limited=5,
            learned_per_minute=80.0,
        ),
        now=NOW,
    )
    assert "300/min   the smallest IMAGE_LISTENER_PROVIDER_IMAGES_PER_MINUTE" in text
    assert "tokens           0.40" in text
    assert "learned        80/min   (used when no budget is set)" in text
    assert "PAUSED   for 12.5 s more" in text
    assert "5   in 2 pause(s)" in text
    assert "unlimited" in render_budget(shown(), now=NOW)


def test_next_start_reads_both_transports_answers() -> None:
    row = {
        "due_at": "2026-12-05T12:00:01.5+00:00",
        "wait_seconds": 1.5,
        "held_by": "budget",
        "per_minute": "300",
        "source": "operator",
        "tokens": 0.25,
        "paused_until": None,
    }
    ahead = NextStart.from_row(row)
    assert ahead.due_at == NOW + timedelta(seconds=1.5)
    assert ahead.wait_seconds == 1.5
    assert (ahead.held_by, ahead.per_minute, ahead.source, ahead.tokens) == (
        "budget",
        300.0,
        "operator",
        0.25,
    )
    with pytest.raises(ValueError, match="held_by"):
        NextStart.from_row(row | {"held_by": "moon"})


async def test_metrics_show_the_fleet_budget_and_this_listener_s_waits() -> None:
    metrics = Metrics()
    paused = (datetime.now(UTC) + timedelta(seconds=20)).isoformat()

    async def snapshot() -> dict[str, Any]:
        return {
            "jobs": {"queued": 3},
            "provider_budget": shown(
                per_minute=300.0,
                source="learned",
                tokens=1.0,
                paused_until=paused,
                rate_limited=7,
                pauses=2,
            ),
        }

    live = LiveState(queue_status=snapshot, wakeup_state=dict)
    metrics.add_live_collector(live)
    await live.refresh()
    metrics.observe_next_start(NextStart(None, 2.0, "pause", 300.0, "learned", 1.0, None))
    metrics.observe_next_start(NextStart(None, None, None, None, "none", None, None))
    metrics.observe_rate_limited()
    text = metrics.render().decode()
    assert 'image_listener_provider_budget_per_minute{source="learned"} 300.0' in text
    assert "image_listener_provider_budget_tokens 1.0" in text
    assert "image_listener_provider_fleet_rate_limited 7.0" in text
    assert "image_listener_provider_fleet_pauses 2.0" in text
    assert 'image_listener_provider_budget_waits_total{held_by="pause"} 1.0' in text
    assert "image_listener_provider_rate_limited_total 1.0" in text
    left = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("image_listener_provider_paused_seconds ")
    )
    assert 15 < left <= 20
