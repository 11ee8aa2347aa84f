"""`image-listener quota | usage | prices` in both modes (SQL, or PostgREST rpc with the
service-role key), and what they change for a frontend: limits that refuse its insert, and the
cost of each complete image, priced from the table `prices set` writes."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.support.daemon_process import cli
from tests.support.modes import ModeRig
from tests.support.queue_helpers import new_chat, reply_of

pytestmark = pytest.mark.e2e


@pytest.fixture
def rig(mode_rig: ModeRig) -> ModeRig:
    return mode_rig


def run(rig: ModeRig, *args: str) -> str:
    result = cli(*args, env=rig.env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_quota_set_and_show_for_the_default_and_an_override(rig: ModeRig) -> None:
    empty = run(rig, "quota", "show")
    assert "no limit is set for anyone" in empty
    shown = run(rig, "quota", "set", "--default", "--per-day", "5", "--usd-per-month", "2.5")
    assert "per_day 5" in shown
    assert "usd_per_month 2.50 USD" in shown
    user, _chat = new_chat(rig.db)
    override = run(rig, "quota", "set", "--user", str(user), "--per-day", "none")
    assert "override  max_pending unlimited, per_day unlimited, usd_per_month 2.50 USD" in override
    as_json = json.loads(run(rig, "quota", "show", "--user", str(user), "--json"))
    assert as_json["default"] == {"max_pending": None, "per_day": 5, "usd_per_month": 2.5}
    assert as_json["user"]["quota"]["per_day"] is None
    assert run(rig, "quota", "remove", "--user", str(user)).strip().endswith("the default applies")
    again = cli("quota", "remove", "--user", str(user), env=rig.env)
    assert again.returncode == 1
    assert "has no override" in again.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--default", "--per-day", "-1"], "give a whole number >= 0 or none"),
        (["--default", "--max-pending", "1.5"], "give a whole number >= 0 or none"),
        (["--default"], "give at least one of"),
        (["--per-day", "3"], "give either --default or --user"),
        (["--user", str(uuid.UUID(int=7)), "--per-day", "3"], "not found"),
    ],
)
def test_quota_set_refuses_bad_input_with_one_line(
    rig: ModeRig, args: list[str], says: str
) -> None:
    result = cli("quota", "set", *args, env=rig.env)
    assert result.returncode != 0
    assert says in result.stderr


def test_a_frontend_over_its_daily_limit_is_refused_and_costs_are_counted(rig: ModeRig) -> None:
    """Per day 2: the third insert is refused (HTTP 429 over PostgREST, IL429 in SQL); the two
    accepted ones complete with cost_usd = tokens x the prices `prices set` gave, and `usage`
    adds them up."""
    run(
        rig,
        "prices",
        "set",
        "gpt-image-2.6-flare",
        "--input-text",
        "10",
        "--input-image",
        "0",
        "--output-image",
        "100",
    )
    assert "gpt-image-2.6-flare" in run(rig, "prices", "show")
    run(rig, "quota", "set", "--default", "--per-day", "2")
    user, chat = new_chat(rig.db)
    rig.start()
    requests = [rig.insert_request(user, chat, f"lighthouse {i}") for i in range(2)]
    refusal = rig.refused_insert(user, chat, "one too many")
    assert refusal.startswith("daily image limit reached (2 per day); next request possible at")
    replies = [rig.wait_final(request) for request in requests]
    total = 0.0
    for reply in replies:
        assert reply["status"] == "complete"
        usage = reply["metadata"]["usage"]
        expected = (usage["input_tokens"] * 10 + usage["output_tokens"] * 100) / 1_000_000
        assert float(reply["metadata"]["cost_usd"]) == pytest.approx(expected)
        total += expected
    [row] = json.loads(run(rig, "usage", "--since", "1h", "--json"))
    assert (row["key"], row["images"]) == (str(user), 2)
    assert float(row["usd"]) == pytest.approx(total, abs=1e-6)
    by_day = run(rig, "usage", "--user", str(user))
    assert by_day.splitlines()[0].startswith("day (UTC)")
    assert len(reply_of(rig.db, requests[0])) == 1


def test_budget_show_set_clear_and_in_status(rig: ModeRig) -> None:
    """The operator's provider budget, in both modes; status shows it and a pause."""
    assert "none: no budget set, no 429 seen" in run(rig, "budget")
    shown = run(rig, "budget", "--set", "120")
    assert "120/min   set by the operator" in shown
    assert json.loads(run(rig, "budget", "--json"))["per_minute"] == 120
    rig.db.execute("update image_queue.provider_budget set paused_until = now() + interval '30 s'")
    status = run(rig, "status")
    assert "provider budget" in status
    assert "PAUSED   for" in status
    assert json.loads(run(rig, "status", "--json"))["provider_budget"]["source"] == "operator"
    cleared = run(rig, "budget", "--clear", "--forget-learned")
    assert "none: no budget set" in cleared
    assert "paused   no" in cleared


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--set", "0"], "above 0"),
        (["--set", "fast"], "give a number of images per minute"),
        (["--set", "5", "--clear"], "not both"),
    ],
)
def test_budget_refuses_bad_input(rig: ModeRig, args: list[str], says: str) -> None:
    result = cli("budget", *args, env=rig.env)
    assert result.returncode == 2
    assert says in result.stderr
