"""The daemon's loop: Kafka records in, posterior updates, Redis snapshots out.

Wiring only: the mathematics lives in :mod:`fogline.models.svi` (and :mod:`fogline.drift`),
serialisation in :mod:`fogline.models.serialize`, Kafka in :mod:`fogline.daemon.stream.source`,
Redis in :mod:`fogline.daemon.stream.store`.

Commit path
-----------
Every micro-batch goes through these steps, in this order (the code of
:meth:`Pipeline._absorb` and :meth:`Pipeline._snapshot` is numbered the same):

1. **Step the posterior**: the update rule of ``drift.policy``
   (:mod:`fogline.daemon.stream.update`): the drift loop's signals, alarm and policy action
   around ``K = stream.steps_per_batch`` steps of
   :func:`fogline.models.stream.stream_step` (``data_size = stream.data_size`` in
   normal operation), on the configured device.  The new state's ``offsets`` are the next offsets
   to read such that everything before them is absorbed or dead-lettered and
   nothing after them is absorbed.
2. **Write the snapshot** (every ``snapshot_every_batches`` batches and/or
   ``snapshot_every_seconds`` seconds, and at shutdown): first flush the
   dead-letter producer, then ``to_bytes(state)`` (safetensors carrying the
   offsets, ``records_absorbed`` and the drift state) in one atomic Redis
   write that succeeds only while this daemon holds the writer lease.
3. **Only then commit the offsets to Kafka** (monitoring of lag only; the
   snapshot is the source of truth).

Start-up: take the writer lease (waiting while another daemon holds it, or
exiting with status 3), restore the latest snapshot, else the ``--init``
state file, else a fresh prior; every assigned partition is sought to the
snapshot's offsets (Kafka's committed offsets are ignored).

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
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
import torch

from fogline.daemon import metrics
from fogline.daemon.config import Settings
from fogline.daemon.stream.batching import MicroBatcher
from fogline.daemon.stream.decode import (
    Decoder,
    RawRecord,
    decode_batch,
    partition_key,
    reason_code,
)
from fogline.daemon.stream.runtime import (
    LeaseKeeper,
    LeaseUnavailable,
    Retry,
    StopFlag,
    call_with_retry,
    select_device,
)
from fogline.daemon.stream.source import DeadLetterProducer, KafkaSource, security_kwargs
from fogline.daemon.stream.store import LeaseLost, SnapshotNotFound, SnapshotStore, StoreUnavailable
from fogline.daemon.stream.update import make_update_rule, warm_up
from fogline.drift.runner import drift_mode, drift_summary, without_loop
from fogline.models.config import ModelConfig
from fogline.models.serialize import from_bytes, load, to_bytes
from fogline.models.state import PosteriorState
from fogline.models.svi import init_state

log = structlog.get_logger(__name__)

#: One buffered record: (``"topic:partition"``, offset, x row [D], y).
Item = tuple[str, int, npt.NDArray[np.float32], float]

#: Longest the shutdown snapshot keeps retrying an unreachable Redis.
SHUTDOWN_RETRY_S = 30.0
#: How often consumer lag is measured.
LAG_EVERY_S = 1.0


class _Batcher(MicroBatcher[Item]):
    """:class:`MicroBatcher` that lets the pipeline look at what it buffers."""

    def buffered(self) -> list[Item]:
        """The items of the current partial batch, oldest first (do not mutate)."""
        return self._buf


@dataclass
class RunStats:
    """Counters of one :meth:`Pipeline.run`."""

    records_in: int = 0
    records_valid: int = 0
    dead_lettered: int = 0
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
    on_batch: Callable[[RunStats, PosteriorState], None] | None = None


def fresh_stream(state: PosteriorState) -> PosteriorState:
    """``state`` as the start of a new stream: no offsets, no records, no drift loop.

    An ``--init`` file may be an exported snapshot of another stream; its drift
    loop (reference, calibration, counters) belongs to that stream, so the new
    one anchors its own (the warm start's functional prior is kept).
    """
    return without_loop(state).replace(offsets={}, records_absorbed=0)


def initial_state(
    settings: Settings,
    store: SnapshotStore,
    device: torch.device,
    init_path: Path | None,
    stop: StopFlag,
) -> tuple[PosteriorState, int | None, str]:
    """The state to start from: latest snapshot, else ``init_path``, else a fresh prior.

    Returns ``(state, snapshot version or None, origin)``.  An ``--init`` state
    starts the stream afresh (:func:`fresh_stream`) and takes ``stream.lr``; a
    restored snapshot is used exactly as written.
    """
    try:
        snap = call_with_retry(store.read, stop, what="read_snapshot")
    except SnapshotNotFound:
        snap = None
    if snap is not None:
        state = from_bytes(snap.blob, device)
        return state, snap.meta.version, f"snapshot v{snap.meta.version}"
    path = init_path or settings.stream.init_path
    if path is not None:
        state = load(str(path), device)
        state = fresh_stream(state).replace(lr=settings.stream.lr)
        return state, None, f"init file {path}"
    state = init_state(
        ModelConfig.model_validate({}),
        seed=settings.stream.seed,
        lr=settings.stream.lr,
        device=device,
    )
    return state, None, "fresh prior"


class Pipeline:
    """One daemon: consume, decode, batch, step, snapshot, commit (see the module docstring)."""

    def __init__(
        self, settings: Settings, options: RunOptions | None = None, stop: StopFlag | None = None
    ) -> None:
        self.settings = settings
        self.options = options or RunOptions()
        self.stop = stop if stop is not None else StopFlag()
        self.stats = RunStats()
        self.state: PosteriorState | None = None
        self._pending: collections.deque[list[Item]] = collections.deque()
        self._processed: dict[str, int] = {}
        self._revoked: list[str] = []
        self._dirty = False
        self._batches_since_snapshot = 0
        self._last_snapshot_at = time.monotonic()
        self._store_retry = Retry()
        self._dlq_unflushed = 0
        self._last_lag = -math.inf

    # -- the whole run ----------------------------------------------------------
    def run(self) -> int:
        """Run until stopped, ``max_records`` or ``idle_exit_s``; return the exit status.

        0: clean exit after a final snapshot; 3: the writer lease is held by
        (or was lost to) another daemon; 1: the final snapshot could not be
        written (nothing is lost: the offsets were not committed either).
        """
        s = self.settings
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        device = select_device(s.stream.device)
        metrics.DEVICE_INFO.labels(device=str(device)).set(1)
        store = SnapshotStore.from_settings(s)
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
        finally:
            keeper.release()
            store.close()

    def _run_with_lease(self, store: SnapshotStore, keeper: LeaseKeeper, device: Any) -> int:
        s = self.settings
        state, version, origin = initial_state(s, store, device, self.options.init_path, self.stop)
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
            offsets=state.offsets,
            batching=s.stream.batching,
            batch_size=s.stream.batch_size,
        )
        self.update = make_update_rule(s, state)
        t0 = time.perf_counter()
        warm_up(state, s.stream.batch_size, s.stream.steps_per_batch, s.stream.data_size)
        log.info("svi_warmed_up", seconds=round(time.perf_counter() - t0, 3))
        self.decoder = Decoder(state.config.features())
        count_mode = s.stream.batching == "count"
        self.batcher = _Batcher(s.stream.batch_size, None if count_mode else s.stream.max_wait_ms)
        kwargs = security_kwargs(s.kafka)
        dlq = DeadLetterProducer(s.kafka.bootstrap_servers, dlq_topic=s.kafka.dlq_topic, **kwargs)
        source = KafkaSource(
            s.kafka.bootstrap_servers,
            s.kafka.topic,
            s.kafka.group_id,
            offsets_for=self._offsets_for,
            on_revoked=self._on_revoked,
            session_timeout_ms=s.kafka.session_timeout_ms,
            max_poll_records=s.kafka.max_poll_records,
            **kwargs,
        )
        self.source, self.dlq, self.store, self.keeper = source, dlq, store, keeper
        try:
            code = self._loop()
        finally:
            source.close()
            dlq.close()
        return code

    # -- rebalance callbacks (may run on kafka-python's thread) ------------------
    def _offsets_for(self, keys: list[str]) -> Mapping[str, int]:
        state = self.state
        return state.offsets if state is not None else {}

    def _on_revoked(self, keys: list[str]) -> None:
        self._revoked.extend(keys)

    def _drop_revoked(self) -> None:
        """Forget buffered records of revoked partitions: they are read again after assignment."""
        if not self._revoked:
            return
        revoked = set(self._revoked)
        self._revoked.clear()
        kept = [it for b in self._pending for it in b if it[0] not in revoked]
        kept += [it for it in self.batcher.discard() if it[0] not in revoked]
        self._pending.clear()
        self._pending.extend(self.batcher.add(kept))
        for key in revoked:
            self._processed.pop(key, None)

    # -- the loop -----------------------------------------------------------------
    def _loop(self) -> int:
        s = self.settings
        opts = self.options
        idle_since = time.monotonic()
        while not self.stop:
            self._maintain_lease()
            if self._store_retry.failing and self._store_retry.due():
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
            raws = self.source.poll(max_records=cap, timeout_ms=int(self.batcher.timeout_ms(100)))
            self._drop_revoked()
            now = time.monotonic()
            assigned = bool(self.source.assignment)
            if raws or not assigned:
                idle_since = now  # the idle clock runs only while partitions are assigned
                self._ingest(raws)
            due = self.batcher.poll_due()
            if due:
                self._pending.append(due)
            self._drain()
            self._maybe_update_lag(now)
            if (
                self._dirty
                and s.stream.snapshot_every_seconds > 0
                and now - self._last_snapshot_at >= s.stream.snapshot_every_seconds
                and not self._store_retry.failing
            ):
                self._snapshot("interval")
            if (
                opts.idle_exit_s is not None
                and not raws
                and not self._store_retry.failing
                and now - idle_since >= opts.idle_exit_s
            ):
                self.stats.exit_reason = "idle"
                break
        else:
            self.stats.exit_reason = f"signal {self.stop.signal_name}"
        return self._shutdown()

    def _ingest(self, raws: list[RawRecord]) -> None:
        """Decode a poll's records: bad ones to the DLQ, good ones into the batcher.

        An empty poll changes nothing (in particular it does not make the state
        dirty, so an idle or not-yet-assigned daemon writes no snapshots).
        """
        if not raws:
            return
        topic = self.settings.kafka.topic
        self.stats.records_in += len(raws)
        metrics.RECORDS_IN.labels(topic=topic).inc(len(raws))
        dec = decode_batch(raws, self.decoder)
        for raw, reason, _ in dec.bad:
            self.dlq.send(raw, reason)
            self._dlq_unflushed += 1
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
        last = {(r.topic, r.partition): r.offset for r in raws}
        keys = {tp: partition_key(*tp) for tp in last}
        for tp, offset in last.items():
            self._processed[keys[tp]] = offset + 1
        if dec.good:
            self.stats.records_valid += len(dec.good)
            xs, ys = dec.x, dec.y.tolist()
            items: list[Item] = []
            for row, pos in enumerate(dec.good):
                raw = raws[pos]
                items.append((keys[raw.topic, raw.partition], raw.offset, xs[row], ys[row]))
            self._pending.extend(self.batcher.add(items))
        else:
            self._dirty = True  # only dead letters: the offsets still move on

    def _resume_offsets(self) -> dict[str, int]:
        """Next offsets to read: the first unabsorbed record of each partition.

        A partition with nothing buffered resumes after its last handled record
        (dead letters included: they are flushed before any snapshot).
        """
        assert self.state is not None
        out = {**self.state.offsets, **self._processed}
        need = set(self._processed)
        for items in (*self._pending, self.batcher.buffered()):
            for key, offset, _, _ in items:
                if key in need:
                    out[key] = offset
                    need.discard(key)
                    if not need:
                        return out
        return out

    def _drain(self) -> None:
        """Absorb every complete pending batch (stopping early on a stop request).

        A long backlog (catching up after downtime) can take many seconds here,
        so the lag gauge and the writer lease keep being refreshed between batches.
        """
        while self._pending and not self.stop:
            batch = self._pending.popleft()
            self._absorb(batch)
            self._maybe_update_lag(time.monotonic())
            self._maintain_lease()
            every = self.settings.stream.snapshot_every_batches
            if every and self._batches_since_snapshot >= every and not self._store_retry.failing:
                self._snapshot("batches")

    def _absorb(self, batch: list[Item]) -> None:
        """Commit path step 1: K SVI steps on one batch; advance the state's offsets."""
        assert self.state is not None
        t0 = time.perf_counter()
        x = torch.from_numpy(np.stack([it[2] for it in batch]))
        y = torch.from_numpy(np.asarray([it[3] for it in batch], dtype=np.float32))
        parts = sorted({it[0] for it in batch})
        structlog.contextvars.bind_contextvars(
            topic=self.settings.kafka.topic,
            partition=parts[0].rsplit(":", 1)[1] if len(parts) == 1 else ",".join(parts),
            offset=batch[-1][1],
            snapshot_version=self.stats.last_version,
            regime=drift_mode(self.state),
        )
        # 1. step the posterior
        new, info, signals = self.update(self.state, x, y)
        self.state = new.replace(offsets=self._resume_offsets())
        self._dirty = True
        self._batches_since_snapshot += 1
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

    def _snapshot(self, why: str) -> bool:
        """Commit path steps 2 and 3: snapshot to Redis, then commit offsets to Kafka.

        Returns ``False`` when Redis is unreachable: consumption is then paused
        and the write retried after a backoff (``True`` once it succeeded).
        Raises :class:`LeaseUnavailable` when another daemon owns the model.
        """
        assert self.state is not None
        self.state = self.state.replace(offsets=self._resume_offsets())
        state = self.state
        # 2. write the snapshot (dead letters first, so the offsets never skip one)
        if self._dlq_unflushed:
            self.dlq.flush()
            self._dlq_unflushed = 0
        blob = to_bytes(state)
        t0 = time.perf_counter()
        try:
            lease = self.keeper.ensure()
            try:
                meta = self._write(blob, state, lease)
            except LeaseLost:
                self.keeper.lease = None
                meta = self._write(blob, state, self.keeper.ensure())
        except StoreUnavailable as exc:
            self._store_down(exc, why)
            return False
        elapsed = time.perf_counter() - t0
        self.keeper.last_version = meta.version
        self.stats.last_version = meta.version
        self.stats.snapshots += 1
        self._dirty = False
        self._batches_since_snapshot = 0
        self._last_snapshot_at = time.monotonic()
        metrics.SNAPSHOT_WRITE_SECONDS.observe(elapsed)
        metrics.SNAPSHOT_VERSION.set(meta.version)
        metrics.SNAPSHOT_LAST_WRITE.set(meta.created_at)
        metrics.REDIS_UP.set(1)
        structlog.contextvars.bind_contextvars(snapshot_version=meta.version)
        log.info(
            "snapshot_written",
            snapshot_version=meta.version,
            records_absorbed=state.records_absorbed,
            offsets=state.offsets,
            bytes=len(blob),
            seconds=round(elapsed, 6),
            trigger=why,
        )
        if self._store_retry.failing:
            down = time.monotonic() - (self._store_retry.failing_since or time.monotonic())
            log.info("redis_recovered", down_s=round(down, 3))
            self._store_retry.ok()
            self.source.resume_all()
        # 3. only then commit the offsets to Kafka (lag monitoring only)
        committed: dict[tuple[str, int] | str, int] = {}
        committed.update(state.offsets)
        self.source.commit(committed)
        return True

    def _write(self, blob: bytes, state: PosteriorState, lease: Any) -> Any:
        return self.store.write(
            blob,
            records_absorbed=state.records_absorbed,
            offsets=state.offsets,
            model_config=state.config.model_dump(mode="json"),
            drift=drift_summary(state),
            lease=lease,
            writer=self.keeper.owner,
        )

    def _store_down(self, exc: Exception, op: str) -> None:
        """Redis is unreachable: pause consumption and schedule a retry."""
        first = not self._store_retry.failing
        wait = self._store_retry.failed()
        self.stats.store_failures += 1
        metrics.REDIS_UP.set(0)
        if first:
            self.source.pause_all()
        log.warning(
            "redis_unavailable", op=op, error=str(exc), retry_in_s=round(wait, 3), paused=True
        )

    def _maintain_lease(self) -> None:
        if self._store_retry.failing or not self.keeper.renew_due():
            return
        try:
            self.keeper.renew()
        except StoreUnavailable as exc:
            self._store_down(exc, "renew_lease")

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
            metrics.CONSUMER_LAG.labels(partition=key).set(value)

    def _shutdown(self) -> int:
        """Absorb what is complete, write the final snapshot, commit, and report."""
        signalled = bool(self.stop)
        if not signalled:
            # max_records / idle exit: absorb everything read; a partial batch only
            # in size_or_time mode (count mode keeps boundaries a pure function of
            # the record sequence; the partial batch is read again after a restart).
            if not self.batcher.count_based:
                rest = self.batcher.flush()
                if rest:
                    self._pending.append(rest)
            while self._pending:
                self._absorb(self._pending.popleft())
        deadline = time.monotonic() + SHUTDOWN_RETRY_S
        while True:
            if self._snapshot("shutdown"):
                break
            if self._store_retry.next_at > deadline:
                log.error(
                    "final_snapshot_failed",
                    reason="redis unreachable",
                    records_absorbed=self.state.records_absorbed if self.state else None,
                )
                return 1
            time.sleep(max(0.0, self._store_retry.next_at - time.monotonic()))
        assert self.state is not None
        log.info(
            "daemon_stopped",
            reason=self.stats.exit_reason,
            records_in=self.stats.records_in,
            records_absorbed=self.state.records_absorbed,
            dead_lettered=self.stats.dead_lettered,
            snapshot_version=self.stats.last_version,
            offsets=self.state.offsets,
        )
        return 0
