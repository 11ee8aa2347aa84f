"""The listener's own overhead against graphile-worker and procrastinate, in one run.

Starts a throwaway PostgreSQL 15 cluster (as ../shared/anchors-bench/run_all.sh does), runs the
peers' harness on it unchanged, then our listener (real ``image-listener run`` processes against
the local instant OpenAI-compatible fake) through the same scenarios, and prints one markdown
table with both sides, the ratios and the targets. Everything it starts is stopped at the end.

    python bench/compare.py                 # full: N=2,000 and 20,000; 200 wake-ups; 500 in
                                            # flight; 100,000 backlog; two rounds (~30 min)
    python bench/compare.py --quick         # smoke run: N=500, 50 wake-ups, 100 in flight, 2k
    python bench/compare.py --profile DIR   # also py-spy + per-function DB time (first round)

Raw results (every round, every figure) go to ``--json`` (default: a file in the temp dir).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import report, scenarios, stress  # noqa: E402
from bench.cluster import Cluster  # noqa: E402
from bench.peers import SYSTEMS, PeerHarness  # noqa: E402
from bench.rig import Rig  # noqa: E402

FULL = {"sizes": (2000, 20000), "k": 200, "slow": 500, "backlog": 100_000, "window": 1000}
QUICK = {"sizes": (500,), "k": 50, "slow": 100, "backlog": 2000, "window": 200}
SCENARIOS = ("peers", "throughput", "latency", "slow", "backlog")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def code_fingerprint() -> str:
    """Short hashes of the code under test: other people may be editing it between runs."""
    parts = []
    for label, patterns in (
        ("migrations", ["migrations/*.sql"]),
        ("code", ["listener/*.py", "core/*.py"]),
    ):
        digest = hashlib.sha256()
        for path in sorted(f for pattern in patterns for f in ROOT.glob(pattern)):
            digest.update(path.name.encode() + path.read_bytes())
        parts.append(f"{label} {digest.hexdigest()[:10]}")
    return ", ".join(parts)


def default_work_parent() -> Path:
    """``.bench-work/`` in the checkout, where the listeners write their images.

    Not the temp dir: on the 2-core VM these figures come from, creating a file under ``/tmp``
    (and, after a few runs, under ``/var/tmp``) cost 0.5-1 ms of kernel CPU against 0.016 ms
    on the checkout's filesystem (bench/FINDINGS.md), a property of those directories that
    would be charged to every job as listener CPU. :func:`file_create_ms` measures the chosen
    directory and the header prints it.
    """
    return ROOT / ".bench-work"


def file_create_ms(directory: Path, count: int = 200) -> float:
    """CPU milliseconds (user + kernel) to create one new 5 KB file here, as each image is:
    the files are kept until all are written, so no freed inode is reused."""
    probe = Path(tempfile.mkdtemp(prefix="probe-", dir=directory))
    payload = b"x" * 5000
    before = time.process_time()
    for i in range(count):
        (probe / f"{i}.png").write_bytes(payload)
    spent = time.process_time() - before
    shutil.rmtree(probe)
    return round(spent * 1000 / count, 3)


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_round(
    number: int,
    sizes: dict[str, Any],
    rig: Rig,
    peers: PeerHarness | None,
    only: set[str],
    profile: bool,
) -> dict[str, Any]:
    """One round: the peers, then ours, each scenario once."""
    result: dict[str, Any] = {"peers": {}, "ours": {}}
    for n in sizes["sizes"]:
        if peers is not None and "peers" in only:
            for system in SYSTEMS:
                for workers in (1, 2):
                    with_latency = workers == 1 and n == sizes["sizes"][0]
                    _say(f"round {number}: {system} N={n} workers={workers}")
                    result["peers"][f"{system}:{n}:{workers}"] = peers.run(
                        system, n=n, k=sizes["k"], workers=workers, latency=with_latency
                    )
        if "throughput" in only:
            for processes in (1, 2):
                _say(f"round {number}: ours N={n} processes={processes}")
                first = profile and number == 1 and n == sizes["sizes"][0] and processes == 1
                result["ours"][f"tp:{n}:{processes}"] = scenarios.throughput(
                    rig, n, processes, profile=first
                )
    if "latency" in only:
        _say(f"round {number}: ours wake-up latency, {sizes['k']} inserts")
        result["ours"]["latency"] = scenarios.wakeup_latency(rig, sizes["k"])
    if "slow" in only:
        _say(f"round {number}: ours {sizes['slow']} in flight against a 10 s provider")
        result["ours"]["slow"] = stress.slow_provider(rig, sizes["slow"])
        _say(f"round {number}: the same with 1.5 MB images, provider 10-12 s")
        result["ours"]["slow_big"] = stress.slow_provider(
            rig,
            sizes["slow"],
            jitter=2.0,
            image_bytes=stress.REALISTIC_IMAGE_BYTES,
            profile=profile and number == 1,
        )
    if "backlog" in only:
        _say(f"round {number}: ours backlog of {sizes['backlog']:,}")
        result["ours"]["backlog"] = stress.backlog(rig, sizes["backlog"], window=sizes["window"])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the table shows medians")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    parser.add_argument("--profile", type=Path, help="write py-spy profiles here (round 1)")
    parser.add_argument("--json", type=Path, help="where to write the raw results")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=default_work_parent(),
        help="parent of the run's work dir (images, logs); default %(default)s",
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    if unknown := only - set(SCENARIOS):
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    sizes = QUICK if args.quick else FULL
    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="il-bench-", dir=args.work_dir))
    out = args.json or work / "results.json"
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    rounds: list[dict[str, Any]] = []
    loads: list[float] = []
    cluster = Cluster()
    rig: Rig | None = None
    try:
        cluster.start()
        _say(f"PostgreSQL on {cluster.host}:{cluster.port}; work dir {work}")
        peers = PeerHarness(cluster.host, cluster.port).prepare() if "peers" in only else None
        rig = Rig(cluster, work, profile_dir=args.profile).prepare()
        meta = {
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "pg": cluster.settings(),
            "versions": peers.versions() if peers else {"graphile": "-", "procrastinate": "-"},
            "rounds": args.rounds,
            "sizes": sizes,
            "load_avg": loads,
            "code": code_fingerprint(),
            "work_dir": str(work),
            "file_create_ms": file_create_ms(work),
        }
        for number in range(1, args.rounds + 1):
            loads.append(os.getloadavg()[0])
            rounds.append(run_round(number, sizes, rig, peers, only, bool(args.profile)))
            loads.append(os.getloadavg()[0])
            out.write_text(json.dumps({"meta": meta, "rounds": rounds}, indent=1, default=str))
    finally:
        cluster.stop()
        if rig is not None:
            rig.remove_images()
    if (now := code_fingerprint()) != meta["code"]:
        meta["code"] += f" (changed during the run: now {now})"
    table = report.rows(sizes["sizes"], 10.0, sizes["slow"])
    print(report.header(meta))
    print()
    print(report.render(rounds, table))
    if len(rounds) > 1:
        for number, single in enumerate(rounds, 1):
            print(f"\n<details><summary>round {number}</summary>\n")
            print(report.render([single], table))
            print("\n</details>")
    print(f"\nraw results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
