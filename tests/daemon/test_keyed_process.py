"""KeyedProcessSource with a scripted consumer in its child process (no broker).

Rebalance events raised on another thread in the child reach the parent in the
order they happened and before the records of the poll that saw them; pause,
seek and the checked seek run in the parent's order behind a poll in flight;
offset findings arrive with the replies; a child that dies is a
:class:`SourceProcessDied`, never a hang.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
from keyed_process_fakes import END, ScriptedConsumer, fingerprint, unreachable

from fogline.daemon.stream.decode import Decoder, decode_batch
from fogline.daemon.stream.keyed_process import KeyedProcessSource
from fogline.daemon.stream.process_source import SourceProcessDied
from fogline.daemon.stream.source import BEYOND_END, FINGERPRINT_MISMATCH

T = "keyed"


def _source(script: list[list[tuple[str, Any]]]) -> tuple[KeyedProcessSource, list[Any]]:
    """A source over ``script`` and the one list its events and records are logged to."""
    seen: list[Any] = []
    src = KeyedProcessSource(
        functools.partial(ScriptedConsumer, topic=T, script=script),
        on_assigned=lambda keys: seen.append(("assigned", keys)),
        on_revoked=lambda keys: seen.append(("revoked", keys)),
    )
    return src, seen


def _take(src: KeyedProcessSource, seen: list[Any], n: int = 1000) -> list[Any]:
    polled = src.take(n, 100)
    assert polled.decoded is None  # keyed mode decodes in the pipeline
    seen.append(("records", sorted({(r.partition) for r in polled.raws}), len(polled.raws)))
    return polled.raws


def test_rebalance_events_arrive_in_order_before_the_records_of_their_poll() -> None:
    script: list[list[tuple[str, Any]]] = [
        [("assign", [0, 1])],
        [("revoke", [0, 1]), ("assign", [1]), ("revoke", [1]), ("assign", [2, 3])],
        [],
    ]
    src, seen = _source(script)
    try:
        assert src.ready(30.0)
        _take(src, seen, 150)
        # the next poll runs ahead in the child; its events come with its reply
        assert src.start(1000, 100)
        assert not src.start(1000, 100)
        assert len(seen) == 2
        _take(src, seen)
        _take(src, seen)
    finally:
        src.close()
    assert seen == [
        ("assigned", [(T, 0), (T, 1)]),
        ("records", [0, 1], 150),
        ("revoked", [(T, 0), (T, 1)]),
        ("assigned", [(T, 1)]),
        ("revoked", [(T, 1)]),
        ("assigned", [(T, 2), (T, 3)]),
        ("records", [2, 3], 2 * END),
        ("records", [], 0),
    ]


def test_the_child_decodes_each_poll_as_the_parent_would() -> None:
    decoder = Decoder(["p", "o"])
    src = KeyedProcessSource(
        functools.partial(ScriptedConsumer, topic=T, script=[[("assign", [0, 1])]]),
        decode=functools.partial(decode_batch, features=decoder),
        on_assigned=lambda keys: None,
        on_revoked=lambda keys: None,
    )
    try:
        assert src.ready(30.0)
        polled = src.take(150, 100)
    finally:
        src.close()
    here = decode_batch(polled.raws, decoder)
    there = polled.decoded
    assert there is not None and len(polled.raws) == 150
    assert there.good == here.good and there.keys == here.keys
    np.testing.assert_array_equal(there.x, here.x)
    np.testing.assert_array_equal(there.y, here.y)
    assert [(raw, why) for raw, why, _ in there.bad] == [(raw, why) for raw, why, _ in here.bad]
    assert len(there.bad) == 21  # every 7th record of each partition is malformed


def test_pause_seek_checked_and_findings_follow_the_parents_order() -> None:
    src, seen = _source([[("assign", [0, 1])]])
    try:
        assert src.ready(30.0)
        assert src.partition_count(T) == 4
        # assigned during the first poll, at the earliest offset until the claim seeks
        assert [(r.partition, r.offset) for r in _take(src, seen, 5)] == [(0, o) for o in range(5)]
        src.pause([(T, 0), (T, 1)])
        assert _take(src, seen) == []  # assigned, paused: nothing fetched
        assert src.assignment == [(T, 0), (T, 1)]
        # a poll in flight, then the claim's calls: they run after it, in order
        assert src.start(1000, 100)
        src.seek_checked({(T, 0): 40}, {(T, 0): fingerprint(0, 39)})
        src.seek_checked({(T, 1): END + 5}, {})
        src.resume([(T, 0), (T, 1)])
        assert src.in_flight
        assert _take(src, seen) == []  # the held poll: before the resume
        raws = _take(src, seen)
        assert [(r.partition, r.offset) for r in raws] == [(0, o) for o in range(40, END)]
        found = src.out_of_range()
        assert [(f.key, f.offset, f.cause) for f in found] == [((T, 1), END + 5, BEYOND_END)]
        assert src.out_of_range() == []  # handed over once
        # a fingerprint of another record: found, and the partition's records withheld
        src.seek_checked({(T, 0): 10}, {(T, 0): fingerprint(1, 9)})
        assert _take(src, seen) == []
        assert [(f.key, f.cause) for f in src.out_of_range()] == [((T, 0), FINGERPRINT_MISMATCH)]
        src.seek({(T, 0): 95})
        assert [r.offset for r in _take(src, seen)] == list(range(95, END))
        assert src.commit({(T, 0): END})
    finally:
        src.close()


def test_a_child_that_dies_during_a_poll_is_an_error_not_a_hang() -> None:
    src, seen = _source([[("assign", [0])], [("die", 3)]])
    try:
        assert src.ready(30.0)
        assert len(_take(src, seen, 10)) == 10
        assert src.start(1000, 100)
        with pytest.raises(SourceProcessDied, match=r"exit code 3"):
            src.take()
        with pytest.raises(SourceProcessDied):
            src.seek_checked({(T, 0): 1}, {})
    finally:
        src.close()  # never raises for a dead child
    with pytest.raises(SourceProcessDied):
        src.take()


def test_a_consumer_that_cannot_start_says_why() -> None:
    src = KeyedProcessSource(
        unreachable,
        on_assigned=lambda keys: None,
        on_revoked=lambda keys: None,
    )
    try:
        with pytest.raises(ConnectionError, match="nowhere:9092"):
            src.ready(30.0)
    finally:
        src.close()
