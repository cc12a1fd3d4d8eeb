"""Settings: file + environment, field-naming errors, masked secrets, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fogline.cli import main
from fogline.daemon.config import MASK, ConfigError, Settings, read_config_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No FOGLINE_* variable of the caller's shell leaks into a test."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("FOGLINE_"):
            monkeypatch.delenv(name)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_match_the_architecture_contract() -> None:
    s = Settings.load(None)
    assert s.model_name == "default"
    assert s.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert s.kafka.topic == "telemetry"
    assert s.kafka.dlq_topic == "telemetry.dlq"
    assert s.redis.url == "redis://127.0.0.1:6379/0"
    assert s.redis.prefix == "fogline" and s.redis.retention == 20
    assert s.stream.batch_size == 256 and s.stream.batching == "size_or_time"
    assert s.drift.policy == "forget" and s.drift.detector == "threshold"
    assert s.api.host == "127.0.0.1" and s.api.port == 8000 and s.api.token is None
    assert s.metrics_port == 9400 and s.log_format == "auto"


def test_yaml_file_loads_and_env_overrides_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(
        tmp_path,
        "f.yaml",
        "model_name: m1\nkafka:\n  topic: t1\nstream:\n  batch_size: 32\n  device: cpu\n",
    )
    s = Settings.load(path)
    assert (s.model_name, s.kafka.topic, s.stream.batch_size, s.stream.device) == (
        "m1",
        "t1",
        32,
        "cpu",
    )
    assert s.kafka.dlq_topic == "t1.dlq"
    monkeypatch.setenv("FOGLINE_STREAM__BATCH_SIZE", "64")
    monkeypatch.setenv("FOGLINE_KAFKA__TOPIC", "t2")
    monkeypatch.setenv("FOGLINE_REDIS__PASSWORD", "pw")
    s = Settings.load(path)
    assert s.stream.batch_size == 64 and s.stream.device == "cpu"  # env wins, file rest kept
    assert s.kafka.topic == "t2" and s.kafka.dlq_topic == "t2.dlq"
    assert s.redis.password is not None and s.redis.password.get_secret_value() == "pw"


def test_fogline_config_env_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "f.toml", 'model_name = "from-env-file"\n')
    monkeypatch.setenv("FOGLINE_CONFIG", str(path))
    assert Settings.load(None).model_name == "from-env-file"


def test_toml_file_loads(tmp_path: Path) -> None:
    path = _write(tmp_path, "f.toml", '[drift]\npolicy = "vb"\nert = 500\n[api]\nquantize = true\n')
    s = Settings.load(path)
    assert s.drift.policy == "vb" and s.drift.ert == 500 and s.api.quantize is True


@pytest.mark.parametrize("name", ["fogline.toml", "fogline.yaml"])
def test_example_files_are_valid_and_agree(name: str) -> None:
    s = Settings.load(EXAMPLES / name)
    assert s == Settings.load(EXAMPLES / "fogline.toml")
    assert read_config_file(EXAMPLES / name)  # not empty


def test_bad_value_names_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOGLINE_STREAM__BATCH_SIZE", "0")
    with pytest.raises(ConfigError) as info:
        Settings.load(None)
    assert info.value.problems == [
        "stream.batch_size: Input should be greater than or equal to 1 (got '0') "
        "[env FOGLINE_STREAM__BATCH_SIZE]"
    ]
    path = _write(tmp_path, "f.yaml", "stream:\n  device: gpu\nredis:\n  retention: 0\n")
    monkeypatch.delenv("FOGLINE_STREAM__BATCH_SIZE")
    with pytest.raises(ConfigError) as info:
        Settings.load(path)
    fields = [p.split(":")[0] for p in info.value.problems]
    assert fields == ["redis.retention", "stream.device"]
    assert "Input should be 'auto', 'cpu' or 'cuda'" in str(info.value)


def test_unknown_keys_are_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "f.yaml", "stream:\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match=r"stream\.batchsize: Extra inputs are not permitted"):
        Settings.load(path)
    path = _write(tmp_path, "g.toml", "modelname = 'x'\n")
    with pytest.raises(ConfigError, match=r"modelname: Extra inputs are not permitted"):
        Settings.load(path)
    monkeypatch.setenv("FOGLINE_KAFKA__TOPC", "x")
    with pytest.raises(ConfigError, match=r"kafka\.topc: Extra inputs"):
        Settings.load(None)


def test_secret_values_are_never_echoed_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(None, kafka={"sasl_password": 12345678, "session_timeout_ms": 0})
    text = str(info.value)
    assert "kafka.sasl_password" in text and "12345678" not in text
    assert "kafka.session_timeout_ms" in text


def test_file_problems_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        Settings.load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unsupported extension"):
        Settings.load(_write(tmp_path, "f.ini", "[x]\n"))
    with pytest.raises(ConfigError, match="cannot parse"):
        Settings.load(_write(tmp_path, "f.toml", "model_name = \n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        Settings.load(_write(tmp_path, "f.yaml", "- 1\n- 2\n"))


def test_override_revalidates_and_keeps_derived_defaults() -> None:
    s = Settings.load(None).override(
        {"kafka.topic": "t9", "stream.batch_size": 8, "stream.lr": None}
    )
    assert s.kafka.dlq_topic == "t9.dlq" and s.stream.batch_size == 8 and s.stream.lr == 1e-3
    with pytest.raises(ConfigError, match=r"stream\.lr: Input should be greater than 0"):
        s.override({"stream.lr": -1})


def test_config_show_masks_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "f.yaml", "kafka:\n  sasl_password: hunter2\n")
    monkeypatch.setenv("FOGLINE_API__TOKEN", "tok-secret")
    assert main(["config", "show", "--config", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert data["kafka"]["sasl_password"] == MASK and data["api"]["token"] == MASK
    assert data["redis"]["password"] is None
    assert "hunter2" not in out and "tok-secret" not in out
    assert main(["config", "show", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sasl_password: '**********'" in out and "hunter2" not in out


def test_config_cli_exits_2_on_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "f.yaml", "api:\n  port: 70000\n")
    with pytest.raises(SystemExit) as info:
        main(["config", "validate", "--config", str(path)])
    assert info.value.code == 2
    assert "api.port: Input should be less than or equal to 65535" in capsys.readouterr().err
    good = _write(tmp_path, "g.yaml", "model_name: ok\n")
    assert main(["config", "validate", "--config", str(good)]) == 0
    assert "ok" in capsys.readouterr().out


# --------------------------------------------------------------------------
# URL credentials are masked on every surface
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("rediss://app:s3cret@cache:6380/1", "rediss://app:***@cache:6380/1"),
        ("redis://app:p@ss:w0rd@cache/0", "redis://app:***@cache/0"),  # '@' inside the password
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        ("redis://app@cache/0", "redis://app@cache/0"),  # a user name alone is no secret
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        (
            "redis unavailable at redis://:s3cret@h:1/0 (ping): ConnectionError: x; "
            "also http://u:s3cret@other:80/p",
            "redis unavailable at redis://:***@h:1/0 (ping): ConnectionError: x; "
            "also http://u:***@other:80/p",
        ),
    ],
)
def test_mask_url_credentials(raw: str, shown: str) -> None:
    from fogline.daemon.config import mask_url_credentials

    assert mask_url_credentials(raw) == shown


def test_config_show_masks_the_password_in_redis_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FOGLINE_REDIS__URL", "redis://app:hunter2@cache:6379/0")
    assert Settings.load(None).redis.url == "redis://app:hunter2@cache:6379/0"  # used as given
    for argv in (["config", "show", "--json"], ["config", "show"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "hunter2" not in out and "redis://app:***@cache:6379/0" in out


def test_invalid_url_is_not_echoed_with_its_password() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(None, redis={"url": "http://app:hunter2@cache:6379/0"})
    assert "redis.url" in str(info.value) and "hunter2" not in str(info.value)
    assert "http://app:***@cache:6379/0" in str(info.value)


def test_snapshot_cli_and_store_errors_mask_the_url_password(
    redis_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """``fogline snapshot list`` (table, JSON, empty) and StoreUnavailable messages."""
    import redis as redis_lib

    from fogline.daemon.stream.store import SnapshotStore, StoreUnavailable

    redis_lib.Redis(host=redis_server.host, port=redis_server.port).config_set(
        "requirepass", "hunter2"
    )
    url = f"redis://:hunter2@{redis_server.host}:{redis_server.port}/0"
    for extra in ([], ["--json"]):
        rc = main(["snapshot", "list", "--redis-url", url, "--model", "m1", *extra])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        assert "hunter2" not in captured.out + captured.err
    assert main(["snapshot", "list", "--redis-url", url, "--model", "m1"]) == 0
    shown = "".join(capsys.readouterr().out.split())  # rich may wrap the line
    assert f"redis://:***@{redis_server.host}:{redis_server.port}/0" in shown
    redis_server.stop()
    with (
        SnapshotStore(url, "m1", socket_timeout=0.5) as store,
        pytest.raises(StoreUnavailable) as info,
    ):
        store.latest_version()
    assert "hunter2" not in str(info.value) and ":***@" in str(info.value)
    rc = main(["snapshot", "list", "--redis-url", url, "--model", "m1"])
    err = capsys.readouterr().err
    assert rc == 1 and "hunter2" not in err and ":***@" in err


# --------------------------------------------------------------------------
# settings errors: a field-naming message and exit 2 at every entry point
# --------------------------------------------------------------------------
def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


ENTRY_POINTS = [
    ["run"],
    ["serve"],
    ["query", "--x", "1,2"],
    ["snapshot", "list"],
    ["snapshot", "models"],
    ["demo", "--out", "{tmp}/demo"],
    ["replay", "{tmp}/r.jsonl", "--topic", "t"],
    ["config", "show"],
    ["config", "validate", "--config", "{tmp}/ok.yaml"],
]


@pytest.mark.parametrize("argv", ENTRY_POINTS, ids=lambda a: " ".join(a[:2]))
def test_broken_json_in_a_nested_env_var_names_the_field_and_exits_2(
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _write(tmp_path, "ok.yaml", "model_name: ok\n")
    _write(tmp_path, "r.jsonl", '{"x": [1], "y": 1}\n')
    monkeypatch.setenv("FOGLINE_API", '{"port": 80, "token": "s3cret"')  # no closing brace
    code = _exit_code([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "api: not valid JSON (Expecting ',' delimiter" in err and "[env FOGLINE_API]" in err
    assert "Traceback" not in err and "s3cret" not in err
    assert not (tmp_path / "demo").exists()  # nothing started


@pytest.mark.parametrize("port", ["0", "99999", "-1"])
def test_serve_port_out_of_range_is_a_usage_error(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _exit_code(["serve", "--port", port]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fogline: invalid configuration:") and "api.port: Input should be" in err
    assert "Traceback" not in err


def test_ports_are_settings_constraints(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("0", "65536"):
        monkeypatch.setenv("FOGLINE_API__PORT", bad)
        with pytest.raises(ConfigError, match=r"api\.port: Input should be"):
            Settings.load(None)
    monkeypatch.setenv("FOGLINE_API__PORT", "65535")
    assert Settings.load(None).api.port == 65535
    with pytest.raises(ConfigError, match=r"metrics_port: Input should be less than"):
        Settings.load(None, metrics_port=70000)
    assert Settings.load(None, metrics_port=0).metrics_port == 0  # 0 turns the endpoint off


def test_settings_error_problem_without_a_json_cause() -> None:
    from pydantic_settings import SettingsError

    from fogline.daemon.config import settings_error_problem

    err = SettingsError('error parsing value for field "kafka" from source "EnvSettingsSource"')
    assert settings_error_problem(err) == (
        'kafka: error parsing value for field "kafka" from source "EnvSettingsSource" '
        "[env FOGLINE_KAFKA]"
    )
    assert settings_error_problem(SettingsError("odd")) == "<settings>: odd"


def test_drift_section_is_the_policy_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """One definition: ``settings.drift`` is the drift loop's PolicyConfig, checked at start-up."""
    from fogline.drift.config import PolicyConfig

    monkeypatch.setenv("FOGLINE_DRIFT__GAMMA", "0.3")
    s = Settings.load(None, drift={"cooldown": 7})
    assert isinstance(s.drift, PolicyConfig)
    assert s.drift.gamma == 0.3 and s.drift.cooldown == 7 and s.drift.name == "forget"
    monkeypatch.setenv("FOGLINE_DRIFT__GAMMA", "1.5")
    with pytest.raises(ConfigError) as info:
        Settings.load(None)
    assert [p.split(":")[0] for p in info.value.problems] == ["drift.gamma"]
    monkeypatch.delenv("FOGLINE_DRIFT__GAMMA")
    with pytest.raises(ConfigError, match=r"drift\.min_recovery: Input should be greater"):
        Settings.load(None, drift={"min_recovery": -1})
    with pytest.raises(ConfigError, match=r"drift\.bogus: Extra inputs are not permitted"):
        Settings.load(None, drift={"bogus": 1})


def test_max_poll_interval_is_kafkas_default_and_covers_the_session() -> None:
    """``kafka.max_poll_interval_ms`` (the group's rebalance timeout) defaults to Kafka's 300 s
    and may not be shorter than the session timeout; the error names both fields."""
    assert Settings.load(None).kafka.max_poll_interval_ms == 300_000
    s = Settings.load(None, kafka={"session_timeout_ms": 6000, "max_poll_interval_ms": 20_000})
    assert s.kafka.max_poll_interval_ms == 20_000
    with pytest.raises(ConfigError) as info:
        Settings.load(None, kafka={"session_timeout_ms": 6000, "max_poll_interval_ms": 5000})
    text = str(info.value)
    assert "kafka.max_poll_interval_ms (5000)" in text and "kafka.session_timeout_ms" in text
