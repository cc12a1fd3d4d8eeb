"""KafkaSource's fingerprint check on the first fetch after an assignment, without a broker.

The check itself (:meth:`KafkaSource._verify`) is plain Python over kafka-python's
``{TopicPartition: [ConsumerRecord]}`` poll result; a stand-in consumer answers
``highwater`` and records the seeks.  The real broker path is in
``tests/service/test_offset_range.py``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from kafka import TopicPartition
from structlog.testing import capture_logs

from fogline.daemon.stream.source import KafkaSource, OutOfRange
from fogline.models.state import RecordFingerprint

TP0 = TopicPartition("t", 0)
TP1 = TopicPartition("t", 1)


class Rec(NamedTuple):
    """The fields of kafka-python's ``ConsumerRecord`` that the source reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int
    headers: list[tuple[str, bytes]]


def rec(offset: int, value: bytes, partition: int = 0) -> Rec:
    return Rec("t", partition, offset, None, value, 1000 + offset, [])


def fp(offset: int, value: bytes) -> RecordFingerprint:
    return RecordFingerprint.of(offset, None, value, 1000 + offset)


class Consumer:
    """Answers what ``_on_assigned`` and ``_verify`` ask of kafka-python's consumer."""

    def __init__(self, highwater: int) -> None:
        self.hw = highwater
        self.seeks: list[tuple[TopicPartition, int]] = []

    def highwater(self, tp: TopicPartition) -> int:
        return self.hw

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    def seek_to_beginning(self, *tps: TopicPartition) -> None:
        self.seeks.extend((tp, 0) for tp in tps)

    def pause(self, *tps: TopicPartition) -> None:
        pass


def source(consumer: Consumer, offsets: dict[Any, int], prints: dict[Any, Any]) -> KafkaSource:
    src = KafkaSource.__new__(KafkaSource)  # no broker: the consumer is the stand-in
    src._consumer = consumer
    src._offsets_for = lambda keys: offsets
    src._fingerprints_for = lambda keys: prints
    src._on_revoked_cb = None
    src._paused = False
    src._assigned = frozenset()
    src._unchecked = {}
    src._out_of_range = []
    src._verifying = {}
    src.rebalances = 0
    return src


def test_assignment_seeks_to_the_fingerprinted_record_and_skips_partitions_without() -> None:
    consumer = Consumer(highwater=20)
    src = source(consumer, {("t", 0): 10, ("t", 1): 7}, {("t", 0): fp(9, b"a")})
    with capture_logs() as logs:
        src._on_assigned([TP0, TP1])
    assert consumer.seeks == [(TP0, 9), (TP1, 7)]
    skipped = [e for e in logs if e["event"] == "fingerprint_check_skipped"]
    assert skipped and skipped[0]["partitions"] == ["t:1"]


def test_a_matching_record_is_withheld_and_the_stream_goes_on_at_the_offset() -> None:
    src = source(Consumer(20), {("t", 0): 10}, {("t", 0): fp(9, b"a")})
    src._on_assigned([TP0])
    batches = {TP0: [rec(9, b"a"), rec(10, b"b"), rec(11, b"c")], TP1: [rec(3, b"x", 1)]}
    with capture_logs() as logs:
        out = src._verify(batches)
    assert [r.offset for r in out[TP0]] == [10, 11]
    assert [r.offset for r in out[TP1]] == [3]  # not checked: passed through
    assert src.out_of_range() == [] and not src._verifying
    assert [e["event"] for e in logs] == ["fingerprint_verified"]
    # checked once per assignment: the next fetch is handed out as it is
    assert [r.offset for r in src._verify({TP0: [rec(12, b"d")]})[TP0]] == [12]


def test_another_record_at_the_offset_is_a_fingerprint_mismatch() -> None:
    src = source(Consumer(130), {("t", 0): 10}, {("t", 0): fp(9, b"a")})
    src._on_assigned([TP0])
    out = src._verify({TP0: [rec(9, b"new"), rec(10, b"b")]})
    assert out == {}  # nothing of the partition is handed out
    assert src.out_of_range() == [OutOfRange(("t", 0), 10, 130, "fingerprint_mismatch")]
    src._check_ranges()  # the range check does not report it a second time
    assert src.out_of_range() == []


def test_a_first_record_at_another_offset_means_the_record_is_gone() -> None:
    src = source(Consumer(40), {("t", 0): 10}, {("t", 0): fp(9, b"a")})
    src._on_assigned([TP0])
    assert src._verify({TP0: [rec(25, b"z")]}) == {}
    assert src.out_of_range() == [OutOfRange(("t", 0), 10, 40, "record_gone")]


def test_an_offset_beyond_the_end_is_reported_once_as_beyond_end() -> None:
    src = source(Consumer(4), {("t", 0): 10}, {("t", 0): fp(9, b"a")})
    src._on_assigned([TP0])
    assert src._verify({}) == {}  # nothing fetched: the check waits
    src._check_ranges()
    assert src.out_of_range() == [OutOfRange(("t", 0), 10, 4, "beyond_end")]
    assert not src._verifying
