"""Keyed mode's poll running ahead: :class:`~fogline.daemon.stream.prefetch.SerialSource`
with the consumer calls keyed mode adds (pause/resume by partition, the checked seek,
the partition count), each serialised after the in-flight poll like the others.

Keyed mode decodes on the main thread (the poll's records are filtered by owned
partition first), so the worker runs only kafka-python's fetch and record
unpacking while the main thread steps the keys.  A partition claimed (sought to
its checkpoint) while a poll was running ahead may have records in that poll
from before the seek: :class:`~fogline.daemon.stream.keyed.KeyedPipeline` drops
them (``_fresh``); the next poll starts at the sought offset.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fogline.daemon.stream.batching import TopicPartition
from fogline.daemon.stream.prefetch import Polled, SerialSource
from fogline.models.fingerprint import RecordFingerprint


class KeyedSerialSource(SerialSource):
    """A :class:`SerialSource` over a keyed consumer (no decoding on the worker)."""

    def __init__(self, source: Any, *, prefetch: bool = True) -> None:
        super().__init__(source, lambda raws: None, prefetch=prefetch)  # type: ignore[arg-type,return-value]

    def _poll(self, max_records: int | None, timeout_ms: int) -> Polled:
        raws = self.source.poll(max_records=max_records, timeout_ms=timeout_ms)
        return Polled(raws, None)

    def pause(self, keys: Iterable[TopicPartition]) -> None:
        """Stop fetching from the assigned ones among ``keys``."""
        self.quiesce()
        self.source.pause(keys)  # type: ignore[attr-defined]

    def resume(self, keys: Iterable[TopicPartition]) -> None:
        """Fetch again from the assigned ones among ``keys``."""
        self.quiesce()
        self.source.resume(keys)  # type: ignore[attr-defined]

    def partition_count(self, topic: str | None = None) -> int | None:
        """Partitions of ``topic`` in the cluster metadata (``None`` while unknown)."""
        self.quiesce()
        count: int | None = self.source.partition_count(topic)  # type: ignore[attr-defined]
        return count

    def seek_checked(
        self,
        offsets: Mapping[TopicPartition, int],
        prints: Mapping[TopicPartition, RecordFingerprint],
    ) -> None:
        """Seek with the assignment's end and fingerprint checks (see ``KafkaSource``)."""
        self.quiesce()
        self.source.seek_checked(offsets, prints)  # type: ignore[attr-defined]
