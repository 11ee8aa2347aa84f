"""``image-listener doctor``: check every configured dependency, one line each.

Each check is bounded in time and reports what an operator should fix; none of them prints a
secret. The checks follow the mode's plan (:mod:`listener.runtime.wiring`): the queue (the
database, or PostgREST), the wake-up channel (LISTEN or Realtime, or a note that polling
replaces it), the image store, the limits, prices and provider budget in the database, and
the OpenAI key and model (unless ``--offline``).
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from core.errors import ImageListenerError, first_line
from listener import migrate
from listener.runtime.wiring import ImagesKind, PushKind, QueueKind, command_queue, plan_for
from listener.settings import Settings

CHECK_TIMEOUT_SECONDS = 15.0
#: one check: a line of detail when it passes, an exception when it does not
Check = Callable[[], Awaitable[str]]


class Warn(str):
    """The detail of a check that passed with something the operator should act on: printed
    as ``warn``, and the exit status stays 0."""


@dataclass(frozen=True)
class CheckResult:
    """One line of the report."""

    name: str
    ok: bool
    detail: str
    warning: bool = False

    def line(self) -> str:
        label = "FAIL" if not self.ok else "warn" if self.warning else "ok  "
        return f"{label}  {self.name:<9} {self.detail}"


async def run_checks(settings: Settings, *, offline: bool) -> list[CheckResult]:
    """Every check that applies to ``settings``, in a stable order."""
    return [await _run(name, check) for name, check in planned_checks(settings, offline=offline)]


def planned_checks(settings: Settings, *, offline: bool) -> list[tuple[str, Check]]:
    """One check per part of the mode's plan: the queue, the wake-ups, the image store, the
    limits and the price of the model (in the database), and OpenAI (unless ``offline``)."""
    plan = plan_for(settings)
    checks: list[tuple[str, Check]] = []
    if plan.queue is QueueKind.SQL:
        conninfo = settings.require_database_url()
        checks.append(("database", lambda: _check_database(conninfo)))
    else:
        checks.append(("postgrest", lambda: _check_postgrest(settings)))
    wakeups = plan.push.value  # "listen" or "realtime"
    if plan.poll_only:
        checks.append((wakeups, lambda: _push_not_used(settings.poll_only_seconds)))
    elif plan.push is PushKind.LISTEN:
        conninfo = settings.require_database_url()
        checks.append((wakeups, lambda: _check_listen(conninfo)))
    else:
        checks.append((wakeups, lambda: _check_realtime(settings)))
    if plan.images is ImagesKind.SUPABASE:
        checks.append(("storage", lambda: _check_bucket(settings)))
    else:
        checks.append(("storage", lambda: _check_directory(settings.image_dir)))
    checks.append(("limits", lambda: _check_limits(settings)))
    checks.append(("prices", lambda: _check_price(settings)))
    checks.append(("budget", lambda: _check_budget(settings)))
    if not offline:
        checks.append(("openai", lambda: _check_openai(settings)))
    return checks


async def _run(name: str, check: Callable[[], Awaitable[str]]) -> CheckResult:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
            detail = await check()
            return CheckResult(name, True, detail, warning=isinstance(detail, Warn))
    except TimeoutError:
        return CheckResult(name, False, f"no answer within {CHECK_TIMEOUT_SECONDS:g}s")
    except ImageListenerError as exc:
        return CheckResult(name, False, exc.detail)
    except Exception as exc:
        return CheckResult(name, False, f"{type(exc).__name__}: {first_line(exc)}")


async def _check_database(conninfo: str) -> str:
    def check() -> str:
        with psycopg.connect(conninfo, connect_timeout=10) as conn:
            missing = migrate.pending(conn)
        total = len(migrate.discover())
        if missing:
            raise RuntimeError(
                f"reachable, but {len(missing)} of {total} migrations are missing: "
                "run `image-listener migrate`"
            )
        return f"reachable; all {total} migrations applied"

    try:
        return await asyncio.to_thread(check)
    except psycopg.Error as exc:
        raise RuntimeError(f"cannot connect: {first_line(exc)}") from exc


async def _check_listen(conninfo: str) -> str:
    from listener.wakeups.listen import listen_round_trip

    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        if await listen_round_trip(conn, conninfo, wait_seconds=5.0):
            return "LISTEN/NOTIFY round trip works"
    raise RuntimeError(
        "a NOTIFY from another session never arrived on LISTEN (a pooler in transaction mode, "
        "e.g. PgBouncer or Supavisor port 6543?): use a direct or session-mode DATABASE_URL, "
        "or set IMAGE_LISTENER_WAKEUP=poll"
    )


async def _push_not_used(poll_seconds: float) -> str:
    return f"not used (IMAGE_LISTENER_WAKEUP=poll): the worker polls every {poll_seconds:g}s"


async def _check_postgrest(settings: Settings) -> str:
    async with command_queue(settings, call_timeout=CHECK_TIMEOUT_SECONDS) as queue:
        await queue.next_due()
    return "reachable; queue functions present and executable with this key"


async def _check_limits(settings: Settings) -> str:
    async with command_queue(settings, call_timeout=CHECK_TIMEOUT_SECONDS) as queue:
        shown = await queue.quota_show()
    if not shown.get("any_limit"):
        return Warn(
            "no limit is set: any signed-in user can generate (and spend) without bound; "
            "see `image-listener quota set --default`"
        )
    default = shown.get("default") or {}
    parts = [f"{key} {value}" for key, value in default.items() if value is not None]
    return "default: " + (", ".join(parts) if parts else "none (per-user overrides only)")


async def _check_budget(settings: Settings) -> str:
    async with command_queue(settings, call_timeout=CHECK_TIMEOUT_SECONDS) as queue:
        shown = await queue.provider_budget()
    return budget_line(shown, settings.provider_images_per_minute)


def budget_line(budget: Mapping[str, Any], own: float | None) -> str:
    """The fleet's provider budget against this listener's setting (``own``), in one line."""
    source = budget.get("source")
    rate = float(budget["per_minute"]) if budget.get("per_minute") is not None else 0.0
    if budget.get("paused_until") is not None:
        return Warn(
            f"the fleet is paused after a rate-limit 429 until {budget['paused_until']} "
            f"({budget.get('rate_limited', 0)} 429s in {budget.get('pauses', 0)} pauses so far)"
        )
    if source == "operator":
        if own is not None and own != rate:
            return Warn(
                f"{rate:g}/min set by the operator wins over this listener's "
                f"IMAGE_LISTENER_PROVIDER_IMAGES_PER_MINUTE={own:g}"
            )
        return f"{rate:g}/min set by the operator (`image-listener budget`)"
    if source == "listeners":
        if own is not None and own > rate:
            return Warn(
                f"another listener's {rate:g}/min is in force, below this one's {own:g}: "
                "the smallest setting wins; make them agree"
            )
        return f"{rate:g}/min for the whole fleet (IMAGE_LISTENER_PROVIDER_IMAGES_PER_MINUTE)"
    if own is not None:
        return f"{own:g}/min for the whole fleet once this listener claims"
    if source == "learned":
        return (
            f"{rate:.3g}/min learned from the provider's 429s; set "
            "IMAGE_LISTENER_PROVIDER_IMAGES_PER_MINUTE to your organisation's limit to avoid them"
        )
    return (
        "none set and no 429 seen: the fleet starts calls without limit and learns one from "
        "429s; IMAGE_LISTENER_PROVIDER_IMAGES_PER_MINUTE sets your organisation's limit"
    )


async def _check_price(settings: Settings) -> str:
    async with command_queue(settings, call_timeout=CHECK_TIMEOUT_SECONDS) as queue:
        rows = await queue.prices()
    price = next((row for row in rows if row.get("model") == settings.model), None)
    if price is None:
        return Warn(
            f"no price for {settings.model}: its images get cost_usd null and do not count "
            f"against usd_per_month; `image-listener prices set {settings.model} ...`"
        )
    return (
        f"{settings.model}: USD {float(price['input_text_usd_per_1m']):g} / "
        f"{float(price['input_image_usd_per_1m']):g} / "
        f"{float(price['output_image_usd_per_1m']):g} per 1M input text / input image / "
        "output image tokens"
    )


async def _check_realtime(settings: Settings) -> str:
    from listener.wakeups.realtime import RealtimeWakeupSource

    url, key = settings.require_supabase()
    source = RealtimeWakeupSource(url, key, probe_seconds=1.0, probe_timeout=5.0)
    stop = asyncio.Event()
    subscribed = asyncio.Event()

    def on_wake() -> None:
        if source.subscriptions:
            subscribed.set()

    task = asyncio.create_task(source.run(on_wake, stop))
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS - 2):
            await subscribed.wait()
    except TimeoutError as exc:
        raise RuntimeError("the postgres_changes subscription did not succeed") from exc
    finally:
        stop.set()
        await task
    return "subscribed to INSERTs on public.messages"


async def _check_bucket(settings: Settings) -> str:
    from core.models import GeneratedImage
    from listener.storage.supabase import SupabaseStorage
    from listener.supabase_client import supabase_client

    url, key = settings.require_supabase()
    path = f"_doctor/{secrets.token_hex(8)}.png"
    async with supabase_client(url, key, http_timeout=CHECK_TIMEOUT_SECONDS) as client:
        storage = SupabaseStorage(client, bucket=settings.storage_bucket, signed_url_seconds=60)
        probe = GeneratedImage(data=b"image-listener doctor probe", output_format="png")
        await storage.store(path, probe)
        await storage.remove(path)
    return f"bucket {settings.storage_bucket!r} writable and signable"


async def _check_directory(directory: Path) -> str:
    def check() -> str:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".doctor-"):
            pass
        return f"{directory.resolve()} writable"

    return await asyncio.to_thread(check)


async def _check_openai(settings: Settings) -> str:
    import openai

    from listener.generators.openai import build_openai_client
    from listener.generators.openai_errors import translate_openai_error

    key = settings.require_openai_api_key()
    client = build_openai_client(key, settings.openai_base_url, CHECK_TIMEOUT_SECONDS)
    try:
        await client.models.retrieve(settings.model)
    except openai.OpenAIError as exc:
        raise translate_openai_error(exc, secret=key) from exc
    finally:
        await client.close()
    return f"key accepted; model {settings.model} available"
