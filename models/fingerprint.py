"""The identity of one stream record (offset and content digest), without torch.

A snapshot stores the fingerprint of the record before its resume offset, so a
restart can tell a recreated topic from the one it absorbed.  This module is
torch-free: the Kafka consumer's child process (``daemon/stream/process_source.py``)
computes fingerprints without loading torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class RecordFingerprint:
    """The identity of one stream record: its offset and a digest of its contents.

    ``digest`` is the hex SHA-256 of ``len(key) | key | len(value) | value |
    timestamp_ms`` (lengths and the timestamp as 8-byte signed big-endian
    integers; ``-1`` stands for a missing key, value or timestamp).  A record
    produced again with the same key, value and timestamp has the same
    fingerprint; a recreated topic almost never has the same record at the
    same offset.

    >>> RecordFingerprint.of(4, None, b"v", 7) == RecordFingerprint.of(4, None, b"v", 7)
    True
    >>> RecordFingerprint.of(4, None, b"v", 7) == RecordFingerprint.of(4, None, b"v", 8)
    False
    """

    offset: int
    digest: str

    @classmethod
    def of(
        cls, offset: int, key: bytes | None, value: bytes | None, timestamp_ms: int | None
    ) -> RecordFingerprint:
        """The fingerprint of the record at ``offset`` with this key, value and timestamp."""
        h = hashlib.sha256()
        for part in (key, value):
            if part is None:
                h.update((-1).to_bytes(8, "big", signed=True))
            else:
                h.update(len(part).to_bytes(8, "big", signed=True))
                h.update(part)
        ts = -1 if timestamp_ms is None else int(timestamp_ms)
        h.update(ts.to_bytes(8, "big", signed=True))
        return cls(int(offset), h.hexdigest())


__all__ = ["RecordFingerprint"]
