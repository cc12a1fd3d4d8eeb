"""KafkaSource, DeadLetterProducer and ReplayProducer against a real broker."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from fogline.daemon.stream.decode import RawRecord, decode_batch, next_offsets
from fogline.daemon.stream.source import (
    DLQ_REASON,
    DLQ_SOURCE_OFFSET,
    DLQ_SOURCE_PARTITION,
    DLQ_SOURCE_TOPIC,
    DeadLetterProducer,
    KafkaSource,
    ReplayProducer,
    dlq_topic_for,
    kafka_source,
    read_topic,
)

T0 = 1_700_000_000_000


def _value(i: int) -> bytes:
    return json.dumps({"ts": (T0 + i) / 1000, "x": [i, 1.0], "y": 0.5 * i}).encode()


def _produce(bootstrap: str, topic: str, n: int, partitions: int = 1, start: int = 0) -> None:
    with ReplayProducer(bootstrap, topic) as prod:
        for i in range(start, start + n):
            prod.send(
                _value(i),
                key=f"k{i}",
                timestamp_ms=T0 + i,
                partition=i % partitions,
                headers=[("origin", b"test")],
            )


def _consume(source: KafkaSource, n: int, timeout_s: float = 30.0) -> list[RawRecord]:
    """Poll until ``n`` records arrived (fails on timeout); then check nothing more comes."""
    out: list[RawRecord] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n:
        assert time.monotonic() < deadline, f"only {len(out)} of {n} records after {timeout_s} s"
        out += source.poll(max_records=500, timeout_ms=200)
    out += source.poll(max_records=500, timeout_ms=300)
    return out


def _by_partition(recs: list[RawRecord]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for r in recs:
        out.setdefault(r.partition, []).append(r.offset)
    return out


def test_produce_then_consume_in_a_group_keeps_keys_timestamps_headers(
    kafka_bootstrap: str, fresh_topic: str, fresh_group: str, session_timeout_ms: int
) -> None:
    _produce(kafka_bootstrap, fresh_topic, 300)
    with KafkaSource(
        kafka_bootstrap, fresh_topic, fresh_group, session_timeout_ms=session_timeout_ms
    ) as src:
        recs = _consume(src, 300)
        assert src.assignment == [(fresh_topic, 0)]
    assert [r.offset for r in recs] == list(range(300))
    for i, r in enumerate(recs):
        assert (r.topic, r.partition, r.key, r.value) == (
            fresh_topic,
            0,
            f"k{i}".encode(),
            _value(i),
        )
        assert r.timestamp_ms == T0 + i
        assert r.headers == (("origin", b"test"),)
    x, y, good, bad = decode_batch(recs, ["a", "b"])
    assert len(good) == 300 and bad == [] and x.shape == (300, 2)
    assert float(y[10]) == 5.0
    assert next_offsets(recs) == {f"{fresh_topic}:0": 300}


def test_assignment_seeks_to_the_given_offsets_and_ignores_committed_ones(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    fresh_group: str,
    session_timeout_ms: int,
) -> None:
    topic = topic_factory(2)
    _produce(kafka_bootstrap, topic, 200, partitions=2)  # 100 per partition
    asked: list[list[tuple[str, int]]] = []

    def offsets_for(keys: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        asked.append(sorted(keys))
        return {(topic, 0): 60}  # partition 1 not named -> earliest

    with KafkaSource(
        kafka_bootstrap,
        topic,
        fresh_group,
        offsets_for=offsets_for,
        session_timeout_ms=session_timeout_ms,
    ) as src:
        recs = _consume(src, 140)
        offs = _by_partition(recs)
        assert offs == {0: list(range(60, 100)), 1: list(range(100))}
        assert asked == [[(topic, 0), (topic, 1)]]
        # commit (for monitoring) and read it back
        assert src.commit({(topic, 0): 100, (topic, 1): 100})
        assert src.committed((topic, 0)) == 100
        assert src.committed((topic, 1)) == 100
        assert src.lag() == {(topic, 0): 0, (topic, 1): 0}
        assert src.lag(absorbed={(topic, 0): 90, (topic, 1): 25}) == {
            (topic, 0): 10,
            (topic, 1): 75,
        }
        assert src.out_of_range() == []  # 60 and the earliest offset are within both partitions
        # explicit seek on an assigned partition
        src.seek({(topic, 1): 95})
        again = _consume(src, 5)
        assert _by_partition(again) == {1: [95, 96, 97, 98, 99]}
    # the same group again without a callback: the committed offsets (100, 100)
    # are NOT where it resumes -- every partition starts at the earliest offset
    with KafkaSource(
        kafka_bootstrap, topic, fresh_group, session_timeout_ms=session_timeout_ms
    ) as src:
        recs = _consume(src, 200)
        assert _by_partition(recs) == {0: list(range(100)), 1: list(range(100))}


def test_pause_and_resume_lose_and_duplicate_nothing(
    kafka_bootstrap: str, fresh_topic: str, fresh_group: str, session_timeout_ms: int
) -> None:
    _produce(kafka_bootstrap, fresh_topic, 1000)
    with KafkaSource(
        kafka_bootstrap,
        fresh_topic,
        fresh_group,
        session_timeout_ms=session_timeout_ms,
        max_poll_records=100,
    ) as src:
        got: list[RawRecord] = []
        while len(got) < 150:  # join and read part of the topic; the rest may sit in fetch buffers
            got += src.poll(max_records=100, timeout_ms=200)
        src.pause_all()
        assert src.paused
        _produce(kafka_bootstrap, fresh_topic, 100, start=1000)
        for _ in range(5):
            assert src.poll(max_records=100, timeout_ms=100) == []
        src.resume_all()
        assert not src.paused
        got += _consume(src, 1100 - len(got))
    assert [r.offset for r in got] == list(range(1100))


def test_dead_letter_headers_round_trip(kafka_bootstrap: str, fresh_topic: str) -> None:
    bad_values = [b"{not json", b'{"ts": 1, "x": [1, NaN], "y": 0}', b"\xff\x00"]
    with ReplayProducer(kafka_bootstrap, fresh_topic) as prod:
        prod.send(_value(0), key="good", timestamp_ms=T0)
        for i, v in enumerate(bad_values):
            prod.send(v, key=f"bad{i}", timestamp_ms=T0 + 1 + i, headers=[("origin", b"t")])
    recs = read_topic(kafka_bootstrap, fresh_topic, min_records=4)
    _, _, good, bad = decode_batch(recs, ["a", "b"])
    assert good == [0] and [pos for _, _, pos in bad] == [1, 2, 3]
    dlq = DeadLetterProducer(kafka_bootstrap)
    for raw, reason, _ in bad:
        dlq.send(raw, reason)
    dlq.flush()
    dlq.close()
    assert dlq.sent == 3
    out = read_topic(kafka_bootstrap, dlq_topic_for(fresh_topic), min_records=3)
    assert len(out) == 3
    for (raw, reason, _), dead in zip(bad, out, strict=True):
        assert dead.value == raw.value and dead.key == raw.key
        assert dead.timestamp_ms == raw.timestamp_ms
        h = dict(dead.headers)
        assert h[DLQ_REASON].decode() == reason
        assert h[DLQ_SOURCE_TOPIC].decode() == fresh_topic
        assert int(h[DLQ_SOURCE_PARTITION]) == raw.partition
        assert int(h[DLQ_SOURCE_OFFSET]) == raw.offset
        assert h["origin"] == b"t"
    reasons = [dict(d.headers)[DLQ_REASON].decode().split(":")[0] for d in out]
    assert reasons == ["invalid_json", "non_finite", "not_utf8"]


def test_closing_tells_the_revoke_callback(
    kafka_bootstrap: str, fresh_topic: str, fresh_group: str, session_timeout_ms: int
) -> None:
    revoked: list[list[tuple[str, int]]] = []
    src = KafkaSource(
        kafka_bootstrap,
        fresh_topic,
        fresh_group,
        on_revoked=lambda keys: revoked.append(sorted(keys)),
        session_timeout_ms=session_timeout_ms,
    )
    try:
        deadline = time.monotonic() + 30
        while not src.assignment:
            assert time.monotonic() < deadline, "never assigned"
            src.poll(timeout_ms=100)
        assert src.rebalances == 1
    finally:
        src.close()
    assert revoked == [[(fresh_topic, 0)]]


# On Tansu a second member makes the group settle only after 20-90 s (members keep
# rejoining at the same generation), so this runs against a real Kafka only.
@pytest.mark.container
def test_a_second_member_takes_partitions_and_the_first_is_told(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    fresh_group: str,
    session_timeout_ms: int,
) -> None:
    topic = topic_factory(2)
    _produce(kafka_bootstrap, topic, 40, partitions=2)
    revoked: list[list[tuple[str, int]]] = []
    first = KafkaSource(
        kafka_bootstrap,
        topic,
        fresh_group,
        on_revoked=lambda keys: revoked.append(sorted(keys)),
        session_timeout_ms=session_timeout_ms,
    )
    second: KafkaSource | None = None
    try:
        _consume(first, 40)
        assert first.assignment == [(topic, 0), (topic, 1)]
        second = KafkaSource(
            kafka_bootstrap, topic, fresh_group, session_timeout_ms=session_timeout_ms
        )
        deadline = time.monotonic() + 90
        while not (len(first.assignment) == 1 and len(second.assignment) == 1):
            if time.monotonic() > deadline:
                pytest.fail(f"no rebalance: {first.assignment} / {second.assignment}")
            first.poll(timeout_ms=100)
            second.poll(timeout_ms=100)
        assert sorted(first.assignment + second.assignment) == [(topic, 0), (topic, 1)]
        assert revoked and revoked[0] == [(topic, 0), (topic, 1)]
    finally:
        first.close()
        if second is not None:
            second.close()


def test_security_settings_map_to_kafka_python_names() -> None:
    from pydantic import SecretStr

    from fogline.daemon.config import KafkaSettings
    from fogline.daemon.stream.source import security_kwargs

    assert security_kwargs(KafkaSettings()) == {}
    s = KafkaSettings(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="fog",
        sasl_password=SecretStr("s3cret"),
    )
    assert security_kwargs(s) == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "fog",
        "sasl_plain_password": "s3cret",
    }


def test_the_daemons_consumer_takes_the_settings_poll_interval(
    kafka_bootstrap: str, fresh_topic: str, fresh_group: str
) -> None:
    """``kafka.max_poll_interval_ms`` reaches the consumer (it is the JoinGroup's rebalance timeout)."""
    from fogline.daemon.config import Settings

    s = Settings.load(
        None,
        kafka={
            "bootstrap_servers": kafka_bootstrap,
            "topic": fresh_topic,
            "group_id": fresh_group,
            "session_timeout_ms": 6000,
            "max_poll_interval_ms": 20_000,
        },
    )
    src = kafka_source(s, lambda keys: {}, lambda keys: None, lambda keys: {})
    try:
        assert src._consumer.config["max_poll_interval_ms"] == 20_000
        assert src._consumer.config["session_timeout_ms"] == 6000
    finally:
        src.close()
