"""fogline settings: one :class:`Settings` object, read once at start-up.

Sources, highest priority first:

1. keyword arguments given to ``Settings(...)`` (tests, CLI overrides);
2. environment variables ``FOGLINE_<FIELD>``, nested with ``__``
   (``FOGLINE_STREAM__BATCH_SIZE=64``, ``FOGLINE_KAFKA__SASL_PASSWORD=...``);
3. a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file given to
   :meth:`Settings.load`, or named by ``FOGLINE_CONFIG`` when no path is given;
4. the defaults below.

Every section forbids unknown keys, so a misspelt key fails.  Any bad value
fails at start-up with :class:`ConfigError`, whose message names each field::

    invalid configuration:
      stream.batch_size: Input should be greater than or equal to 1 (got 0) [env FOGLINE_STREAM__BATCH_SIZE]

This module is the only one in fogline that reads environment variables.
Secrets are :class:`pydantic.SecretStr`; :meth:`Settings.masked` shows them as
``'**********'``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from fogline.daemon.names import MODEL_NAME_PATTERN, dlq_topic_for, mask_url_credentials
from fogline.drift.config import PolicyConfig
from fogline.models.spec import ModelSpec

__all__ = [
    "ENV_CONFIG_PATH",
    "ENV_PREFIX",
    "MASK",
    "MODEL_NAME_PATTERN",
    "ApiSettings",
    "ConfigError",
    "DriftSettings",
    "KafkaSettings",
    "RedisSettings",
    "Settings",
    "StreamSettings",
    "env_var_name",
    "format_validation_error",
    "load_or_exit",
    "mask_url_credentials",
    "read_config_file",
    "settings_error_problem",
]

ENV_PREFIX = "FOGLINE_"
#: Environment variable naming a config file, used when ``Settings.load(None)``.
ENV_CONFIG_PATH = "FOGLINE_CONFIG"
#: How secrets are shown by :meth:`Settings.masked` and ``fogline config show``.
MASK = "**********"

_SECRET_FIELDS = frozenset({"sasl_password", "password", "token"})


class ConfigError(ValueError):
    """The configuration is unusable; ``str(err)`` is ready to print.

    ``problems`` holds one ``"<dotted.field>: <reason>"`` line per problem.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = problems or []
        super().__init__(message)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class KafkaSettings(_Section):
    """Kafka consumer group and dead-letter topic."""

    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = Field(default="telemetry", min_length=1)
    #: Dead-letter topic; ``None`` in input means ``"<topic>.dlq"``.
    dlq_topic: str | None = None
    group_id: str = Field(default="fogline", min_length=1)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: (
        Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] | None
    ) = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    session_timeout_ms: int = Field(default=10_000, ge=1)
    #: Kafka's ``max.poll.interval.ms``, which is also the group's rebalance timeout: the
    #: coordinator holds a rebalance open this long for members that have not rejoined,
    #: so a daemon killed during a rebalance delays its group's next assignment by up to
    #: this much.  The consumer polls every ``stream.max_wait_ms`` or so, in its own
    #: process by default; at least ``session_timeout_ms``.
    max_poll_interval_ms: int = Field(default=300_000, ge=1)
    max_poll_records: int = Field(default=2048, ge=1)
    #: Largest dead-letter produce request (the broker's ``message.max.bytes``);
    #: a dead letter that does not fit is sent as a truncated copy.
    dlq_max_request_bytes: int = Field(default=1_048_576, ge=65_536)

    @model_validator(mode="after")
    def _poll_interval_covers_the_session(self) -> KafkaSettings:
        if self.max_poll_interval_ms < self.session_timeout_ms:
            raise ValueError(
                f"kafka.max_poll_interval_ms ({self.max_poll_interval_ms}) must be at least "
                f"kafka.session_timeout_ms ({self.session_timeout_ms})"
            )
        return self

    @model_validator(mode="after")
    def _default_dlq(self) -> KafkaSettings:
        if self.dlq_topic is None:
            # object.__setattr__ avoids re-running validation on assignment.
            object.__setattr__(self, "dlq_topic", dlq_topic_for(self.topic))
        return self


class RedisSettings(_Section):
    """Snapshot store connection and policy."""

    url: str = "redis://127.0.0.1:6379/0"
    #: Overrides a password in ``url``.
    password: SecretStr | None = None
    prefix: str = Field(default="fogline", min_length=1)
    #: Snapshot versions kept (older ones are deleted on write).
    retention: int = Field(default=20, ge=1)
    #: Writer lease time-to-live; the daemon renews it well before it expires.
    lease_ttl_s: float = Field(default=15.0, gt=0)
    #: Socket timeout of ordinary commands; blocking reads are chunked below it.
    socket_timeout_s: float | None = Field(default=5.0, gt=0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v


class StreamSettings(_Section):
    """Micro-batching, SVI steps and snapshot cadence of the daemon."""

    batch_size: int = Field(default=256, ge=1)
    max_wait_ms: int = Field(default=500, ge=0)
    #: ``size_or_time``: flush at batch_size or max_wait_ms, whichever first;
    #: ``count``: flush only at exactly batch_size records (deterministic replays).
    batching: Literal["size_or_time", "count"] = "size_or_time"
    steps_per_batch: int = Field(default=1, ge=1)
    #: Nominal data-set size N scaling the likelihood; ``None``: the model core's default.
    data_size: int | None = Field(default=None, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Write a snapshot every N batches (0 disables this trigger).
    snapshot_every_batches: int = Field(default=50, ge=0)
    #: Write a snapshot every T seconds (0 disables this trigger).
    snapshot_every_seconds: float = Field(default=30.0, ge=0)
    #: Warm-start state file used when Redis holds no snapshot.
    init_path: Path | None = None
    #: Start from ``init_path`` or a fresh prior even though the model has snapshot
    #: versions and none of them is intact (else the daemon exits with status 4).
    allow_fresh: bool = False
    #: Keep applying the functional prior a warm-start state carries (out-of-range uncertainty).
    functional_prior: bool = True
    #: Fetch and decode the next poll on a worker thread while batches are absorbed
    #: (every consumer call serialised; exactly-once unchanged).  Off by default: on
    #: 2 CPU cores it measured no gain (kafka-python, json and the drift loop all hold
    #: the GIL); meant for CUDA, where the step waits on the device without the GIL.
    prefetch: bool = False
    #: Run the Kafka consumer and the decoder in a child process (``spawn``) that
    #: fetches and decodes the next poll while this one absorbs batches; every
    #: consumer call is a request/reply message, so commits keep their order and
    #: exactly-once is unchanged (:mod:`fogline.daemon.stream.process_source`).
    #: On by default: on two free cores the daemon with ``forget`` ran at 0.70-0.91
    #: (median 0.82) of the raw loop against 0.49-0.72 (median 0.65) in-process,
    #: four alternating pairs (docs/performance.md); with both cores busy it
    #: measured no gain.  The child costs ~250 MB and 1-9 s of start-up.  Keyed mode
    #: too: its child owns the group membership and forwards rebalance events in
    #: order with the records (:mod:`fogline.daemon.stream.keyed_process`); off, the
    #: keyed consumer runs in-process (``stream.prefetch`` then applies).
    source_process: bool = True
    seed: int = 0
    #: A snapshot offset beyond a partition's end (broker restarted empty, topic recreated):
    #: ``fail`` exits non-zero (status 4), ``earliest``/``latest`` resume there; always logged
    #: (``offset_out_of_range``) and counted (``fogline_offset_out_of_range_total``).
    offset_out_of_range: Literal["fail", "earliest", "latest"] = "fail"


class KeyedSettings(_Section):
    """Keyed mode: one posterior per source key, partitions owned across the group.

    ``enabled`` makes ``model.key`` mean "one posterior per key" (each key its own
    parameters, optimizer and RNG state; snapshots and leases per
    ``(model, partition)``; see ``docs/operations.md``).  Off, ``model.key`` only
    names the record's source field (one shared posterior).
    """

    enabled: bool = False
    #: Most key states kept in memory; beyond it the least recently used clean keys
    #: leave memory (their last checkpoint holds them) and reload on their next record.
    max_keys: int = Field(default=10_000, ge=1)
    #: Seconds a key may stay unused in memory before it is evicted (once clean); 0: never.
    idle_ttl_s: float = Field(default=600.0, ge=0)
    #: Longest key (characters); longer keys are dead-lettered (``bad_key``).
    max_key_length: int = Field(default=256, ge=1)
    #: What a new key starts from: ``warm`` the fleet prior of the start state (warm-start
    #: file, else the spec's prior); ``population`` the moment-matched mixture of the
    #: posteriors of the keys its partition has absorbed (``models.keyed.Population``,
    #: kept per partition in its manifest; the warm fleet prior while it has none).
    fleet: Literal["warm", "population"] = "warm"
    #: Rows one key typically has in a micro-batch (about ``stream.batch_size`` over the keys
    #: of a partition's batch): the batch size each key's alarm threshold is fitted for when
    #: ``drift.calibration = history``.  Unset, keys calibrate on their own first
    #: ``drift.calibration_batches`` batches (the median of their own row counts), since a
    #: threshold fitted for ``stream.batch_size`` records is far too tight for a key's few.
    rows_per_key: int | None = Field(default=None, ge=1)


class DriftSettings(PolicyConfig):
    """Drift signal, detector and adaptation policy (``docs/drift.md``).

    The drift loop's own :class:`fogline.drift.config.PolicyConfig`, field for
    field (one definition: the daemon hands ``settings.drift`` to the loop as
    it is).  ``policy = "off"``: plain SVI, no drift monitoring; ``none``:
    monitor and alarm only.
    """


class ApiSettings(_Section):
    """Query service."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    #: Bearer token; when set every request but /healthz must carry it.
    token: SecretStr | None = None
    max_rows: int = Field(default=1024, ge=1)
    max_features: int = Field(default=4096, ge=1)
    ensemble_size: int = Field(default=100, ge=1)
    quantize: bool = False
    reload_poll_s: float = Field(default=0.2, gt=0)


#: File contents handed from :meth:`Settings.load` to the settings sources.
_FILE_DATA: ContextVar[dict[str, Any] | None] = ContextVar("_fogline_file_data", default=None)


class Settings(BaseSettings):
    """Every setting of fogline; see ``docs/configuration.md``.

    Build it with :meth:`load` (file + environment, errors as
    :class:`ConfigError`) rather than the bare constructor.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
        validate_assignment=True,
        env_file=None,
    )

    model_name: str = Field(default="default", pattern=MODEL_NAME_PATTERN)
    #: The model spec (``docs/model.md``): features, target, transforms, the BNN.
    #: ``None``: the model is whatever the warm-start state or snapshot holds
    #: (a fresh start without either builds ``ModelSpec()``).
    model: ModelSpec | None = None
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    keyed: KeyedSettings = Field(default_factory=KeyedSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    #: Prometheus port of the daemon; 0 disables the endpoint.
    metrics_port: int = Field(default=9400, ge=0, le=65535)
    #: Address of the daemon's Prometheus endpoint; 0.0.0.0 inside a container.
    metrics_host: str = "127.0.0.1"
    log_format: Literal["json", "console", "auto"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Priority: constructor arguments > ``FOGLINE_*`` env > config file > defaults."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        data = _FILE_DATA.get()
        if data:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=data))
        return tuple(sources)

    # -- construction ------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
        """Read settings from ``path`` (YAML or TOML) and the environment.

        Environment variables override the file; ``overrides`` (nested dicts
        allowed, ``None`` values ignored) override both.  With ``path=None``
        the file named by ``FOGLINE_CONFIG`` is used, if that is set.

        Raises
        ------
        ConfigError
            The file is missing or unparsable, or a value is invalid; the
            message has one line per offending field.
        """
        if path is None:
            path = os.environ.get(ENV_CONFIG_PATH) or None
        data = read_config_file(path) if path is not None else {}
        kwargs = {k: v for k, v in overrides.items() if v is not None}
        token = _FILE_DATA.set(data)
        try:
            return cls(**kwargs)
        except ValidationError as exc:
            origin = f" (file {path} and {ENV_PREFIX}* environment)" if path else ""
            raise _config_error(exc, origin) from None
        except SettingsError as exc:  # e.g. FOGLINE_API='{"port": 80' (broken JSON)
            problem = settings_error_problem(exc)
            raise ConfigError(f"invalid configuration:\n  {problem}", [problem]) from None
        finally:
            _FILE_DATA.reset(token)

    def override(self, updates: Mapping[str, Any]) -> Settings:
        """Return a validated copy with dotted keys replaced (``None`` values skipped).

        >>> Settings().override({"stream.batch_size": 64}).stream.batch_size
        64
        """
        # Unset fields stay unset, so derived defaults (kafka.dlq_topic) follow.
        data = self.model_dump(exclude_unset=True)
        for dotted, value in updates.items():
            if value is None:
                continue
            *parents, leaf = dotted.split(".")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        try:
            return type(self).model_validate(data)
        except ValidationError as exc:
            raise _config_error(exc, "") from None

    # -- presentation ------------------------------------------------------
    def masked(self) -> dict[str, Any]:
        """JSON-able dict of the effective settings with secrets shown as ``MASK``.

        Secret fields become ``MASK``; the password inside any URL-valued
        string (``redis.url`` = ``redis://:pw@host``) becomes ``***``
        (:func:`~fogline.daemon.names.mask_url_credentials`).
        """
        data: dict[str, Any] = json.loads(self.model_dump_json())
        for section in data.values():
            if isinstance(section, dict):
                for key in _SECRET_FIELDS & section.keys():
                    if section[key] is not None:
                        section[key] = MASK
        return _mask_strings(data)


def _mask_strings(value: Any) -> Any:
    """``value`` with :func:`mask_url_credentials` applied to every string in it."""
    if isinstance(value, str):
        return mask_url_credentials(value)
    if isinstance(value, dict):
        return {k: _mask_strings(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask_strings(v) for v in value]
    return value


def load_or_exit(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """:meth:`Settings.load` for CLI handlers: on :class:`ConfigError` print it to
    stderr and exit with status 2 (a usage error), before anything has started."""
    try:
        return Settings.load(path, **overrides)
    except ConfigError as exc:
        print(f"fogline: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def env_var_name(loc: tuple[int | str, ...]) -> str:
    """Environment variable setting the field at ``loc``: ``('stream','lr')`` -> ``FOGLINE_STREAM__LR``."""
    return ENV_PREFIX + "__".join(str(p).upper() for p in loc if isinstance(p, str))


def format_validation_error(exc: ValidationError) -> list[str]:
    """One ``"<dotted.field>: <reason>"`` line per error, never echoing secrets.

    Scalars that failed are quoted after the reason (``(got 0)``), and the
    environment variable that sets the field is named.
    """
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if isinstance(p, str | int))
        # Drop pydantic's union/tag members (e.g. 'literal[...]', 'constrained-str').
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p.endswith("-str"))))
        field = ".".join(str(p) for p in loc) or "<root>"
        line = f"{field}: {mask_url_credentials(err['msg'])}"
        value = err.get("input")
        secret = any(isinstance(p, str) and p in _SECRET_FIELDS for p in loc)
        if (
            err["type"] != "extra_forbidden"
            and not secret
            and isinstance(value, str | int | float | bool)
        ):
            shown = mask_url_credentials(value) if isinstance(value, str) else value
            line += f" (got {shown!r})"
        if loc and err["type"] != "extra_forbidden":
            line += f" [env {env_var_name(loc)}]"
        lines.append(line)
    return lines


_SETTINGS_ERROR = re.compile(r'field "(?P<field>[^"]+)" from source "(?P<source>[^"]+)"')


def settings_error_problem(exc: SettingsError) -> str:
    """One ``"<field>: <reason>"`` line for pydantic-settings' :class:`SettingsError`.

    pydantic-settings raises it (not a ``ValidationError``) when a complex
    field's environment value is not JSON, e.g. ``FOGLINE_API='{"port": 80'``.
    The line names the field, the variable and the JSON error, never the value
    (it may hold a secret)::

        api: not valid JSON (Expecting ',' delimiter: line 1 column 12 (char 11)) [env FOGLINE_API]
    """
    m = _SETTINGS_ERROR.search(str(exc))
    cause = exc.__cause__ or exc.__context__
    reason = f"not valid JSON ({cause})" if isinstance(cause, ValueError) else str(exc)
    if m is None:
        return f"<settings>: {reason}"
    field = m["field"]
    where = f" [env {env_var_name((field,))}]" if m["source"] == "EnvSettingsSource" else ""
    return f"{field}: {reason}{where}"


def _config_error(exc: ValidationError, origin: str) -> ConfigError:
    problems = format_validation_error(exc)
    message = f"invalid configuration{origin}:\n" + "\n".join(f"  {p}" for p in problems)
    return ConfigError(message, problems)


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a YAML or TOML settings file into a dict (empty file -> ``{}``).

    Raises :class:`ConfigError` for a missing file, an unknown extension, a
    syntax error or a top level that is not a mapping.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(
            f"config file {p}: unsupported extension {suffix!r} (use .yaml, .yml or .toml)"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {p}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"config file {p}: cannot parse: {reason}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {p}: top level must be a mapping, got {type(data).__name__}"
        )
    return data
