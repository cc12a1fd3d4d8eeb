"""Redis goes away for >= 10 s mid-stream: the daemon pauses, retries, resumes, loses nothing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fogline.bench.crash_replay import (
    latest_meta,
    log_events,
    make_records,
    produce,
    start_daemon,
    write_config,
)
from fogline.daemon.embedded import EmbeddedRedis
from fogline.daemon.stream.store import SnapshotStore


def test_redis_outage_pauses_and_loses_nothing(
    kafka_bootstrap: str, fresh_topic: str, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    topic = fresh_topic
    cfg = write_config(
        tmp_path / "d.yaml",
        bootstrap=kafka_bootstrap,
        topic=topic,
        redis_url=redis_server.url,
        model="outage",
        batching="count",
        batch_size=32,
        snapshot_every_batches=2,
        max_poll_records=64,  # small polls: the pause must hold records back in Kafka
    )
    first, second = make_records(640, 10, seed=4), make_records(640, 10, seed=5)
    produce(kafka_bootstrap, topic, first.values)
    log = tmp_path / "d.log"
    store = SnapshotStore(redis_server.url, "outage", socket_timeout=2.0)
    proc = start_daemon(cfg, log, "--idle-exit-s", "4")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            meta = latest_meta(store)
            if meta is not None and meta.records_absorbed >= 640:
                break
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        else:
            pytest.fail("first part never absorbed:\n" + log.read_text()[-3000:])
        redis_server.stop()
        outage_start = time.monotonic()
        produce(kafka_bootstrap, topic, second.values)
        time.sleep(max(0.0, 12.0 - (time.monotonic() - outage_start)))
        assert proc.poll() is None, "the daemon survives the outage"
        redis_server.start()  # same port, empty
        assert proc.wait(timeout=180) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    meta = store.read_meta()
    assert meta.records_absorbed == first.valid + second.valid == 1280
    assert meta.offsets == {f"{topic}:0": len(first.values) + len(second.values)}
    names = [e.get("event") for e in log_events(log)]
    assert "redis_unavailable" in names
    assert "consumption_paused" in names
    assert "redis_recovered" in names
    assert "consumption_resumed" in names
    assert "lease_reacquired" in names  # redis came back empty
    store.close()
