"""The deployment files agree with the code: the Dockerfile, the systemd unit, the example
environment file and the README's Deployment section name only real settings; the unit restarts
the daemon and waits longer than its shutdown grace; the image is non-root, carries no build
tools and checks its health.

Docker does not run here: the Dockerfile is read, the wheel its builder stage makes is built with
pip (and ``migrate`` is run from an installed copy of it), and its health check command is run
against a real daemon.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from listener.migrate import discover
from listener.settings import SECRET_VARIABLES, load_settings, settings_table
from tests.support.daemon_process import Daemon, listener_env
from tests.support.fake_openai import FakeOpenAI
from tests.support.pg import PostgresServer

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
UNIT = ROOT / "deploy" / "image-listener.service"
ENV_EXAMPLE = ROOT / "deploy" / "image-listener.env.example"
README = ROOT / "README.md"

SETTINGS = {variable: (default, text) for variable, default, text in settings_table()}
GRACE_SECONDS = float(SETTINGS["IMAGE_LISTENER_SHUTDOWN_GRACE_SECONDS"][0])
HTTP_PORT = int(SETTINGS["IMAGE_LISTENER_HTTP_PORT"][0])

# Anything that looks like one of our variables, so that a typo or a removed setting is caught.
_VARIABLE = re.compile(
    r"\b(?:IMAGE_LISTENER_[A-Z0-9_]*[A-Z0-9]|DATABASE_URL|OPENAI_[A-Z0-9_]+|SUPABASE_[A-Z0-9_]+)\b"
)


def variables_in(text: str) -> set[str]:
    return set(_VARIABLE.findall(text))


# --- systemd -----------------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax: ``[Section]``, ``Key=value`` (keys may repeat), ``#``/``;``
    comment lines, a trailing backslash continuing a line."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = (pending + raw.strip()) if pending else raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"not Key=value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


_TIMESPAN_UNITS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}


def timespan_seconds(value: str) -> float:
    """A systemd time span (``45``, ``45s``, ``1min 30s``) in seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", value)
    assert parts, value
    assert "".join(n + u for n, u in parts) == value.replace(" ", ""), value
    return sum(float(number) * _TIMESPAN_UNITS[unit] for number, unit in parts)


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text("utf-8"))["Service"]


def test_unit_restarts_always_and_waits_longer_than_the_shutdown_grace(
    service: dict[str, list[str]],
) -> None:
    assert service["Restart"] == ["always"]
    assert timespan_seconds(service["RestartSec"][-1]) > 0
    assert service["KillSignal"] == ["SIGTERM"]
    assert timespan_seconds(service["TimeoutStopSec"][-1]) > GRACE_SECONDS


def test_unit_runs_the_daemon_as_a_dedicated_user_with_the_environment_file(
    service: dict[str, list[str]],
) -> None:
    # No leading "-": a missing settings file must stop the start, not run with defaults.
    assert service["EnvironmentFile"] == ["/etc/image-listener/env"]
    assert service["ExecStart"] == ["/opt/image-listener/.venv/bin/image-listener run"]
    assert service["User"][-1] not in ("", "root", "0")
    assert service["NoNewPrivileges"] == ["yes"]


def test_unit_keeps_the_image_directory_writable_under_protect_system(
    service: dict[str, list[str]],
) -> None:
    assert service["ProtectSystem"] == ["strict"]
    writable = [
        Path(path.lstrip("-")) for entry in service["ReadWritePaths"] for path in entry.split()
    ]
    assignments = dict(entry.split("=", 1) for entry in service["Environment"])
    image_dir = Path(assignments["IMAGE_LISTENER_IMAGE_DIR"])
    assert any(image_dir.is_relative_to(path) for path in writable), (image_dir, writable)


def test_unit_names_only_real_settings(service: dict[str, list[str]]) -> None:
    assigned = {entry.split("=", 1)[0] for entry in service.get("Environment", [])}
    assert assigned <= SETTINGS.keys()
    assert variables_in(UNIT.read_text("utf-8")) <= SETTINGS.keys()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own parser: unknown keys and malformed values are reported against the file.
    The venv does not exist here, so ExecStart points at a stand-in executable."""
    stand_in = tmp_path / "image-listener"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(
        UNIT.read_text("utf-8").replace(
            "/opt/image-listener/.venv/bin/image-listener", str(stand_in)
        )
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    about_unit = [
        line for line in (result.stdout + result.stderr).splitlines() if str(unit) in line
    ]
    assert result.returncode == 0, result.stdout + result.stderr
    assert about_unit == []


# --- the example environment file ----------------------------------------------------------------

_ASSIGNMENT = re.compile(r"^(?P<commented># ?)?(?P<variable>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


def env_example() -> list[tuple[str, str, bool, str]]:
    """(variable, value, commented out, the comment block above it) for each assignment."""
    entries = []
    block: list[str] = []
    for line in ENV_EXAMPLE.read_text("utf-8").splitlines():
        match = _ASSIGNMENT.match(line)
        if match:
            comment = " ".join(text.lstrip("#").strip() for text in block)
            entries.append(
                (match["variable"], match["value"], match["commented"] is not None, comment)
            )
            block = []
        elif line.startswith("#"):
            block.append(line)
        else:
            block = []
    return entries


def test_env_example_names_every_setting_once_and_nothing_else() -> None:
    named = [variable for variable, _, _, _ in env_example()]
    assert sorted(named) == sorted(SETTINGS), "each setting exactly once"
    assert variables_in(ENV_EXAMPLE.read_text("utf-8")) <= SETTINGS.keys()


def test_env_example_gives_each_setting_its_description_and_default() -> None:
    for variable, value, commented, comment in env_example():
        default, description = SETTINGS[variable]
        assert description in comment, variable
        assert "(default: " in comment, variable
        if default == "unset":
            assert "(default: unset" in comment, variable
        else:
            assert commented, f"{variable} has a default: leave it commented out"
            assert value == default, variable


def test_env_example_holds_placeholders_for_secrets_only() -> None:
    for variable, value, _, comment in env_example():
        if variable in SECRET_VARIABLES:
            assert "REPLACE_ME" in value, variable
            assert "secret" in comment, variable
    active = {variable: value for variable, value, commented, _ in env_example() if not commented}
    assert active.keys() == {"DATABASE_URL", "OPENAI_API_KEY"}
    # docker --env-file keeps quotes as part of the value
    assert not any(quote in value for value in active.values() for quote in "\"'")


def test_env_example_values_are_accepted_by_the_settings() -> None:
    entries = env_example()
    active = {variable: value for variable, value, commented, _ in entries if not commented}
    assert load_settings(active).mode() == "postgres"
    everything = {variable: value for variable, value, _, _ in entries}
    assert load_settings(everything).mode() == "hybrid"
    defaults = {
        variable: value for variable, value, _, _ in entries if SETTINGS[variable][0] != "unset"
    }
    assert load_settings(defaults) == load_settings({})


# --- Dockerfile ----------------------------------------------------------------------------------


def dockerfile_stages() -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """(global ARG defaults, stages as lists of (INSTRUCTION, arguments)); comments dropped,
    continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text("utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, arguments = (pending + line).partition(" ")
        instructions.append((instruction.upper(), arguments.strip()))
        pending = ""
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for instruction, arguments in instructions:
        if instruction == "FROM":
            stages.append([])
        if not stages:
            assert instruction == "ARG", instruction
            name, _, default = arguments.partition("=")
            args[name] = default
            continue
        stages[-1].append((instruction, arguments))
    return args, stages


def _base_image(args: dict[str, str], stage: list[tuple[str, str]]) -> str:
    instruction, arguments = stage[0]
    assert instruction == "FROM"
    image = arguments.split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image)


def _final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[1][-1]


def _only(stage: list[tuple[str, str]], instruction: str) -> str:
    found = [arguments for name, arguments in stage if name == instruction]
    assert len(found) == 1, (instruction, found)
    return found[0]


_BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|clang|build-essential|make|cmake|cargo|rustc|[a-z0-9.+-]+-dev)\b"
)


def test_dockerfile_final_stage_is_slim_non_root_and_holds_only_the_venv() -> None:
    args, stages = dockerfile_stages()
    assert len(stages) >= 2, "a builder stage and a final stage"
    # the venv is copied across stages: same Python in both
    assert {_base_image(args, stage) for stage in stages} == {"python:3.11-slim"}
    final = stages[-1]
    user = _only(final, "USER").split(":")[0]
    assert user not in ("root", "0")
    copies = [arguments for name, arguments in final if name in ("COPY", "ADD")]
    assert copies
    assert all(arguments.startswith("--from=") for arguments in copies), copies
    for name, arguments in final:
        if name == "RUN":
            assert not _BUILD_TOOLS.search(arguments), arguments


def test_dockerfile_runs_the_daemon_stops_with_sigterm_and_checks_health() -> None:
    final = _final_stage()
    assert json.loads(_only(final, "ENTRYPOINT")) == ["image-listener"]
    assert json.loads(_only(final, "CMD")) == ["run"]
    assert _only(final, "STOPSIGNAL") == "SIGTERM"
    assert str(HTTP_PORT) in _only(final, "EXPOSE").split()
    healthcheck = _only(final, "HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert "curl" not in healthcheck, "not in slim images"
    assert "wget" not in healthcheck, "not in slim images"


def test_dockerfile_names_only_real_settings() -> None:
    final = _final_stage()
    env_keys = {
        key
        for name, arguments in final
        if name == "ENV"
        for key in re.findall(r"(\w+)=", arguments)
    }
    ours = {key for key in env_keys if _VARIABLE.fullmatch(key)}
    assert ours <= SETTINGS.keys()
    assert variables_in(DOCKERFILE.read_text("utf-8")) <= SETTINGS.keys()
    # the image and the systemd unit put images in the same place, as the README says
    unit_env = dict(
        entry.split("=", 1) for entry in parse_unit(UNIT.read_text())["Service"]["Environment"]
    )
    env_line = " ".join(arguments for name, arguments in final if name == "ENV")
    assert f"IMAGE_LISTENER_IMAGE_DIR={unit_env['IMAGE_LISTENER_IMAGE_DIR']}" in env_line


def test_dockerignore_keeps_only_the_build_inputs() -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text("utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "everything is excluded unless listed"
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources = set()
    for name, arguments in dockerfile_stages()[1][0]:
        if name == "COPY" and not arguments.startswith("--from="):
            sources.update(part.rstrip("/") for part in arguments.split()[:-1])
    assert sources
    assert sources <= kept
    assert not kept & {".git", ".venv", "tests", ".image-listener"}


@pytest.mark.e2e
def test_docker_healthcheck_command_passes_on_a_running_daemon_only(
    database_url: str, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    """The HEALTHCHECK's own command line, with this venv's python, against the real daemon."""
    command = json.loads(_only(_final_stage(), "HEALTHCHECK").split("CMD", 1)[1])
    assert command[0] == "python"
    command[0] = sys.executable
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    probe_env = {"PATH": os.environ.get("PATH", ""), "IMAGE_LISTENER_HTTP_PORT": port}

    def healthcheck() -> int:
        return subprocess.run(command, env=probe_env, capture_output=True, timeout=10).returncode

    env = listener_env(database_url, fake_openai.base_url, tmp_path / "images")
    daemon = Daemon(
        {**env, "IMAGE_LISTENER_HTTP_PORT": port, "IMAGE_LISTENER_HTTP_HOST": "127.0.0.1"}
    )
    try:
        daemon.wait_for_event("listening")
        deadline = time.monotonic() + 10
        while healthcheck() != 0:
            assert time.monotonic() < deadline, daemon.output()
            time.sleep(0.1)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
        assert healthcheck() != 0
    finally:
        daemon.stop()


@pytest.mark.e2e
def test_the_wheel_carries_the_migrations_and_migrate_runs_from_an_installed_copy(
    tmp_path: Path, pg_server: PostgresServer
) -> None:
    """What the Dockerfile's builder does (``pip wheel --no-deps .``, then install), minus
    Docker: the SQL files are inside the wheel and ``migrate`` finds them once installed."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("core", "listener", "migrations"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist, site = tmp_path / "dist", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", str(source), "-w", str(dist)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("*.whl")
    migrations = sorted((ROOT / "migrations").glob("*.sql"))
    assert migrations
    with zipfile.ZipFile(wheel) as archive:
        for path in migrations:
            assert archive.read(f"listener/migrations/{path.name}") == path.read_bytes()
    installed = subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr

    name = pg_server.empty()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGE_LISTENER_")}
        env.update({"PYTHONPATH": str(site), "DATABASE_URL": pg_server.dsn(name)})
        where = subprocess.run(
            [sys.executable, "-c", "from listener import migrate; print(migrate.MIGRATIONS_DIR)"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert Path(where.stdout.strip()) == site / "listener" / "migrations", where.stderr
        result = subprocess.run(
            [sys.executable, "-m", "listener", "migrate"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert f"{len(discover())} migration(s) applied" in result.stdout
    finally:
        pg_server.drop(name)


# --- README --------------------------------------------------------------------------------------


def deployment_section() -> str:
    text = README.read_text("utf-8")
    start = text.index("\n## Deployment\n")
    end = text.index("\n## ", start + 1)
    assert text[end:].startswith("\n## Tests\n"), "the Deployment section comes just before Tests"
    return text[start:end]


def test_readme_deployment_section_covers_docker_systemd_and_kubernetes() -> None:
    section = deployment_section()
    for heading in ("### Docker", "### systemd", "### Kubernetes"):
        assert f"\n{heading}\n" in section
    assert variables_in(section) <= SETTINGS.keys()
    assert "IMAGE_LISTENER_WAKEUP=poll" in section
    assert re.search(r"docker run --rm --env-file \S+ image-listener migrate", section)
    stop_timeout = re.search(r"--stop-timeout (\d+)", section)
    assert stop_timeout
    assert float(stop_timeout[1]) > GRACE_SECONDS
    for path in re.findall(r"\]\(((?:deploy/|Dockerfile)[^)]*)\)", section):
        assert (ROOT / path).is_file(), path


def test_readme_systemd_steps_match_the_unit(service: dict[str, list[str]]) -> None:
    section = deployment_section()
    assert service["ExecStart"][0].split()[0] in section
    assert service["EnvironmentFile"][0] in section
    assert f"deploy/{UNIT.name}" in section
    assert f"deploy/{ENV_EXAMPLE.name}" in section


def test_readme_kubernetes_probes_and_grace_period() -> None:
    section = deployment_section()
    yaml = section[section.index("```yaml") : section.index("```", section.index("```yaml") + 3)]
    grace = re.search(r"terminationGracePeriodSeconds: (\d+)", yaml)
    assert grace
    assert float(grace[1]) > GRACE_SECONDS
    replicas = re.search(r"replicas: (\d+)", yaml)
    assert replicas
    assert int(replicas[1]) > 1
    assert re.search(r"livenessProbe:[^\n]*\n\s+httpGet: \{path: /healthz,", yaml)
    assert re.search(r"readinessProbe:[^\n]*\n\s+httpGet: \{path: /readyz,", yaml)
    assert f"containerPort: {HTTP_PORT}" in yaml
    uid = _only(_final_stage(), "USER").split(":")[0]
    assert f"runAsUser: {uid}" in yaml
