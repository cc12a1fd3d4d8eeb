"""The whole loop against fake collaborators: commit order, dead letters, out-of-range offsets."""

from __future__ import annotations

from typing import Any

import pytest
from daemon_fakes import FakeConsumer, FakeDeadLetters, FakeStore, record
from daemon_fakes import fake_settings as _settings
from structlog.testing import capture_logs

from fogline.daemon import metrics
from fogline.daemon.config import Settings
from fogline.daemon.stream.pipeline import EXIT_OUT_OF_RANGE, Clients, Pipeline, RunOptions
from fogline.models.serialize import from_bytes
from fogline.models.state import RecordFingerprint


class World:
    """One fake store, consumer and DLQ producer sharing an event log."""

    def __init__(self, log: list[bytes], store: FakeStore | None = None) -> None:
        self.events: list[Any] = []
        self.store = store or FakeStore(self.events)
        self.store.events = self.events
        self.log = log
        self.consumer: FakeConsumer | None = None
        self.dlq = FakeDeadLetters(self.events)

    def clients(self) -> Clients:
        def source(
            s: Settings, offsets_for: Any, on_revoked: Any, fingerprints_for: Any
        ) -> FakeConsumer:
            self.consumer = FakeConsumer(
                self.events,
                self.log,
                offsets_for=offsets_for,
                on_revoked=on_revoked,
                fingerprints_for=fingerprints_for,
                per_poll=24,
            )
            return self.consumer

        return Clients(store=lambda s: self.store, source=source, dead_letters=lambda s: self.dlq)

    def run(self, **stream: Any) -> int:
        opts = RunOptions(idle_exit_s=0.05)
        return Pipeline(_settings(**stream), opts, clients=self.clients()).run()


def test_the_loop_flushes_writes_then_commits_and_absorbs_every_valid_record() -> None:
    log = [record(i) for i in range(100)]
    log[5] = b"{not json"
    log[40] = b'{"x": [1], "y": 0}'
    world = World(log)
    assert world.run() == 0
    kinds = [e[0] for e in world.events if e[0] in ("flush", "write", "commit")]
    # every write is followed by its commit; the first write is preceded by the flush of record 5
    assert kinds[:3] == ["flush", "write", "commit"]
    writes = [i for i, k in enumerate(kinds) if k == "write"]
    assert all(kinds[i + 1] == "commit" for i in writes)
    flushes = [e for e in world.events if e[0] == "flush"]
    sends = [i for i, e in enumerate(world.events) if e[0] == "dlq_send"]
    first_flush = world.events.index(flushes[0])
    assert sends[0] < first_flush  # record 5 is in the DLQ before any offset passes it
    assert [raw.offset for raw, _ in world.dlq.sent] == [5, 40]
    # count mode: 98 valid records -> 6 batches of 16 absorbed, the last 2 read again later
    state = from_bytes(world.store.blobs[-1][1])
    assert state.records_absorbed == 96
    resume = state.offsets[("t", 0)]
    assert sum(1 for o in range(resume) if o not in (5, 40)) == 96
    assert world.consumer is not None and world.consumer.committed == {("t", 0): resume}


def test_restart_resumes_at_the_snapshot_offsets() -> None:
    log = [record(i) for i in range(64)]
    world = World(log)
    assert world.run() == 0
    first = from_bytes(world.store.blobs[-1][1])
    assert first.offsets == {("t", 0): 64} and first.records_absorbed == 64
    world.log.extend(record(i) for i in range(64, 96))
    again = World(world.log, store=world.store)
    assert again.run() == 0
    second = from_bytes(again.store.blobs[-1][1])
    assert second.records_absorbed == 96 and second.offsets == {("t", 0): 96}


def _oor_count(action: str, cause: str = "beyond_end") -> float:
    v = metrics.REGISTRY.get_sample_value(
        "fogline_offset_out_of_range_total",
        {"partition": "t:0", "action": action, "cause": cause},
    )
    return v or 0.0


def _snapshot_at(store_world: World, n: int) -> FakeStore:
    """A store whose latest snapshot absorbed ``n`` records of a log that is now gone."""
    assert store_world.run() == 0
    return store_world.store


def test_an_offset_beyond_the_partition_end_fails_loudly_by_default() -> None:
    store = _snapshot_at(World([record(i) for i in range(64)]), 64)
    versions = len(store.blobs)
    shrunk = World([record(i) for i in range(20)], store=store)  # broker restarted empty
    before = _oor_count("fail")
    with capture_logs() as logs:
        assert shrunk.run() == EXIT_OUT_OF_RANGE
    oor = [e for e in logs if e["event"] == "offset_out_of_range"]
    assert oor and oor[0]["snapshot_offset"] == 64 and oor[0]["high_watermark"] == 20
    assert oor[0]["log_level"] == "error" and oor[0]["action"] == "fail"
    assert _oor_count("fail") == before + 1
    assert len(store.blobs) == versions  # nothing written
    assert not any(e[0] == "commit" for e in shrunk.events)


@pytest.mark.parametrize(("action", "absorbed"), [("earliest", 64 + 32), ("latest", 64)])
def test_an_offset_beyond_the_partition_end_resumes_where_the_setting_says(
    action: str, absorbed: int
) -> None:
    store = _snapshot_at(World([record(i) for i in range(64)]), 64)
    shrunk = World([record(i) for i in range(32)], store=store)
    before = _oor_count(action)
    with capture_logs() as logs:
        assert shrunk.run(offset_out_of_range=action) == 0
    assert [e["action"] for e in logs if e["event"] == "offset_out_of_range"] == [action]
    assert _oor_count(action) == before + 1
    assert ("reset", action) in shrunk.events
    state = from_bytes(store.blobs[-1][1])
    assert state.records_absorbed == absorbed and state.offsets == {("t", 0): 32}


def test_a_lease_taken_over_mid_run_stops_the_daemon_without_writing() -> None:
    world = World([record(i) for i in range(200)])
    stolen_at: list[int] = []

    def on_batch(stats: Any, state: Any) -> None:
        if stats.batches == 3 and not stolen_at:
            world.store.steal(write=True)  # another daemon took over and wrote
            stolen_at.append(len(world.events))

    settings = _settings(snapshot_every_batches=4)
    pipe = Pipeline(
        settings, RunOptions(idle_exit_s=0.05, on_batch=on_batch), clients=world.clients()
    )
    with capture_logs() as logs:
        assert pipe.run() == 3
    after = world.events[stolen_at[0] :]
    assert not any(e[0] in ("write", "commit") for e in after)
    assert any(e["event"] == "lease_lost" for e in logs)
    assert world.store.blobs == []  # the first snapshot was due at batch 4


def _print_of(log: list[bytes], offset: int) -> RecordFingerprint:
    return RecordFingerprint.of(offset, None, log[offset], 1_700_000_000_000 + offset)


def test_each_snapshot_fingerprints_the_record_before_its_offset() -> None:
    log = [record(i) for i in range(100)]
    log[5] = b"{not json"
    log[63] = b"{also not json"  # a dead letter can be the record before an offset
    world = World(log)
    assert world.run() == 0
    assert len(world.store.blobs) >= 3
    for _, blob in world.store.blobs:
        state = from_bytes(blob)
        resume = state.offsets[("t", 0)]
        assert state.fingerprints == {("t", 0): _print_of(log, resume - 1)}
    # count mode: the final offset is a partial batch's first row, not the end of the log
    assert from_bytes(world.store.blobs[-1][1]).offsets[("t", 0)] < 100


def test_a_restart_on_the_same_log_verifies_the_fingerprint_and_resumes() -> None:
    log = [record(i) for i in range(64)]
    world = World(log)
    assert world.run() == 0
    world.log.extend(record(i) for i in range(64, 96))
    again = World(world.log, store=world.store)
    assert again.run() == 0
    assert again.consumer is not None and again.consumer.verified == [63]
    state = from_bytes(again.store.blobs[-1][1])
    assert state.records_absorbed == 96 and state.offsets == {("t", 0): 96}
    assert state.fingerprints == {("t", 0): _print_of(world.log, 95)}


def _recreated(n_old: int, n_new: int) -> tuple[FakeStore, list[bytes]]:
    """A snapshot at ``n_old`` and a recreated log of ``n_new`` other records."""
    store = _snapshot_at(World([record(i) for i in range(n_old)]), n_old)
    return store, [record(1000 + i) for i in range(n_new)]


@pytest.mark.parametrize("n_new", [64, 130])
def test_a_recreated_log_at_least_as_long_fails_loudly_by_default(n_new: int) -> None:
    store, new = _recreated(64, n_new)
    versions = len(store.blobs)
    before = _oor_count("fail", "fingerprint_mismatch")
    recreated = World(new, store=store)
    with capture_logs() as logs:
        assert recreated.run() == EXIT_OUT_OF_RANGE
    oor = [e for e in logs if e["event"] == "offset_out_of_range"]
    assert len(oor) == 1 and oor[0]["cause"] == "fingerprint_mismatch"
    assert oor[0]["snapshot_offset"] == 64 and oor[0]["action"] == "fail"
    failed = [e for e in logs if e["event"] == "daemon_failed"]
    assert failed and "fingerprint_mismatch" in failed[0]["error"]
    assert _oor_count("fail", "fingerprint_mismatch") == before + 1
    assert len(store.blobs) == versions  # nothing written, nothing committed
    assert not any(e[0] == "commit" for e in recreated.events)


def test_a_recreated_log_at_least_as_long_is_absorbed_from_0_with_earliest() -> None:
    store, new = _recreated(64, 130)
    before = _oor_count("earliest", "fingerprint_mismatch")
    recreated = World(new, store=store)
    with capture_logs() as logs:
        assert recreated.run(offset_out_of_range="earliest") == 0
    assert [e["cause"] for e in logs if e["event"] == "offset_out_of_range"] == [
        "fingerprint_mismatch"
    ]
    assert _oor_count("earliest", "fingerprint_mismatch") == before + 1
    state = from_bytes(store.blobs[-1][1])
    resume = state.offsets[("t", 0)]
    assert resume == 128  # 130 valid records: 8 batches of 16, two read again later
    assert state.records_absorbed == 64 + 128
    assert state.fingerprints == {("t", 0): _print_of(new, 127)}
