"""Faults that used to stop or silently corrupt the daemon, on the real broker and redis-server.

- a malformed record larger than the dead-letter producer's request limit
  (3 MiB against 1 MiB) is dead-lettered as a truncated copy carrying the
  original's size and sha256, and the records after it are absorbed;
- records that decode but make the SVI step non-finite (±3e38) are
  dead-lettered with reason ``step_rejected`` and the rest of their batches
  learnt: absorbed + dead-lettered == sent.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from daemon_runs import run_daemon

from fogline.bench.crash_replay import (
    dlq_reasons,
    dlq_source_offsets,
    log_events,
    make_records,
    write_config,
)
from fogline.bench.faults import huge_value_records
from fogline.daemon.stream.isolate import STEP_REJECTED
from fogline.daemon.stream.source import (
    DLQ_ORIGINAL_SHA256,
    DLQ_ORIGINAL_SIZE,
    DLQ_SOURCE_OFFSET,
    DLQ_TRUNCATED,
    ReplayProducer,
    read_topic,
)
from fogline.daemon.stream.store import SnapshotStore


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    with ReplayProducer(bootstrap, topic, max_request_size=8 * 2**20) as prod:
        for v in values:
            prod.send(v, partition=0)


def test_oversized_malformed_record_is_dead_lettered_truncated(
    kafka_bootstrap: str, redis_url: str, fresh_topic: str, redis_prefix: str, tmp_path: Path
) -> None:
    topic = fresh_topic
    good = make_records(128, 0, seed=5).values
    huge = b'{"ts": 1, "x": "' + b"a" * (3 * 2**20) + b'", "y": 1.0}'
    values = [*good[:40], huge, *good[40:]]
    _produce(kafka_bootstrap, topic, values)
    cfg = write_config(
        tmp_path / "d.yaml",
        bootstrap=kafka_bootstrap,
        topic=topic,
        redis_url=redis_url,
        model="big",
        prefix=redis_prefix,
        batch_size=32,
    )
    log = tmp_path / "d.log"
    assert run_daemon(cfg, log, "--idle-exit-s", "2") == 0, log.read_text()[-3000:]

    with SnapshotStore(redis_url, "big", prefix=redis_prefix) as store:
        meta = store.read_meta()
    assert meta.records_absorbed == 128, "every valid record after the huge one is absorbed"
    assert meta.offsets == {f"{topic}:0": len(values)}

    dlq = read_topic(kafka_bootstrap, f"{topic}.dlq", timeout_s=15, min_records=1)
    assert dlq_source_offsets(dlq) == [40]
    (rec,) = dlq
    h = dict(rec.headers)
    assert h[DLQ_TRUNCATED] == b"1"
    assert int(h[DLQ_ORIGINAL_SIZE]) == len(huge)
    assert h[DLQ_ORIGINAL_SHA256].decode() == hashlib.sha256(huge).hexdigest()
    assert h[DLQ_SOURCE_OFFSET] == b"40"
    assert dlq_reasons(dlq)[0].startswith("bad_x")
    assert rec.value is not None and 0 < len(rec.value) < 2**20
    assert huge.startswith(rec.value), "the copy is the original's first bytes"
    events = log_events(log)
    assert [e["offset"] for e in events if e.get("event") == "dlq_record_truncated"] == [40]
    assert any(e.get("event") == "daemon_stopped" for e in events), "a clean exit, no crash"


@pytest.mark.parametrize("policy", ["off", "forget"])
def test_rejected_steps_dead_letter_the_poison_and_learn_the_rest(
    kafka_bootstrap: str,
    redis_url: str,
    fresh_topic: str,
    redis_prefix: str,
    tmp_path: Path,
    policy: str,
) -> None:
    topic = fresh_topic
    positions = [3, 4, 70, 100, 101, 102, 200, 333, 334, 500]
    values = huge_value_records(512, positions, seed=7)
    _produce(kafka_bootstrap, topic, values)
    cfg = write_config(
        tmp_path / "d.yaml",
        bootstrap=kafka_bootstrap,
        topic=topic,
        redis_url=redis_url,
        model="rej",
        prefix=redis_prefix,
        batch_size=64,
        policy=policy,
    )
    log = tmp_path / "d.log"
    assert run_daemon(cfg, log, "--idle-exit-s", "2") == 0, log.read_text()[-3000:]
    with SnapshotStore(redis_url, "rej", prefix=redis_prefix) as store:
        meta = store.read_meta()
    dlq = read_topic(kafka_bootstrap, f"{topic}.dlq", timeout_s=15, min_records=len(positions))
    sources = sorted(dlq_source_offsets(dlq))
    if policy == "off":
        assert sources == positions
    else:
        # the drift loop drops gross outliers itself once calibrated (weight 0,
        # counted as seen); only the ones that reach the step are dead-lettered
        assert sources and set(sources) <= set(positions)
    assert set(dlq_reasons(dlq)) == {STEP_REJECTED}
    assert meta.records_absorbed + len(dlq) == len(values), "every good record learnt"
    assert meta.offsets == {f"{topic}:0": len(values)}
    events = log_events(log)
    assert len([e for e in events if e.get("event") == "svi_step_rejected"]) == 0, (
        "after isolation no batch ends rejected"
    )
