"""docker-compose.yml, .env.example and the GPU override: valid, and broken copies rejected.

The engine-free ``docker-compose config`` runs when installed
(``ops/install-validators.sh``); the structural checks always run.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from ops_validation import (
    COMPOSE_FILE,
    ENV_EXAMPLE,
    OPS,
    ROOT,
    Mutation,
    compose_problems,
    compose_tool_problems,
    env_example_problems,
    find_tool,
    replace,
    run_tool,
)

COMPOSE = COMPOSE_FILE.read_text()
ENV = ENV_EXAMPLE.read_text()


# Broken copies: name -> (how to break it, a fragment the validator must report).
STRUCTURAL_BREAKS: dict[str, tuple[Mutation, str]] = {
    "yaml syntax error": (
        replace("services:\n", "services: [\n"),
        "YAML",
    ),
    "depends on an unknown service": (
        replace(
            "      kafka-init:\n        condition: service_completed_successfully",
            "      kafka-setup:\n        condition: service_completed_successfully",
        ),
        "unknown service 'kafka-setup'",
    ),
    "waits for a service without healthcheck": (
        replace('      test: ["CMD-SHELL", "redis-cli ping | grep -q PONG"]\n', ""),
        "waits for redis healthy",
    ),
    "long-running service without healthcheck": (
        replace(
            '      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:3000/api/health"]\n',
            "",
        ),
        "grafana: long-running service without a healthcheck",
    ),
    "literal secret": (
        replace(
            "FOGLINE_API__TOKEN: ${API_TOKEN:?set API_TOKEN in .env (see .env.example)}",
            "FOGLINE_API__TOKEN: hunter2",
        ),
        "FOGLINE_API__TOKEN is a literal",
    ),
    "required variable missing from .env.example": (
        replace(
            'GF_USERS_ALLOW_SIGN_UP: "false"',
            'GF_USERS_ALLOW_SIGN_UP: "false"\n      GF_SMTP_PASSWORD: ${SMTP_PASSWORD:?set it}',
        ),
        "${SMTP_PASSWORD} is not in .env.example",
    ),
    "misspelt fogline setting": (
        replace("      FOGLINE_METRICS_PORT: 9400", "      FOGLINE_STREAM__BATCHSIZE: 256"),
        "FOGLINE_STREAM__BATCHSIZE: no such setting",
    ),
    "invalid fogline setting value": (
        replace("FOGLINE_STREAM__DEVICE: ${FOGLINE_DEVICE:-cpu}", "FOGLINE_STREAM__DEVICE: tpu"),
        "stream.device",
    ),
    "redis without AOF": (
        replace("--appendonly yes", "--appendonly no"),
        "lacks --appendonly yes",
    ),
    "redis without password": (
        replace('--requirepass "$$REDIS_PASSWORD"', ""),
        "lacks --requirepass",
    ),
    "kafka not in KRaft mode": (
        replace("KAFKA_PROCESS_ROLES: broker,controller", "KAFKA_PROCESS_ROLES: broker"),
        "not a KRaft broker+controller",
    ),
    "topics not created idempotently": (
        replace("--create --if-not-exists", "--create"),
        "does not create topics idempotently",
    ),
    "port published on every interface": (
        replace('"127.0.0.1:${GRAFANA_HOST_PORT:-3000}:3000"', '"3000:3000"'),
        "published beyond loopback",
    ),
    "query service bound to loopback": (
        replace('command: ["serve", "--host", "0.0.0.0"]', 'command: ["serve"]'),
        "serve --host 0.0.0.0",
    ),
    "keyed replicas on a fixed host port": (
        replace(
            "  fogline-keyed:\n    <<: *fogline\n",
            '  fogline-keyed:\n    <<: *fogline\n    ports:\n      - "127.0.0.1:9401:9400"\n',
        ),
        "fogline-keyed: keyed replicas publish a fixed host port",
    ),
    "missing bind-mount source": (
        replace("./ops/prometheus/alerts.yml:", "./ops/prometheus/alert-rules.yml:"),
        "alert-rules.yml does not exist",
    ),
}


def test_compose_structure_is_valid() -> None:
    assert compose_problems(COMPOSE, ENV) == []


@pytest.mark.parametrize("name", sorted(STRUCTURAL_BREAKS))
def test_compose_structure_rejects_broken_copy(name: str) -> None:
    mutate, expected = STRUCTURAL_BREAKS[name]
    problems = compose_problems(mutate(COMPOSE), ENV)
    assert any(expected in p for p in problems), (name, problems)


def test_env_example_holds_placeholders_only() -> None:
    assert env_example_problems(ENV) == []
    leaked = ENV.replace("REDIS_PASSWORD=change-me-redis", "REDIS_PASSWORD=s3cr3t-Pr0d")
    assert leaked != ENV
    assert env_example_problems(leaked) == [
        "REDIS_PASSWORD: example value is not a change-me placeholder"
    ]


def test_dotenv_is_ignored_and_not_committed() -> None:
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
    tracked = subprocess.run(
        ["git", "ls-files", "--", ".env"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert tracked == ""
    # .dockerignore keeps it out of images too.
    assert ".env" in (ROOT / ".dockerignore").read_text().splitlines()


# --- engine-free compose validator --------------------------------------------------
needs_compose = pytest.mark.skipif(
    find_tool("docker-compose") is None,
    reason="no docker-compose binary: run ops/install-validators.sh (structural checks still ran)",
)

TOOL_BREAKS: dict[str, Mutation] = {
    "yaml syntax error": STRUCTURAL_BREAKS["yaml syntax error"][0],
    "depends on an unknown service": STRUCTURAL_BREAKS["depends on an unknown service"][0],
    "unknown depends_on condition": replace(
        "condition: service_completed_successfully", "condition: service_done"
    ),
    "misspelt key": replace("stop_grace_period: 60s", "stop_grace_perod: 60s"),
    "wrong type": replace("retries: 12", "retries: twelve"),
    "unknown top-level section": replace("volumes:\n  kafka-data:", "volume:\n  kafka-data:"),
}


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@needs_compose
def test_compose_validator_accepts_compose_file() -> None:
    assert compose_tool_problems(COMPOSE_FILE, ENV_EXAMPLE) == []


@needs_compose
@pytest.mark.parametrize("name", sorted(TOOL_BREAKS))
def test_compose_validator_rejects_broken_copy(name: str, tmp_path: Path) -> None:
    broken = _write(tmp_path, "docker-compose.yml", TOOL_BREAKS[name](COMPOSE))
    assert compose_tool_problems(broken, ENV_EXAMPLE), f"docker-compose config accepted: {name}"


@needs_compose
def test_compose_validator_refuses_missing_secret(tmp_path: Path) -> None:
    env = _write(tmp_path, ".env", replace("REDIS_PASSWORD=change-me-redis\n", "")(ENV))
    problems = compose_tool_problems(COMPOSE_FILE, env)
    assert problems and "REDIS_PASSWORD" in problems[0]


@needs_compose
def test_gpu_override_merges_onto_the_stack() -> None:
    tool = find_tool("docker-compose")
    assert tool is not None
    argv: list[str | Path] = [
        tool, "--project-directory", ROOT, "-f", COMPOSE_FILE, "-f", OPS / "compose.gpu.yml",
        "--env-file", ENV_EXAMPLE, "config", "--format", "json",
    ]  # fmt: skip
    rc, out = run_tool(argv)
    assert rc == 0, out
    import json

    daemon = json.loads(out)["services"]["fogline-daemon"]
    assert daemon["environment"]["FOGLINE_STREAM__DEVICE"] == "cuda"
    devices = daemon["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
