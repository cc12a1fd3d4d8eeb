"""The commit path with fakes: flush -> write -> commit, outages pause, a lost lease stops."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from daemon_fakes import FakeConsumer, FakeDeadLetters, FakeStore
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from fogline.daemon.stream.batching import Rows
from fogline.daemon.stream.checkpoint import Checkpoint, resume_offsets
from fogline.daemon.stream.decode import RawRecord
from fogline.daemon.stream.lease import LeaseKeeper, LeaseUnavailable
from fogline.daemon.stream.runtime import Retry, StopFlag
from fogline.models.config import ModelConfig
from fogline.models.serialize import from_bytes
from fogline.models.state import PosteriorState, RecordFingerprint
from fogline.models.svi import init_state


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def state() -> PosteriorState:
    return init_state(ModelConfig(in_features=2, hidden=(4,)), seed=0).replace(
        offsets={("t", 0): 10, ("t", 1): 3}, records_absorbed=13
    )


def _checkpoint(events: list[Any], **kw: Any) -> tuple[Checkpoint, FakeStore, FakeConsumer]:
    store = FakeStore(events)
    keeper = LeaseKeeper(store, ttl_s=30.0, owner="me:1")
    assert keeper.acquire(0, StopFlag())
    consumer = FakeConsumer(events, log=[])
    cp = Checkpoint(
        store=store, keeper=keeper, dead_letters=FakeDeadLetters(events), consumer=consumer, **kw
    )
    return cp, store, consumer


def test_flush_then_write_then_commit(state: PosteriorState) -> None:
    events: list[Any] = []
    cp, store, consumer = _checkpoint(events)
    cp.read({("t", 0): 10}, dead_lettered=2)
    cp.stepped()
    meta = cp.commit(state, "batches")
    assert meta is not None and meta.version == 1
    assert events == [
        ("flush", 0),
        ("write", {"t:0": 10, "t:1": 3}),  # the JSON spelling only at the store boundary
        ("commit", {("t", 0): 10, ("t", 1): 3}),
    ]
    assert consumer.committed == state.offsets
    back = from_bytes(store.blobs[-1][1])  # the snapshot carries the offsets it absorbed
    assert back.offsets == state.offsets and back.records_absorbed == 13
    assert not cp.dirty and cp.batches_since == 0
    # nothing dead-lettered since: no flush the second time
    events.clear()
    cp.commit(state, "interval")
    assert [e[0] for e in events] == ["write", "commit"]


def test_a_failed_write_commits_nothing_pauses_and_retries_with_backoff(
    state: PosteriorState,
) -> None:
    events: list[Any] = []
    cp, store, consumer = _checkpoint(events, retry=Retry(base_s=0.2, cap_s=1.0))
    store.down = True
    with capture_logs() as logs:
        assert cp.commit(state, "batches") is None
        assert cp.commit(state, "retry") is None
    assert [e[0] for e in events] == ["pause"]  # paused once, no write, no commit
    assert consumer.paused and consumer.committed == {}
    assert cp.failing and cp.failures == 2
    down = [e for e in logs if e["event"] == "redis_unavailable"]
    assert len(down) == 2 and all(e["paused"] for e in down)
    assert 0.1 <= down[0]["retry_in_s"] <= 0.2 and 0.2 <= down[1]["retry_in_s"] <= 0.4
    assert cp.due(50, 30.0) in ("retry", None)  # no other trigger while failing
    store.down = False
    with capture_logs() as logs:
        assert cp.commit(state, "retry") is not None
    assert [e[0] for e in events] == ["pause", "write", "resume", "commit"]
    assert not cp.failing and not consumer.paused
    assert any(e["event"] == "redis_recovered" for e in logs)


def test_a_lease_lost_to_another_writer_stops_before_writing(state: PosteriorState) -> None:
    events: list[Any] = []
    cp, store, consumer = _checkpoint(events)
    assert cp.commit(state, "batches") is not None
    events.clear()
    store.steal(write=True)  # another daemon took over and wrote a version
    with pytest.raises(LeaseUnavailable, match="lost"):
        cp.commit(state, "batches")
    assert [e for e in events if e[0] in ("write", "commit")] == []
    assert consumer.committed == state.offsets  # only the first, successful commit


def test_a_lapsed_lease_nobody_used_is_taken_back(state: PosteriorState) -> None:
    events: list[Any] = []
    cp, store, _ = _checkpoint(events)
    assert cp.commit(state, "batches") is not None
    store.holder = None  # expired (Redis restarted empty, a long pause), nobody wrote
    with capture_logs() as logs:
        meta = cp.commit(state, "batches")
    assert meta is not None and meta.version == 2
    assert any(e["event"] == "lease_reacquired" for e in logs)
    store.steal(write=False)  # another daemon holds it but has not written: still not ours
    with pytest.raises(LeaseUnavailable):
        cp.commit(state, "batches")


def test_triggers(state: PosteriorState) -> None:
    clock = Clock()
    cp, _, _ = _checkpoint([], clock=clock)
    assert cp.due(2, 5.0) is None  # clean
    cp.stepped()
    assert cp.due(2, 5.0) is None
    clock.now += 5.0
    assert cp.due(2, 5.0) == "interval"
    cp.stepped()
    assert cp.due(2, 5.0) == "batches"
    cp.commit(state, "batches")
    clock.now += 10.0
    assert cp.due(2, 5.0) is None  # nothing new since the snapshot
    cp.read({("t", 0): 11}, dead_lettered=1, valid=0)  # dead letters only: offsets moved on
    assert cp.due(0, 5.0) == "interval"


def _rows(partition: list[int], offset: list[int]) -> Rows:
    n = len(offset)
    return Rows.of("t", np.zeros((n, 2)), np.zeros(n), partition, offset)


def test_resume_offsets_are_the_first_unabsorbed_row_per_partition() -> None:
    absorbed = {("t", 0): 10, ("t", 1): 3, ("t", 2): 7}
    handled = {("t", 0): 20, ("t", 1): 9}
    unabsorbed = [_rows([1, 0, 1], [5, 14, 6]), _rows([0], [15])]
    assert resume_offsets(absorbed, handled, unabsorbed) == {
        ("t", 0): 14,  # rows from 14 on are still buffered
        ("t", 1): 5,
        ("t", 2): 7,  # not read since the snapshot
    }
    # nothing buffered: after the last handled record (dead letters included)
    assert resume_offsets(absorbed, handled, []) == {("t", 0): 20, ("t", 1): 9, ("t", 2): 7}


@given(
    st.lists(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 50)), max_size=8), max_size=5),
    st.dictionaries(st.integers(0, 3), st.integers(0, 60), max_size=4),
    st.dictionaries(st.integers(0, 3), st.integers(0, 60), max_size=4),
)
def test_resume_offsets_match_a_row_by_row_scan(
    chunks: list[list[tuple[int, int]]], absorbed: dict[int, int], handled: dict[int, int]
) -> None:
    rows = [_rows([p for p, _ in c], [o for _, o in c]) for c in chunks]
    a = {("t", p): o for p, o in absorbed.items()}
    h = {("t", p): o for p, o in handled.items()}
    expected = {**a, **h}
    seen: set[int] = set()
    for chunk in chunks:  # the slow exact version: first row per handled partition
        for p, o in chunk:
            if p in handled and p not in seen:
                expected["t", p] = o
                seen.add(p)
    assert resume_offsets(a, h, rows) == expected


def _raws(offsets: range, partition: int = 0) -> list[RawRecord]:
    return [RawRecord("t", partition, o, None, b"v%d" % o, 1000 + o) for o in offsets]


def _print(o: int) -> RecordFingerprint:
    return RecordFingerprint.of(o, None, b"v%d" % o, 1000 + o)


def test_stamp_fingerprints_the_record_before_each_offset_across_polls(
    state: PosteriorState,
) -> None:
    cp, _, _ = _checkpoint([])
    first, second = _raws(range(0, 10)), _raws(range(10, 20))
    cp.read({("t", 0): 10}, valid=10, records=first)
    cp.read({("t", 0): 20}, valid=10, records=second)
    # rows 16.. are unabsorbed: the resume offset is 16, its record before is 15
    unabsorbed = [Rows.of("t", np.zeros((4, 2)), np.zeros(4), [0] * 4, [16, 17, 18, 19])]
    offsets = cp.offsets({}, unabsorbed)
    assert offsets == {("t", 0): 16}
    stamped = cp.stamp(state.replace(offsets=offsets))
    assert stamped.fingerprints == {("t", 0): _print(15)}
    assert len(cp._recent) == 1  # the first poll can no longer hold a record before an offset
    # records let go (offset 9) and partitions never read (t:1) get no fingerprint
    assert cp.stamp(state.replace(offsets={("t", 0): 10, ("t", 1): 3})).fingerprints == {}


def test_a_start_fingerprint_holds_until_the_offset_moves(state: PosteriorState) -> None:
    start = state.replace(offsets={("t", 0): 10}, fingerprints={("t", 0): _print(9)})
    cp, _, _ = _checkpoint([], start=start)
    assert cp.stamp(start).fingerprints == {("t", 0): _print(9)}
    cp.read({("t", 0): 13}, valid=3, records=_raws(range(10, 13)))
    moved = start.replace(offsets=cp.offsets(start.offsets, []))
    assert cp.stamp(moved).fingerprints == {("t", 0): _print(12)}


def test_forget_with_reset_drops_the_old_stream_s_records(state: PosteriorState) -> None:
    start = state.replace(offsets={("t", 0): 10}, fingerprints={("t", 0): _print(9)})
    cp, _, _ = _checkpoint([], start=start)
    cp.read({("t", 0): 10, ("t", 1): 2}, valid=12, records=_raws(range(5, 10)) + _raws(range(2), 1))
    cp.forget([("t", 0)], reset=True)
    # the same offset on the recreated topic is another record: nothing is known of it
    assert cp.stamp(start).fingerprints == {}
    kept = cp.stamp(state.replace(offsets={("t", 1): 2}))
    assert kept.fingerprints == {("t", 1): _print(1)}
