"""Start-up when ``latest`` is missing or damaged, against a real redis-server.

The store's scan (:meth:`SnapshotStore.newest_intact`) and the pipeline's
decision (:func:`initial_state`): the newest intact version, loudly; never a
fresh prior while versions exist, unless ``stream.allow_fresh``; ``fogline
run`` exits 5 when no version is intact.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from structlog.testing import capture_logs

from fogline.bench.crash_replay import log_events, start_daemon, write_config
from fogline.daemon import metrics
from fogline.daemon.config import Settings
from fogline.daemon.stream.pipeline import NoIntactSnapshot, initial_state
from fogline.daemon.stream.runtime import StopFlag
from fogline.daemon.stream.store import Snapshot, SnapshotStore
from fogline.models.config import ModelConfig
from fogline.models.serialize import from_bytes, offsets_to_json, to_bytes
from fogline.models.state import PosteriorState
from fogline.models.svi import init_state

pytestmark = pytest.mark.service

CPU = torch.device("cpu")


@pytest.fixture
def model() -> str:
    return f"fb-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def store(redis_url: str, redis_prefix: str, model: str) -> Iterator[SnapshotStore]:
    s = SnapshotStore(redis_url, model, prefix=redis_prefix, retention=20)
    yield s
    s.purge()
    s.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _states(n: int) -> list[PosteriorState]:
    """``n`` distinct states (records_absorbed 100 v) as versions 1..n would hold them."""
    base = init_state(ModelConfig.model_validate({}), seed=3, lr=1e-3)
    return [
        base.replace(records_absorbed=100 * v, offsets={("t", 0): 100 * v}) for v in range(1, n + 1)
    ]


def _write_versions(store: SnapshotStore, n: int) -> list[PosteriorState]:
    states = _states(n)
    for st in states:
        store.write(
            to_bytes(st), records_absorbed=st.records_absorbed, offsets=offsets_to_json(st.offsets)
        )
    return states


def _decode(snap: Snapshot) -> PosteriorState:
    return from_bytes(snap.blob, CPU)


def _settings(redis_url: str, prefix: str, model: str, **stream: object) -> Settings:
    return Settings.load(
        None,
        model_name=model,
        redis={"url": redis_url, "prefix": prefix},
        stream={"device": "cpu", **stream},
    )


def _corrupt(raw: redis.Redis, store: SnapshotStore, version: int, how: str) -> None:
    if how == "checksum":
        raw.set(store.snap_key(version), b"garbage")
    else:  # checksum right, contents not a state
        import hashlib

        blob = b"not a safetensors blob"
        raw.set(store.snap_key(version), blob)
        raw.hset(store.meta_key(version), "checksum", hashlib.sha256(blob).hexdigest())


def test_scan_uses_latest_when_intact(store: SnapshotStore) -> None:
    _write_versions(store, 3)
    store.rollback(2)  # an operator's rollback is honoured, not "fixed"
    scan = store.newest_intact(_decode)
    assert scan.snapshot is not None and scan.snapshot.meta.version == 2
    assert not scan.fallback and scan.skipped == () and scan.versions == (3, 2, 1)


@pytest.mark.parametrize("how", ["checksum", "undecodable"])
def test_scan_skips_deleted_latest_and_damaged_versions(
    store: SnapshotStore, raw: redis.Redis, how: str
) -> None:
    states = _write_versions(store, 5)
    raw.delete(store.keys_latest)
    _corrupt(raw, store, 5, how)
    scan = store.newest_intact(_decode)
    assert scan.latest is None and scan.fallback
    assert scan.snapshot is not None and scan.snapshot.meta.version == 4
    assert [v for v, _ in scan.skipped] == [5]
    assert scan.value is not None and to_bytes(scan.value) == to_bytes(states[3])


def test_scan_finds_versions_whose_index_was_deleted(
    store: SnapshotStore, raw: redis.Redis
) -> None:
    _write_versions(store, 3)
    raw.delete(store.keys_latest, store.keys_versions)
    scan = store.newest_intact(_decode)
    assert scan.versions == (3, 2, 1)
    assert scan.snapshot is not None and scan.snapshot.meta.version == 3


def test_initial_state_falls_back_loudly(
    store: SnapshotStore, raw: redis.Redis, redis_url: str, redis_prefix: str, model: str
) -> None:
    states = _write_versions(store, 10)
    _corrupt(raw, store, 10, "checksum")  # latest itself is corrupt
    before = metrics.SNAPSHOT_FALLBACKS._value.get()
    settings = _settings(redis_url, redis_prefix, model)
    with capture_logs() as logs:
        state, version, origin = initial_state(settings, store, CPU, None, StopFlag())
    assert version == 9 and "fallback" in origin
    assert to_bytes(state) == to_bytes(states[8])
    assert state.records_absorbed == 900, "the stream resumes from v9's offsets, not from 0"
    (warn,) = [e for e in logs if e["event"] == "snapshot_fallback"]
    assert warn["log_level"] == "warning" and warn["latest"] == 10
    assert [s["version"] for s in warn["skipped"]] == [10]
    assert metrics.SNAPSHOT_FALLBACKS._value.get() == before + 1


def test_initial_state_refuses_a_fresh_prior_over_damaged_versions(
    store: SnapshotStore, raw: redis.Redis, redis_url: str, redis_prefix: str, model: str
) -> None:
    _write_versions(store, 3)
    for v in (1, 2, 3):
        _corrupt(raw, store, v, "checksum")
    settings = _settings(redis_url, redis_prefix, model)
    with capture_logs() as logs, pytest.raises(NoIntactSnapshot, match="none is intact"):
        initial_state(settings, store, CPU, None, StopFlag())
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["no_intact_snapshot"]

    allowed = _settings(redis_url, redis_prefix, model, allow_fresh=True)
    state, version, origin = initial_state(allowed, store, CPU, None, StopFlag())
    assert version is None and origin == "fresh prior" and state.records_absorbed == 0


def test_a_new_model_still_starts_from_a_fresh_prior(
    store: SnapshotStore, redis_url: str, redis_prefix: str, model: str
) -> None:
    state, version, origin = initial_state(
        _settings(redis_url, redis_prefix, model), store, CPU, None, StopFlag()
    )
    assert (version, origin, state.records_absorbed) == (None, "fresh prior", 0)


def test_fogline_run_exits_5_when_no_version_is_intact(
    store: SnapshotStore,
    raw: redis.Redis,
    redis_url: str,
    redis_prefix: str,
    model: str,
    tmp_path: Path,
) -> None:
    _write_versions(store, 2)
    for v in (1, 2):
        _corrupt(raw, store, v, "undecodable")
    cfg = write_config(
        tmp_path / "d.yaml",
        bootstrap="127.0.0.1:1",  # never reached: the start-up decision comes first
        topic="t",
        redis_url=redis_url,
        model=model,
        prefix=redis_prefix,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fogline.cli", "run", "--config", str(cfg), "--threads", "1"],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 5, proc.stderr.decode()[-2000:]
    assert b"none is intact" in proc.stderr
    assert b"no_intact_snapshot" in proc.stdout + proc.stderr


def test_fogline_run_allow_fresh_starts_afresh_and_says_so(
    store: SnapshotStore,
    raw: redis.Redis,
    kafka_bootstrap: str,
    fresh_topic: str,
    redis_url: str,
    redis_prefix: str,
    model: str,
    tmp_path: Path,
) -> None:
    _write_versions(store, 2)
    for v in (1, 2):
        _corrupt(raw, store, v, "checksum")
    cfg = write_config(
        tmp_path / "d.yaml",
        bootstrap=kafka_bootstrap,
        topic=fresh_topic,
        redis_url=redis_url,
        model=model,
        prefix=redis_prefix,
    )
    log = tmp_path / "d.log"
    proc = start_daemon(cfg, log, "--allow-fresh", "--idle-exit-s", "1")
    assert proc.wait(timeout=120) == 0, log.read_text()[-2000:]
    events = log_events(log)
    assert any(e.get("event") == "starting_fresh_over_damaged_snapshots" for e in events)
    (started,) = [e for e in events if e.get("event") == "daemon_started"]
    assert started["origin"] == "fresh prior"
