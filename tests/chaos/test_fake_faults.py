"""The fake OpenAI server's chaos tools: server-wide faults and ``[fake:kill-caller]``."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
from urllib.parse import urlsplit

import pytest

from tests.support.fake_openai import FAULT_KINDS, FakeOpenAI

pytestmark = pytest.mark.chaos


def _call(fake: FakeOpenAI, prompt: str) -> tuple[int, dict[str, str]]:
    """One generation call on a fresh connection: (status, headers), or (0, {}) when the server
    closed the connection without answering (a drop, or a hang that ended)."""
    url = urlsplit(fake.base_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=5)
    try:
        conn.request(
            "POST",
            "/v1/images/generations",
            body=json.dumps({"prompt": prompt, "size": "256x256"}),
            headers={"authorization": "Bearer sk-test", "content-type": "application/json"},
        )
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    except (http.client.RemoteDisconnected, ConnectionError):
        return 0, {}
    finally:
        conn.close()


def _run_faulty(seed: int) -> tuple[list[int], FakeOpenAI]:
    with FakeOpenAI(
        fault_rate=0.5, fault_seed=seed, fault_hang_seconds=0.05, fault_retry_after_seconds=0.7
    ) as fake:
        statuses = [_call(fake, f"call {n}")[0] for n in range(60)]
    return statuses, fake


def test_server_wide_faults_replace_that_share_of_successes_reproducibly() -> None:
    """With fault_rate 0.5, about half the calls fail, each fault counted under its kind, and
    the same seed gives the same sequence."""
    statuses, fake = _run_faulty(seed=11)
    failed = sum(1 for status in statuses if status != 200)
    assert failed == fake.faults_injected
    assert 15 <= failed <= 45
    assert set(fake.fault_counts()) <= set(FAULT_KINDS)
    assert statuses.count(429) == fake.fault_counts().get("429", 0)
    assert statuses.count(500) == fake.fault_counts().get("500", 0)
    assert sum(fake.success_counts().values()) == statuses.count(200)
    again, _ = _run_faulty(seed=11)
    assert again == statuses


def test_a_429_fault_carries_retry_after() -> None:
    with FakeOpenAI(
        fault_rate=1.0, fault_seed=0, fault_hang_seconds=0.05, fault_retry_after_seconds=0.7
    ) as fake:
        for n in range(40):
            status, headers = _call(fake, f"call {n}")
            if status == 429:
                assert headers["retry-after"] == "0.7"
                return
    raise AssertionError("no 429 in 40 faults")


def test_kill_caller_sigkills_the_child_process_that_called() -> None:
    with FakeOpenAI() as fake:
        code = (
            "import json, sys, urllib.request\n"
            "req = urllib.request.Request(sys.argv[1] + '/images/generations',"
            " data=json.dumps({'prompt': 'x [fake:kill-caller]'}).encode(),"
            " headers={'authorization': 'Bearer sk-test', 'content-type': 'application/json'})\n"
            "urllib.request.urlopen(req, timeout=10)\n"
        )
        child = subprocess.run([sys.executable, "-c", code, fake.base_url], timeout=30, check=False)
        assert child.returncode == -signal.SIGKILL
        assert len(fake.kills()) == 1


def test_kill_caller_refuses_a_caller_that_is_not_its_child() -> None:
    """The test process itself calls: the server must not kill it (nor anything else)."""
    with FakeOpenAI() as fake:
        status, _ = _call(fake, "x [fake:kill-caller]")
        assert status == 400
        assert fake.kills() == []


def test_rate_limit_429s_are_counted_per_prompt_whatever_sent_them() -> None:
    """The server-wide limit and a scripted 429 both count; a billing 429 does not."""
    with FakeOpenAI(rate_limit=1, rate_window_seconds=30) as fake:
        assert _call(fake, "first")[0] == 200
        assert _call(fake, "second")[0] == 429  # the window is full
        assert _call(fake, "second")[0] == 429
        fake.rate_limit = None
        assert _call(fake, "scripted [fake:fail=429]")[0] == 429
        assert _call(fake, "quota [fake:status=billing]")[0] == 429
        assert fake.rate_limited_counts() == {"second": 2, "scripted [fake:fail=429]": 1}
        assert fake.rate_limited == 2
        assert fake.max_arrived_in_window() == 3
        assert fake.max_admitted_in_window() == 1
