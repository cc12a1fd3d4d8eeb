"""Dead-letter headers and the truncated copy of a record too large to dead-letter whole."""

from __future__ import annotations

import hashlib
from typing import Any

from kafka.errors import MessageSizeTooLargeError

from fogline.daemon.stream.decode import RawRecord
from fogline.daemon.stream.source import (
    DLQ_FALLBACK_VALUE_BYTES,
    DLQ_FRAMING_BYTES,
    DLQ_ORIGINAL_SHA256,
    DLQ_ORIGINAL_SIZE,
    DLQ_REASON,
    DLQ_SOURCE_OFFSET,
    DLQ_SOURCE_PARTITION,
    DLQ_SOURCE_TOPIC,
    DLQ_TRUNCATED,
    DeadLetterProducer,
    dead_letter_headers,
    record_bytes,
    truncated_copy,
)


def _raw(value: bytes) -> RawRecord:
    return RawRecord("src", 3, 17, b"k", value, 1_700_000_000_000, (("trace", b"t1"),))


def test_headers_keep_own_ones_and_name_the_source() -> None:
    raw = _raw(b"{}")._replace(headers=(("trace", b"t1"), ("fogline-reason", b"old")))
    h = dead_letter_headers(raw, "missing_field: y")
    assert h[0] == ("trace", b"t1")
    assert dict(h)[DLQ_REASON] == b"missing_field: y", "a stale fogline header is replaced"
    assert dict(h)[DLQ_SOURCE_TOPIC] == b"src"
    assert dict(h)[DLQ_SOURCE_PARTITION] == b"3"
    assert dict(h)[DLQ_SOURCE_OFFSET] == b"17"


def test_truncated_copy_is_a_prefix_with_the_originals_size_and_digest() -> None:
    value = bytes(range(256)) * 5000
    cut, headers = truncated_copy(_raw(value), "bad_x: x", 1000)
    h = dict(headers)
    assert cut == value[:1000]
    assert h[DLQ_TRUNCATED] == b"1"
    assert int(h[DLQ_ORIGINAL_SIZE]) == len(value)
    assert h[DLQ_ORIGINAL_SHA256] == hashlib.sha256(value).hexdigest().encode()
    assert h[DLQ_SOURCE_OFFSET] == b"17" and h[DLQ_REASON] == b"bad_x: x"
    assert record_bytes(b"k", cut, headers) < 2000


def test_truncated_copy_of_an_empty_value() -> None:
    cut, headers = truncated_copy(_raw(b"")._replace(value=None), "empty", 10)
    assert cut == b""
    assert dict(headers)[DLQ_ORIGINAL_SIZE] == b"0"


class _Future:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def get(self, timeout: float | None = None) -> None:
        if self.error is not None:
            raise self.error


class _FakeProducer:
    """Accepts values up to ``limit`` bytes; larger ones fail like a broker refusal."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sent: list[tuple[str, bytes | None, dict[str, bytes]]] = []
        self.flushes = 0

    def send(
        self,
        topic: str,
        *,
        value: bytes | None,
        key: bytes | None,
        headers: Any,
        timestamp_ms: int | None,
    ) -> _Future:
        self.sent.append((topic, value, dict(headers)))
        big = len(value or b"") > self.limit
        return _Future(MessageSizeTooLargeError("refused by the broker") if big else None)

    def flush(self, timeout: float | None = None) -> None:
        self.flushes += 1

    def close(self) -> None:
        pass


def test_a_broker_refusal_is_resent_cut_and_the_flush_succeeds() -> None:
    fake = _FakeProducer(limit=DLQ_FALLBACK_VALUE_BYTES)
    dlq = DeadLetterProducer("unused:1", dlq_topic="d", create_topics=False, producer=fake)
    small, big = _raw(b"{}"), _raw(b"z" * 500_000)._replace(offset=18)
    dlq.send(small, "not_object")
    dlq.send(big, "bad_x: x")  # under the 1 MiB request limit, yet refused
    dlq.flush()
    assert [len(v or b"") for _, v, _ in fake.sent] == [2, 500_000, DLQ_FALLBACK_VALUE_BYTES]
    _, value, headers = fake.sent[-1]
    assert value == (big.value or b"")[:DLQ_FALLBACK_VALUE_BYTES]
    assert headers[DLQ_TRUNCATED] == b"1" and headers[DLQ_SOURCE_OFFSET] == b"18"
    assert headers[DLQ_ORIGINAL_SHA256] == hashlib.sha256(big.value or b"").hexdigest().encode()
    assert dlq.truncated == 1 and dlq.sent == 2


def test_a_record_over_the_request_limit_is_cut_before_sending() -> None:
    fake = _FakeProducer(limit=10**9)
    dlq = DeadLetterProducer(
        "unused:1", dlq_topic="d", create_topics=False, producer=fake, max_request_bytes=2**20
    )
    dlq.send(_raw(b"q" * (3 * 2**20)), "bad_x: x")
    dlq.flush()
    ((_, value, headers),) = fake.sent
    assert value is not None and len(value) + DLQ_FRAMING_BYTES <= 2**20
    assert int(headers[DLQ_ORIGINAL_SIZE]) == 3 * 2**20
