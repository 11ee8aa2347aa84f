"""IMAGE_LISTENER_WAKEUP=poll: no push channel at all, for databases where neither LISTEN nor
Realtime can work (a transaction pooler with Realtime off, say). The worker's own timer does the
claiming, every ``IMAGE_LISTENER_POLL_ONLY_SECONDS``; this source only keeps the daemon's shape."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class PollingOnly:
    """A wake-up source that never wakes: always healthy, never reconnects."""

    healthy = True
    reconnects = 0
    hints = 0

    async def run(self, wake: Callable[[], None], stop: asyncio.Event) -> None:
        await stop.wait()
