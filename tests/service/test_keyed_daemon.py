"""Keyed daemon in-process on the embedded broker and redis-server: memory bound, refusals.

- A daemon whose key cache holds only 3 keys (evicting clean keys and
  checkpointing to make room) ends with the same key states, byte for byte, as
  one that keeps every key in memory: eviction loses nothing.
- A topic with another partition count than the stored layout, and a key that
  arrives on another partition than the one that absorbed it, stop the daemon
  with exit status 7 and a message naming the cause; nothing more is written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fogline.bench.keyed_daemon import (
    key_blobs,
    make_keyed_records,
    produce_keyed,
    write_keyed_config,
)
from fogline.daemon.config import Settings
from fogline.daemon.stream.keyed import EXIT_REPARTITIONED, KeyedPipeline
from fogline.daemon.stream.pipeline import RunOptions
from fogline.daemon.stream.source import ReplayProducer
from fogline.daemon.stream.store import PartitionStore, SnapshotStore

pytestmark = pytest.mark.service


def _run(cfg: Path, dotted: dict[str, Any] | None = None) -> KeyedPipeline:
    settings = Settings.load(cfg).override(dotted or {})
    pipe = KeyedPipeline(settings, RunOptions(idle_exit_s=1.5, threads=1))
    pipe.code = pipe.run()  # type: ignore[attr-defined]
    return pipe


def _config(tmp_path: Path, name: str, **kw: Any) -> Path:
    return write_keyed_config(
        tmp_path / f"{name}.yaml",
        model=name,
        group=f"g-{name}",
        batch_size=8,
        snapshot_every_batches=3,
        session_timeout_ms=4000,
        **kw,
    )


def test_a_tiny_key_cache_ends_with_the_same_key_states(
    tmp_path: Path,
    kafka_bootstrap: str,
    redis_url: str,
    redis_prefix: str,
    topic_factory: Callable[..., str],
) -> None:
    topic = topic_factory(2, "keyed")
    recs = make_keyed_records(400, 12, 2, seed=5)
    produce_keyed(kafka_bootstrap, topic, recs)
    common = {"bootstrap": kafka_bootstrap, "topic": topic, "redis_url": redis_url}
    common["prefix"] = redis_prefix
    big = _run(_config(tmp_path, "big", **common))
    small = _run(_config(tmp_path, "small", max_keys=3, idle_ttl_s=0.0, **common))
    assert big.code == small.code == 0  # type: ignore[attr-defined]
    assert small.cache.evictions > 0 and big.cache.evictions == 0
    a, b = key_blobs(redis_url, "big", redis_prefix), key_blobs(redis_url, "small", redis_prefix)
    assert len(a) == 12 and a == b
    assert big.stats.records_absorbed == small.stats.records_absorbed == recs.absorbable(8)


def test_repartitioned_topic_and_moved_key_are_refused(
    tmp_path: Path,
    kafka_bootstrap: str,
    redis_url: str,
    redis_prefix: str,
    topic_factory: Callable[..., str],
) -> None:
    topic = topic_factory(2, "keyed")
    recs = make_keyed_records(64, 4, 2, seed=1)
    produce_keyed(kafka_bootstrap, topic, recs)
    common = {"bootstrap": kafka_bootstrap, "topic": topic, "redis_url": redis_url}
    common["prefix"] = redis_prefix
    cfg = _config(tmp_path, "moved", **common)
    assert _run(cfg).code == 0  # type: ignore[attr-defined]
    # a key that partition p absorbed now arrives on the other partition
    p, key, value = next(r for i, r in enumerate(recs.rows) if i not in recs.bad)
    with ReplayProducer(kafka_bootstrap, topic) as prod:
        for _ in range(8):
            prod.send(value, key=key, partition=1 - p)
    moved = _run(cfg)
    assert moved.code == EXIT_REPARTITIONED  # type: ignore[attr-defined]
    assert f"key {key!r} was absorbed from partition {p}" in moved.stats.exit_reason

    # the stored layout says 2 partitions; a 3-partition topic under the same model is refused
    other = topic_factory(3, "keyed")
    produce_keyed(kafka_bootstrap, other, make_keyed_records(24, 4, 3, seed=2))
    wider = _run(cfg, {"kafka.topic": other})
    assert wider.code == EXIT_REPARTITIONED  # type: ignore[attr-defined]
    assert "2 partitions" in wider.stats.exit_reason and "now has 3" in wider.stats.exit_reason
    store = PartitionStore(SnapshotStore(redis_url, "moved", prefix=redis_prefix))
    try:
        assert store.layout()["partitions"] == "2"
        assert all(store.lease_owner(n) is None for n in range(3))
    finally:
        store.close()


def test_per_key_drift_state_survives_eviction_bit_for_bit(
    tmp_path: Path,
    kafka_bootstrap: str,
    redis_url: str,
    redis_prefix: str,
    topic_factory: Callable[..., str],
) -> None:
    """With a drift policy each key carries its own loop; evicting and reloading keys
    (their drift state restored from their blobs) changes nothing."""
    topic = topic_factory(1, "keyed")
    recs = make_keyed_records(240, 4, 1, seed=7)
    produce_keyed(kafka_bootstrap, topic, recs)
    common: dict[str, Any] = {"bootstrap": kafka_bootstrap, "topic": topic}
    common.update(redis_url=redis_url, prefix=redis_prefix, policy="forget")
    big = _run(_config(tmp_path, "dbig", **common))
    small = _run(_config(tmp_path, "dsmall", max_keys=1, idle_ttl_s=0.0, **common))
    assert big.code == small.code == 0  # type: ignore[attr-defined]
    assert small.cache.evictions > 0
    a, b = key_blobs(redis_url, "dbig", redis_prefix), key_blobs(redis_url, "dsmall", redis_prefix)
    assert len(a) == 4 and a == b
    store = PartitionStore(SnapshotStore(redis_url, "dbig", prefix=redis_prefix))
    try:
        modes = {v["drift_mode"] for v in store.key_index().values()}
    finally:
        store.close()
    assert modes <= {"stable", "shifted", "recovering"} and "none" not in modes
