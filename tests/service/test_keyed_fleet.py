"""``keyed.fleet = "population"``: new keys start from their partition's population.

A key first seen after others starts from the moment-matched mixture of the
posteriors its partition has absorbed (``models.keyed.Population``), kept in
the partition's manifest: a daemon that stops and resumes from the manifest
ends with the same key states, byte for byte, as one that ran through; keys
seen before any other start from the warm fleet prior as under ``warm``.
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
from fogline.daemon.stream.keyed import KeyedPipeline
from fogline.daemon.stream.pipeline import RunOptions
from fogline.daemon.stream.store import PartitionStore, SnapshotStore

pytestmark = pytest.mark.service


def _run(cfg: Path, fleet: str) -> KeyedPipeline:
    settings = Settings.load(cfg).override({"keyed.fleet": fleet})
    pipe = KeyedPipeline(settings, RunOptions(idle_exit_s=1.5, threads=1))
    assert pipe.run() == 0
    return pipe


def test_population_fleet_starts_late_keys_from_the_partition_population(
    tmp_path: Path,
    kafka_bootstrap: str,
    redis_url: str,
    redis_prefix: str,
    topic_factory: Callable[..., str],
) -> None:
    topic = topic_factory(1, "keyed")
    early = make_keyed_records(96, 3, 1, seed=11)  # keys h0000-h0002
    late = make_keyed_records(96, 6, 1, seed=12)  # h0003-h0005 appear only here
    common: dict[str, Any] = {"bootstrap": kafka_bootstrap, "topic": topic}
    common.update(redis_url=redis_url, prefix=redis_prefix, batch_size=8)
    common.update(snapshot_every_batches=3, session_timeout_ms=4000)

    def cfg(name: str) -> Path:
        return write_keyed_config(
            tmp_path / f"{name}.yaml", model=name, group=f"g-{name}", **common
        )

    produce_keyed(kafka_bootstrap, topic, early)
    _run(cfg("split"), "population")  # stops, then resumes from its manifest
    produce_keyed(kafka_bootstrap, topic, late)
    _run(cfg("split"), "population")
    _run(cfg("whole"), "population")
    _run(cfg("warm"), "warm")

    split, whole, warm = (key_blobs(redis_url, m, redis_prefix) for m in ("split", "whole", "warm"))
    assert len(whole) == 6 and split == whole
    old, new = ["h0000", "h0001", "h0002"], ["h0003", "h0004", "h0005"]
    assert all(whole[k] == warm[k] for k in old)
    assert all(whole[k] != warm[k] for k in new)
    store = PartitionStore(SnapshotStore(redis_url, "whole", prefix=redis_prefix))
    try:
        m = store.manifest(0)
        assert m is not None and m.population is not None and m.population["count"] == 6
        assert m.records_absorbed == 192
    finally:
        store.close()
