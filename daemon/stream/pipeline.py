"""The daemon's loop: Kafka records in, posterior updates, Redis snapshots out.

Wiring only: the mathematics lives in :mod:`fogline.models.svi` (and :mod:`fogline.drift`),
serialisation in :mod:`fogline.models.serialize`, Kafka in :mod:`fogline.daemon.stream.source`,
Redis in :mod:`fogline.daemon.stream.store`, the commit path in
:mod:`fogline.daemon.stream.checkpoint`, the writer lease in :mod:`fogline.daemon.stream.lease`.

Collaborators are passed in: :class:`Clients` holds factories of the store, the
consumer and the dead-letter producer (Kafka and Redis by default), so the
loop runs against fakes as well as against the real services.

Per poll: decode (bad records to the dead-letter producer), put the decoded
``[N, D]`` arrays into the micro-batcher (:class:`~fogline.daemon.stream.batching.Rows`
slices, never per-row tuples), absorb each complete batch (commit path step 1:
the update rule of :mod:`fogline.daemon.stream.update`), and when a snapshot is
due let the :class:`~fogline.daemon.stream.checkpoint.Checkpoint` run steps 2-4
(flush dead letters, write the snapshot in one lease-guarded Redis
transaction, only then commit offsets to Kafka).

Start-up: take the writer lease (waiting while another daemon holds it, or
exiting with status 3), restore the latest snapshot (or, when it is missing
or damaged, the newest intact version, loudly; status 5 when versions exist
but none is intact, unless ``stream.allow_fresh``), else the ``--init``
state file, else a fresh prior of the settings' ``model`` spec; a spec that
contradicts the restored state exits with status 2, naming each field.  Every
assigned partition is sought to the
snapshot's offsets (Kafka's committed offsets are ignored).  A snapshot
offset beyond the partition's end (broker restarted empty, topic recreated)
is handled by ``stream.offset_out_of_range``: ``fail`` (default) exits with
status 4 and writes nothing; ``earliest``/``latest`` move on from there.  So
is a recreated topic at least as long as the offset: the snapshot's
fingerprint of the record before the offset does not match (``cause``
``fingerprint_mismatch`` or ``record_gone``; see
:mod:`fogline.daemon.stream.source`).  Either way ``offset_out_of_range`` is
logged and ``fogline_offset_out_of_range_total`` counted.

Exactly-once absorption across crashes: batch boundaries depend only on the
record sequence in ``stream.batching = "count"`` mode, snapshots are taken
only between SVI steps, and a restart resumes from the offsets in the last
snapshot with an empty batcher, so it rebuilds the same batches and -- with
the RNG state inside :class:`~fogline.models.state.PosteriorState` -- reaches the same
posterior bit for bit.

Redis outage: a failed snapshot write pauses consumption (the partitions stay
assigned, the group membership is kept by polling), retries with backoff and
resumes once a write succeeds; what was already fetched is still absorbed, so
memory is bounded by one poll.  Malformed records go to the dead-letter topic
and never stop the loop.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog
import torch

from fogline.daemon import metrics
from fogline.daemon.config import Settings
from fogline.daemon.stream.batching import MicroBatcher, Rows, TopicPartition
from fogline.daemon.stream.checkpoint import Checkpoint, SnapshotSink
from fogline.daemon.stream.decode import (
    DecodedBatch,
    Decoder,
    RawRecord,
    decode_batch,
    partition_key,
    reason_code,
)
from fogline.daemon.stream.isolate import STEP_REJECTED, isolate, rejected_record
from fogline.daemon.stream.lease import LeaseKeeper, LeaseStore, LeaseUnavailable
from fogline.daemon.stream.prefetch import Polled, SerialSource, Source
from fogline.daemon.stream.process_source import ProcessSource, SourceProcessDied
from fogline.daemon.stream.runtime import StopFlag, call_with_retry, select_device
from fogline.daemon.stream.series import (
    SeriesDecoder,
    SeriesInputs,
    series_problems,
    series_spec,
    settings_spec,
)
from fogline.daemon.stream.source import (
    DeadLetterProducer,
    OutOfRange,
    kafka_source,
    security_kwargs,
)
from fogline.daemon.stream.store import IntactScan, Snapshot, SnapshotStore
from fogline.daemon.stream.update import PlainUpdate, make_update_rule, warm_up
from fogline.drift.runner import drift_mode, without_loop
from fogline.models.autoregressive import EXTRA_KEY as SERIES_KEY
from fogline.models.config import ModelConfig
from fogline.models.schema import DataSchema
from fogline.models.serialize import from_bytes, load, offsets_to_json
from fogline.models.spec import contradictions
from fogline.models.state import PosteriorState, RecordFingerprint, StepInfo
from fogline.models.svi import init_state

log = structlog.get_logger(__name__)

#: Longest the shutdown snapshot keeps retrying an unreachable Redis.
SHUTDOWN_RETRY_S = 30.0
#: How often consumer lag is measured.
LAG_EVERY_S = 1.0
#: Exit status when a snapshot offset lies beyond its partition's end and
#: ``stream.offset_out_of_range = "fail"``.
EXIT_OUT_OF_RANGE = 4
#: Exit status of ``fogline run`` when versions exist but none is intact.
EXIT_NO_INTACT_SNAPSHOT = 5
#: Exit status when the settings' ``model`` section contradicts the stored state.
EXIT_BAD_CONFIG = 2
#: Exit status when the consumer's child process died (``stream.source_process``).
EXIT_SOURCE_DIED = 6


# -- what the pipeline needs of the outside world (real clients or fakes) -----------
class Store(LeaseStore, SnapshotSink, Protocol):
    """The snapshot store: :class:`~fogline.daemon.stream.store.SnapshotStore` or a fake.

    The lease calls (:class:`~fogline.daemon.stream.lease.LeaseStore`) and ``write``
    (:class:`~fogline.daemon.stream.checkpoint.SnapshotSink`), plus what start-up reads.
    """

    def read(self, version: int | None = None) -> Any: ...
    def newest_intact(self, verify: Callable[[Snapshot], Any]) -> IntactScan[Any]: ...
    def close(self) -> None: ...


class DeadLetters(Protocol):
    """The dead-letter producer: :class:`~fogline.daemon.stream.source.DeadLetterProducer` or a fake."""

    def send(self, raw: RawRecord, reason: str) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


#: ``source(settings, offsets_for, on_revoked, fingerprints_for)``: the consumer, seeking
#: assigned partitions to ``offsets_for(keys)``, verifying the record before each with
#: ``fingerprints_for(keys)`` and telling ``on_revoked(keys)`` what it lost.
SourceFactory = Callable[
    [
        Settings,
        Callable[[list[TopicPartition]], Mapping[TopicPartition, int]],
        Callable[[list[TopicPartition]], None],
        Callable[[list[TopicPartition]], Mapping[TopicPartition, RecordFingerprint]],
    ],
    Source,
]


def kafka_dead_letters(s: Settings) -> DeadLetters:
    """The real dead-letter producer for ``s.kafka``."""
    return DeadLetterProducer(
        s.kafka.bootstrap_servers,
        dlq_topic=s.kafka.dlq_topic,
        max_request_bytes=s.kafka.dlq_max_request_bytes,
        **security_kwargs(s.kafka),
    )


def redis_store(s: Settings) -> Store:
    """The real snapshot store for ``s.redis``."""
    return SnapshotStore.from_settings(s)


@dataclass(frozen=True)
class Clients:
    """Factories of the pipeline's collaborators (Kafka and Redis by default)."""

    store: Callable[[Settings], Store] = redis_store
    source: SourceFactory = kafka_source
    dead_letters: Callable[[Settings], DeadLetters] = kafka_dead_letters


@dataclass
class RunStats:
    """Counters of one :meth:`Pipeline.run`."""

    records_in: int = 0
    records_valid: int = 0
    dead_lettered: int = 0
    #: Autoregressive models: valid records that only filled their key's lag buffer.
    records_warming: int = 0
    batches: int = 0
    snapshots: int = 0
    last_version: int | None = None
    last_loss: float = math.nan
    last_kl: float = math.nan
    #: The update rule's signals for the last batch (empty for ``drift.policy = "off"``).
    last_signals: dict[str, float] = field(default_factory=dict)
    store_failures: int = 0
    started: float = field(default_factory=time.monotonic)
    exit_reason: str = ""


@dataclass
class RunOptions:
    """What ``fogline run`` adds to the settings."""

    init_path: Path | None = None
    max_records: int | None = None
    idle_exit_s: float | None = None
    #: ``None``: wait for the lease as long as it takes; ``0``: exit at once.
    lease_wait_s: float | None = None
    threads: int | None = 1
    #: Fetch and decode the next poll on a worker thread while batches are absorbed
    #: (:mod:`fogline.daemon.stream.prefetch`); ``None``: ``stream.prefetch``.
    prefetch: bool | None = None
    on_batch: Callable[[RunStats, PosteriorState], None] | None = None


class OffsetOutOfRange(RuntimeError):
    """A snapshot offset lies beyond its partition's end and the setting says ``fail``."""


def announce_out_of_range(oor: OutOfRange, action: str, resumes: str) -> None:
    """Count and log one out-of-range partition; with ``action == "fail"`` raise.

    ``resumes`` names what resumes at the offset (``"the snapshot"``, ``"its keyed
    checkpoint"``); the error tells the operator how to continue.
    """
    label = partition_key(*oor.key)
    metrics.OFFSET_OUT_OF_RANGE.labels(partition=label, action=action, cause=oor.cause).inc()
    log.error(
        "offset_out_of_range",
        partition=label,
        snapshot_offset=oor.offset,
        high_watermark=oor.high_watermark,
        action=action,
        cause=oor.cause,
        hint="the broker lost the topic (restarted empty, topic recreated?)",
    )
    if action == "fail":
        what = (
            f"the partition ends at {oor.high_watermark}"
            if oor.cause == "beyond_end"
            else f"the record before it is not the one absorbed ({oor.cause})"
        )
        raise OffsetOutOfRange(
            f"partition {label}: {resumes} resumes at offset {oor.offset} but "
            f"{what} (broker restarted empty or topic recreated?); set "
            f"stream.offset_out_of_range to 'earliest' or 'latest' to continue from there"
        )


def fresh_stream(state: PosteriorState) -> PosteriorState:
    """``state`` as the start of a new stream: no offsets, no records, no drift loop.

    An ``--init`` file may be an exported snapshot of another stream; its drift
    loop (reference, calibration, counters) belongs to that stream, so the new
    one anchors its own (the warm start's functional prior is kept).
    """
    return without_loop(state).replace(offsets={}, fingerprints={}, records_absorbed=0)


class NoIntactSnapshot(RuntimeError):
    """The model has snapshot versions but none is intact (and ``stream.allow_fresh`` is off)."""


class SpecContradiction(RuntimeError):
    """The settings' ``model`` section contradicts the state the daemon would resume.

    ``problems`` holds one ``"model.<field>: ..."`` line each
    (:func:`fogline.models.spec.contradictions`).
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def spec_problems(settings: Settings, state: PosteriorState) -> list[str]:
    """Where ``settings.model`` contradicts ``state`` (none when the section is unset)."""
    spec = settings_spec(settings.model, state)  # season "auto" agrees with the stored one
    if spec is None:
        return []
    schema = state.schema
    return contradictions(
        spec,
        state.config,
        target=schema.target.name if schema is not None else None,
        transforms=schema.transforms() if schema is not None else None,
    ) + series_problems(spec, state)


def record_schema(settings: Settings, state: PosteriorState) -> DataSchema:
    """The schema records are decoded by: the state's, else identity columns named by the spec.

    A state written before schemas existed has none; with a ``model`` section
    its (non-contradicting) names, target, key and timestamp fields are used,
    without transforms (nothing was fitted).
    """
    spec = settings.model
    if state.schema is not None or spec is None:
        return state.data_schema()
    return dataclasses.replace(
        DataSchema.identity(spec.features, spec.target), key=spec.key, timestamp=spec.timestamp
    )


def fresh_prior(settings: Settings, device: torch.device) -> PosteriorState:
    """A prior state: the model of ``settings.model`` (else the default ``ModelConfig``).

    Built from the spec alone there is nothing fitted, so the columns carry the
    spec's names and transform kinds with loc 0 and scale 1
    (:meth:`DataSchema.unfitted`): inputs and target in raw units, which the
    ``fresh_prior_raw_units`` warning says.
    """
    spec = settings.model
    config = spec.to_config() if spec is not None else ModelConfig.model_validate({})
    state = init_state(config, seed=settings.stream.seed, lr=settings.stream.lr, device=device)
    if spec is None:
        return state
    log.warning(
        "fresh_prior_raw_units",
        features=list(spec.features),
        target=spec.target,
        detail="no warm start: nothing is standardised, inputs and target are used in raw "
        "units (fogline warmstart fits the transforms)",
    )
    return state.replace(schema=DataSchema.unfitted(spec))


def initial_state(
    settings: Settings,
    store: Store,
    device: torch.device,
    init_path: Path | None,
    stop: StopFlag,
) -> tuple[PosteriorState, int | None, str]:
    """The state to start from: the newest intact snapshot, else ``init_path``, else a fresh prior.

    Returns ``(state, snapshot version or None, origin)``.  ``latest`` is used
    when it is intact (checksum verified, blob decodes); when it is missing or
    damaged, the newest intact version is (:meth:`SnapshotStore.newest_intact`),
    with a ``snapshot_fallback`` warning and ``fogline_snapshot_fallbacks``
    counted.  When versions exist but none is intact the daemon never starts
    from scratch silently: it raises :class:`NoIntactSnapshot` unless
    ``stream.allow_fresh`` is set.  An ``--init`` state starts the stream
    afresh (:func:`fresh_stream`) and takes ``stream.lr``; a restored snapshot
    is used exactly as written.  A fresh prior is the model of ``settings.model``
    (:func:`fresh_prior`).
    """
    scan = call_with_retry(
        lambda: store.newest_intact(lambda snap: from_bytes(snap.blob, device)),
        stop,
        what="read_snapshot",
    )
    if scan.snapshot is not None and scan.value is not None:
        version = scan.snapshot.meta.version
        origin = f"snapshot v{version}"
        if scan.fallback:
            metrics.SNAPSHOT_FALLBACKS.inc()
            log.warning(
                "snapshot_fallback",
                snapshot_version=version,
                latest=scan.latest,
                skipped=[{"version": v, "why": why} for v, why in scan.skipped],
            )
            why = "missing" if scan.latest is None else f"v{scan.latest} not intact"
            origin += f" (fallback: latest {why})"
        return scan.value, version, origin
    if scan.versions:
        problem = (
            f"model {settings.model_name!r} has snapshot versions {list(scan.versions)} "
            f"but none is intact"
        )
        skipped = [{"version": v, "why": why} for v, why in scan.skipped]
        if not settings.stream.allow_fresh:
            log.error("no_intact_snapshot", versions=list(scan.versions), skipped=skipped)
            raise NoIntactSnapshot(problem + "; set stream.allow_fresh to start afresh")
        log.warning("starting_fresh_over_damaged_snapshots", versions=list(scan.versions))
    path = init_path or settings.stream.init_path
    if path is not None:
        state = load(str(path), device)
        state = fresh_stream(state).replace(lr=settings.stream.lr)
        return state, None, f"init file {path}"
    return fresh_prior(settings, device), None, "fresh prior"


class Pipeline:
    """One daemon: consume, decode, batch, step, checkpoint (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        options: RunOptions | None = None,
        stop: StopFlag | None = None,
        clients: Clients | None = None,
    ) -> None:
        self.settings = settings
        self.options = options or RunOptions()
        self.stop = stop if stop is not None else StopFlag()
        self.clients = clients or Clients()
        self.stats = RunStats()
        self.state: PosteriorState | None = None
        #: Complete batches not yet absorbed, oldest first.
        self._pending: collections.deque[Rows] = collections.deque()
        #: Partitions revoked since the last poll (set on the consumer's callback).
        self._revoked: list[TopicPartition] = []
        self._last_lag = -math.inf
        #: Autoregressive models: the per-batch inputs (``None``: tabular records).
        self.series: SeriesInputs | None = None

    # -- the whole run ----------------------------------------------------------
    def run(self) -> int:
        """Run until stopped, ``max_records`` or ``idle_exit_s``; return the exit status.

        0: clean exit after a final snapshot; 3: the writer lease is held by
        (or was lost to) another daemon; 1: the final snapshot could not be
        written (nothing is lost: the offsets were not committed either);
        4: a snapshot offset is beyond its partition's end
        (``stream.offset_out_of_range = "fail"``; nothing written).
        5: snapshot versions exist but none is intact (:class:`NoIntactSnapshot`;
        ``stream.allow_fresh`` starts afresh instead).  2: the settings' ``model``
        section contradicts the state (:class:`SpecContradiction`; nothing written).
        6: the consumer's child process died (``stream.source_process``; no final
        snapshot, a restart resumes from the last one).
        """
        s = self.settings
        structlog.contextvars.clear_contextvars()  # no batch context left from an earlier run
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        device = select_device(s.stream.device)
        metrics.DEVICE_INFO.labels(device=str(device)).set(1)
        store = self.clients.store(s)
        keeper = LeaseKeeper(store, s.redis.lease_ttl_s)
        try:
            if not keeper.acquire(self.options.lease_wait_s, self.stop):
                self.stats.exit_reason = "stopped before the lease was free"
                return 0
        except LeaseUnavailable as exc:
            log.error("lease_unavailable", error=str(exc))
            self.stats.exit_reason = str(exc)
            return 3
        try:
            return self._run_with_lease(store, keeper, device)
        except LeaseUnavailable as exc:
            log.error("lease_lost", error=str(exc))
            self.stats.exit_reason = str(exc)
            return 3
        except OffsetOutOfRange as exc:
            log.error("daemon_failed", reason="offset_out_of_range", error=str(exc))
            self.stats.exit_reason = str(exc)
            return EXIT_OUT_OF_RANGE
        except NoIntactSnapshot as exc:
            log.error("daemon_failed", reason="no_intact_snapshot", error=str(exc))
            self.stats.exit_reason = str(exc)
            return EXIT_NO_INTACT_SNAPSHOT
        except SpecContradiction as exc:
            log.error("daemon_failed", reason="model_spec_contradiction", problems=exc.problems)
            self.stats.exit_reason = "\n".join(exc.problems)
            return EXIT_BAD_CONFIG
        except SourceProcessDied as exc:  # no final snapshot: a restart resumes from the last
            log.error("daemon_failed", reason="source_process_died", error=str(exc))
            self.stats.exit_reason = str(exc)
            return EXIT_SOURCE_DIED
        finally:
            keeper.release()
            store.close()

    def _run_with_lease(self, store: Store, keeper: LeaseKeeper, device: Any) -> int:
        s = self.settings
        state, version, origin = initial_state(s, store, device, self.options.init_path, self.stop)
        problems = spec_problems(s, state)
        if problems:
            raise SpecContradiction([f"{p} ({origin})" for p in problems])
        self.state = state
        keeper.last_version = version
        self.stats.last_version = version
        metrics.REDIS_UP.set(1)
        if version is not None:
            metrics.SNAPSHOT_VERSION.set(version)
        log.info(
            "daemon_started",
            model=s.model_name,
            origin=origin,
            device=str(device),
            records_absorbed=state.records_absorbed,
            offsets=offsets_to_json(state.offsets),
            batching=s.stream.batching,
            batch_size=s.stream.batch_size,
        )
        self.update = make_update_rule(s, state)
        t0 = time.perf_counter()
        warm_up(state, s.stream.batch_size, s.stream.steps_per_batch, s.stream.data_size)
        log.info("svi_warmed_up", seconds=round(time.perf_counter() - t0, 3))
        # raw units in, model units out: the stored schema's names and transforms
        self.decoder = Decoder(record_schema(s, state))
        ar_spec = series_spec(s.model, state)
        if ar_spec is not None:  # {ts, value, key} records; inputs built per batch
            schema = record_schema(s, state)
            self.series = SeriesInputs(ar_spec, schema, SeriesDecoder(schema))
        count_mode = s.stream.batching == "count"
        self.batcher = MicroBatcher(
            s.stream.batch_size, None if count_mode else s.stream.max_wait_ms
        )
        dlq = self.clients.dead_letters(s)
        try:
            self.source = self._open_source()
        except BaseException:
            dlq.close()
            raise
        self.dlq = dlq
        self.checkpoint = Checkpoint(
            store=store,
            keeper=keeper,
            dead_letters=dlq,
            consumer=self.source,
            start=state,
        )
        try:
            code = self._loop()
        finally:
            self.source.close()
            dlq.close()
        return code

    def _open_source(self) -> SerialSource | ProcessSource:
        """The consumer: in a child process (``stream.source_process``, real Kafka only), else here.

        Fakes passed in :class:`Clients` live in this process, so they always run here.
        """
        s = self.settings
        decode = self._decode_batch
        if s.stream.source_process and self.clients.source is kafka_source:
            return ProcessSource(
                functools.partial(kafka_source, s),
                decode,
                offsets=lambda: self._offsets_for([]),
                fingerprints=lambda: self._fingerprints_for([]),
                on_revoked=self._on_revoked,
            )
        source = self.clients.source(s, self._offsets_for, self._on_revoked, self._fingerprints_for)
        return SerialSource(
            source,
            decode,
            prefetch=s.stream.prefetch if self.options.prefetch is None else self.options.prefetch,
        )

    # -- rebalance callbacks -------------------------------------------------------
    def _offsets_for(self, keys: list[TopicPartition]) -> Mapping[TopicPartition, int]:
        """Where assigned partitions start: the state's offsets (runs inside ``poll``).

        With prefetching this runs on the worker while batches may still be
        absorbed, so what it returned is recorded and checked after the poll
        (:meth:`_reseek`).
        """
        state = self.state
        offsets = state.offsets if state is not None else {}
        serial = getattr(self, "source", None)
        if isinstance(serial, SerialSource):
            serial.assigned.update({k: offsets.get(k) for k in keys})
        return offsets

    def _fingerprints_for(
        self, keys: list[TopicPartition]
    ) -> Mapping[TopicPartition, RecordFingerprint]:
        # those of the last snapshot (or the start): a record before the offsets either way
        state = self.state
        return state.fingerprints if state is not None else {}

    def _on_revoked(self, keys: list[TopicPartition]) -> None:
        self._revoked.extend(keys)

    def _drop_revoked(self) -> None:
        """Forget buffered rows of revoked partitions: they are read again after assignment."""
        if not self._revoked:
            return
        revoked = sorted({p for t, p in self._revoked if t == self.settings.kafka.topic})
        self.checkpoint.forget(self._revoked)
        self._revoked.clear()

        def keep(rows: Rows) -> np.ndarray[Any, np.dtype[np.bool_]]:
            return ~np.isin(rows.partition, revoked)

        # the kept rows of complete batches, then of the partial one, re-enter in order
        kept = [r[keep(r)] for r in (*self._pending, *self.batcher.discard())]
        self._pending.clear()
        for rows in kept:
            if len(rows):
                self._pending.extend(self.batcher.add(rows))

    # -- the loop -----------------------------------------------------------------
    def _loop(self) -> int:
        s = self.settings
        opts = self.options
        cp = self.checkpoint
        idle_since = time.monotonic()
        while not self.stop:
            cp.maintain_lease()
            if cp.due(0, 0) == "retry":
                self._snapshot("retry")
            remaining = None
            if opts.max_records is not None:
                remaining = opts.max_records - self.stats.records_in
                if remaining <= 0:
                    self.stats.exit_reason = "max_records"
                    break
            cap = (
                s.kafka.max_poll_records
                if remaining is None
                else min(remaining, s.kafka.max_poll_records)
            )
            polled = self.source.take(cap, int(self.batcher.timeout_ms(100)))
            self._drop_revoked()
            polled = self._reseek(polled)
            raws = polled.raws
            moved = self._handle_out_of_range()
            now = time.monotonic()
            assigned = bool(self.source.assignment)
            if raws or moved or not assigned:
                idle_since = now  # the idle clock runs only while partitions are assigned
                self._ingest(polled)
            due = self.batcher.poll_due()
            if due is not None:
                self._pending.append(due)
            self._prefetch()
            self._drain()
            self._maybe_update_lag(now)
            if cp.due(0, s.stream.snapshot_every_seconds) == "interval":
                self._snapshot("interval")
            if (
                opts.idle_exit_s is not None
                and not raws
                and not cp.failing
                and now - idle_since >= opts.idle_exit_s
            ):
                self.stats.exit_reason = "idle"
                break
        else:
            self.stats.exit_reason = f"signal {self.stop.signal_name}"
        return self._shutdown()

    def _handle_out_of_range(self) -> bool:
        """Apply ``stream.offset_out_of_range`` to offsets the consumer found beyond the end.

        Returns whether a partition was moved (raises :class:`OffsetOutOfRange` for ``fail``).
        """
        found = self.source.out_of_range()
        if not found:
            return False
        action = self.settings.stream.offset_out_of_range
        assert self.state is not None
        offsets = dict(self.state.offsets)
        prints = dict(self.state.fingerprints)
        for oor in found:
            announce_out_of_range(oor, action, "the snapshot")
            self.source.reset(oor.key, action, oor.high_watermark)
            self.checkpoint.forget([oor.key], reset=True)
            prints.pop(oor.key, None)
            if action == "earliest":
                offsets.pop(oor.key, None)  # no offset: the next assignment starts at the earliest
            else:
                offsets[oor.key] = oor.high_watermark
        self.state = self.state.replace(offsets=offsets, fingerprints=prints)
        self.checkpoint.moved()
        return True

    def _prefetch(self) -> None:
        """Start the next poll on the worker when batches are waiting to be absorbed.

        Only then is there a step to overlap with; an idle daemon polls on the
        main thread as before.  The cap honours ``max_records``.
        """
        if not self._pending or self.stop:
            return
        cap = self.settings.kafka.max_poll_records
        if self.options.max_records is not None:
            cap = min(cap, self.options.max_records - self.stats.records_in)
            if cap <= 0:
                return
        self.source.start(cap, int(self.batcher.timeout_ms(100)))

    def _reseek(self, polled: Polled) -> Polled:
        """Undo a rebalance's seek that raced with absorption (prefetching only).

        A partition assigned during a poll was sought to the state's offsets *at
        that moment*; when the poll ran ahead, batches may have been absorbed
        since, so the first unabsorbed offset can now lie further on.  Those
        partitions' records of this poll are dropped and the consumer is sought
        to the first unabsorbed offset here, on the main thread (or to the
        earliest, when the state has none): nothing is absorbed twice, nothing
        skipped.  Where the offsets agree (the usual case) the poll is kept.
        """
        if not polled.assigned:
            return polled
        resume = self._resume_offsets()
        stale = {k for k, off in polled.assigned.items() if resume.get(k) != off}
        if not stale:
            return polled
        log.info(
            "partitions_resought",
            partitions=[partition_key(*k) for k in sorted(stale)],
            offsets={partition_key(*k): resume.get(k) for k in sorted(stale)},
        )
        seek = {k: resume[k] for k in stale if k in resume}
        if seek:
            self.source.seek(seek)
        for k in stale - seek.keys():
            self.source.reset(k, "earliest")
        kept = [r for r in polled.raws if (r.topic, r.partition) not in stale]
        return Polled(kept, self._decode_batch(kept) if kept else None)

    def _decode_batch(self, raws: Sequence[RawRecord]) -> DecodedBatch:
        """A poll's records decoded (series records when the model is autoregressive)."""
        if self.series is not None:
            return self.series.decoder.decode_batch(raws)
        return decode_batch(raws, self.decoder)

    def _ingest(self, polled: Polled) -> None:
        """A poll's decoded records: bad ones to the DLQ, good ones into the batcher.

        An empty poll changes nothing (in particular it does not make the state
        dirty, so an idle or not-yet-assigned daemon writes no snapshots).
        """
        raws, dec = polled.raws, polled.decoded
        if not raws or dec is None:
            return
        topic = self.settings.kafka.topic
        self.stats.records_in += len(raws)
        metrics.RECORDS_IN.labels(topic=topic).inc(len(raws))
        for raw, reason, _ in dec.bad:
            self.dlq.send(raw, reason)
            self.stats.dead_lettered += 1
            metrics.RECORDS_DEAD_LETTERED.labels(reason=reason_code(reason)).inc()
            log.warning(
                "record_rejected",
                topic=raw.topic,
                partition=raw.partition,
                offset=raw.offset,
                reason=reason,
            )
        # processed horizon: the next offset after the last handled record
        self.checkpoint.read(
            {(r.topic, r.partition): r.offset + 1 for r in raws},
            dead_lettered=len(dec.bad),
            valid=len(dec.good),
            records=raws,
        )
        if dec.good:
            self.stats.records_valid += len(dec.good)
            good = [raws[i] for i in dec.good]
            rows = Rows.of(
                topic,  # the one topic the consumer subscribes to
                dec.x,
                dec.y,
                [r.partition for r in good],
                [r.offset for r in good],
                getattr(dec, "meta", None),  # series records: value, ts, key id
            )
            self._pending.extend(self.batcher.add(rows))

    def _resume_offsets(self) -> dict[TopicPartition, int]:
        """Next offsets to read: the first unabsorbed row of each partition."""
        assert self.state is not None
        unabsorbed = (*self._pending, *self.batcher.buffered())
        return self.checkpoint.offsets(self.state.offsets, unabsorbed)

    def _drain(self) -> None:
        """Absorb every complete pending batch (stopping early on a stop request).

        A long backlog (catching up after downtime) can take many seconds here,
        so the lag gauge and the writer lease keep being refreshed between batches.
        """
        every = self.settings.stream.snapshot_every_batches
        while self._pending and not self.stop:
            self._absorb(self._pending.popleft())
            self._maybe_update_lag(time.monotonic())
            self.checkpoint.maintain_lease()
            if self.checkpoint.due(every, 0) == "batches":
                self._snapshot("batches")

    def _regime(self) -> str:
        """The drift regime for the log context (the one read of drift state here)."""
        assert self.state is not None
        return drift_mode(self.state)

    def _absorb(self, batch: Rows) -> None:
        """Commit path step 1: K SVI steps on one batch; advance the state's offsets.

        Series records (autoregressive model): the batch's inputs are built
        first (:class:`~fogline.daemon.stream.series.SeriesInputs`) and the new
        series state goes into the stepped state with the new offsets.
        """
        assert self.state is not None
        t0 = time.perf_counter()
        series_extra: dict[str, Any] | None = None
        if self.series is not None and batch.meta is not None:
            batch, series_extra = self._series_batch(batch)
            if not len(batch):  # every row only filled a lag buffer
                self.state = self._with_series(self.state, series_extra)
                self.checkpoint.stepped()
                return
        x = torch.from_numpy(batch.x)
        y = torch.from_numpy(batch.y)
        parts = np.unique(batch.partition)
        structlog.contextvars.bind_contextvars(
            topic=batch.topic,
            partition=int(parts[0]) if len(parts) == 1 else ",".join(map(str, parts)),
            offset=batch.last_offset(),
            snapshot_version=self.stats.last_version,
            regime=self._regime(),
        )
        # 1. step the posterior (rejected: learn what can be learnt, dead-letter the rest)
        new, info, signals = self.update(self.state, x, y)
        if info.rejected:
            new, info, signals, batch = self._absorb_rejected(batch, x, y, info)
        if series_extra is not None:
            new = self._with_series(new, series_extra)
        self.state = new.replace(offsets=self._resume_offsets())
        self.checkpoint.stepped()
        self.stats.batches += 1
        self.stats.last_loss = info.loss
        self.stats.last_kl = info.kl
        self.stats.last_signals = signals
        if info.rejected:
            metrics.STEPS_REJECTED.inc()
            log.warning("svi_step_rejected", loss=info.loss, rows=info.rows)
        else:
            metrics.RECORDS_ABSORBED.inc(len(batch))
            metrics.SVI_LOSS.set(info.loss)
        elapsed = time.perf_counter() - t0
        metrics.BATCH_SECONDS.observe(elapsed)
        log.debug(
            "svi_step_done",
            rows=info.rows,
            loss=info.loss,
            kl=info.kl,
            grad_norm=info.grad_norm,
            rejected=info.rejected,
            records_absorbed=self.state.records_absorbed,
            seconds=round(elapsed, 6),
            **signals,
        )
        if self.options.on_batch is not None:
            self.options.on_batch(self.stats, self.state)

    def _series_batch(self, batch: Rows) -> tuple[Rows, dict[str, Any]]:
        """The featured rows of a batch of series records, and the series state after it."""
        assert self.series is not None and self.state is not None and batch.meta is not None
        step = self.series.step(self.state, batch.meta)
        if step.warming:
            self.stats.records_warming += step.warming
            metrics.RECORDS_WARMING.inc(step.warming)
        rows = Rows.of(
            batch.topic,
            step.x,
            step.y,
            batch.partition[step.rows],
            batch.offset[step.rows],
        )
        return rows, step.extra

    def _with_series(self, state: PosteriorState, extra: dict[str, Any]) -> PosteriorState:
        """``state`` with the series state after the batch just absorbed."""
        out = state.replace(extra={**state.extra, SERIES_KEY: extra})
        return out.replace(offsets=self._resume_offsets())

    def _absorb_rejected(
        self, batch: Rows, x: torch.Tensor, y: torch.Tensor, info: StepInfo
    ) -> tuple[PosteriorState, StepInfo, dict[str, float], Rows]:
        """A rejected step: dead-letter the rows that make it non-finite, learn the others.

        The rows are found by :func:`fogline.daemon.stream.isolate.isolate` with the plain
        streaming step from the unchanged state as the oracle (deterministic, so a
        restart learns the same rows); a drift rule is first rebuilt from that state,
        so its loop never counts the rejected batch.  Returns the update of the
        learnt rows and those rows (empty, with the old state, when none is left).
        """
        assert self.state is not None
        s, state = self.settings, self.state
        probe = PlainUpdate(
            num_steps=s.stream.steps_per_batch,
            data_size=s.stream.data_size,
            functional_prior=s.stream.functional_prior,
        )

        def rejected(rows: Sequence[int]) -> bool:
            idx = torch.as_tensor(list(rows), dtype=torch.long)
            return probe(state, x[idx], y[idx])[1].rejected

        iso = isolate(len(batch), rejected)
        bad = list(iso.bad)
        new, signals = state, dict[str, float]()
        if iso.good:
            if self.update.name != "off":
                self.update = make_update_rule(s, state)
            idx = torch.as_tensor(iso.good, dtype=torch.long)
            new, info, signals = self.update(state, x[idx], y[idx])
            if info.rejected:  # the rule steps differently from the probe: set all aside
                new, bad = state, list(range(len(batch)))
        for i in bad:
            offset = int(batch.offset[i])
            self.dlq.send(
                *rejected_record(
                    batch.topic, int(batch.partition[i]), offset, batch.x[i], float(batch.y[i])
                )
            )
            self.checkpoint.unflushed += 1
            self.stats.dead_lettered += 1
            metrics.RECORDS_DEAD_LETTERED.labels(reason=STEP_REJECTED).inc()
            log.warning("record_rejected", offset=offset, reason=STEP_REJECTED, probes=iso.probes)
        learnt = np.ones(len(batch), dtype=np.bool_)
        learnt[bad] = False
        if not info.rejected:  # (a batch rejected to the end is counted by the caller)
            metrics.STEPS_REJECTED.inc()
        log.warning(
            "rejected_rows_isolated",
            rows=len(batch),
            dead_lettered=len(bad),
            learnt=len(batch) - len(bad),
            probes=iso.probes,
        )
        return new, info, signals, batch[learnt]

    def _snapshot(self, why: str) -> bool:
        """Commit path steps 2-4 through the checkpoint; ``False`` while Redis is unreachable.

        Raises :class:`~fogline.daemon.stream.lease.LeaseUnavailable` when another
        daemon owns the model.
        """
        assert self.state is not None
        self.state = self.checkpoint.stamp(self.state.replace(offsets=self._resume_offsets()))
        failures = self.checkpoint.failures
        meta = self.checkpoint.commit(self.state, why)
        self.stats.store_failures += self.checkpoint.failures - failures
        if meta is None:
            return False
        self.stats.last_version = meta.version
        self.stats.snapshots += 1
        return True

    def _maybe_update_lag(self, now: float) -> None:
        """Measure the consumer lag at most every ``LAG_EVERY_S`` seconds."""
        if now - self._last_lag >= LAG_EVERY_S:
            self._last_lag = now
            self._update_lag()

    def _update_lag(self) -> None:
        assert self.state is not None
        try:
            lag = self.source.lag(self._resume_offsets())
        except Exception as exc:  # lag is best effort; never stop the loop for it
            log.debug("lag_unavailable", error=repr(exc))
            return
        for key, value in lag.items():
            metrics.CONSUMER_LAG.labels(partition=partition_key(*key)).set(value)

    def _shutdown(self) -> int:
        """Absorb what is complete, write the final snapshot, commit, and report."""
        signalled = bool(self.stop)
        if not signalled:
            # max_records / idle exit: absorb everything read; a partial batch only
            # in size_or_time mode (count mode keeps boundaries a pure function of
            # the record sequence; the partial batch is read again after a restart).
            if not self.batcher.count_based:
                rest = self.batcher.flush()
                if rest is not None:
                    self._pending.append(rest)
            while self._pending:
                self._absorb(self._pending.popleft())
        retry = self.checkpoint.retry
        deadline = time.monotonic() + SHUTDOWN_RETRY_S
        while True:
            if self._snapshot("shutdown"):
                break
            if retry.next_at > deadline:
                log.error(
                    "final_snapshot_failed",
                    reason="redis unreachable",
                    records_absorbed=self.state.records_absorbed if self.state else None,
                )
                return 1
            time.sleep(max(0.0, retry.next_at - time.monotonic()))
        assert self.state is not None
        log.info(
            "daemon_stopped",
            reason=self.stats.exit_reason,
            records_in=self.stats.records_in,
            records_absorbed=self.state.records_absorbed,
            dead_lettered=self.stats.dead_lettered,
            records_warming=self.stats.records_warming,
            snapshot_version=self.stats.last_version,
            offsets=offsets_to_json(self.state.offsets),
        )
        return 0
