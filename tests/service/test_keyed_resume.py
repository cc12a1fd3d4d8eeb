"""Keyed mode resumes a partition only where its checkpoint's stream still is.

Like the single-model daemon (``stream.offset_out_of_range``): each partition
checkpoint stores the fingerprint of the record before its next offset; on
resume an offset beyond the partition's end, or another record before it (a
recreated topic), stops the daemon with exit status 4 under ``fail``, and
``latest`` moves the partition to its end instead.  (The manifest is edited
here to stand for a topic recreated behind the daemon's back: Tansu cannot
delete a topic.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fogline.bench.keyed_daemon import make_keyed_records, produce_keyed, write_keyed_config
from fogline.daemon.config import Settings
from fogline.daemon.stream.keyed import KeyedPipeline
from fogline.daemon.stream.pipeline import EXIT_OUT_OF_RANGE, RunOptions
from fogline.daemon.stream.store import PartitionStore, SnapshotStore

pytestmark = pytest.mark.service


def _run(cfg: Path, dotted: dict[str, Any] | None = None) -> tuple[int, KeyedPipeline]:
    pipe = KeyedPipeline(
        Settings.load(cfg).override(dotted or {}), RunOptions(idle_exit_s=1.5, threads=1)
    )
    return pipe.run(), pipe


def test_resume_checks_the_end_and_the_record_before_the_offset(
    tmp_path: Path,
    kafka_bootstrap: str,
    redis_url: str,
    redis_prefix: str,
    topic_factory: Callable[..., str],
) -> None:
    topic = topic_factory(1, "keyed")
    recs = make_keyed_records(40, 3, 1, seed=3)
    produce_keyed(kafka_bootstrap, topic, recs)
    cfg = write_keyed_config(
        tmp_path / "r.yaml",
        bootstrap=kafka_bootstrap,
        topic=topic,
        redis_url=redis_url,
        prefix=redis_prefix,
        model="resume",
        group="g-resume",
        batch_size=8,
        snapshot_every_batches=2,
        session_timeout_ms=4000,
    )
    code, first = _run(cfg)
    assert code == 0 and first.stats.records_absorbed == 40
    store = PartitionStore(SnapshotStore(redis_url, "resume", prefix=redis_prefix))
    try:
        m = store.manifest(0)
        assert m is not None and m.offsets == {f"{topic}:0": 40}
        assert m.fingerprints[f"{topic}:0"]["offset"] == 39  # the last record absorbed

        code, again = _run(cfg)  # the same stream: verified, nothing read twice
        assert code == 0 and again.stats.records_in == 0

        part = store.part_key(0)
        forged = {f"{topic}:0": {"offset": 39, "sha256": "0" * 64}}
        store._client.hset(part, "fingerprints", json.dumps(forged))
        code, other = _run(cfg)
        assert code == EXIT_OUT_OF_RANGE
        assert "fingerprint_mismatch" in other.stats.exit_reason
        assert store.lease_owner(0) is None

        store._client.hset(part, mapping={"offsets": json.dumps({f"{topic}:0": 500})})
        store._client.hset(part, "fingerprints", "{}")
        code, beyond = _run(cfg)
        assert code == EXIT_OUT_OF_RANGE and "ends at 40" in beyond.stats.exit_reason
        assert store.manifest(0).offsets == {f"{topic}:0": 500}  # type: ignore[union-attr]

        code, moved = _run(cfg, {"stream.offset_out_of_range": "latest"})
        assert code == 0 and moved.stats.records_in == 0
        assert store.manifest(0).offsets == {f"{topic}:0": 40}  # type: ignore[union-attr]
    finally:
        store.close()
