"""A worker wired in-process to real parts (the database, the real SDK over HTTP to the fake
server, a local image directory), for tests that need the worker without a subprocess."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from core.retry import RetryPolicy
from listener.generators.openai import OpenAIImageGenerator, build_openai_client
from listener.generators.retrying import RetryingGenerator
from listener.queue.calls import QueueCalls
from listener.queue.postgres import SqlTransport, open_pool
from listener.runtime.processor import JobProcessor, ProcessorConfig
from listener.runtime.worker import Worker, WorkerConfig
from listener.storage.local import LocalDirectoryStorage
from tests.support.fake_openai import FakeOpenAI

API_KEY = "sk-test-WORKER-secret-7f3a"
# Fast schedules: the behaviour under test is the decision, not the wall-clock wait.
FAST = RetryPolicy(
    tries_per_attempt=3,
    base_delay=0.01,
    max_delay=0.05,
    attempt_backoff_base=0.05,
    attempt_backoff_max=0.1,
)


@dataclass
class Rig:
    """A worker wired to real parts; ``drain()`` runs it until the queue is empty."""

    database_url: str
    fake: FakeOpenAI
    image_dir: Path
    policy: RetryPolicy = FAST
    max_attempts: int = 3
    lease_seconds: float = 30.0
    concurrency: int = 4

    openai_timeout: float = 2.0

    async def drain(self, limit_seconds: float = 30.0) -> Worker:
        pool = open_pool(self.database_url, max_size=4, timeout=5)
        await pool.open(wait=True)
        client = build_openai_client(API_KEY, self.fake.base_url, self.openai_timeout)
        try:
            store = QueueCalls(SqlTransport.over_pool(pool, call_timeout=5))
            processor = JobProcessor(
                store=store,
                generator=RetryingGenerator(OpenAIImageGenerator(client), self.policy),
                storage=LocalDirectoryStorage(self.image_dir, None),
                inputs=LocalDirectoryStorage(self.image_dir.parent / "inputs", None),
                config=ProcessorConfig(
                    worker_id="test-worker",
                    model="gpt-image-2.6-flare",
                    default_size="1024x1024",
                    max_attempts=self.max_attempts,
                    lease_seconds=self.lease_seconds,
                    log_prompts=False,
                    retry_policy=self.policy,
                ),
            )
            worker = Worker(
                store=store,
                processor=processor,
                config=WorkerConfig(
                    worker_id="test-worker",
                    concurrency=self.concurrency,
                    lease_seconds=self.lease_seconds,
                    max_attempts=self.max_attempts,
                    poll_seconds=0.2,
                    shutdown_grace_seconds=5,
                ),
            )
            async with asyncio.timeout(limit_seconds):
                await worker.run(asyncio.Event(), drain=True)
            return worker
        finally:
            await client.close()
            await pool.close()
