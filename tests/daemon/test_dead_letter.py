"""Dead-letter headers and the truncated copy of a record too large to dead-letter whole."""

from __future__ import annotations

import hashlib

from fogline.daemon.stream.decode import RawRecord
from fogline.daemon.stream.source import (
    DLQ_ORIGINAL_SHA256,
    DLQ_ORIGINAL_SIZE,
    DLQ_REASON,
    DLQ_SOURCE_OFFSET,
    DLQ_SOURCE_PARTITION,
    DLQ_SOURCE_TOPIC,
    DLQ_TRUNCATED,
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
