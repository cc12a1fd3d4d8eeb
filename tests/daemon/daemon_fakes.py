"""Fakes of the pipeline's collaborators: a store, a consumer and a dead-letter producer.

They share one ``events`` list, so a test can assert the order in which the
commit path touched them (flush -> write -> commit).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fogline.daemon.config import Settings
from fogline.daemon.stream.decode import RawRecord
from fogline.daemon.stream.pipeline import Clients
from fogline.daemon.stream.source import OutOfRange
from fogline.daemon.stream.store import (
    IntactScan,
    Lease,
    LeaseLost,
    Snapshot,
    SnapshotMeta,
    SnapshotNotFound,
    StoreUnavailable,
    T,
)
from fogline.models.state import RecordFingerprint

TP = tuple[str, int]
#: Records per batch of :func:`fake_settings`.
BATCH = 16


def fake_settings(model: dict[str, Any] | None = None, **stream: Any) -> Settings:
    """Settings for a pipeline on the fakes: count batching of :data:`BATCH`, a snapshot
    every 2 batches, no drift loop; ``stream`` overrides, ``model`` the model section."""
    return Settings.load(
        None,
        model_name="fake",
        metrics_port=0,
        kafka={"bootstrap_servers": "unused:9092", "topic": "t", "group_id": "g"},
        stream={
            "batch_size": BATCH,
            "batching": "count",
            "snapshot_every_batches": 2,
            "snapshot_every_seconds": 0,
            "device": "cpu",
            **stream,
        },
        drift={"policy": "off"},
        **({"model": model} if model is not None else {}),
    )


@dataclass
class FakeStore:
    """An in-memory snapshot store with a writer lease; ``down`` makes every call fail."""

    events: list[Any] = field(default_factory=list)
    model_name: str = "fake"
    down: bool = False
    blobs: list[tuple[SnapshotMeta, bytes]] = field(default_factory=list)
    holder: str | None = None  # token of the lease holder
    version: int = 0

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("fake redis is down")

    def acquire_lease(self, owner: str, ttl_s: float) -> Lease | None:
        self._check()
        if self.holder is not None:
            return None
        self.holder = f"{owner}|{len(self.events)}"
        return Lease(key="lease", owner=owner, token=self.holder, ttl_s=ttl_s)

    def renew(self, lease: Lease) -> bool:
        self._check()
        return self.holder == lease.token

    def release(self, lease: Lease) -> bool:
        self._check()
        if self.holder == lease.token:
            self.holder = None
            return True
        return False

    def lease_owner(self) -> str | None:
        self._check()
        return None if self.holder is None else self.holder.rsplit("|", 1)[0]

    def latest_version(self) -> int | None:
        self._check()
        return self.version or None

    def steal(self, owner: str = "other:1", write: bool = True) -> None:
        """Another daemon takes the lease (and writes a version)."""
        self.holder = f"{owner}|stolen"
        if write:
            self.version += 1

    def write(
        self,
        blob: bytes,
        *,
        records_absorbed: int,
        offsets: Mapping[str, int],
        model_config: Mapping[str, Any] | None = None,
        drift: Mapping[str, Any] | None = None,
        lease: Lease | None = None,
        writer: str | None = None,
    ) -> SnapshotMeta:
        self._check()
        if lease is not None and lease.token != self.holder:
            raise LeaseLost("fake lease lost")
        self.version += 1
        meta = SnapshotMeta(
            model_name=self.model_name,
            version=self.version,
            created_at=time.time(),
            records_absorbed=records_absorbed,
            offsets=dict(offsets),
            checksum="0" * 64,
            writer=writer or "",
            size=len(blob),
        )
        self.blobs.append((meta, blob))
        self.events.append(("write", dict(offsets)))
        return meta

    def read(self, version: int | None = None) -> Snapshot:
        self._check()
        if not self.blobs:
            raise SnapshotNotFound("no snapshot")
        meta, blob = self.blobs[-1]
        return Snapshot(meta, blob)

    def newest_intact(self, verify: Callable[[Snapshot], T]) -> IntactScan[T]:
        """The newest blob that ``verify`` accepts (the fake's blobs have no checksum)."""
        self._check()
        versions = tuple(m.version for m, _ in reversed(self.blobs))
        skipped: list[tuple[int, str]] = []
        for meta, blob in reversed(self.blobs):
            try:
                value = verify(Snapshot(meta, blob))
            except Exception as exc:
                skipped.append((meta.version, repr(exc)))
                continue
            snap = Snapshot(meta, blob)
            return IntactScan(snap, value, self.version or None, versions, tuple(skipped))
        return IntactScan(None, None, self.version or None, versions, tuple(skipped))

    def close(self) -> None:
        pass


@dataclass
class FakeDeadLetters:
    """Records sends; :meth:`flush` is logged in ``events``."""

    events: list[Any]
    sent: list[tuple[RawRecord, str]] = field(default_factory=list)
    flushed: int = 0

    def send(self, raw: RawRecord, reason: str) -> None:
        self.sent.append((raw, reason))
        self.events.append(("dlq_send", raw.offset))

    def flush(self) -> None:
        self.flushed = len(self.sent)
        self.events.append(("flush", self.flushed))

    def close(self) -> None:
        self.flush()


@dataclass
class FakeConsumer:
    """One-partition consumer over ``log`` (record values by offset).

    At the first poll it is "assigned": it asks ``offsets_for`` where to start
    (earliest when unnamed).  A start beyond ``len(log)`` is reported once by
    :meth:`out_of_range`, like :class:`~fogline.daemon.stream.source.KafkaSource`
    after its first fetch; so is a ``fingerprints_for`` fingerprint that the
    record at its offset does not match (``fingerprint_mismatch``); every
    record read for a check is counted in ``verified``.  :meth:`reset` moves
    the position.
    """

    events: list[Any]
    log: list[bytes]
    topic: str = "t"
    offsets_for: Callable[[list[TP]], Mapping[TP, int]] | None = None
    on_revoked: Callable[[list[TP]], None] | None = None
    fingerprints_for: Callable[[list[TP]], Mapping[TP, RecordFingerprint]] | None = None
    per_poll: int = 100
    position: int | None = None
    paused: bool = False
    committed: dict[TP, int] = field(default_factory=dict)
    _oor: list[OutOfRange] = field(default_factory=list)
    verified: list[int] = field(default_factory=list)

    def timestamp(self, offset: int) -> int:
        """The fake broker's timestamp of the record at ``offset``."""
        return 1_700_000_000_000 + offset

    @property
    def key(self) -> TP:
        return (self.topic, 0)

    @property
    def assignment(self) -> list[TP]:
        return [self.key] if self.position is not None else []

    def poll(self, max_records: int | None = None, timeout_ms: int = 100) -> list[RawRecord]:
        if self.position is None:  # the assignment
            wanted = self.offsets_for([self.key]) if self.offsets_for else {}
            self.position = wanted.get(self.key, 0)
            prints = self.fingerprints_for([self.key]) if self.fingerprints_for else {}
            fp = prints.get(self.key)
            if self.position > len(self.log):
                self._oor.append(OutOfRange(self.key, self.position, len(self.log)))
            elif fp is not None and fp.offset < self.position:
                o = fp.offset
                self.verified.append(o)
                seen = RecordFingerprint.of(o, None, self.log[o], self.timestamp(o))
                if seen != fp:
                    self._oor.append(
                        OutOfRange(self.key, self.position, len(self.log), "fingerprint_mismatch")
                    )
                    return []
        if self.paused or self.position >= len(self.log):
            return []
        n = min(self.per_poll, max_records or self.per_poll, len(self.log) - self.position)
        out = [
            RawRecord(self.topic, 0, o, None, self.log[o], self.timestamp(o))
            for o in range(self.position, self.position + n)
        ]
        self.position += n
        return out

    def out_of_range(self) -> list[OutOfRange]:
        found, self._oor = self._oor, []
        return found

    def reset(self, key: TP, to: str, high_watermark: int | None = None) -> None:
        self.events.append(("reset", to))
        self.position = 0 if to == "earliest" else int(high_watermark or 0)

    def seek(self, offsets: Mapping[TP, int]) -> None:
        self.events.append(("seek", dict(offsets)))
        if self.key in offsets and self.position is not None:
            self.position = int(offsets[self.key])

    def commit(self, offsets: Mapping[TP, int]) -> bool:
        self.committed.update(offsets)
        self.events.append(("commit", dict(offsets)))
        return True

    def pause_all(self) -> None:
        self.paused = True
        self.events.append(("pause",))

    def resume_all(self) -> None:
        self.paused = False
        self.events.append(("resume",))

    def lag(self, absorbed: Mapping[TP, int] | None = None) -> dict[TP, int]:
        pos = (absorbed or {}).get(self.key, self.position or 0)
        return {self.key: max(0, len(self.log) - pos)}

    def close(self) -> None:
        self.events.append(("close",))


def fake_clients(
    store: FakeStore, dlq: FakeDeadLetters, events: list[Any], log: list[bytes], per_poll: int = 24
) -> Clients:
    """The pipeline's collaborators as fakes: ``store``, ``dlq`` and a :class:`FakeConsumer` of ``log``."""

    def source(s: Settings, offsets_for: Any, on_revoked: Any, fingerprints_for: Any) -> Any:
        return FakeConsumer(
            events,
            log,
            offsets_for=offsets_for,
            on_revoked=on_revoked,
            fingerprints_for=fingerprints_for,
            per_poll=per_poll,
        )

    return Clients(store=lambda s: store, source=source, dead_letters=lambda s: dlq)


def record(i: int, d: int = 8) -> bytes:
    """A valid telemetry record with ``d`` features."""
    x = [round(((i * 7 + j * 3) % 11) / 11 - 0.5, 4) for j in range(d)]
    return json.dumps({"ts": 1_700_000_000 + i, "x": x, "y": round(sum(x) / d, 4)}).encode()
