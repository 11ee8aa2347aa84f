"""Run the chaos scenarios and print one table of figures.

    python -m tests.chaos                      # every scenario, full scale (several minutes)
    python -m tests.chaos --scale short        # what CI runs under the ``chaos`` marker
    python -m tests.chaos --only kill-storm --only replicas

Each scenario starts real ``image-listener run`` processes against a real PostgreSQL (embedded,
or the server of ``DATABASE_URL``; the database scenario always starts a private one it can
restart) and the local fake OpenAI server, then checks every request. Exit status 0 when every
scenario met every expectation, 1 otherwise (the problems are printed under the table).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable, Sequence

from tests.chaos import (
    database_outage,
    kill_storm,
    paused_listener,
    poison,
    provider_faults,
    replicas,
)
from tests.chaos.harness import SCALES
from tests.chaos.outcomes import ScenarioResult
from tests.support.pg import PostgresServer

Scenario = Callable[[str, PostgresServer], ScenarioResult]

SCENARIOS: dict[str, Scenario] = {
    "kill-storm": lambda scale, pg: kill_storm.run(scale, pg=pg),
    "poison": lambda scale, pg: poison.run(scale, pg=pg),
    "database": lambda scale, pg: database_outage.run(scale),
    "provider": lambda scale, pg: provider_faults.run(scale, pg=pg),
    "replicas": lambda scale, pg: replicas.run(scale, pg=pg),
    "paused": lambda scale, pg: paused_listener.run(scale, pg=pg),
}

COLUMNS = (
    "scenario",
    "requests",
    "kills",
    "restarts",
    "faults",
    "lost",
    "duplicated",
    "stuck",
    "wrong",
    "p50",
    "p99",
    "max",
    "wall",
)


def table(results: Sequence[ScenarioResult]) -> str:
    """The figures as a Markdown table (pastes into the README as is)."""
    rows = [COLUMNS, tuple("---" for _ in COLUMNS)]
    rows += [
        (
            r.name,
            str(r.requests),
            str(r.kills),
            str(r.restarts),
            str(r.faults),
            str(r.lost),
            str(r.duplicated),
            str(r.stuck),
            str(r.wrong),
            _seconds(r.p50_s),
            _seconds(r.p99_s),
            _seconds(r.max_s),
            f"{r.wall_s:.0f} s",
        )
        for r in results
    ]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def details(results: Sequence[ScenarioResult]) -> str:
    """Each scenario's notes, and its problems if it has any."""
    lines = []
    for result in results:
        status = "ok" if result.ok else "FAILED"
        lines.append(f"{result.name} ({result.scale}): {status}")
        lines += [f"    {key}: {value}" for key, value in result.notes.items()]
        lines += [f"    problem: {problem}" for problem in result.problems[:20]]
        if len(result.problems) > 20:
            lines.append(f"    ... and {len(result.problems) - 20} more problems")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--scale", choices=SCALES, default="full")
    parser.add_argument(
        "--only", action="append", choices=sorted(SCENARIOS), help="run only these (repeatable)"
    )
    args = parser.parse_args(argv)
    names = args.only or list(SCENARIOS)
    results: list[ScenarioResult] = []
    pg = PostgresServer()
    try:
        for name in names:
            print(f"chaos: {name} ({args.scale}) ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            try:
                result = SCENARIOS[name](args.scale, pg)
            except Exception:
                traceback.print_exc()
                result = ScenarioResult(
                    name=name,
                    scale=args.scale,
                    wall_s=time.monotonic() - started,
                    problems=["the scenario raised (traceback above)"],
                )
            results.append(result)
            print(
                f"chaos: {name} {'ok' if result.ok else 'FAILED'} in {result.wall_s:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    finally:
        pg.close()
    print(table(results))
    print()
    print(details(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
