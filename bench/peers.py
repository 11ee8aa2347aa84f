"""The peers' harness (graphile-worker and procrastinate), run unchanged on our cluster.

``../shared/anchors-bench`` may be read-only: like its ``run_all.sh``, we copy it into a work
directory (``ANCHORS_WORKDIR``, default ``$TMPDIR/anchors-bench``) and keep its venv and
node_modules there between runs. Each call runs its ``bench.py`` once and returns the JSON line
it prints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path(os.environ.get("ANCHORS_SOURCE", ROOT.parent / "shared" / "anchors-bench"))
SYSTEMS = ("graphile", "procrastinate")


class PeerHarness:
    """A prepared copy of the harness; ``run()`` executes one ``bench.py`` invocation."""

    def __init__(self, pg_host: str, pg_port: int, work_dir: Path | None = None) -> None:
        default = Path(tempfile.gettempdir()) / "anchors-bench"
        self.work = work_dir or Path(os.environ.get("ANCHORS_WORKDIR", default))
        self.env = {**os.environ, "PGHOST": pg_host, "PGPORT": str(pg_port)}
        self.env.pop("GW_LOCAL_QUEUE", None)

    def prepare(self) -> PeerHarness:
        """Copy the harness in and install what is missing (once: installs are kept)."""
        if not (SOURCE / "bench.py").exists():
            raise SystemExit(f"bench: the peers' harness is not at {SOURCE} (set ANCHORS_SOURCE)")
        (self.work / "gw").mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        for item in [*SOURCE.glob("*.py"), SOURCE / "README.md"]:
            shutil.copy(item, self.work / item.name)
        for item in [*SOURCE.glob("gw/*.js"), *SOURCE.glob("gw/*.json")]:
            shutil.copy(item, self.work / "gw" / item.name)
        python = self.work / ".venv" / "bin" / "python"
        if not python.exists():
            self._run(["python3", "-m", "venv", ".venv"], self.work)
            packages = ["procrastinate", "psycopg[binary]", "psycopg-pool"]
            self._run([str(python), "-m", "pip", "install", "-q", *packages], self.work)
        if not (self.work / "gw" / "node_modules" / "graphile-worker").exists():
            self._run(["npm", "ci", "--no-audit", "--no-fund"], self.work / "gw")
        return self

    def versions(self) -> dict[str, str]:
        """Installed versions of the two peers (for the table header)."""
        python = str(self.work / ".venv" / "bin" / "python")
        proc = subprocess.run(
            [python, "-c", "import importlib.metadata as m; print(m.version('procrastinate'))"],
            capture_output=True,
            text=True,
            check=False,
        )
        package = self.work / "gw" / "node_modules" / "graphile-worker" / "package.json"
        graphile = json.loads(package.read_text())["version"] if package.exists() else "?"
        return {"graphile": graphile, "procrastinate": proc.stdout.strip() or "?"}

    def run(
        self,
        system: str,
        *,
        n: int,
        k: int = 200,
        concurrency: int = 10,
        workers: int = 1,
        latency: bool = True,
        timeout: float = 1800,
    ) -> dict[str, Any]:
        """One ``bench.py SYSTEM`` run; its JSON result."""
        argv = [str(self.work / ".venv" / "bin" / "python"), "bench.py", system]
        argv += ["--n", str(n), "--k", str(k), "--concurrency", str(concurrency)]
        argv += ["--workers", str(workers), "--tag", "compare"]
        if not latency:
            argv.append("--skip-latency")
        proc = subprocess.run(
            argv,
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(
                f"bench: peers' bench.py {system} failed ({proc.returncode}):\n"
                f"{proc.stderr[-2000:]}"
            )
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    @staticmethod
    def _run(argv: list[str], cwd: Path) -> None:
        result = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=900, check=False
        )
        if result.returncode != 0:
            raise SystemExit(f"bench: {' '.join(argv)} failed:\n{result.stderr[-2000:]}")
