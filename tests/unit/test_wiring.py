"""The mode table: which settings select which plan, and what the plan makes the daemon and
``doctor`` use. Pure: nothing is connected; the builders that need no I/O are called for real."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import OperatorError
from listener.commands.doctor import planned_checks
from listener.runtime.wiring import (
    MODES,
    ImagesKind,
    PushKind,
    QueueKind,
    image_storage,
    plan_for,
    wakeup_source,
)
from listener.settings import SettingsError, load_settings
from listener.storage.local import LocalDirectoryStorage
from listener.wakeups.listen import PgNotificationSource
from listener.wakeups.polling import PollingOnly
from listener.wakeups.realtime import RealtimeWakeupSource

DATABASE = {"DATABASE_URL": "postgresql://app@db/app"}
SUPABASE = {"SUPABASE_URL": "https://p.supabase.co", "SUPABASE_SERVICE_ROLE_KEY": "service-key"}


@pytest.mark.parametrize(
    ("environ", "mode", "queue", "push", "images"),
    [
        (DATABASE, "postgres", QueueKind.SQL, PushKind.LISTEN, ImagesKind.LOCAL),
        (SUPABASE, "supabase", QueueKind.POSTGREST, PushKind.REALTIME, ImagesKind.SUPABASE),
        (DATABASE | SUPABASE, "hybrid", QueueKind.SQL, PushKind.LISTEN, ImagesKind.SUPABASE),
    ],
)
def test_the_settings_present_select_one_row_of_the_mode_table(
    environ: dict[str, str], mode: str, queue: QueueKind, push: PushKind, images: ImagesKind
) -> None:
    plan = plan_for(load_settings(environ))
    assert (plan.mode, plan.queue, plan.push, plan.images) == (mode, queue, push, images)
    assert plan == MODES[plan.mode]
    assert not plan.poll_only


def test_wakeup_poll_switches_the_push_channel_off_in_every_mode() -> None:
    for environ in (DATABASE, SUPABASE, DATABASE | SUPABASE):
        settings = load_settings({**environ, "IMAGE_LISTENER_WAKEUP": "poll"})
        plan = plan_for(settings)
        assert plan.poll_only
        assert isinstance(wakeup_source(settings, plan), PollingOnly)


def test_no_queue_settings_is_an_error_naming_the_variables() -> None:
    with pytest.raises(SettingsError, match="DATABASE_URL: set it, or SUPABASE_URL"):
        plan_for(load_settings({}))


def test_each_plan_builds_its_wakeup_source_and_image_store(tmp_path: Path) -> None:
    settings = load_settings({**DATABASE, "IMAGE_LISTENER_IMAGE_DIR": str(tmp_path)})
    plan = plan_for(settings)
    assert isinstance(wakeup_source(settings, plan), PgNotificationSource)
    assert isinstance(image_storage(settings, plan, None), LocalDirectoryStorage)
    supabase_settings = load_settings(SUPABASE)
    supabase_plan = plan_for(supabase_settings)
    assert isinstance(wakeup_source(supabase_settings, supabase_plan), RealtimeWakeupSource)
    with pytest.raises(OperatorError, match="needs a Supabase client"):
        image_storage(supabase_settings, supabase_plan, None)


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        (DATABASE, ["database", "listen", "storage", "limits", "prices", "budget", "openai"]),
        (SUPABASE, ["postgrest", "realtime", "storage", "limits", "prices", "budget", "openai"]),
        (
            DATABASE | SUPABASE,
            ["database", "listen", "storage", "limits", "prices", "budget", "openai"],
        ),
    ],
)
def test_doctor_checks_one_line_per_part_of_the_plan(
    environ: dict[str, str], names: list[str]
) -> None:
    settings = load_settings(environ)
    assert [name for name, _ in planned_checks(settings, offline=False)] == names
    assert [name for name, _ in planned_checks(settings, offline=True)] == names[:-1]


async def test_doctor_with_wakeup_poll_reports_the_push_channel_as_not_used() -> None:
    """Also in supabase mode, where the daemon then never opens Realtime."""
    settings = load_settings({**SUPABASE, "IMAGE_LISTENER_WAKEUP": "poll"})
    checks = dict(planned_checks(settings, offline=True))
    assert (await checks["realtime"]()).startswith("not used (IMAGE_LISTENER_WAKEUP=poll)")
