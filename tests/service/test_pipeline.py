"""The daemon end to end against a real broker and redis-server, as a subprocess.

produce -> consume -> snapshot -> restart -> resume; dead letters with their
headers; lease exclusion of a second daemon; SIGTERM finishes, snapshots and
exits 0; a bad setting exits 2 naming the field.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_runs import RUN_TIMEOUT_S, run_daemon

from fogline.bench.crash_replay import (
    daemon_argv,
    dlq_reasons,
    dlq_source_offsets,
    latest_meta,
    log_events,
    make_records,
    produce,
    start_daemon,
    write_config,
)
from fogline.daemon.stream.source import DLQ_SOURCE_PARTITION, DLQ_SOURCE_TOPIC, read_topic
from fogline.daemon.stream.store import SnapshotStore
from fogline.models.serialize import from_bytes


def _wait_for_absorbed(
    store: SnapshotStore, n: int, proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        meta = latest_meta(store)
        if meta is not None and meta.records_absorbed >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"daemon exited {proc.returncode}; log tail:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"no snapshot with {n} records absorbed; log tail:\n{log.read_text()[-3000:]}")


def test_produce_consume_snapshot_restart_resume(
    kafka_bootstrap: str, redis_url: str, fresh_topic: str, redis_prefix: str, tmp_path: Path
) -> None:
    topic = fresh_topic
    cfg = write_config(
        tmp_path / "d.yaml",
        bootstrap=kafka_bootstrap,
        topic=topic,
        redis_url=redis_url,
        model="m1",
        prefix=redis_prefix,
        batching="size_or_time",
        batch_size=64,
        snapshot_every_batches=2,
    )
    log = tmp_path / "d.log"
    first = make_records(300, 12, seed=1)
    produce(kafka_bootstrap, topic, first.values)

    assert run_daemon(cfg, log, "--idle-exit-s", "2") == 0
    store = SnapshotStore(redis_url, "m1", prefix=redis_prefix)
    snap = store.read()
    n1 = len(first.values)
    assert snap.meta.records_absorbed == first.valid == 300
    assert snap.meta.offsets == {f"{topic}:0": n1}
    state = from_bytes(snap.blob)
    assert state.records_absorbed == 300 and state.offsets == {(topic, 0): n1}
    v1 = snap.meta.version

    dlq = read_topic(kafka_bootstrap, f"{topic}.dlq", timeout_s=15, min_records=12)
    assert sorted(dlq_source_offsets(dlq)) == sorted(first.bad_offsets)
    for rec, reason in zip(dlq, dlq_reasons(dlq), strict=True):
        headers = dict(rec.headers)
        assert reason, "every dead letter carries its reason"
        assert headers[DLQ_SOURCE_TOPIC] == topic.encode()
        assert headers[DLQ_SOURCE_PARTITION] == b"0"
        src = int(dict(rec.headers)["fogline-source-offset"])
        assert rec.value == first.values[src], "original bytes kept"

    # restart: resumes from the snapshot's offsets, not from the start
    second = make_records(200, 8, seed=2)
    produce(kafka_bootstrap, topic, second.values)
    assert run_daemon(cfg, log, "--idle-exit-s", "2") == 0
    snap2 = store.read()
    assert snap2.meta.version > v1
    assert snap2.meta.records_absorbed == 500
    assert snap2.meta.offsets == {f"{topic}:0": n1 + len(second.values)}
    events = log_events(log)
    starts = [e for e in events if e.get("event") == "daemon_started"]
    assert starts[0]["origin"] == "fresh prior"
    assert starts[1]["origin"] == f"snapshot v{v1}"
    assert starts[1]["offsets"] == {f"{topic}:0": n1}
    assigned = [e for e in events if e.get("event") == "partitions_assigned"]
    assert assigned[-1]["offsets"] == {f"{topic}:0": n1}

    dlq = read_topic(kafka_bootstrap, f"{topic}.dlq", timeout_s=15, min_records=20)
    expected = sorted(first.bad_offsets) + sorted(n1 + o for o in second.bad_offsets)
    assert sorted(dlq_source_offsets(dlq)) == expected  # clean stops: no duplicates
    rejected = [e for e in events if e.get("event") == "record_rejected"]
    assert len(rejected) == 20
    store.close()


def test_lease_excludes_second_daemon_and_sigterm_snapshots(
    kafka_bootstrap: str, redis_url: str, fresh_topic: str, redis_prefix: str, tmp_path: Path
) -> None:
    topic = fresh_topic
    cfg = write_config(
        tmp_path / "d.yaml",
        bootstrap=kafka_bootstrap,
        topic=topic,
        redis_url=redis_url,
        model="m2",
        prefix=redis_prefix,
        batching="count",
        batch_size=32,
        snapshot_every_batches=100,  # only the shutdown snapshot covers the tail
        snapshot_every_seconds=0.5,
    )
    recs = make_records(256, 0, seed=3)
    produce(kafka_bootstrap, topic, recs.values)
    store = SnapshotStore(redis_url, "m2", prefix=redis_prefix)
    log_a = tmp_path / "a.log"
    a = start_daemon(cfg, log_a)
    try:
        _wait_for_absorbed(store, 256, a, log_a)
        version_before = store.latest_version()
        b = subprocess.run(
            daemon_argv(cfg, "--lease-wait-s", "0"),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            env=dict(os.environ),
        )
        assert b.returncode == 3, b.stderr[-2000:]
        assert "writer lease" in b.stderr
        assert store.latest_version() == version_before, "the second daemon wrote nothing"
        assert a.poll() is None, "the first daemon keeps running"
        a.send_signal(signal.SIGTERM)
        assert a.wait(timeout=60) == 0
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    meta = store.read_meta()
    assert meta.records_absorbed == 256
    assert meta.offsets == {f"{topic}:0": 256}
    assert version_before is not None and meta.version > version_before
    events = log_events(log_a)
    final = [e for e in events if e.get("event") == "snapshot_written"][-1]
    assert final["trigger"] == "shutdown"
    stopped = [e for e in events if e.get("event") == "daemon_stopped"]
    assert stopped and stopped[-1]["reason"] == "signal SIGTERM"
    assert store.lease_owner() is None, "the lease is released on exit"
    store.close()


def test_bad_setting_exits_2_naming_the_field(tmp_path: Path) -> None:
    env = dict(os.environ, FOGLINE_STREAM__BATCH_SIZE="0")
    out = subprocess.run(
        [sys.executable, "-m", "fogline.cli", "run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "stream.batch_size" in lines[0]
