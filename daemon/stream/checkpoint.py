"""The commit path of the daemon as one object (the manner of Quix Streams' ``Checkpoint``).

A :class:`Checkpoint` is handed its collaborators -- the snapshot store, the
writer-lease keeper, the dead-letter producer and the consumer -- so the
commit order is testable with fakes as well as against Kafka and Redis.

Commit path
-----------
For every micro-batch, in this order:

1. **Step the posterior** (the caller: the update rule of
   :mod:`fogline.daemon.stream.update`), then tell the checkpoint with
   :meth:`Checkpoint.stepped`.  The new state's ``offsets`` are the next
   offsets to read such that everything before them is absorbed or
   dead-lettered and nothing after them is absorbed (:meth:`Checkpoint.offsets`).

When a snapshot is due (:meth:`Checkpoint.due`), :meth:`Checkpoint.commit`:

2. **flushes the dead-letter producer**, so the offsets about to be written
   never skip a bad record that is not yet in the dead-letter topic;
3. **writes the snapshot** -- ``to_bytes(state)``, carrying the offsets it
   absorbed -- in one Redis transaction that succeeds only while this daemon
   holds the writer lease (:mod:`fogline.daemon.stream.lease`);
4. **only then commits the offsets to Kafka** (lag monitoring only: the
   snapshot is the source of truth for where to resume).

A failed write (Redis unreachable) commits nothing: consumption is paused,
the write is retried with backoff (:class:`~fogline.daemon.stream.runtime.Retry`),
and consumption resumes after the first write that succeeds.  A lost lease
(another daemon wrote since our last snapshot) raises
:class:`~fogline.daemon.stream.lease.LeaseUnavailable` before anything is
written or committed.

Fingerprints
------------
Beside its offsets a snapshot carries, per partition, the
:class:`~fogline.models.state.RecordFingerprint` of the last record absorbed or
dead-lettered before the offset (:meth:`Checkpoint.stamp`), so a restart can
tell the partition it resumes is still the one it absorbed (a recreated topic
at least as long as the offset is not found by the range check).  The
checkpoint keeps the records of the polls that can still hold that record --
those reaching at least the record before a partition's resume offset -- and
hashes only the one record it needs, when a snapshot is written.

Offsets are keyed by ``(topic, partition)`` tuples throughout; only the
serialised JSON spells them ``"topic:partition"`` (at the boundary:
:func:`fogline.models.serialize.offsets_to_json`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import structlog

from fogline.daemon import metrics
from fogline.daemon.stream.batching import Rows, TopicPartition
from fogline.daemon.stream.decode import RawRecord
from fogline.daemon.stream.lease import LeaseKeeper
from fogline.daemon.stream.runtime import Retry
from fogline.daemon.stream.store import Lease, LeaseLost, SnapshotMeta, StoreUnavailable
from fogline.drift.runner import drift_summary
from fogline.models.serialize import offsets_to_json, to_bytes
from fogline.models.state import PosteriorState, RecordFingerprint

log = structlog.get_logger(__name__)

Offsets = Mapping[TopicPartition, int]


class SnapshotSink(Protocol):
    """What the checkpoint needs of :class:`~fogline.daemon.stream.store.SnapshotStore`."""

    def write(
        self,
        blob: bytes,
        *,
        records_absorbed: int,
        offsets: Mapping[str, int],
        model_config: Mapping[str, Any] | None = ...,
        drift: Mapping[str, Any] | None = ...,
        lease: Lease | None = ...,
        writer: str | None = ...,
    ) -> SnapshotMeta: ...


class Flushable(Protocol):
    """The dead-letter producer: :meth:`flush` blocks until every send is acknowledged."""

    def flush(self) -> None: ...


class Committer(Protocol):
    """The consumer side the checkpoint drives: commit offsets, pause and resume."""

    def commit(self, offsets: Offsets) -> bool: ...
    def pause_all(self) -> None: ...
    def resume_all(self) -> None: ...


def resume_offsets(
    absorbed: Offsets, handled: Offsets, unabsorbed: Iterable[Rows]
) -> dict[TopicPartition, int]:
    """Next offsets to read: the first unabsorbed row of each partition.

    ``absorbed`` are the last snapshot's offsets, ``handled`` the next offset
    after the last record read per partition (dead letters included: they are
    flushed before any snapshot), ``unabsorbed`` the decoded rows read but not
    yet stepped on, oldest first.  A partition with nothing unabsorbed resumes
    after its last handled record.
    """
    out = {**absorbed, **handled}
    need = set(handled)
    for rows in unabsorbed:
        if not need:
            break
        for key, first in rows.first_offsets().items():
            if key in need:
                out[key] = first
                need.discard(key)
    return out


class Checkpoint:
    """Bookkeeping and execution of the commit path (see the module docstring).

    Parameters
    ----------
    store:
        Where snapshots go (one atomic, lease-guarded write each).
    keeper:
        The writer lease.
    dead_letters:
        The dead-letter producer, flushed before each write.
    consumer:
        Committed to after each write; paused while writes fail.
    retry:
        Pacing of write retries while the store is unavailable.
    serialize:
        State to bytes (:func:`fogline.models.serialize.to_bytes`).
    clock:
        Monotonic seconds (default :func:`time.monotonic`).
    start:
        The state the daemon started from: its fingerprints stay valid while
        its offsets do (nothing read yet, or a partition revoked and assigned again).
    """

    def __init__(
        self,
        *,
        store: SnapshotSink,
        keeper: LeaseKeeper,
        dead_letters: Flushable,
        consumer: Committer,
        retry: Retry | None = None,
        serialize: Callable[[PosteriorState], bytes] = to_bytes,
        clock: Callable[[], float] = time.monotonic,
        start: PosteriorState | None = None,
    ) -> None:
        self.store = store
        self.keeper = keeper
        self.dead_letters = dead_letters
        self.consumer = consumer
        self.retry = retry if retry is not None else Retry()
        self.serialize = serialize
        self._clock = clock
        #: Next offset after the last record read, per partition, since the start.
        self.handled: dict[TopicPartition, int] = {}
        #: Something (a step, or offsets moving past dead letters) is not in a snapshot yet.
        self.dirty = False
        self.batches_since = 0
        self.unflushed = 0
        self.last_at = clock()
        self.last_meta: SnapshotMeta | None = None
        self.failures = 0
        #: Records of recent polls with each poll's next offsets (oldest first).
        self._recent: list[tuple[Sequence[RawRecord], dict[TopicPartition, int]]] = []
        #: The fingerprint last found for a partition, with the offset it precedes.
        self._prints: dict[TopicPartition, tuple[int, RecordFingerprint]] = {}
        if start is not None:
            for key, fp in start.fingerprints.items():
                if key in start.offsets:
                    self._prints[key] = (start.offsets[key], fp)

    # -- what happened since the last snapshot ---------------------------------
    def read(
        self,
        handled: Offsets,
        dead_lettered: int = 0,
        valid: int = 0,
        records: Sequence[RawRecord] = (),
    ) -> None:
        """One poll was read up to ``handled`` (next offsets): ``dead_lettered`` records went
        to the DLQ, ``valid`` into the batcher; ``records`` are the poll's raw records
        (kept, unhashed, until no resume offset can follow them: :meth:`stamp`).

        A poll of dead letters only makes the state dirty (its offsets move on
        though no batch follows); valid records do when their batch is stepped.
        """
        if records:
            self._recent.append((records, dict(handled)))
        self.handled.update(handled)
        self.unflushed += dead_lettered
        if dead_lettered and not valid:
            self.dirty = True

    def moved(self) -> None:
        """The state's offsets moved without a step (a partition reset): snapshot it."""
        self.dirty = True

    def stepped(self) -> None:
        """Step 1 happened: one batch was absorbed into the posterior."""
        self.dirty = True
        self.batches_since += 1

    def forget(self, keys: Iterable[TopicPartition], *, reset: bool = False) -> None:
        """Partitions were revoked: their reads no longer count (they are read again).

        ``reset``: the partitions were moved to another stream position (the
        topic was recreated): their kept records and fingerprints are dropped too.
        """
        gone = set(keys)
        for key in gone:
            self.handled.pop(key, None)
        if not reset or not gone:
            return
        for key in gone:
            self._prints.pop(key, None)
        kept: list[tuple[Sequence[RawRecord], dict[TopicPartition, int]]] = []
        for records, handled in self._recent:
            rest = [r for r in records if (r.topic, r.partition) not in gone]
            if rest:
                kept.append((rest, {k: v for k, v in handled.items() if k not in gone}))
        self._recent = kept

    def offsets(self, absorbed: Offsets, unabsorbed: Iterable[Rows]) -> dict[TopicPartition, int]:
        """The offsets a state that absorbed everything but ``unabsorbed`` resumes from.

        Polls whose every record lies before the record preceding these
        offsets are let go (no later resume offset can need them).
        """
        out = resume_offsets(absorbed, self.handled, unabsorbed)
        self._recent = [
            (records, handled)
            for records, handled in self._recent
            if any(k in out and nxt >= out[k] for k, nxt in handled.items())
        ]
        return out

    def fingerprint(self, key: TopicPartition, offset: int) -> RecordFingerprint | None:
        """The fingerprint of the last record read before ``offset`` on ``key`` (``None``: not known).

        Searches the kept polls newest first; a partition whose offset did not
        move keeps the fingerprint found (or restored) for it.
        """
        known = self._prints.get(key)
        if known is not None and known[0] == offset:
            return known[1]
        for records, handled in reversed(self._recent):
            if key not in handled:
                continue
            for r in reversed(records):
                if r.offset < offset and (r.topic, r.partition) == key:
                    fp = RecordFingerprint.of(r.offset, r.key, r.value, r.timestamp_ms)
                    self._prints[key] = (offset, fp)
                    return fp
        return None

    def stamp(self, state: PosteriorState) -> PosteriorState:
        """``state`` with the fingerprint of the record before each of its offsets.

        A partition whose record is not known (e.g. its offset was moved to the
        end of a recreated topic) gets none: a restart does not check it.
        """
        prints = {}
        for key, offset in state.offsets.items():
            fp = self.fingerprint(key, offset) if offset > 0 else None
            if fp is not None:
                prints[key] = fp
        return state.replace(fingerprints=prints)

    # -- when -------------------------------------------------------------------
    @property
    def failing(self) -> bool:
        """True between a failed write (or lease renewal) and the next successful write."""
        return self.retry.failing

    def due(self, every_batches: int, every_seconds: float) -> str | None:
        """The trigger of a snapshot due now (``"batches"``, ``"interval"``, ``"retry"``) or ``None``."""
        if self.retry.failing:
            return "retry" if self.retry.due() else None
        if every_batches and self.batches_since >= every_batches:
            return "batches"
        if self.dirty and every_seconds > 0 and self._clock() - self.last_at >= every_seconds:
            return "interval"
        return None

    # -- steps 2 to 4 -----------------------------------------------------------
    def commit(self, state: PosteriorState, trigger: str) -> SnapshotMeta | None:
        """Steps 2-4 for ``state`` (whose ``offsets`` are final); the new metadata, or ``None``.

        ``None`` means the store was unavailable: nothing was committed, the
        consumer is paused and a retry is scheduled.  Raises
        :class:`~fogline.daemon.stream.lease.LeaseUnavailable` when another
        daemon owns the model now.
        """
        # 2. flush the dead-letter producer
        if self.unflushed:
            self.dead_letters.flush()
            self.unflushed = 0
        # 3. write the snapshot in one transaction guarded by the writer lease
        blob = self.serialize(state)
        t0 = time.perf_counter()
        try:
            try:
                meta = self._write(blob, state, self.keeper.ensure())
            except LeaseLost:  # it lapsed since the last renewal: take it back if nobody wrote
                self.keeper.lease = None
                meta = self._write(blob, state, self.keeper.ensure())
        except StoreUnavailable as exc:
            self.store_down(exc, trigger)
            return None
        elapsed = time.perf_counter() - t0
        self.keeper.last_version = meta.version
        self.last_meta = meta
        self.dirty = False
        self.batches_since = 0
        self.last_at = self._clock()
        metrics.SNAPSHOT_WRITE_SECONDS.observe(elapsed)
        metrics.SNAPSHOT_VERSION.set(meta.version)
        metrics.SNAPSHOT_LAST_WRITE.set(meta.created_at)
        metrics.REDIS_UP.set(1)
        structlog.contextvars.bind_contextvars(snapshot_version=meta.version)
        log.info(
            "snapshot_written",
            snapshot_version=meta.version,
            records_absorbed=state.records_absorbed,
            offsets=meta.offsets,
            bytes=len(blob),
            seconds=round(elapsed, 6),
            trigger=trigger,
        )
        if self.retry.failing:
            down = self._clock() - (self.retry.failing_since or self._clock())
            log.info("redis_recovered", down_s=round(down, 3))
            self.retry.ok()
            self.consumer.resume_all()
        # 4. only then commit the offsets to Kafka
        self.consumer.commit(state.offsets)
        return meta

    def _write(self, blob: bytes, state: PosteriorState, lease: Lease) -> SnapshotMeta:
        return self.store.write(
            blob,
            records_absorbed=state.records_absorbed,
            offsets=offsets_to_json(state.offsets),
            model_config=state.config.model_dump(mode="json"),
            drift=drift_summary(state),
            lease=lease,
            writer=self.keeper.owner,
        )

    # -- outages and the lease ----------------------------------------------------
    def store_down(self, exc: Exception, op: str) -> None:
        """Redis is unreachable: pause consumption (once) and schedule a retry."""
        first = not self.retry.failing
        wait = self.retry.failed()
        self.failures += 1
        metrics.REDIS_UP.set(0)
        if first:
            self.consumer.pause_all()
        log.warning(
            "redis_unavailable", op=op, error=str(exc), retry_in_s=round(wait, 3), paused=True
        )

    def maintain_lease(self) -> None:
        """Renew the writer lease when due (not while failing: the next write retries it)."""
        if self.retry.failing or not self.keeper.renew_due():
            return
        try:
            self.keeper.renew()
        except StoreUnavailable as exc:
            self.store_down(exc, "renew_lease")
