"""The consumer in a child process (``stream.source_process``) against the embedded broker.

Calls stay in order behind a poll in flight (commit after the poll, a seek that
moves the next poll), rebalance reports cross the pipe, and a child that dies
surfaces as :class:`SourceProcessDied`: the daemon exits 6 and a restart
absorbs every record exactly once.
"""

from __future__ import annotations

import functools
import os
import signal
import time
import uuid
from typing import Any

import pytest

from fogline.bench.crash_replay import make_records, produce
from fogline.daemon.config import Settings
from fogline.daemon.stream.decode import Decoder, RawRecord, decode_batch
from fogline.daemon.stream.pipeline import EXIT_SOURCE_DIED, Pipeline, RunOptions
from fogline.daemon.stream.prefetch import Polled
from fogline.daemon.stream.process_source import ProcessSource, SourceProcessDied
from fogline.daemon.stream.source import KafkaSource, kafka_source
from fogline.models.state import PosteriorState
from tests.conftest import SESSION_TIMEOUT_MS

FEATURES = [f"x{i}" for i in range(8)]


def _settings(
    bootstrap: str, topic: str, redis_url: str = "redis://unused", **stream: Any
) -> Settings:
    return Settings.load(
        None,
        model_name=f"ps-{uuid.uuid4().hex[:6]}",
        metrics_port=0,
        kafka={
            "bootstrap_servers": bootstrap,
            "topic": topic,
            "group_id": f"g-{uuid.uuid4().hex[:8]}",
            "session_timeout_ms": SESSION_TIMEOUT_MS,
            "max_poll_records": 50,
        },
        redis={"url": redis_url},
        stream=stream,
        drift={"policy": "off"},
    )


def _source(s: Settings, offsets: dict[tuple[str, int], int]) -> tuple[ProcessSource, list[Any]]:
    revoked: list[Any] = []
    src = ProcessSource(
        functools.partial(kafka_source, s),
        lambda raws: decode_batch(raws, Decoder(FEATURES)),
        offsets=lambda: offsets,
        fingerprints=dict,
        on_revoked=revoked.extend,
    )
    return src, revoked


def _until_records(src: ProcessSource, assigned: dict[Any, Any], timeout_s: float = 30) -> Polled:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        polled = src.take(50, 200)
        assigned.update(polled.assigned)
        if polled.raws:
            return polled
    pytest.fail(f"no records within {timeout_s} s")


def test_calls_wait_for_the_poll_in_flight_and_keep_their_order(
    kafka_bootstrap: str, fresh_topic: str
) -> None:
    topic = fresh_topic
    recs = make_records(200, 0, seed=3)
    produce(kafka_bootstrap, topic, recs.values)
    s = _settings(kafka_bootstrap, topic)
    src, _ = _source(s, {(topic, 0): 20})
    try:
        assigned: dict[Any, Any] = {}
        first = _until_records(src, assigned)
        # assigned in the child, sought to the parent's offsets sent with the poll
        assert assigned == {(topic, 0): 20}
        assert [r.offset for r in first.raws] == list(range(20, 70))
        assert first.decoded is not None and first.decoded.x.shape == (50, 8)
        assert src.assignment == [(topic, 0)]

        # a poll in flight, then a commit: the commit runs after it, the poll is kept
        assert src.start(50, 200)
        assert src.in_flight and not src.start(50, 200)
        assert src.commit({(topic, 0): 70})
        nxt = src.take()
        assert [r.offset for r in nxt.raws] == list(range(70, 120))
        # a seek moves the next poll; the DLQ path gets raw bytes of every record
        src.seek({(topic, 0): 150})
        after = src.take(50, 200)
        assert [r.offset for r in after.raws] == list(range(150, 200))
        assert all(isinstance(r, RawRecord) and r.value for r in after.raws)
        assert src.lag({(topic, 0): 200}) == {(topic, 0): 0}
        assert src.out_of_range() == []
    finally:
        src.close()
    # the commit reached the group (Kafka's offsets are for lag monitoring only)
    with KafkaSource(kafka_bootstrap, topic, s.kafka.group_id) as probe:
        assert probe.committed((topic, 0)) == 70


def test_a_killed_child_is_a_clear_error_and_close_still_returns(
    kafka_bootstrap: str, fresh_topic: str
) -> None:
    topic = fresh_topic
    produce(kafka_bootstrap, topic, make_records(60, 0, seed=4).values)
    src, _ = _source(_settings(kafka_bootstrap, topic), {})
    try:
        _until_records(src, {})
        assert src.pid is not None
        assert src.start(50, 200)
        os.kill(src.pid, signal.SIGKILL)
        with pytest.raises(SourceProcessDied, match=r"exit code -9"):
            src.commit({(topic, 0): 50})
    finally:
        src.close()  # never raises for a dead child
    with pytest.raises(SourceProcessDied):
        src.take()


def test_daemon_exits_6_when_its_consumer_dies_and_a_restart_absorbs_each_record_once(
    kafka_bootstrap: str, redis_url: str, fresh_topic: str
) -> None:
    topic = fresh_topic
    recs = make_records(1_500, 0, seed=5)
    produce(kafka_bootstrap, topic, recs.values)
    s = _settings(
        kafka_bootstrap,
        topic,
        redis_url,
        batch_size=64,
        batching="count",
        snapshot_every_batches=3,
        snapshot_every_seconds=0,
        device="cpu",
        source_process=True,
    )
    killed: list[int] = []

    def kill_child(_stats: Any, state: PosteriorState) -> None:
        pid = getattr(first.source, "pid", None)
        if state.records_absorbed >= 640 and pid is not None and not killed:
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

    first = Pipeline(s, RunOptions(max_records=len(recs.values), on_batch=kill_child))
    assert first.run() == EXIT_SOURCE_DIED
    assert killed
    assert "consumer process" in first.stats.exit_reason
    absorbed_before = first.state.records_absorbed if first.state else 0

    second = Pipeline(s, RunOptions(idle_exit_s=2.0))
    assert second.run() == 0
    assert second.state is not None
    # 1,500 in count batches of 64: 23 full batches; the partial one waits for more records
    assert second.state.records_absorbed == 23 * 64 > absorbed_before
    assert second.state.offsets == {(topic, 0): 23 * 64}
