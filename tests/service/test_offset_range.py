"""Issue 11 item 2: the broker restarts empty, the snapshot's offsets lie beyond the new end.

Before, the daemon sought to them, absorbed nothing, logged nothing and
reported zero lag.  Now it fails loudly by default (exit status 4, nothing
written) and resumes from the earliest offset when told to.  The same holds
for a recreated topic at least as long as the snapshot's offset, found by the
fingerprint of the record before the offset.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from structlog.testing import capture_logs

from fogline.bench.crash_replay import make_records, produce, start_daemon, write_config
from fogline.daemon import metrics
from fogline.daemon.config import Settings
from fogline.daemon.embedded import EmbeddedKafka
from fogline.daemon.stream.pipeline import EXIT_OUT_OF_RANGE, Pipeline, RunOptions
from fogline.daemon.stream.source import create_topic
from fogline.daemon.stream.store import SnapshotStore
from fogline.models.serialize import from_bytes
from tests.conftest import SESSION_TIMEOUT_MS

BATCH = 16


def _settings(
    bootstrap: str, topic: str, redis_url: str, prefix: str, **stream: object
) -> Settings:
    return Settings.load(
        None,
        model_name="oor",
        metrics_port=0,
        kafka={
            "bootstrap_servers": bootstrap,
            "topic": topic,
            "group_id": f"g-{uuid.uuid4().hex[:8]}",
            "session_timeout_ms": SESSION_TIMEOUT_MS,
        },
        redis={"url": redis_url, "prefix": prefix},
        stream={
            "batch_size": BATCH,
            "batching": "count",
            "snapshot_every_batches": 2,
            "snapshot_every_seconds": 0,
            "device": "cpu",
            **stream,
        },
        drift={"policy": "off"},
    )


def _count(action: str, topic: str, cause: str = "beyond_end") -> float:
    v = metrics.REGISTRY.get_sample_value(
        "fogline_offset_out_of_range_total",
        {"partition": f"{topic}:0", "action": action, "cause": cause},
    )
    return v or 0.0


def test_broker_restarted_empty_fails_loudly_then_resumes_from_earliest(
    kafka_server: EmbeddedKafka, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    bootstrap = kafka_server.bootstrap_servers
    topic = f"oor-{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, topic, 1)
    produce(bootstrap, topic, make_records(6 * BATCH, 0, seed=1).values)
    opts = RunOptions(idle_exit_s=2.0)
    assert Pipeline(_settings(bootstrap, topic, redis_url, redis_prefix), opts).run() == 0
    store = SnapshotStore(redis_url, "oor", prefix=redis_prefix)
    before = store.read()
    assert before.meta.offsets == {f"{topic}:0": 6 * BATCH}

    # the memory-only broker loses the topic; it is recreated with fewer records
    kafka_server.stop()
    kafka_server.start()
    create_topic(bootstrap, topic, 1)
    produce(bootstrap, topic, make_records(2 * BATCH, 0, seed=2).values)

    fails = _count("fail", topic)
    with capture_logs() as logs:
        code = Pipeline(_settings(bootstrap, topic, redis_url, redis_prefix), opts).run()
    assert code == EXIT_OUT_OF_RANGE
    oor = [e for e in logs if e["event"] == "offset_out_of_range"]
    assert len(oor) == 1 and oor[0]["log_level"] == "error"
    assert oor[0]["snapshot_offset"] == 6 * BATCH and oor[0]["high_watermark"] == 2 * BATCH
    failed = [e for e in logs if e["event"] == "daemon_failed"]
    assert failed and "stream.offset_out_of_range" in failed[0]["error"]
    assert _count("fail", topic) == fails + 1
    assert store.read_meta().version == before.meta.version  # nothing written

    # the same through `fogline run`: exit status 4 and a message naming the setting
    cfg = write_config(
        tmp_path / "d.yaml",
        bootstrap=bootstrap,
        topic=topic,
        redis_url=redis_url,
        model="oor",
        prefix=redis_prefix,
        group=f"g-cli-{uuid.uuid4().hex[:8]}",
        batch_size=BATCH,
        snapshot_every_batches=2,
    )
    log = tmp_path / "d.log"
    proc = start_daemon(cfg, log, "--idle-exit-s", "5")
    assert proc.wait(timeout=120) == EXIT_OUT_OF_RANGE, log.read_text()[-3000:]
    lines = log.read_text().splitlines()
    assert any(line.startswith("fogline run: partition ") for line in lines)
    assert any("stream.offset_out_of_range" in line for line in lines)
    events = [json.loads(line) for line in lines if line.startswith("{")]
    assert [e["action"] for e in events if e.get("event") == "offset_out_of_range"] == ["fail"]
    assert store.read_meta().version == before.meta.version

    with capture_logs() as logs:
        settings = _settings(
            bootstrap, topic, redis_url, redis_prefix, offset_out_of_range="earliest"
        )
        assert Pipeline(settings, opts).run() == 0
    assert [e["action"] for e in logs if e["event"] == "offset_out_of_range"] == ["earliest"]
    after = store.read()
    state = from_bytes(after.blob)
    assert after.meta.offsets == {f"{topic}:0": 2 * BATCH}
    assert state.records_absorbed == 8 * BATCH
    assert _count("earliest", topic) == 1
    store.close()


def test_a_recreated_topic_as_long_as_the_offset_fails_loudly_then_resumes_from_0(
    kafka_server: EmbeddedKafka, redis_url: str, redis_prefix: str
) -> None:
    bootstrap = kafka_server.bootstrap_servers
    topic = f"oor-long-{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, topic, 1)
    old = make_records(6 * BATCH, 0, seed=3).values
    produce(bootstrap, topic, old)
    opts = RunOptions(idle_exit_s=2.0)
    assert Pipeline(_settings(bootstrap, topic, redis_url, redis_prefix), opts).run() == 0
    store = SnapshotStore(redis_url, "oor", prefix=redis_prefix)
    before = store.read()
    assert before.meta.offsets == {f"{topic}:0": 6 * BATCH}
    fp = from_bytes(before.blob).fingerprints[(topic, 0)]
    assert fp.offset == 6 * BATCH - 1

    # a restart on the same topic reads the fingerprinted record and resumes after it
    produce(bootstrap, topic, make_records(2 * BATCH, 0, seed=4).values)
    with capture_logs() as logs:
        assert Pipeline(_settings(bootstrap, topic, redis_url, redis_prefix), opts).run() == 0
    assert [e["offset"] for e in logs if e["event"] == "fingerprint_verified"] == [fp.offset]
    assert not [e for e in logs if e["event"] == "offset_out_of_range"]
    same = store.read()
    assert from_bytes(same.blob).records_absorbed == 8 * BATCH
    assert same.meta.offsets == {f"{topic}:0": 8 * BATCH}

    # the broker loses the topic; it is recreated with more records than the offset
    kafka_server.stop()
    kafka_server.start()
    create_topic(bootstrap, topic, 1)
    new = make_records(130, 0, seed=5).values
    assert len(new) >= 8 * BATCH
    produce(bootstrap, topic, new)

    fails = _count("fail", topic, "fingerprint_mismatch")
    with capture_logs() as logs:
        code = Pipeline(_settings(bootstrap, topic, redis_url, redis_prefix), opts).run()
    assert code == EXIT_OUT_OF_RANGE
    oor = [e for e in logs if e["event"] == "offset_out_of_range"]
    assert len(oor) == 1 and oor[0]["log_level"] == "error"
    assert oor[0]["cause"] == "fingerprint_mismatch" and oor[0]["snapshot_offset"] == 8 * BATCH
    assert _count("fail", topic, "fingerprint_mismatch") == fails + 1
    assert store.read_meta().version == same.meta.version  # nothing written

    with capture_logs() as logs:
        settings = _settings(
            bootstrap, topic, redis_url, redis_prefix, offset_out_of_range="earliest"
        )
        assert Pipeline(settings, opts).run() == 0
    oor = [e for e in logs if e["event"] == "offset_out_of_range"]
    assert [(e["action"], e["cause"]) for e in oor] == [("earliest", "fingerprint_mismatch")]
    after = store.read()
    state = from_bytes(after.blob)
    # absorbed from offset 0: 8 batches of 16 of the 130 new records (2 wait for a batch)
    assert after.meta.offsets == {f"{topic}:0": 128}
    assert state.records_absorbed == 8 * BATCH + 128
    assert state.fingerprints[(topic, 0)].offset == 127
    store.close()
