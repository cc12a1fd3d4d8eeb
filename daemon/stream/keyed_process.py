"""Keyed mode's consumer in a child process: Kafka's fetch and unpacking beside the key step.

In keyed mode the parent's time per poll is the batched key step, JSON
decoding and kafka-python's fetch, record unpacking and CRC check, all
under one GIL.  :class:`KeyedProcessSource` moves the consumer -- and with it
the group membership -- into a child interpreter, as
:class:`~fogline.daemon.stream.process_source.ProcessSource` does for the
single-model daemon (same pipe, start-up, log forwarding and death handling;
see that module), so the next poll is fetched while this one is stepped.

What differs from the single-model child (:func:`keyed_serve`):

1. **Rebalance events travel in order.**  kafka-python runs the rebalance
   callbacks on its own threads; the child queues each as
   ``("assigned" | "revoked", partitions)`` under a lock, and every reply
   carries the events since the last reply, oldest first.  The parent hands
   them, in that order, to ``on_assigned`` / ``on_revoked`` (the pipeline's
   callbacks, which only queue them) *before* the reply's records are
   returned, so a poll's records are seen after the rebalances that happened
   during it -- exactly as with the consumer in-process.  Assigned
   partitions start at the earliest offset, unsought: the pipeline takes
   the partition's lease first, then pauses, seeks (``seek_checked``) and
   resumes it through requests.
2. **Offset findings travel with the replies.**  After every request the
   child collects ``KafkaSource.out_of_range()`` (a sought offset beyond the
   partition's end, a fingerprint mismatch; found during polls) and the
   reply carries them; :meth:`KeyedProcessSource.out_of_range` returns what
   has arrived without a round trip.  Records of such a partition are
   withheld by the consumer, so a finding that arrives one poll later lets
   nothing wrong through.
3. **Decoding in the child** (``decode``): the child
   decodes each poll's records with the parent's decoder (pickled at the
   start) and the reply carries the raw records *and* their
   :class:`~fogline.daemon.stream.decode.DecodedBatch`, so the parent's
   share is batching, the key step and checkpoints.  The parent still gets
   every raw record: bad ones go to the dead-letter topic from it, and a
   checkpoint fingerprints the record before its offset.  A poll that has
   records the pipeline does not take (a partition not owned, or claimed
   while the poll ran ahead) is decoded again in the parent from the raw
   records it keeps.  Autoregressive models decode in the child too, with
   a copy of the parent's :class:`~fogline.daemon.stream.series_decode.SeriesDecoder`
   that numbers keys on its own; the parent re-numbers each batch's key
   column with its own ids (``SeriesDecoder.adopt``).

Every other call (``assignment``, ``pause``, ``resume``, ``seek``,
``seek_checked``, ``reset``, ``commit``, ``partition_count``, ``close``) is
one request and its reply, sent after the poll in flight has replied (that
poll's reply is held for the next :meth:`~ProcessSource.take`): the consumer
sees the calls in the pipeline's order, so the commit path (checkpoint
written, *then* offsets committed) and the claim (lease, pause, seek,
resume) keep their order.  A poll that ran ahead is *not read* until the
pipeline ingests it: a checkpoint meanwhile resumes before it, and a stop or
crash drops it (the next owner reads those records).

A child that dies raises :class:`~fogline.daemon.stream.process_source.SourceProcessDied`
at the parent's next call; the keyed daemon then releases its leases
without a final checkpoint and exits 6 (the partitions' next owners, or a
restart, resume from the last checkpoints).  A parent that dies (kill -9)
closes the pipe: the child leaves the group and exits, so the partitions
move on without waiting out the session timeout.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from fogline.daemon.stream.batching import TopicPartition
from fogline.daemon.stream.decode import DecodedBatch, RawRecord
from fogline.daemon.stream.prefetch import Polled
from fogline.daemon.stream.process_source import (
    ChildSourceFactory,
    ProcessSource,
    _forward_logs,
    _portable,
    answer_requests,
)
from fogline.daemon.stream.source import OutOfRange
from fogline.models.fingerprint import RecordFingerprint

#: A rebalance event: ``("assigned" | "revoked", [(topic, partition), ...])``.
Event = tuple[str, list[TopicPartition]]

#: Requests other than ``poll`` and ``assignment`` that the keyed child serves by name.
KEYED_CALLS = frozenset(
    {
        "seek",
        "seek_checked",
        "reset",
        "commit",
        "pause",
        "resume",
        "pause_all",
        "resume_all",
        "partition_count",
        "lag",
        "close",
    }
)


# -- the child --------------------------------------------------------------------
@dataclass(frozen=True)
class KeyedChild:
    """What the child is built from: the consumer's factory and, optionally, the decoder.

    Called like the factory it wraps (a
    :data:`~fogline.daemon.stream.process_source.ChildSourceFactory`); both must pickle.
    """

    source: ChildSourceFactory
    decode: Callable[[list[RawRecord]], DecodedBatch] | None = None

    def __call__(
        self,
        offsets_for: Callable[[list[TopicPartition]], Mapping[TopicPartition, int]],
        on_revoked: Callable[[list[TopicPartition]], None],
        fingerprints_for: Callable[
            [list[TopicPartition]], Mapping[TopicPartition, RecordFingerprint]
        ],
    ) -> Any:
        return self.source(offsets_for, on_revoked, fingerprints_for)


class _KeyedEvents:
    """Rebalance events of the child's consumer since the last reply, in the order they happened."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[Event] = []
        #: Log records to re-emit in the parent (filled by the log collector).
        self.logs: list[tuple[Any, ...]] = []

    def offsets_for(self, keys: list[TopicPartition]) -> Mapping[TopicPartition, int]:
        """Queue an assignment; the partitions start at the earliest offset until claimed."""
        with self._lock:
            self._events.append(("assigned", list(keys)))
        return {}

    def fingerprints_for(
        self, keys: list[TopicPartition]
    ) -> Mapping[TopicPartition, RecordFingerprint]:
        return {}

    def on_revoked(self, keys: list[TopicPartition]) -> None:
        with self._lock:
            self._events.append(("revoked", list(keys)))

    def take(self) -> tuple[list[Event], list[tuple[Any, ...]]]:
        """The events and log records since the last call (then cleared)."""
        with self._lock:
            events, self._events = self._events, []
        records = list(self.logs)
        del self.logs[: len(records)]  # the same list: the log collector appends to it
        return events, records


def keyed_serve(
    conn: Connection, factory: ChildSourceFactory, log_config: tuple[str, str] | None
) -> None:
    """The keyed child's loop: build the consumer, then answer requests until ``close`` or EOF.

    Replies are ``(status, value, events, out_of_range, logs)``: ``status``
    ``"ok"`` or ``"error"`` (``value`` then ``(exception, child traceback)``),
    ``events`` the rebalance events since the last reply in order,
    ``out_of_range`` the consumer's findings since the last reply.  A poll's
    ``value`` is ``(raw records, DecodedBatch or None)`` (``None``: no
    ``decode`` in ``factory``, or no records).  The first reply answers the
    start itself (the consumer built, or why not).
    """
    decode = getattr(factory, "decode", None)
    events = _KeyedEvents()
    _forward_logs(log_config, events.logs)
    try:
        source: Any = factory(events.offsets_for, events.on_revoked, events.fingerprints_for)
    except BaseException as exc:
        conn.send(("error", (_portable(exc), traceback.format_exc()), *_extras(events, None)))
        return
    conn.send(("ok", None, *_extras(events, source)))

    def handle(op: str, args: tuple[Any, ...]) -> Any:
        if op == "poll":
            max_records, timeout_ms = args
            raws = source.poll(max_records=max_records, timeout_ms=timeout_ms)
            return (raws, decode(raws) if decode is not None and raws else None)
        if op == "assignment":
            return source.assignment
        if op in KEYED_CALLS:
            return getattr(source, op)(*args)
        raise ValueError(f"unknown request {op!r}")

    answer_requests(conn, source, handle, lambda: _extras(events, source))


def _extras(events: _KeyedEvents, source: Any) -> tuple[Any, ...]:
    """A reply's tail: ``(events, out_of_range findings, log records)``."""
    found = list(source.out_of_range()) if source is not None else []
    evs, records = events.take()
    return evs, found, records


# -- the parent -------------------------------------------------------------------
def _no_decode(raws: list[RawRecord]) -> DecodedBatch:  # pragma: no cover - never called
    raise AssertionError("a keyed poll is decoded in the child or by the pipeline")


class KeyedProcessSource(ProcessSource):
    """Keyed mode's consumer in a child process (a ``keyed.KeyedSource``).

    ``start``/``take``/``quiesce``/``in_flight`` as
    :class:`~fogline.daemon.stream.process_source.ProcessSource`; :meth:`take`
    returns the raw records and, with ``decode``, their decoding
    (``Polled.decoded``; else ``None``).

    Parameters
    ----------
    factory:
        Builds the consumer in the child from its three callbacks (must
        pickle, e.g. ``functools.partial(source.kafka_source, settings)``).
    decode:
        ``raws -> DecodedBatch``, run in the child on each poll's records
        (must pickle, e.g. ``functools.partial(decode_batch, features=decoder)``);
        ``None``: the pipeline decodes.
    on_assigned, on_revoked:
        Told, in the order they happened and before the records of the reply
        that reports them, which partitions the child's consumer was assigned
        and which it lost.
    log_config:
        ``(format, level)`` for the child's logs (default: this process's).
    """

    server = staticmethod(keyed_serve)

    def __init__(
        self,
        factory: ChildSourceFactory,
        *,
        decode: Callable[[list[RawRecord]], DecodedBatch] | None = None,
        on_assigned: Callable[[list[TopicPartition]], object],
        on_revoked: Callable[[list[TopicPartition]], None],
        log_config: tuple[str, str] | None = None,
    ) -> None:
        self._on_assigned = on_assigned
        #: Offset findings arrived with replies, not yet asked for.
        self._found: list[OutOfRange] = []
        super().__init__(
            KeyedChild(factory, decode),
            _no_decode,
            offsets=dict,
            fingerprints=dict,
            on_revoked=on_revoked,
            log_config=log_config,
        )

    # -- replies --------------------------------------------------------------
    def _events(  # type: ignore[override]
        self, events: list[Event], found: list[OutOfRange]
    ) -> None:
        """Hand a reply's rebalance events over in order; keep its offset findings."""
        for kind, keys in events:
            if kind == "assigned":
                self._on_assigned(list(keys))
            else:
                self._on_revoked(list(keys))
        self._found.extend(found)

    def _poll_state(self) -> tuple[Any, ...]:
        return ()  # keyed partitions are sought by requests once their lease is held

    def _polled(self, value: Any) -> Polled:
        raws, decoded = value
        return Polled(raws, decoded)

    # -- the keyed consumer calls -------------------------------------------------
    def out_of_range(self) -> list[OutOfRange]:
        """Offset findings that arrived with the replies so far (then cleared); no round trip."""
        found, self._found = self._found, []
        return found

    def pause(self, keys: Iterable[TopicPartition]) -> None:
        """Stop fetching from the assigned ones among ``keys`` (none before the child is up)."""
        keys = list(keys)
        if keys and self.ready():
            self._call("pause", keys)

    def resume(self, keys: Iterable[TopicPartition]) -> None:
        """Fetch again from the assigned ones among ``keys``."""
        keys = list(keys)
        if keys and self.ready():
            self._call("resume", keys)

    def seek_checked(
        self,
        offsets: Mapping[TopicPartition, int],
        prints: Mapping[TopicPartition, RecordFingerprint],
    ) -> None:
        """Seek with the assignment's end and fingerprint checks (``KafkaSource.seek_checked``)."""
        self._call("seek_checked", dict(offsets), dict(prints))

    def partition_count(self, topic: str | None = None) -> int | None:
        """Partitions of ``topic`` in the child's cluster metadata (``None`` while unknown)."""
        if not self.ready():
            return None
        count = self._call("partition_count", topic)
        return None if count is None else int(count)
