"""Keyed mode's consumer in a child process on the embedded broker and redis-server.

- :class:`KeyedProcessSource` in a real consumer group: a second member joins,
  and the first one reports the revocation and its new assignment in the order
  they happened, before any record of the new assignment; a record of a
  partition it no longer holds never follows the revocation.
- The keyed daemon (``stream.source_process``, the default) whose consumer child
  is killed exits 6 with its leases released and no final checkpoint; a
  restart ends with every key's state bit-identical to an uninterrupted run,
  each valid record of a complete batch absorbed once.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fogline.bench.keyed_daemon import (
    absorbed_total,
    key_blobs,
    make_keyed_records,
    produce_keyed,
    write_keyed_config,
)
from fogline.daemon.config import Settings
from fogline.daemon.stream.keyed import KeyedPipeline
from fogline.daemon.stream.keyed_process import KeyedProcessSource
from fogline.daemon.stream.pipeline import EXIT_SOURCE_DIED, RunOptions
from fogline.daemon.stream.source import KafkaSource, kafka_source
from fogline.daemon.stream.store import PartitionStore, SnapshotStore
from tests.conftest import SESSION_TIMEOUT_MS

pytestmark = pytest.mark.service


def test_a_rebalance_reaches_the_parent_in_order_before_the_new_assignments_records(
    kafka_bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory(2, "kps")
    recs = make_keyed_records(400, 8, 2, seed=3)
    produce_keyed(kafka_bootstrap, topic, recs)
    group = f"g-{uuid.uuid4().hex[:8]}"
    s = Settings.load(
        None,
        model_name="kps",
        kafka={
            "bootstrap_servers": kafka_bootstrap,
            "topic": topic,
            "group_id": group,
            "session_timeout_ms": SESSION_TIMEOUT_MS,
            "max_poll_records": 20,
        },
    )
    seen: list[tuple[Any, ...]] = []
    src = KeyedProcessSource(
        functools.partial(kafka_source, s),
        on_assigned=lambda keys: seen.append(("assigned", sorted(keys))),
        on_revoked=lambda keys: seen.append(("revoked", sorted(keys))),
    )
    stop = threading.Event()
    other: list[KafkaSource] = []

    def second_member() -> None:  # joins, then keeps polling so the group stays settled
        with KafkaSource(
            kafka_bootstrap, topic, group, session_timeout_ms=SESSION_TIMEOUT_MS
        ) as member:
            other.append(member)
            while not stop.is_set():
                member.poll(20, 100)

    joiner = threading.Thread(target=second_member, daemon=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(e[0] == "records" for e in seen):
            raws = src.take(20, 200).raws
            if raws:
                seen.append(("records", sorted({r.partition for r in raws})))
        joiner.start()
        while time.monotonic() < deadline and not any(e[0] == "revoked" for e in seen):
            src.start(20, 200)  # ask ahead, as the daemon does
            raws = src.take(20, 200).raws
            if raws:
                seen.append(("records", sorted({r.partition for r in raws})))
        while time.monotonic() < deadline and [e[0] for e in seen].count("assigned") < 2:
            raws = src.take(20, 200).raws
            if raws:
                seen.append(("records", sorted({r.partition for r in raws})))
        for _ in range(5):
            raws = src.take(20, 200).raws
            if raws:
                seen.append(("records", sorted({r.partition for r in raws})))
    finally:
        stop.set()
        joiner.join(30)
        src.close()
    kinds = [e[0] for e in seen]
    assert kinds[0] == "assigned" and seen[0][1] == [(topic, 0), (topic, 1)]
    assert "revoked" in kinds and kinds.count("assigned") >= 2, seen
    revoked_at = kinds.index("revoked")
    reassigned_at = kinds.index("assigned", revoked_at)
    mine = {p for _, p in seen[reassigned_at][1]}
    assert len(mine) == 1  # the other member holds the other partition
    # between the revocation and the new assignment no record; after it only its own
    assert "records" not in kinds[revoked_at:reassigned_at]
    for e in seen[reassigned_at + 1 :]:
        if e[0] == "records":
            assert set(e[1]) <= mine, seen


def _config(tmp_path: Path, name: str, **kw: Any) -> Path:
    return write_keyed_config(
        tmp_path / f"{name}.yaml",
        model=name,
        group=f"g-{name}",
        batch_size=16,
        snapshot_every_batches=2,
        session_timeout_ms=4000,
        **kw,
    )


def test_keyed_daemon_exits_6_when_its_consumer_dies_and_a_restart_is_bit_identical(
    tmp_path: Path,
    kafka_bootstrap: str,
    redis_url: str,
    redis_prefix: str,
    topic_factory: Callable[..., str],
) -> None:
    topic = topic_factory(3, "kps")
    recs = make_keyed_records(1_200, 10, 3, bad_every=37, seed=4)
    produce_keyed(kafka_bootstrap, topic, recs)
    common = {"bootstrap": kafka_bootstrap, "topic": topic, "redis_url": redis_url}
    common["prefix"] = redis_prefix

    ref = KeyedPipeline(
        Settings.load(_config(tmp_path, "kps-ref", **common)),
        RunOptions(idle_exit_s=1.5, threads=1),
    )
    assert ref.run() == 0

    first = KeyedPipeline(
        Settings.load(_config(tmp_path, "kps-kill", **common)),
        RunOptions(idle_exit_s=30.0, threads=1),
    )
    killed: list[int] = []

    def kill_child_after_a_checkpoint() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            src = getattr(first, "source", None)
            if isinstance(src, KeyedProcessSource) and first.stats.checkpoints >= 2:
                assert src.pid is not None
                killed.append(src.pid)
                os.kill(src.pid, signal.SIGKILL)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_child_after_a_checkpoint, daemon=True)
    killer.start()
    assert first.run() == EXIT_SOURCE_DIED
    killer.join(5)
    assert killed
    assert "consumer process" in first.stats.exit_reason
    store = PartitionStore(SnapshotStore(redis_url, "kps-kill", prefix=redis_prefix))
    try:
        assert all(store.lease_owner(p) is None for p in range(3))  # released on the way out
    finally:
        store.close()

    again = KeyedPipeline(
        Settings.load(tmp_path / "kps-kill.yaml"), RunOptions(idle_exit_s=1.5, threads=1)
    )
    assert again.run() == 0
    total = recs.absorbable(16)
    assert absorbed_total(redis_url, "kps-kill", redis_prefix, 3) == total
    assert absorbed_total(redis_url, "kps-ref", redis_prefix, 3) == total
    a = key_blobs(redis_url, "kps-ref", redis_prefix)
    b = key_blobs(redis_url, "kps-kill", redis_prefix)
    assert len(a) == 10 and a == b
