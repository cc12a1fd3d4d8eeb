"""Keyed mode across a consumer group: 3 daemons, kill -9 twice, same posteriors as one daemon.

Real processes (``fogline run`` with ``keyed.enabled``) on the embedded Tansu
broker and a real redis-server.  A producer thread trickles a keyed stream
(40 keys, malformed records among them) into 6 partitions while 3 daemons of
one group absorb it; one daemon is killed with SIGKILL twice (while it has
absorbed batches not yet checkpointed) and started again each time.  At the
end every valid record of a complete batch is absorbed exactly once (the
partition manifests and the per-key counts both say so) and every key's
checkpointed state -- parameters, Adam moments, RNG state, step count,
records absorbed -- is bit-identical to a single daemon's run over the same
records.  The time from each kill to the killed daemon's partitions resuming
elsewhere is printed (the rebalance cost docs/operations.md quotes).
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from fogline.bench.crash_replay import log_events, start_daemon
from fogline.bench.keyed_daemon import (
    absorbed_total,
    key_blobs,
    make_keyed_records,
    write_keyed_config,
)
from fogline.daemon.stream.source import ReplayProducer
from fogline.daemon.stream.store import PartitionStore, SnapshotStore
from fogline.models.serialize import from_bytes

pytestmark = [pytest.mark.slow, pytest.mark.service]

PARTITIONS = 6
BATCH = 16
RECORDS = 6000
SESSION_MS = 4000


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def _owned_at(log: Path, when: float) -> set[int]:
    """Partitions a daemon held at ``when`` (from its resumed/dropped log events)."""
    owned: set[int] = set()
    for e in log_events(log):
        if _ts(e) > when:
            break
        if e.get("event") == "partition_resumed":
            owned.add(int(e["partition"]))
        elif e.get("event") == "partition_dropped":
            owned.discard(int(e["partition"]))
    return owned


def _resumed_after(logs: list[Path], partitions: set[int], when: float) -> float | None:
    """Seconds from ``when`` until every one of ``partitions`` resumed in one of ``logs``."""
    first: dict[int, float] = {}
    for log in logs:
        for e in log_events(log):
            if e.get("event") == "partition_resumed" and _ts(e) > when:
                p = int(e["partition"])
                first[p] = min(first.get(p, float("inf")), _ts(e))
    if not partitions <= first.keys():
        return None
    return max(first[p] for p in partitions) - when


def _wait(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_three_daemons_with_kills_match_one_daemon_key_by_key(
    tmp_path: Path,
    kafka_bootstrap: str,
    redis_url: str,
    redis_prefix: str,
    topic_factory: Callable[..., str],
) -> None:
    topic = topic_factory(PARTITIONS, "keyed")
    recs = make_keyed_records(RECORDS, 40, PARTITIONS, bad_every=97, seed=3)
    expect = recs.absorbable(BATCH)
    common: dict[str, Any] = {
        "bootstrap": kafka_bootstrap,
        "topic": topic,
        "redis_url": redis_url,
        "prefix": redis_prefix,
        "batch_size": BATCH,
        "snapshot_every_batches": 4,
        "session_timeout_ms": SESSION_MS,
        "lease_ttl_s": 2.0,
    }
    # the group polls ahead (stream.prefetch), the reference does not: same key states
    group_cfg = write_keyed_config(
        tmp_path / "group.yaml", model="grp", group="g-grp", prefetch=True, **common
    )
    ref_cfg = write_keyed_config(tmp_path / "ref.yaml", model="ref", group="g-ref", **common)

    def produce() -> None:  # a trickle, so the kills land mid-stream
        with ReplayProducer(kafka_bootstrap, topic) as prod:
            for i, (p, k, v) in enumerate(recs.rows):
                prod.send(v, key=k, partition=p)
                if i % 200 == 199:
                    prod.flush()
                    time.sleep(0.1)

    producer = threading.Thread(target=produce, daemon=True)
    logs = [tmp_path / f"d{i}.log" for i in range(3)]
    procs = [start_daemon(group_cfg, log) for log in logs]
    producer.start()

    def absorbed() -> int:
        try:
            return absorbed_total(redis_url, "grp", redis_prefix, PARTITIONS)
        except Exception:
            return 0

    rebalance_s: list[float] = []
    try:
        for k, fraction in enumerate((0.25, 0.6)):
            _wait(lambda f=fraction: absorbed() >= f * expect, 90, f"{fraction:.0%} absorbed")
            _wait(lambda: bool(_owned_at(logs[0], time.time())), 60, "daemon 0 owns partitions")
            victim = procs[0]
            killed_at = time.time()
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            lost = _owned_at(logs[0], killed_at)
            survivors = logs[1:]
            _wait(
                lambda lost=lost, t=killed_at, s=survivors: _resumed_after(s, lost, t) is not None,
                60,
                f"kill {k + 1}: partitions {sorted(lost)} resumed elsewhere",
            )
            took = _resumed_after(survivors, lost, killed_at)
            assert took is not None
            rebalance_s.append(round(took, 2))
            logs[0] = tmp_path / f"d0-restart{k + 1}.log"
            procs[0] = start_daemon(group_cfg, logs[0])
            _wait(
                lambda log=logs[0]: any(
                    e.get("event") == "daemon_started" for e in log_events(log)
                ),
                60,
                "the restarted daemon started",
            )
        producer.join(timeout=120)
        _wait(lambda: absorbed() >= expect, 120, "every complete batch absorbed")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=60) for proc in procs]
    print(f"kill -> partitions resumed elsewhere: {rebalance_s} s (session {SESSION_MS} ms)")
    assert codes == [0, 0, 0]

    ref = subprocess.run(
        [*start_argv(ref_cfg), "--idle-exit-s", "3"],
        stdout=(tmp_path / "ref.log").open("wb"),
        stderr=subprocess.STDOUT,
        timeout=300,
        check=False,
    )
    assert ref.returncode == 0

    assert absorbed_total(redis_url, "grp", redis_prefix, PARTITIONS) == expect
    assert absorbed_total(redis_url, "ref", redis_prefix, PARTITIONS) == expect
    grp = key_blobs(redis_url, "grp", redis_prefix)
    one = key_blobs(redis_url, "ref", redis_prefix)
    assert sorted(grp) == sorted(one) and len(grp) == 40
    different = [k for k in one if grp[k] != one[k]]
    assert not different, f"keys whose state differs from the single daemon's: {different}"
    assert sum(from_bytes(b).records_absorbed for b in grp.values()) == expect
    store = PartitionStore(SnapshotStore(redis_url, "grp", prefix=redis_prefix))
    try:
        for p, n in recs.valid_per_partition().items():
            m = store.manifest(p)
            assert m is not None and m.records_absorbed == n // BATCH * BATCH
            assert store.lease_owner(p) is None  # released at the clean stop
    finally:
        store.close()


def start_argv(config: Path) -> list[str]:
    from fogline.bench.crash_replay import daemon_argv

    return daemon_argv(config)
