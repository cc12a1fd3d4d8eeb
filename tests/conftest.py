"""Shared test fixtures: real services, clean and seeded state before each test.

Services
--------
- ``kafka_bootstrap`` (session, ``"host:port"``) and ``redis_url`` (session,
  ``"redis://host:port/0"``): testcontainers ``KafkaContainer`` /
  ``RedisContainer`` when a Docker engine answers, else the embedded Tansu
  broker and a local ``redis-server`` (:mod:`fogline.daemon.embedded`).  Started
  lazily, only for tests that ask for them; never skipped.
- ``fresh_topic`` (function): a new, created, 1-partition topic name.
  ``topic_factory(partitions=1)`` makes more (e.g. multi-partition) topics.
- ``fresh_group`` (function): a unique consumer group id.
- ``redis_prefix`` (function): a unique key prefix, so tests sharing the
  session's Redis never see each other's keys.
- ``redis_server`` (function): an own :class:`~fogline.daemon.embedded.EmbeddedRedis`
  that the test may ``stop()``/``kill()`` and ``start()`` again on the same
  port (outage tests).  ``kafka_server`` (function) likewise gives an own
  :class:`~fogline.daemon.embedded.EmbeddedKafka` (e.g. for broker-restart tests).
- ``SESSION_TIMEOUT_MS`` (6000): the consumer-group session timeout tests
  should use (Tansu's join takes about half of it).

Outside data
------------
- ``shared_dir`` (session): the folder of data that is not part of the
  repository (``cal_housing.csv``, NAB): ``$FOGLINE_SHARED_DIR``, else
  ``../shared`` beside the repository root.  Only tests look there; package
  code never reaches outside the installed package.
- ``cal_housing_csv`` / ``nab_root`` (session): ``data/cal_housing.csv`` and
  ``data/nab`` under it; a test that asks for one is skipped, with the path in
  the reason, when it is absent (a fresh clone has no ``../shared``).

Markers: ``container`` tests are skipped cleanly when no Docker engine
answers; ``service`` is applied automatically to tests that use a service
fixture.

Every test starts with ``random``, ``numpy`` and ``torch`` seeded to 0 and
an empty Pyro param store; torch uses one thread for the whole session.
Hypothesis has no deadline and no too-slow health check (timings are
never assertions).
"""

from __future__ import annotations

import functools
import os
import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from fogline.daemon.embedded import EmbeddedKafka, EmbeddedRedis

SESSION_TIMEOUT_MS = 6000
SEED = 0
REPO_ROOT = Path(__file__).resolve().parents[1]

# No deadline and no "too slow" health check: on a shared 2-core machine a
# timing is noise, and timings are never assertions here.
settings.register_profile(
    "fogline", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fogline"))

_SERVICE_FIXTURES = frozenset(
    {"kafka_bootstrap", "redis_url", "fresh_topic", "topic_factory", "redis_server", "kafka_server"}
)


@functools.cache
def docker_available() -> bool:
    """True when a Docker engine answers a ping within a few seconds."""
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``container`` tests without Docker; mark service-fixture users ``service``."""
    skip_container: pytest.MarkDecorator | None = None
    for item in items:
        if item.get_closest_marker("container") is not None:
            if skip_container is None:
                skip_container = (
                    None
                    if docker_available()
                    else pytest.mark.skip(reason="no Docker engine answers (container test)")
                )
            if skip_container is not None:
                item.add_marker(skip_container)
        if _SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.service)


# --------------------------------------------------------------------------
# clean, seeded state
# --------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_clear() -> None:
    """Seed every RNG and clear Pyro's param store before each test."""
    import pyro
    import torch

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    pyro.clear_param_store()


@pytest.fixture(autouse=True)
def _keep_structlog() -> Iterator[None]:
    """Give every test the structlog configuration it started with (benchmarks and CLI
    commands under test configure it globally, which would hide later tests' logs)."""
    import structlog

    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(autouse=True)
def _keep_gc() -> Iterator[None]:
    """Give every test CPython's collector as it found it: ``fogline run`` called in
    process (a CLI test) freezes the heap and raises the thresholds for the daemon
    (fogline/daemon/gc_tuning.py), which would otherwise hold for the rest of the suite."""
    import gc

    saved = gc.get_threshold()
    frozen = gc.get_freeze_count()
    yield
    if gc.get_threshold() != saved or gc.get_freeze_count() != frozen:
        gc.unfreeze()
        gc.set_threshold(*saved)


@pytest.fixture(autouse=True)
def _keep_malloc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep glibc's allocator defaults in the test process: ``fogline run`` called in
    process would raise its thresholds for good (fogline/daemon/malloc_tuning.py has
    no undo); daemons the tests start as subprocesses still tune theirs, and
    tests/daemon/test_malloc_tuning.py checks the function in a child process."""
    import fogline.daemon.malloc_tuning as mt

    monkeypatch.setattr(mt, "tune_malloc", lambda *args, **kwargs: False)


# --------------------------------------------------------------------------
# outside data (never needed by package code; tests skip without it)
# --------------------------------------------------------------------------


def shared_dir_path() -> Path:
    """``$FOGLINE_SHARED_DIR``, else ``../shared`` beside the repository root."""
    env = os.environ.get("FOGLINE_SHARED_DIR")
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared"


def _shared(*parts: str) -> Path:
    path = shared_dir_path().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"outside data not found: {path} (set FOGLINE_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The outside-data folder; skips the test when it does not exist."""
    return _shared()


@pytest.fixture(scope="session")
def cal_housing_csv() -> Path:
    """The raw StatLib ``cal_housing.csv``; skips when absent (no network fetch)."""
    return _shared("data", "cal_housing.csv")


@pytest.fixture(scope="session")
def nab_root() -> Path:
    """The NAB tree (``combined_windows.json``, ``data/<category>/*.csv``); skips when absent."""
    return _shared("data", "nab")


# --------------------------------------------------------------------------
# services
# --------------------------------------------------------------------------


def _testcontainers(module: str) -> object:
    """``testcontainers.<module>``, or an error naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(f"testcontainers.{module}")
    except ImportError as exc:
        raise RuntimeError(
            "a Docker engine answers but testcontainers is missing: it is in the 'dev' extra "
            "(pip install -e '.[dev]')"
        ) from exc


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``host:port`` of a Kafka-protocol broker for the whole session."""
    if docker_available():
        kafka_module: Any = _testcontainers("community.kafka")
        with kafka_module.KafkaContainer() as kafka:
            yield kafka.get_bootstrap_server()
        return
    with EmbeddedKafka() as kafka:
        yield kafka.bootstrap_servers


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``redis://host:port/0`` of a Redis server for the whole session."""
    if docker_available():
        redis_module: Any = _testcontainers("community.redis")
        with redis_module.RedisContainer() as redis:
            host = redis.get_container_host_ip()
            port = redis.get_exposed_port(redis.port)
            yield f"redis://{host}:{port}/0"
        return
    with EmbeddedRedis() as redis:
        yield redis.url


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def topic_factory(kafka_bootstrap: str) -> Callable[..., str]:
    """``make(partitions=1, prefix="t") -> name``: create a new unique topic."""
    from fogline.daemon.stream.source import create_topic

    def make(partitions: int = 1, prefix: str = "t") -> str:
        name = _unique(prefix)
        create_topic(kafka_bootstrap, name, partitions)
        return name

    return make


@pytest.fixture
def fresh_topic(topic_factory: Callable[..., str]) -> str:
    """A new 1-partition topic (created), unique to this test."""
    return topic_factory(1)


@pytest.fixture
def fresh_group() -> str:
    """A consumer group id unique to this test."""
    return _unique("g")


@pytest.fixture
def redis_prefix() -> str:
    """A Redis key prefix unique to this test."""
    return _unique("fogline-test")


@pytest.fixture
def redis_server() -> Iterator[EmbeddedRedis]:
    """An own embedded redis-server the test may stop and restart (same port)."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def kafka_server() -> Iterator[EmbeddedKafka]:
    """An own embedded Tansu broker the test may stop or kill."""
    with EmbeddedKafka() as server:
        yield server


@pytest.fixture
def session_timeout_ms() -> int:
    """Consumer-group session timeout for tests (Tansu's join takes about half)."""
    return SESSION_TIMEOUT_MS


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say which services the fixtures will use."""
    kind = "testcontainers (Docker)" if docker_available() else "embedded Tansu + redis-server"
    return [f"fogline services: {kind}"]
