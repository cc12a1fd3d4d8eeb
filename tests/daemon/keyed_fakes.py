"""In-memory fakes of keyed mode's collaborators: a partition store, a group consumer, a group.

:class:`FakePartitionStore` keeps :class:`~fogline.daemon.stream.store.PartitionStore`'s
contract (per-partition leases, a lease-guarded commit of key blobs + manifest +
key index, the layout and the fleet blob written once); :class:`FakeGroupConsumer`
reads a multi-partition log and takes its assignment from a :class:`FakeGroup`
that the test drives (assign, revoke, re-assign), calling the pipeline's
rebalance callbacks from inside ``poll`` as kafka-python does.  Every touch of
the commit path is logged in one ``events`` list, so a test can check its order
(dead letters flushed -> store commit -> Kafka commit).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from daemon_fakes import FakeDeadLetters

from fogline.daemon.config import Settings
from fogline.daemon.stream.decode import RawRecord, partition_key
from fogline.daemon.stream.keyed import KeyedClients
from fogline.daemon.stream.source import OutOfRange
from fogline.daemon.stream.store import Lease, LeaseLost, PartitionManifest, StoreUnavailable
from fogline.models.state import RecordFingerprint

TP = tuple[str, int]


class Killed(Exception):
    """Raised by :class:`FakeGroupConsumer` to stand for a SIGKILL: no shutdown runs."""


@dataclass
class FakePartitionStore:
    """In-memory :class:`~fogline.daemon.stream.store.PartitionStore`; ``down`` fails every call."""

    events: list[Any] = field(default_factory=list)
    model_name: str = "fake"
    down: bool = False
    leases: dict[int, str] = field(default_factory=dict)
    manifests: dict[int, PartitionManifest] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    index: dict[str, dict[str, Any]] = field(default_factory=dict)
    layout_fields: dict[str, str] = field(default_factory=dict)
    fleet: bytes | None = None
    commits: int = 0

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("fake redis is down")

    def expire_leases(self) -> None:
        """Every lease's TTL runs out (its holder was killed)."""
        self.leases.clear()

    # -- layout and fleet -------------------------------------------------
    def ensure_layout(self, fields: Mapping[str, str]) -> dict[str, str]:
        self._check()
        if not self.layout_fields:
            self.layout_fields = dict(fields)
        return dict(self.layout_fields)

    def layout(self) -> dict[str, str]:
        self._check()
        return dict(self.layout_fields)

    def fleet_blob(self, blob: bytes) -> bytes:
        self._check()
        if self.fleet is None:
            self.fleet = blob
        return self.fleet

    # -- leases -------------------------------------------------------------
    def acquire(self, partition: int, owner: str, ttl_s: float) -> Lease | None:
        self._check()
        if partition in self.leases:
            return None
        token = f"{owner}|{len(self.events)}"
        self.leases[partition] = token
        self.events.append(("acquire", partition))
        return Lease(key=f"lease:{partition}", owner=owner, token=token, ttl_s=ttl_s)

    @staticmethod
    def _partition(lease: Lease) -> int:
        return int(lease.key.rsplit(":", 1)[1])

    def renew(self, lease: Lease) -> bool:
        self._check()
        return self.leases.get(self._partition(lease)) == lease.token

    def release(self, lease: Lease) -> bool:
        self._check()
        p = self._partition(lease)
        if self.leases.get(p) == lease.token:
            del self.leases[p]
            self.events.append(("release", p))
            return True
        return False

    def lease_owner(self, partition: int) -> str | None:
        self._check()
        token = self.leases.get(partition)
        return None if token is None else token.rsplit("|", 1)[0]

    # -- reading --------------------------------------------------------------
    def manifest(self, partition: int) -> PartitionManifest | None:
        self._check()
        return self.manifests.get(partition)

    def read_key(self, key: str) -> bytes | None:
        self._check()
        return self.blobs.get(key)

    def read_keys(self, keys: list[str]) -> dict[str, bytes]:
        self._check()
        return {k: self.blobs[k] for k in keys if k in self.blobs}

    def key_info(self, key: str) -> dict[str, Any] | None:
        self._check()
        info = self.index.get(key)
        return None if info is None else dict(info)

    def key_index(self) -> dict[str, dict[str, Any]]:
        self._check()
        return {k: dict(v) for k, v in self.index.items()}

    # -- writing ------------------------------------------------------------
    def commit(
        self,
        lease: Lease,
        partition: int,
        *,
        offsets: Mapping[str, int],
        records_absorbed: int,
        blobs: Mapping[str, bytes],
        entries: Mapping[str, Mapping[str, Any]],
        writer: str = "",
        fingerprints: Mapping[str, Mapping[str, Any]] | None = None,
        population: Mapping[str, Any] | None = None,
    ) -> int:
        self._check()
        if self.leases.get(partition) != lease.token:
            raise LeaseLost(f"partition {partition}: fake lease not held")
        old = self.manifests.get(partition)
        version = (old.version if old else 0) + 1
        self.manifests[partition] = PartitionManifest(
            partition=partition,
            version=version,
            offsets=dict(offsets),
            records_absorbed=int(records_absorbed),
            writer=writer or lease.owner,
            updated_at=0.0,
            fingerprints=json.loads(json.dumps(dict(fingerprints or {}))),
            population=json.loads(json.dumps(dict(population))) if population else None,
        )
        for k, blob in blobs.items():
            self.blobs[k] = bytes(blob)
            self.index[k] = {**entries.get(k, {}), "partition": partition, "version": version}
        self.commits += 1
        self.events.append(("store_commit", partition, dict(offsets), sorted(blobs)))
        return version

    def close(self) -> None:
        pass


@dataclass
class FakeGroup:
    """The consumer group's coordinator, driven by the test: who is assigned what."""

    partitions: int
    #: member name -> partitions assigned to it.
    assigned: dict[str, set[int]] = field(default_factory=dict)

    def assign(self, member: str, parts: Iterable[int]) -> None:
        self.assigned[member] = set(parts)


@dataclass
class FakeGroupConsumer:
    """A consumer of ``logs`` (partition -> [(kafka key, value)]) in a :class:`FakeGroup`.

    At each poll it takes the group's assignment for ``member``: it calls
    ``on_revoked`` for partitions taken away and ``offsets_for`` for new ones
    (which start at the earliest offset, as with no committed offset), then
    returns up to ``per_poll`` records of each assigned, unpaused partition.
    ``plan(poll_number, consumer)`` runs before each poll (e.g. to reassign,
    append records or raise :class:`Killed`).
    """

    events: list[Any]
    logs: dict[int, list[tuple[bytes | None, bytes]]]
    group: FakeGroup
    member: str
    offsets_for: Callable[[list[TP]], Mapping[TP, int]] | None = None
    on_revoked: Callable[[list[TP]], None] | None = None
    fingerprints_for: Callable[[list[TP]], Mapping[TP, RecordFingerprint]] | None = None
    topic: str = "t"
    per_poll: int = 24
    plan: Callable[[int, FakeGroupConsumer], None] | None = None
    polls: int = 0
    mine: set[int] = field(default_factory=set)
    position: dict[int, int] = field(default_factory=dict)
    paused: set[int] = field(default_factory=set)
    committed: dict[TP, int] = field(default_factory=dict)
    _oor: list[OutOfRange] = field(default_factory=list)

    @staticmethod
    def timestamp(offset: int) -> int:
        return 1_700_000_000_000 + offset

    @property
    def assignment(self) -> list[TP]:
        return [(self.topic, p) for p in sorted(self.mine)]

    def _rebalance(self) -> None:
        wanted = set(self.group.assigned.get(self.member, set()))
        gone, new = self.mine - wanted, wanted - self.mine
        if gone:
            self.mine -= gone
            for p in gone:
                self.position.pop(p, None)
                self.paused.discard(p)
            self.events.append(("revoked", sorted(gone)))
            if self.on_revoked is not None:
                self.on_revoked([(self.topic, p) for p in sorted(gone)])
        if new:
            self.mine |= new
            for p in new:
                self.position[p] = 0
            self.events.append(("assigned", sorted(new)))
            if self.offsets_for is not None:
                self.offsets_for([(self.topic, p) for p in sorted(new)])

    def poll(self, max_records: int | None = None, timeout_ms: int = 100) -> list[RawRecord]:
        self.polls += 1
        if self.plan is not None:
            self.plan(self.polls, self)
        self._rebalance()
        cap = max_records if max_records is not None else 10**9
        out: list[RawRecord] = []
        for p in sorted(self.mine - self.paused):
            log = self.logs.get(p, [])
            start = self.position[p]
            n = min(self.per_poll, len(log) - start, cap - len(out))
            for o in range(start, start + max(0, n)):
                key, value = log[o]
                out.append(RawRecord(self.topic, p, o, key, value, self.timestamp(o)))
            self.position[p] = start + max(0, n)
        return out

    def seek(self, offsets: Mapping[TP, int]) -> None:
        for (_, p), off in offsets.items():
            if p in self.mine:
                self.position[p] = int(off)

    def seek_checked(
        self, offsets: Mapping[TP, int], prints: Mapping[TP, RecordFingerprint]
    ) -> None:
        for key, off in offsets.items():
            p = key[1]
            if p not in self.mine:
                continue
            end = len(self.logs.get(p, []))
            fp = prints.get(key)
            if int(off) > end:
                self._oor.append(OutOfRange(key, int(off), end))
            elif fp is not None and 0 <= fp.offset < int(off):
                k, v = self.logs[p][fp.offset]
                if RecordFingerprint.of(fp.offset, k, v, self.timestamp(fp.offset)) != fp:
                    self._oor.append(OutOfRange(key, int(off), end, "fingerprint_mismatch"))
            self.position[p] = int(off)
        self.events.append(("seek", {partition_key(*k): v for k, v in offsets.items()}))

    def out_of_range(self) -> list[OutOfRange]:
        found, self._oor = self._oor, []
        return found

    def reset(self, key: TP, to: str, high_watermark: int | None = None) -> None:
        p = key[1]
        self.position[p] = 0 if to == "earliest" else int(high_watermark or 0)

    def pause(self, keys: Any) -> None:
        self.paused |= {p for _, p in keys if p in self.mine}

    def resume(self, keys: Any) -> None:
        self.paused -= {p for _, p in keys}

    def partition_count(self, topic: str | None = None) -> int | None:
        return self.group.partitions

    def commit(self, offsets: Mapping[TP, int]) -> bool:
        self.committed.update(offsets)
        self.events.append(("kafka_commit", dict(offsets)))
        return True

    def close(self) -> None:
        self.events.append(("close", self.member))


@dataclass
class KeyedWorld:
    """One fake cluster: a store, a dead-letter topic, a group and the partition logs."""

    logs: dict[int, list[tuple[bytes | None, bytes]]]
    partitions: int
    events: list[Any] = field(default_factory=list)
    store: FakePartitionStore = field(init=False)
    dlq: FakeDeadLetters = field(init=False)
    group: FakeGroup = field(init=False)
    consumers: list[FakeGroupConsumer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.store = FakePartitionStore(self.events)
        self.dlq = FakeDeadLetters(self.events)
        self.group = FakeGroup(self.partitions)

    def clients(
        self,
        member: str = "m0",
        plan: Callable[[int, FakeGroupConsumer], None] | None = None,
        per_poll: int = 24,
    ) -> KeyedClients:
        """Keyed clients of a member of the group (assigned every partition unless told)."""
        self.group.assigned.setdefault(member, set(range(self.partitions)))

        def source(s: Settings, offsets_for: Any, on_revoked: Any, fingerprints_for: Any) -> Any:
            consumer = FakeGroupConsumer(
                self.events,
                self.logs,
                self.group,
                member,
                offsets_for=offsets_for,
                on_revoked=on_revoked,
                fingerprints_for=fingerprints_for,
                topic=s.kafka.topic,
                per_poll=per_poll,
                plan=plan,
            )
            self.consumers.append(consumer)
            return consumer

        return KeyedClients(
            store=lambda s: self.store,  # type: ignore[arg-type,return-value]
            source=source,
            dead_letters=lambda s: self.dlq,
        )
