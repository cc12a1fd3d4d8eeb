"""Keyed mode: one posterior per source key, partitions owned across the consumer group.

Wiring only, like :mod:`fogline.daemon.stream.pipeline` (which stays the
single-posterior daemon, unchanged): Kafka through
:mod:`fogline.daemon.stream.source`, decoding through
:mod:`fogline.daemon.stream.decode`, count batching through
:class:`~fogline.daemon.stream.batching.MicroBatcher` (one per partition),
Redis through :class:`~fogline.daemon.stream.store.PartitionStore`, the key
step through :mod:`fogline.daemon.stream.keyed_update`, memory through
:class:`~fogline.daemon.stream.keycache.KeyCache`.

Ownership (Kafka's consumer group assigns, Redis leases guard the writes; the
consumer runs in a child process by default,
:class:`~fogline.daemon.stream.keyed_process.KeyedProcessSource`, which hands
the rebalance events over in order before the records of the same poll):

- **assign**: the partition is paused; the main loop takes its lease
  ``(model, partition)`` (waiting while a dead owner's lease runs out), reads
  its manifest, seeks to the manifest's next offset (no manifest: the
  earliest) and resumes it.  Key states load lazily from their blobs on the
  key's next record (a key never written starts from the fleet prior).
- **revoke** (inside the consumer's poll): the partition's complete batches
  are absorbed, its checkpoint written, its lease released and its keys
  forgotten; its partial batch is dropped (read again by the next owner).
- **killed** owner: the group reassigns its partitions after the session
  timeout; the new owner waits out the lease TTL and resumes from the last
  checkpoint.  Batches are formed per partition in count mode, so every
  owner rebuilds the same batches from the same offset: each key's posterior
  depends only on its partition's record sequence, bit for bit.

Partition checkpoint (commit path, per partition): 1. the batch's keys were
stepped, 2. flush the dead-letter producer, 3. write every dirty key's blob,
the manifest (next offset) and the key index in one lease-guarded Redis
transaction that also renews the lease (:meth:`PartitionStore.commit`), 4. only
then commit the offset to Kafka (lag monitoring).  A lease found lost drops the
partition (its dirty keys were never committed; the owner redoes them from the
checkpoint).

Repartitioning: the topic name, the partition count and the key field are
stored once (``keyed:layout``), and every key's partition in the key index;
a different partition count, or a key arriving on another partition than the
one that absorbed it, stops the daemon with :data:`EXIT_REPARTITIONED` and
says why (never a silent mix of two keys' histories).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog
import torch

from fogline.daemon import metrics
from fogline.daemon.config import Settings
from fogline.daemon.names import process_identity
from fogline.daemon.stream.batching import MicroBatcher, Rows, TopicPartition
from fogline.daemon.stream.checkpoint import resume_offsets
from fogline.daemon.stream.decode import Decoder, RawRecord, decode_batch, partition_key
from fogline.daemon.stream.isolate import STEP_REJECTED, rejected_record
from fogline.daemon.stream.keycache import KeyCache
from fogline.daemon.stream.keyed_prefetch import KeyedSerialSource
from fogline.daemon.stream.keyed_process import KeyedProcessSource
from fogline.daemon.stream.keyed_series import KeyedSeries
from fogline.daemon.stream.keyed_update import (
    KeyedOutcome,
    KeyedUpdate,
    fleet_state,
    new_key,
    new_population,
    population_fleet,
)
from fogline.daemon.stream.lease_keeper import LeaseKeeper
from fogline.daemon.stream.pipeline import (
    EXIT_OUT_OF_RANGE,
    EXIT_SOURCE_DIED,
    DeadLetters,
    OffsetOutOfRange,
    RunOptions,
    announce_out_of_range,
    fresh_prior,
    fresh_stream,
    kafka_dead_letters,
    kafka_source,
    record_schema,
    spec_problems,
)
from fogline.daemon.stream.prefetch import Polled
from fogline.daemon.stream.process_source import SourceProcessDied
from fogline.daemon.stream.runtime import StopFlag, select_device
from fogline.daemon.stream.series import series_spec
from fogline.daemon.stream.source import OutOfRange
from fogline.daemon.stream.store import (
    Lease,
    LeaseLost,
    PartitionStore,
    StoreUnavailable,
    retry_backoff,
)
from fogline.daemon.stream.update import warm_up
from fogline.drift.runner import drift_mode
from fogline.models.keyed import Population
from fogline.models.serialize import (
    fingerprints_from_json,
    fingerprints_to_json,
    from_bytes,
    load,
    to_bytes,
)
from fogline.models.state import Minibatch, PosteriorState, RecordFingerprint

log = structlog.get_logger(__name__)

#: Exit status when the topic was repartitioned (or keys moved between partitions).
EXIT_REPARTITIONED = 7
#: Exit status of a configuration keyed mode cannot run (no ``model.key``).
EXIT_BAD_CONFIG = 2
#: Longest the shutdown checkpoints keep retrying an unreachable Redis.
SHUTDOWN_RETRY_S = 30.0


class Repartitioned(RuntimeError):
    """The topic's partitions no longer match what the keyed snapshots were built from."""


class KeyedSource(Protocol):
    """What keyed mode needs of the consumer (:class:`~fogline.daemon.stream.source.KafkaSource`)."""

    @property
    def assignment(self) -> list[TopicPartition]: ...
    def poll(self, max_records: int | None = ..., timeout_ms: int = ...) -> list[RawRecord]: ...
    def seek(self, offsets: Mapping[TopicPartition, int]) -> None: ...
    def seek_checked(
        self,
        offsets: Mapping[TopicPartition, int],
        prints: Mapping[TopicPartition, RecordFingerprint],
    ) -> None: ...
    def out_of_range(self) -> list[OutOfRange]: ...
    def reset(self, key: TopicPartition, to: str, high_watermark: int | None = ...) -> None: ...
    def pause(self, keys: Any) -> None: ...
    def resume(self, keys: Any) -> None: ...
    def partition_count(self, topic: str | None = ...) -> int | None: ...
    def commit(self, offsets: Mapping[TopicPartition, int]) -> bool: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class KeyedClients:
    """Factories of keyed mode's collaborators (Kafka and Redis by default)."""

    store: Callable[[Settings], PartitionStore] = PartitionStore.from_settings
    source: Callable[..., Any] = kafka_source
    dead_letters: Callable[[Settings], DeadLetters] = kafka_dead_letters


@dataclass
class KeyedStats:
    """Counters of one :meth:`KeyedPipeline.run`."""

    records_in: int = 0
    records_valid: int = 0
    records_absorbed: int = 0
    #: Autoregressive models: valid records that only filled their key's lag buffer.
    records_warming: int = 0
    dead_lettered: int = 0
    batches: int = 0
    checkpoints: int = 0
    partitions_resumed: int = 0
    exit_reason: str = ""
    #: Wall-clock time (``time.time()``) the first and the last batch finished absorbing.
    first_absorbed_at: float | None = None
    last_absorbed_at: float | None = None
    #: Records absorbed by the first batch (left out of the steady-state rate).
    first_batch_records: int = 0

    def steady_rate(self) -> float | None:
        """Records/s absorbed from the end of the first batch to the end of the last one.

        The group join, the first batch's warm-up and the final checkpoints are
        outside this window (``None`` with fewer than two batches).
        """
        if self.first_absorbed_at is None or self.last_absorbed_at is None:
            return None
        window = self.last_absorbed_at - self.first_absorbed_at
        if window <= 0:
            return None
        return (self.records_absorbed - self.first_batch_records) / window


@dataclass
class Owned:
    """A partition this daemon holds the lease of."""

    partition: int
    lease: Lease
    batcher: MicroBatcher
    version: int
    records_absorbed: int
    #: Next offset after the last record read (``None``: nothing read since the resume).
    horizon: int | None
    #: The next offset of the last checkpoint (``None``: never checkpointed).
    committed: int | None
    #: Key of each buffered row, by offset.
    keys_at: dict[int, str] = field(default_factory=dict)
    pending: collections.deque[Rows] = field(default_factory=collections.deque)
    #: Records read, oldest first, from the last one before the resume offset on
    #: (:meth:`KeyedPipeline._prune`): the fingerprint of the record before the
    #: next offset is found here at a checkpoint.
    recent: collections.deque[RawRecord] = field(default_factory=collections.deque)
    #: The fingerprint last written or restored, with the offset it precedes.
    printed: tuple[int, RecordFingerprint] | None = None
    #: ``keyed.fleet = "population"``: the mixture of the partition's key posteriors.
    population: Population | None = None
    batches_since: int = 0
    changed: bool = False
    last_commit: float = field(default_factory=time.monotonic)
    renewed_at: float = field(default_factory=time.monotonic)


class KeyedPipeline:
    """One keyed daemon of a consumer group (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        options: RunOptions | None = None,
        stop: StopFlag | None = None,
        clients: KeyedClients | None = None,
    ) -> None:
        self.settings = settings
        self.options = options or RunOptions()
        self.stop = stop if stop is not None else StopFlag()
        self.clients = clients or KeyedClients()
        self.stats = KeyedStats()
        self.owner = process_identity()
        self.topic = settings.kafka.topic
        self.owned: dict[int, Owned] = {}
        #: Assigned partitions waiting for their lease: partition -> monotonic time assigned.
        self.claiming: dict[int, float] = {}
        self._announced: set[int] = set()
        self._retry_at = 0.0
        self._failures = 0
        self._paused_for_store = False
        #: Rebalance events queued by the consumer's callbacks: ("assigned"|"revoked", partitions).
        self._events: collections.deque[tuple[str, list[int]]] = collections.deque()
        #: Partitions claimed while a poll ran ahead: that poll's records of them predate the seek.
        self._fresh: set[int] = set()
        #: Autoregressive models: each key's series state with its posterior (``None``: tabular).
        self.series: KeyedSeries | None = None
        #: The heartbeat renewing the leases during each batch's update (one thread, reused).
        self._keeper: LeaseKeeper | None = None

    # -- the whole run ----------------------------------------------------------
    def run(self) -> int:
        """Run until stopped (or ``max_records`` / ``idle_exit_s``); return the exit status.

        0 clean stop (every owned partition checkpointed, leases released); 1 a
        final checkpoint could not be written; 2 keyed mode without ``model.key``
        or a spec contradicting the start state; 4 a checkpoint's offset is
        unusable (``stream.offset_out_of_range = "fail"``); 6 the consumer's
        child process died (``stream.source_process``; leases released without
        a final checkpoint); 7 repartitioned topic.
        """
        s = self.settings
        structlog.contextvars.clear_contextvars()
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        if s.model is None or not s.model.key:
            self.stats.exit_reason = "keyed.enabled needs model.key (the record field of the key)"
            log.error("daemon_failed", reason="bad_config", error=self.stats.exit_reason)
            return EXIT_BAD_CONFIG
        device = select_device(s.stream.device)
        self.store = self.clients.store(s)
        try:
            start = self._start_state(device)
            problems = spec_problems(s, start)
            if problems:
                self.stats.exit_reason = "\n".join(problems)
                log.error("daemon_failed", reason="model_spec_contradiction", problems=problems)
                return EXIT_BAD_CONFIG
            # every daemon of the group starts new keys from the same stored bytes, and
            # decodes by their schema: a restart without --init is the first run's model
            offered = to_bytes(fleet_state(start))
            stored = self.store.fleet_blob(offered)
            self.fleet = from_bytes(stored, device)
            if stored != offered:
                problems = [
                    f"{p} (the group's stored fleet prior)" for p in spec_problems(s, self.fleet)
                ]
                if problems:
                    self.stats.exit_reason = "\n".join(problems)
                    log.error("daemon_failed", reason="model_spec_contradiction", problems=problems)
                    return EXIT_BAD_CONFIG
                log.info("keyed_fleet_prior_from_store", detail="the group's first fleet prior")
            schema = record_schema(s, self.fleet)
            self.decoder = Decoder(schema)
            ar_spec = series_spec(s.model, self.fleet)  # {ts, value, key} records: inputs per key
            self.series = KeyedSeries(ar_spec, schema) if ar_spec else None
            self.cache = KeyCache(s.keyed.max_keys, s.keyed.idle_ttl_s)
            self.update = KeyedUpdate(s)
            warm_up(self.fleet, 8, s.stream.steps_per_batch, s.stream.data_size)
            self.dlq = self.clients.dead_letters(s)
            try:
                self.source = self._open_source()
                log.info(
                    "daemon_started",
                    model=s.model_name,
                    mode="keyed",
                    key_field=s.model.key,
                    batching=s.stream.batching,
                    batch_size=s.stream.batch_size,
                    max_keys=s.keyed.max_keys,
                    source_process=isinstance(self.source, KeyedProcessSource),
                )
                try:
                    return self._loop()
                except Repartitioned as exc:
                    log.error("daemon_failed", reason="repartitioned", error=str(exc))
                    self.stats.exit_reason = str(exc)
                    self._release_all()
                    return EXIT_REPARTITIONED
                except OffsetOutOfRange as exc:
                    log.error("daemon_failed", reason="offset_out_of_range", error=str(exc))
                    self.stats.exit_reason = str(exc)
                    self._release_all()  # nothing of the partition written
                    return EXIT_OUT_OF_RANGE
                except SourceProcessDied as exc:  # no final checkpoint: resume from the last
                    log.error("daemon_failed", reason="source_process_died", error=str(exc))
                    self.stats.exit_reason = str(exc)
                    self._release_all()  # the next owners need not wait out the leases
                    return EXIT_SOURCE_DIED
                finally:
                    self.source.close()
            finally:
                self.dlq.close()
        finally:
            if self._keeper is not None:  # before the store its renewals use
                self._keeper.close()
                self._keeper = None
            self.store.close()

    def _open_source(self) -> KeyedSource:
        """The consumer: in a child process (``stream.source_process``, real Kafka only), else here.

        In-process, ``stream.prefetch`` (or ``RunOptions.prefetch``) runs the
        next poll ahead on a worker thread.  Fakes passed in
        :class:`KeyedClients` live in this process, so they always run here.
        """
        s = self.settings
        if s.stream.source_process and self.clients.source is kafka_source:
            return KeyedProcessSource(
                functools.partial(kafka_source, s),
                # a series batch's key ids are the child's: _ingest re-numbers them here
                decode=self.series.decoder.decode_batch
                if self.series is not None
                else functools.partial(decode_batch, features=self.decoder),
                on_assigned=self._offsets_for,
                on_revoked=self._on_revoked,
            )
        raw = self.clients.source(s, self._offsets_for, self._on_revoked, self._fingerprints_for)
        prefetch = self.options.prefetch
        if prefetch is None:
            prefetch = s.stream.prefetch
        source: KeyedSource = KeyedSerialSource(raw) if prefetch else raw
        return source

    def _start_state(self, device: torch.device) -> PosteriorState:
        """The state the fleet prior is made from: ``--init`` / ``stream.init_path``, else fresh."""
        path: Path | None = self.options.init_path or self.settings.stream.init_path
        if path is not None:
            return fresh_stream(load(str(path), device)).replace(lr=self.settings.stream.lr)
        return fresh_prior(self.settings, device)

    # -- rebalance callbacks (kafka-python's IO thread) ------------------------------
    # They only queue what happened: kafka-python 3 runs them on its IO thread, where
    # no blocking consumer call may run; the main loop handles them (:meth:`_rebalanced`).
    # With the consumer in a child process they are called here, in the order they
    # happened there, when the reply that carries them arrives.
    def _offsets_for(self, keys: list[TopicPartition]) -> Mapping[TopicPartition, int]:
        """Queue newly assigned partitions; they stay paused until their lease is taken."""
        self._events.append(("assigned", [p for t, p in keys if t == self.topic]))
        return {}

    def _fingerprints_for(
        self, keys: list[TopicPartition]
    ) -> Mapping[TopicPartition, RecordFingerprint]:
        return {}

    def _on_revoked(self, keys: list[TopicPartition]) -> None:
        self._events.append(("revoked", [p for t, p in keys if t == self.topic]))

    def _rebalanced(self) -> None:
        """Handle queued rebalance events in order, on the main thread.

        Revoked: finish the partition's complete batches, checkpoint it (the lease
        is still ours, so the write is valid even if Kafka already gave the
        partition to another member, whose claim waits for the lease), release
        the lease, forget its keys.  Assigned: queue the partition for a claim.
        """
        while self._events:
            kind, parts = self._events.popleft()
            now = time.monotonic()
            for p in parts:
                if kind == "assigned":
                    if p not in self.owned:
                        self.claiming.setdefault(p, now)
                    continue
                self.claiming.pop(p, None)
                part = self.owned.get(p)
                if part is None:
                    continue
                while part.pending:
                    self._absorb(part, part.pending.popleft())
                try:
                    self._checkpoint(part, "revoked")
                except StoreUnavailable as exc:  # the next owner redoes it from the last one
                    log.warning("revoke_checkpoint_failed", partition=p, error=str(exc))
                self._drop(p, "revoked", release=True)

    # -- ownership ----------------------------------------------------------------------
    def _claim(self) -> None:
        """Take the lease of every assigned, unowned partition whose lease is free."""
        if not self.claiming:
            return
        assigned = {p for t, p in self.source.assignment if t == self.topic}
        for p in sorted(self.claiming):
            if p not in assigned:
                del self.claiming[p]
                continue
            self.source.pause([(self.topic, p)])
            lease = self.store.acquire(p, self.owner, self.settings.redis.lease_ttl_s)
            if lease is None:
                if p not in self._announced:
                    self._announced.add(p)
                    log.info("partition_lease_held", partition=p, holder=self.store.lease_owner(p))
                continue
            self._announced.discard(p)
            if getattr(self.source, "in_flight", False):
                self._fresh.add(p)
            manifest = self.store.manifest(p)
            offset = manifest.offsets.get(partition_key(self.topic, p)) if manifest else None
            prints = fingerprints_from_json(manifest.fingerprints) if manifest else {}
            printed = prints.get((self.topic, p))
            if offset is not None:
                # beyond the partition's end, or another record before it: out_of_range()
                self.source.seek_checked({(self.topic, p): offset}, prints)
            else:
                self.source.reset((self.topic, p), "earliest")
            s = self.settings.stream
            self.owned[p] = Owned(
                partition=p,
                lease=lease,
                batcher=MicroBatcher(
                    s.batch_size, None if s.batching == "count" else s.max_wait_ms
                ),
                version=manifest.version if manifest else 0,
                records_absorbed=manifest.records_absorbed if manifest else 0,
                horizon=None,
                committed=offset,
                printed=(offset, printed) if printed is not None and offset is not None else None,
                population=self._population(manifest.population if manifest else None),
            )
            waited = time.monotonic() - self.claiming.pop(p)
            self.source.resume([(self.topic, p)])
            self.stats.partitions_resumed += 1
            metrics.PARTITIONS_OWNED.set(len(self.owned))
            metrics.PARTITION_RESUME_SECONDS.observe(waited)
            log.info(
                "partition_resumed",
                partition=p,
                offset=offset,
                snapshot_version=manifest.version if manifest else None,
                records_absorbed=manifest.records_absorbed if manifest else 0,
                waited_s=round(waited, 3),
            )

    def _population(self, stored: Mapping[str, Any] | None) -> Population | None:
        """A claimed partition's population (``keyed.fleet = "population"``), else ``None``."""
        if self.settings.keyed.fleet != "population":
            return None
        return Population.from_json(stored) if stored else new_population(self.fleet)

    def _drop(self, p: int, why: str, *, release: bool) -> None:
        """Forget partition ``p`` (its keys too); release its lease if asked."""
        part = self.owned.pop(p, None)
        if part is None:
            return
        if release:
            with contextlib.suppress(StoreUnavailable):  # else it runs out after its TTL
                self.store.release(part.lease)
        gone = self.cache.drop_partition(p)
        metrics.PARTITIONS_OWNED.set(len(self.owned))
        metrics.KEYS_IN_MEMORY.set(len(self.cache))
        log.info("partition_dropped", partition=p, reason=why, keys=len(gone))

    def _check_layout(self) -> None:
        """Store the topic's layout once; refuse a different partition count or topic."""
        if getattr(self, "_layout_ok", False):
            return
        count = self.source.partition_count(self.topic)
        if count is None:
            return
        assert self.settings.model is not None
        stored = self.store.ensure_layout(
            {
                "topic": self.topic,
                "partitions": str(count),
                "key_field": str(self.settings.model.key),
            }
        )
        if stored.get("partitions") != str(count) or stored.get("topic") != self.topic:
            raise Repartitioned(
                f"model {self.settings.model_name!r}: keyed snapshots were built from topic "
                f"{stored.get('topic')!r} with {stored.get('partitions')} partitions, the topic "
                f"{self.topic!r} now has {count}: keys would move between partitions and mix "
                f"histories; re-key into a new model name (see docs/operations.md)"
            )
        self._layout_ok = True

    def _lease_keeper(self) -> LeaseKeeper:
        """The heartbeat that renews the owned leases while a batch's update runs
        (:mod:`fogline.daemon.stream.lease_keeper`; one thread, reused by every batch and
        closed with the run), for at most Kafka's rebalance timeout per batch.
        A lease it finds lost is left for :meth:`_renew` after the batch, which drops it."""
        if self._keeper is None:
            self._keeper = LeaseKeeper(
                lambda: self._renew_due(time.monotonic()),
                self.settings.redis.lease_ttl_s / 3,
                self.settings.kafka.max_poll_interval_ms / 1000,
            )
        return self._keeper

    def _renew_due(self, now: float) -> list[int]:
        """Renew each owned lease a third of its TTL after its last renewal; the partitions
        whose renewal failed (lost), which stay owned."""
        lost: list[int] = []
        for p, part in list(self.owned.items()):
            if now - part.renewed_at < part.lease.ttl_s / 3:
                continue
            if self.store.renew(part.lease):
                part.renewed_at = now
            else:
                lost.append(p)
        return lost

    def _renew(self, now: float) -> None:
        """Renew each owned lease that is due (:meth:`_renew_due`); drop lost ones."""
        for p in self._renew_due(now):
            log.warning("partition_lease_lost", partition=p)
            self._drop(p, "lease_lost", release=False)
            self.claiming.setdefault(p, now)

    # -- the loop -------------------------------------------------------------------
    def _loop(self) -> int:
        opts = self.options
        idle_since = time.monotonic()
        while not self.stop:
            now = time.monotonic()
            if now < self._retry_at:
                # Redis down: fetch nothing more (bounded memory), keep the group membership
                self.source.pause(self.source.assignment)
                self._ingest(self._poll())
                self.stop.wait(min(0.5, max(0.0, self._retry_at - time.monotonic())))
                continue
            try:
                self._claim()
                self._renew(now)
            except StoreUnavailable as exc:
                self._store_down(exc, "lease")
                continue
            if self._paused_for_store:
                self._paused_for_store = False
                self.source.resume([(self.topic, p) for p in self.owned])
            if opts.max_records is not None and self.stats.records_in >= opts.max_records:
                self.stats.exit_reason = "max_records"
                break
            polled = self._poll()
            try:
                self._check_layout()
                self._rebalanced()
                self._out_of_range()
                self._ingest(polled)
                self._prefetch()
                self._drain()
                self._maybe_checkpoint(time.monotonic())
                self._bound_memory()
            except StoreUnavailable as exc:
                self._store_down(exc, "checkpoint")
                continue
            now = time.monotonic()
            if polled.raws or self.claiming or not self.owned:
                idle_since = now
            if opts.idle_exit_s is not None and now - idle_since >= opts.idle_exit_s:
                self.stats.exit_reason = "idle"
                break
        else:
            self.stats.exit_reason = f"signal {self.stop.signal_name}"
        return self._shutdown()

    def _poll(self) -> Polled:
        """The next poll's records (the one run ahead, if any), less those predating a claim.

        With the consumer in a child process the next poll is asked for right
        away, so the child fetches, unpacks and decodes it while this one is
        stepped.  ``Polled.decoded`` is the child's decoding of exactly
        ``Polled.raws`` (else ``None``: :meth:`_ingest` decodes).
        """
        take = getattr(self.source, "take", None)
        cap = self.settings.kafka.max_poll_records
        polled: Polled = (
            take(cap, 100) if take is not None else Polled(self.source.poll(cap, 100), None)
        )
        if self._fresh:
            raws = [r for r in polled.raws if r.partition not in self._fresh]
            self._fresh.clear()
            if len(raws) != len(polled.raws):
                polled = Polled(raws, None)
        if isinstance(self.source, KeyedProcessSource):
            self._prefetch(eager=True)
        return polled

    def _prefetch(self, *, eager: bool = False) -> None:
        """Start the next poll ahead (prefetching or a child process's consumer only).

        On a worker thread only when batches wait to be absorbed (only then is
        there a step to overlap with, and the worker shares the GIL);
        ``eager``: whatever is pending (the child has its own interpreter).
        Records it returns are not read until :meth:`_ingest` takes them, so a
        checkpoint meanwhile resumes before them, and a stop drops them (the
        next owner reads them).
        """
        start = getattr(self.source, "start", None)
        if start is None or self.stop:
            return
        if not eager and not any(p.pending for p in self.owned.values()):
            return
        cap = self.settings.kafka.max_poll_records
        if self.options.max_records is not None:
            cap = min(cap, self.options.max_records - self.stats.records_in)
            if cap <= 0:
                return
        start(cap, 100)

    def _store_down(self, exc: Exception, op: str) -> None:
        """Redis unreachable: wait (backoff) while polling to keep the group membership."""
        delay = retry_backoff(self._failures)
        self._failures += 1
        self._retry_at = time.monotonic() + delay
        self._paused_for_store = True
        metrics.REDIS_UP.set(0)
        log.warning("redis_unavailable", op=op, error=str(exc), retry_in_s=round(delay, 3))

    def _ingest(self, polled: Polled) -> None:
        """Decode a poll: bad records to the DLQ, good ones into their partition's batcher.

        The child's decoding is used when the poll's records are all taken
        (else the taken ones are decoded here: the same decoder, the same result).
        """
        raws = [r for r in polled.raws if r.topic == self.topic and r.partition in self.owned]
        if not raws:
            return
        self.stats.records_in += len(raws)
        metrics.RECORDS_IN.labels(topic=self.topic).inc(len(raws))
        if polled.decoded is not None and len(raws) == len(polled.raws):
            dec: Any = polled.decoded
            if self.series is not None:  # decoded in the child: this process's key ids
                dec = self.series.decoder.adopt(dec)
        elif self.series is not None:
            dec = self.series.decoder.decode_batch(raws)
        else:
            dec = decode_batch(raws, self.decoder)
        meta = getattr(dec, "meta", None)  # series records: value, ts, key id
        for raw, reason, _ in dec.bad:
            self._dead_letter(raw, reason)
        limit = self.settings.keyed.max_key_length
        field_name = self.settings.model.key if self.settings.model else "key"
        by_part: dict[int, list[int]] = collections.defaultdict(list)
        for j, i in enumerate(dec.good):
            key = dec.keys[j]
            raw = raws[i]
            if not key:
                self._dead_letter(raw, f"missing_key: {field_name}")
                continue
            if len(key) > limit:
                self._dead_letter(raw, f"bad_key: longer than {limit} characters")
                continue
            by_part[raw.partition].append(j)
        for r in raws:
            part = self.owned[r.partition]
            part.horizon = max(part.horizon or 0, r.offset + 1)
            part.changed = True
            part.recent.append(r)
        for p, rows in by_part.items():
            part = self.owned[p]
            idx = np.asarray(rows, dtype=np.int64)
            offsets = [raws[dec.good[j]].offset for j in rows]
            for j, off in zip(rows, offsets, strict=True):
                part.keys_at[off] = str(dec.keys[j])
            self.stats.records_valid += len(rows)
            chunk = Rows.of(
                self.topic,
                dec.x[idx],
                dec.y[idx],
                [p] * len(rows),
                offsets,
                None if meta is None else meta[idx],
            )
            part.pending.extend(part.batcher.add(chunk))
        for part in self.owned.values():
            due = part.batcher.poll_due()
            if due is not None:
                part.pending.append(due)
            self._prune(part, self._next_offset(part))

    @staticmethod
    def _prune(part: Owned, offset: int | None) -> None:
        """Forget read records before the last one preceding ``offset`` (the resume offset).

        The resume offset never moves back, so the record before any later one
        is still kept; the deque holds about the unabsorbed records of the partition.
        """
        if offset is None:
            return
        recent = part.recent
        while len(recent) > 1 and recent[1].offset < offset:
            recent.popleft()

    @staticmethod
    def _print_before(part: Owned, offset: int) -> RecordFingerprint | None:
        """The fingerprint of the last record read before ``offset`` (``None``: not known)."""
        if part.printed is not None and part.printed[0] == offset:
            return part.printed[1]
        for r in reversed(part.recent):
            if r.offset < offset:
                fp = RecordFingerprint.of(r.offset, r.key, r.value, r.timestamp_ms)
                part.printed = (offset, fp)
                return fp
        return None

    def _out_of_range(self) -> None:
        """Apply ``stream.offset_out_of_range`` to resume offsets the consumer found unusable.

        ``fail`` raises :class:`OffsetOutOfRange` (exit 4, nothing written);
        ``earliest``/``latest`` move the partition there and checkpoint the move
        (its keys keep what they absorbed: the records before are gone).
        """
        found = self.source.out_of_range()
        if not found:
            return
        action = self.settings.stream.offset_out_of_range
        for oor in found:
            announce_out_of_range(oor, action, "its keyed checkpoint")
            part = self.owned.get(oor.key[1])
            if part is None:
                continue
            self.source.reset(oor.key, action, oor.high_watermark)
            s = self.settings.stream
            part.batcher = MicroBatcher(
                s.batch_size, None if s.batching == "count" else s.max_wait_ms
            )
            part.pending.clear()
            part.keys_at.clear()
            part.recent.clear()
            part.printed = None
            part.horizon = None
            part.committed = None if action == "earliest" else oor.high_watermark
            part.changed = True
            self._checkpoint(part, "offset_out_of_range")

    def _dead_letter(self, raw: RawRecord, reason: str) -> None:
        self.dlq.send(raw, reason)
        self.stats.dead_lettered += 1
        metrics.RECORDS_DEAD_LETTERED.labels(reason=reason.split(":", 1)[0]).inc()
        log.warning(
            "record_rejected",
            topic=raw.topic,
            partition=raw.partition,
            offset=raw.offset,
            reason=reason,
        )

    def _drain(self) -> None:
        """Absorb every complete batch, partition by partition, in partition order."""
        every = self.settings.stream.snapshot_every_batches
        for p in sorted(self.owned):
            part = self.owned.get(p)
            while part is not None and part.pending and not self.stop:
                self._absorb(part, part.pending.popleft())
                if every and part.batches_since >= every:
                    self._checkpoint(part, "batches")
                self._renew(time.monotonic())  # a long backlog must not outlive the leases
                part = self.owned.get(p)

    def _load(
        self, p: int, keys: list[str], *, states: bool = True
    ) -> tuple[dict[str, PosteriorState], set[str]]:
        """States of ``keys`` (all of partition ``p``): cached, else their blob, else new;
        and the new ones.

        A new key starts from the fleet prior (``keyed.fleet = "population"``: from
        the partition's population as it was before this batch).  A key that
        another partition absorbed raises :class:`Repartitioned`.  ``states=False``
        (the in-place step): every key is made resident in the cache instead (a
        new one clean: it becomes dirty with its first step) and no state is returned.
        """
        out: dict[str, PosteriorState] = {}
        fresh: set[str] = set()
        missing: list[str] = []
        for k in keys:
            entry = self.cache.get(k)
            if entry is None:
                missing.append(k)
                continue
            if entry.partition != p:
                self._moved(k, entry.partition, p)
            if states:
                out[k] = entry.state
        fleet: PosteriorState | None = None
        if missing:
            blobs = self.store.read_keys(missing)
            for k in missing:
                blob = blobs.get(k)
                if blob is None:
                    pop = self.owned[p].population
                    if pop is not None and fleet is None:
                        fleet = population_fleet(pop, self.fleet)
                    st = new_key(fleet if fleet is not None else self.fleet, k)
                    if self.series is not None:  # its own part of the warm start's lags
                        st = self.series.own(st, k)
                    fresh.add(k)
                    if states:
                        out[k] = st
                    else:
                        self.cache.put(k, st, p, dirty=False)
                    continue
                info = self.store.key_info(k) or {}
                if int(info.get("partition", p)) != p:
                    self._moved(k, int(info["partition"]), p)
                st = from_bytes(blob, self.fleet.device)
                self.cache.put(k, st, p, dirty=False)
                if states:
                    out[k] = st
        return out, fresh

    def _moved(self, key: str, was: int, now: int) -> None:
        raise Repartitioned(
            f"key {key!r} was absorbed from partition {was} and now arrives on partition {now}: "
            f"the topic was repartitioned or the producers' keying changed; refusing to mix "
            f"histories (re-key into a new model name, see docs/operations.md)"
        )

    def _absorb(self, part: Owned, batch: Rows) -> None:
        """Commit path step 1 for one batch of one partition: step each key on its rows.

        Autoregressive models: each key's inputs are built from its own series
        state first (:meth:`KeyedSeries.inputs`); a key whose rows only warmed
        its buffer is not stepped, and every key of the batch takes its new
        series state (a rejected step's too: its values are in the lags, as
        in the single-model daemon).
        """
        t0 = time.perf_counter()
        keys = [part.keys_at.pop(int(o)) for o in batch.offset]
        rows: dict[str, list[int]] = collections.defaultdict(list)
        for i, k in enumerate(keys):
            rows[k].append(i)
        # in place: drift off, no series state, no population (they read the keys' states)
        in_place = self.update.in_place and self.series is None and part.population is None
        states, fresh = self._load(part.partition, list(rows), states=not in_place)
        series: dict[str, dict[str, Any]] = {}
        if self.series is not None and batch.meta is not None:
            ins = self.series.inputs(states, rows, batch.meta)
            batches, learnt, series = ins.batches, ins.rows, ins.extras
            if ins.warming:
                self.stats.records_warming += ins.warming
                metrics.RECORDS_WARMING.inc(ins.warming)
        else:
            # one gather puts each key's rows together (in offset order), then views per key
            order = torch.as_tensor([i for idx in rows.values() for i in idx], dtype=torch.long)
            x = torch.from_numpy(batch.x)[order]
            y = torch.from_numpy(batch.y)[order]
            batches = {}
            at = 0
            for k, idx in rows.items():
                batches[k] = Minibatch(x[at : at + len(idx)], y[at : at + len(idx)])
                at += len(idx)
            learnt = rows
        with self._lease_keeper():  # one batch may outlast the leases' TTL
            if in_place:
                out = KeyedOutcome({}, self.update.step_cached(self.cache, batches))
            else:
                out = self.update(states, batches) if batches else KeyedOutcome({}, {})
        new, infos = out.states, out.infos
        if out.alarmed:
            metrics.DRIFT_ALARMS.inc(len(out.alarmed))
            for k in out.alarmed:  # a key label only on alarms: bounded cardinality
                log.warning(
                    "drift_detected", key=k, partition=part.partition, offset=batch.last_offset()
                )
        absorbed = 0
        for k, info in infos.items():
            if info.rejected:
                metrics.STEPS_REJECTED.inc()
                mb = batches[k]
                for j, i in enumerate(learnt[k]):
                    raw, reason = rejected_record(
                        batch.topic,
                        part.partition,
                        int(batch.offset[i]),
                        mb.x[j].numpy(),
                        float(mb.y[j]),
                    )
                    self._dead_letter(raw, reason if reason else STEP_REJECTED)
                continue
            # every learnt row, as the key's own records_absorbed counts it: a gross
            # outlier the drift loop dropped from the step was still seen (weight 0)
            absorbed += len(learnt[k])
            if not in_place:
                self.cache.put(k, new[k], part.partition, dirty=True)
        if in_place:
            self.cache.mark_dirty([k for k, info in infos.items() if not info.rejected])
            for k in fresh:  # a new key enters memory with its first step, as above
                if infos[k].rejected:
                    self.cache.discard(k)
        for k, extra in series.items():
            stepped = k in infos and not infos[k].rejected
            state = KeyedSeries.with_series(new[k] if stepped else states[k], extra)
            self.cache.put(k, state, part.partition, dirty=True)
        if part.population is not None:  # sorted: the float64 sums' order is fixed
            for k in sorted(infos):
                if not infos[k].rejected:  # a key enters it with its first step
                    joined = k not in fresh and states[k].step_count > 0
                    part.population.replace(states[k] if joined else None, new[k])
        part.records_absorbed += absorbed
        part.batches_since += 1
        part.changed = True
        self.stats.batches += 1
        self.stats.records_absorbed += absorbed
        self.stats.last_absorbed_at = time.time()
        if self.stats.first_absorbed_at is None:
            self.stats.first_absorbed_at = self.stats.last_absorbed_at
            self.stats.first_batch_records = absorbed
        metrics.RECORDS_ABSORBED.inc(absorbed)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - t0)
        metrics.KEYS_IN_MEMORY.set(len(self.cache))

    def _next_offset(self, part: Owned) -> int | None:
        """The partition's resume offset: its first unabsorbed row, else after the last read."""
        tp: TopicPartition = (self.topic, part.partition)
        absorbed = {tp: part.committed} if part.committed is not None else {}
        handled = {tp: part.horizon} if part.horizon is not None else {}
        unabsorbed = (*part.pending, *part.batcher.buffered())
        return resume_offsets(absorbed, handled, unabsorbed).get(tp)

    def _checkpoint(self, part: Owned, why: str) -> bool:
        """Commit path steps 2-4 for one partition; ``False`` when it lost its lease."""
        if not part.changed:
            return True
        p = part.partition
        offset = self._next_offset(part)
        dirty = self.cache.dirty(p)
        blobs: dict[str, bytes] = {}
        entries: dict[str, dict[str, Any]] = {}
        for k in dirty:
            entry = self.cache.get(k)
            assert entry is not None
            st = entry.state  # materialised from the key's row
            blobs[k] = to_bytes(st)
            entries[k] = {
                "records_absorbed": st.records_absorbed,
                "drift_mode": drift_mode(st),
                "step_count": st.step_count,
            }
        self.dlq.flush()  # 2. the dead letters before the offsets that pass them
        offsets = {partition_key(self.topic, p): offset} if offset is not None else {}
        fp = self._print_before(part, offset) if offset else None
        prints = fingerprints_to_json({(self.topic, p): fp}) if fp is not None else {}
        t0 = time.perf_counter()
        try:
            version = self.store.commit(  # 3. one lease-guarded transaction
                part.lease,
                p,
                offsets=offsets,
                records_absorbed=part.records_absorbed,
                blobs=blobs,
                entries=entries,
                writer=self.owner,
                fingerprints=prints,
                population=part.population.to_json() if part.population is not None else None,
            )
        except LeaseLost as exc:
            log.warning("partition_lease_lost", partition=p, error=str(exc))
            self._drop(p, "lease_lost", release=False)
            self.claiming.setdefault(p, time.monotonic())
            return False
        metrics.SNAPSHOT_WRITE_SECONDS.observe(time.perf_counter() - t0)
        metrics.REDIS_UP.set(1)
        self._failures = 0
        self.cache.clean(dirty)
        part.version = version
        part.committed = offset
        self._prune(part, offset)
        part.batches_since = 0
        part.changed = False
        part.last_commit = time.monotonic()
        part.renewed_at = part.last_commit  # the script checked the token and renewed the lease
        self.stats.checkpoints += 1
        if offset is not None:
            self.source.commit({(self.topic, p): offset})  # 4. Kafka, for lag only
        log.info(
            "partition_checkpoint_written",
            partition=p,
            snapshot_version=version,
            offset=offset,
            keys=len(dirty),
            records_absorbed=part.records_absorbed,
            trigger=why,
        )
        return True

    def _maybe_checkpoint(self, now: float) -> None:
        every_s = self.settings.stream.snapshot_every_seconds
        if not every_s:
            return
        for part in list(self.owned.values()):
            if part.changed and now - part.last_commit >= every_s:
                self._renew(time.monotonic())  # the others' leases, one write at a time
                if part.partition in self.owned:
                    self._checkpoint(part, "interval")

    def _bound_memory(self) -> None:
        """Evict clean keys past the TTL or the cap; checkpoint first when dirty ones overflow."""
        gone = self.cache.evict()
        if self.cache.over_cap:
            for part in list(self.owned.values()):
                self._renew(time.monotonic())
                if part.partition in self.owned:
                    self._checkpoint(part, "memory")
            gone += self.cache.evict()
        if gone:
            metrics.KEYS_EVICTED.inc(len(gone))
            metrics.KEYS_IN_MEMORY.set(len(self.cache))
            log.debug("keys_evicted", keys=len(gone), in_memory=len(self.cache))

    def _release_all(self) -> None:
        for p in list(self.owned):
            self._drop(p, "stopped", release=True)

    def _shutdown(self) -> int:
        """Absorb what is complete, checkpoint every owned partition, release the leases."""
        deadline = time.monotonic() + SHUTDOWN_RETRY_S
        for p in sorted(self.owned):
            part = self.owned[p]
            if not part.batcher.count_based:
                rest = part.batcher.flush()
                if rest is not None:
                    part.pending.append(rest)
            while part.pending:
                self._absorb(part, part.pending.popleft())
                with contextlib.suppress(StoreUnavailable):
                    self._renew(time.monotonic())
        code = 0
        for p in sorted(self.owned):
            attempt = 0
            while p in self.owned:
                part = self.owned[p]
                try:
                    # a write of many keys takes a while: keep the other leases alive
                    self._renew(time.monotonic())
                    if p in self.owned:
                        self._checkpoint(part, "shutdown")
                    break
                except StoreUnavailable as exc:
                    wait = retry_backoff(attempt)
                    attempt += 1
                    if time.monotonic() + wait > deadline:
                        log.error("final_snapshot_failed", partition=p, error=str(exc))
                        code = 1
                        break
                    time.sleep(wait)
        self._release_all()
        log.info(
            "daemon_stopped",
            reason=self.stats.exit_reason,
            records_in=self.stats.records_in,
            records_absorbed=self.stats.records_absorbed,
            records_warming=self.stats.records_warming,
            dead_lettered=self.stats.dead_lettered,
            checkpoints=self.stats.checkpoints,
            partitions_resumed=self.stats.partitions_resumed,
            steady_records_per_s=_round(self.stats.steady_rate()),
            first_absorbed_at=self.stats.first_absorbed_at,
            last_absorbed_at=self.stats.last_absorbed_at,
        )
        return code


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)
