"""Every Kafka client of fogline: the consumer, the dead-letter and replay producers.

This is the only module that imports ``kafka`` (kafka-python >= 3).  It hands
the rest of the daemon plain :class:`~fogline.daemon.stream.decode.RawRecord` tuples and
takes plain ``{(topic, partition): next_offset}`` mappings, so nothing else
needs to know kafka-python's types.

Offsets
-------
An offset mapping always holds the **next offset to read** (last absorbed
offset + 1), keyed by ``(topic, partition)`` tuples -- the same convention as
``PosteriorState.offsets`` (kafka-python's ``TopicPartition`` is such a tuple).
The posterior snapshot is the source of truth for where to resume; offsets
committed to Kafka only feed lag monitoring.

Out-of-range offsets
--------------------
After a broker restarted empty or a topic was recreated, the snapshot's
offsets can lie beyond a partition's end; Tansu then answers fetches with no
records and no error, so the daemon would stall silently.  On every
assignment :class:`KafkaSource` remembers the offsets it sought to and, once a
fetch response told it the partition's high-water mark
(:meth:`kafka.KafkaConsumer.highwater`), reports each sought offset above it
as an :class:`OutOfRange` (:meth:`KafkaSource.out_of_range`).  The caller
decides what to do (``stream.offset_out_of_range``); :meth:`KafkaSource.reset`
moves a partition to its earliest or latest offset.

Recreated topics
----------------
A recreated topic at least as long as the snapshot's offset passes that range
check, and the daemon would silently skip its first records.  So the snapshot
also carries, per partition, the fingerprint of the record just before its
offset (:class:`~fogline.models.state.RecordFingerprint`: offset and sha256 of
key, value and timestamp).  On assignment :class:`KafkaSource` seeks such a
partition to that record's offset instead; the first fetch that returns data
for it is checked before :meth:`KafkaSource.poll` hands anything of the
partition out: the fingerprinted record must come first and be unchanged.  It
is then withheld with anything else before the resume offset, so the stream
goes on at the resume offset with no second seek.  A different record
(``cause="fingerprint_mismatch"``) or a first record at another offset -- the
record is gone (``cause="record_gone"``) -- is reported by
:meth:`KafkaSource.out_of_range` like an offset beyond the end
(``cause="beyond_end"``), and the partition's records are withheld.  A
snapshot without fingerprints (written before they existed) is not checked
(``fingerprint_check_skipped``).

Tansu gaps avoided here (see ``docs/kafka.md``)
----------------------------------------------
- ``end_offsets()`` / ``seek_to_end()`` return wrong values: lag uses
  :meth:`kafka.KafkaConsumer.highwater`, learnt from fetch responses.
- ``offsets_for_times()`` is wrong: never used.
- commit metadata is dropped: nothing is stored in it.
- group joins are slow (about half of ``session_timeout_ms``): tests use
  ``session_timeout_ms`` of about 6000.

Security settings (``security_protocol``, ``sasl_mechanism``,
``sasl_plain_username``, ``sasl_plain_password``, ``ssl_*``) and any other
kafka-python setting pass through each constructor's ``**client_kwargs``.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import structlog
from kafka import (
    ConsumerRebalanceListener,
    KafkaAdminClient,
    KafkaConsumer,
    KafkaProducer,
    OffsetAndMetadata,
    TopicPartition,
)
from kafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAlreadyExistsError,
)

from fogline.daemon.names import dlq_topic_for
from fogline.daemon.stream.decode import RawRecord, partition_key
from fogline.models.fingerprint import RecordFingerprint

if TYPE_CHECKING:
    from fogline.daemon.config import Settings

log = structlog.get_logger(__name__)

#: ``(topic, partition)``: the key of every offset mapping.
TP = tuple[str, int]

#: Header names of a dead-lettered record (values are UTF-8 bytes).
DLQ_REASON = "fogline-reason"
DLQ_SOURCE_TOPIC = "fogline-source-topic"
DLQ_SOURCE_PARTITION = "fogline-source-partition"
DLQ_SOURCE_OFFSET = "fogline-source-offset"
#: Longest reason kept in the header (bytes of UTF-8); longer ones are cut.
DLQ_REASON_MAX_BYTES = 1000
#: Headers of a dead letter whose value had to be cut to fit the broker's limit:
#: ``fogline-truncated`` is ``b"1"``, the others the original value's length and sha256 (hex).
DLQ_TRUNCATED = "fogline-truncated"
DLQ_ORIGINAL_SIZE = "fogline-original-size"
DLQ_ORIGINAL_SHA256 = "fogline-original-sha256"
#: Default largest dead-letter request: Kafka's default ``message.max.bytes`` and
#: kafka-python's ``max_request_size`` (Tansu answers no DescribeConfigs, so it is a setting).
DLQ_MAX_REQUEST_BYTES = 1_048_576
#: Bytes left for the record batch framing, key and headers when a value is cut.
DLQ_FRAMING_BYTES = 4096
#: Value budget of the second attempt when the broker refused a cut copy as too large.
DLQ_FALLBACK_VALUE_BYTES = 64 * 1024

#: ``offsets_for([(topic, partition), ...]) -> {(topic, partition): next_offset}``.
OffsetsCallback = Callable[[list[TP]], Mapping[TP, int]]
#: ``fingerprints_for([(topic, partition), ...]) -> {(topic, partition): fingerprint}``.
FingerprintsCallback = Callable[[list[TP]], Mapping[TP, RecordFingerprint]]

#: Causes of an :class:`OutOfRange`.
BEYOND_END = "beyond_end"
FINGERPRINT_MISMATCH = "fingerprint_mismatch"
RECORD_GONE = "record_gone"


class OutOfRange(NamedTuple):
    """A sought offset the partition cannot resume from.

    ``cause``: ``"beyond_end"`` (above the high-water mark, the next offset to
    be written), ``"fingerprint_mismatch"`` (the record before it is another
    one) or ``"record_gone"`` (the record before it is no longer there).
    """

    key: TP
    offset: int
    high_watermark: int
    cause: str = BEYOND_END


def _tp_key(tp: TopicPartition) -> TP:
    return (tp.topic, tp.partition)


def _tp(key: TP) -> TopicPartition:
    return TopicPartition(key[0], int(key[1]))


def _spelt(keys: Iterable[TP]) -> list[str]:
    """``"topic:partition"`` spellings, for logs (JSON keys and values)."""
    return [partition_key(*k) for k in sorted(keys)]


def _to_raw(rec: Any) -> RawRecord:
    hs = rec.headers
    headers = tuple((k, bytes(v) if v is not None else b"") for k, v in hs) if hs else ()
    return RawRecord(
        rec.topic, rec.partition, rec.offset, rec.key, rec.value, rec.timestamp, headers
    )


def security_kwargs(kafka: Any) -> dict[str, Any]:
    """kafka-python security settings from a ``KafkaSettings``-like object.

    Reads ``security_protocol``, ``sasl_mechanism``, ``sasl_username`` and
    ``sasl_password`` (a ``SecretStr`` or plain string) when present, and
    returns only what differs from kafka-python's defaults.
    """
    out: dict[str, Any] = {}
    proto = getattr(kafka, "security_protocol", None)
    if proto and proto != "PLAINTEXT":
        out["security_protocol"] = proto
    mech = getattr(kafka, "sasl_mechanism", None)
    if mech:
        out["sasl_mechanism"] = mech
    user = getattr(kafka, "sasl_username", None)
    if user is not None:
        out["sasl_plain_username"] = user
    pw = getattr(kafka, "sasl_password", None)
    if pw is not None:
        out["sasl_plain_password"] = (
            pw.get_secret_value() if hasattr(pw, "get_secret_value") else str(pw)
        )
    return out


# --------------------------------------------------------------------------
# admin helpers
# --------------------------------------------------------------------------


def wait_for_broker(bootstrap_servers: str, timeout_ms: int = 5000, **client_kwargs: Any) -> bool:
    """True when a kafka-python client bootstraps against ``bootstrap_servers`` in time."""
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap_servers,
            bootstrap_timeout_ms=timeout_ms,
            request_timeout_ms=max(timeout_ms, 1000),
            **client_kwargs,
        )
    except (KafkaError, OSError, ValueError):
        return False
    try:
        admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()


def create_topic(
    bootstrap_servers: str,
    name: str,
    partitions: int = 1,
    *,
    exist_ok: bool = True,
    timeout_ms: int = 10000,
    **client_kwargs: Any,
) -> None:
    """Create topic ``name`` with ``partitions`` partitions (replication factor 1).

    Blocks until the topic is visible in metadata with a leader for every
    partition.  An existing topic is fine when ``exist_ok`` (its partition
    count is not checked: Tansu cannot add partitions anyway).
    """
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap_servers, bootstrap_timeout_ms=timeout_ms, **client_kwargs
    )
    try:
        admin.create_topics(
            {name: {"num_partitions": partitions, "replication_factor": 1}},
            timeout_ms=timeout_ms,
            wait_for_metadata=True,
        )
    except TopicAlreadyExistsError:
        if not exist_ok:
            raise
    finally:
        admin.close()


def list_topics(bootstrap_servers: str, **client_kwargs: Any) -> list[str]:
    """Names of the topics on the cluster."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, **client_kwargs)
    try:
        return sorted(admin.list_topics())
    finally:
        admin.close()


def _reader(bootstrap_servers: str, client_kwargs: dict[str, Any]) -> KafkaConsumer:
    """A consumer without a group that reads from the earliest offset (no commits)."""
    return KafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        bootstrap_timeout_ms=10000,
        **client_kwargs,
    )


def _assign_from_beginning(
    consumer: KafkaConsumer, topic: str, deadline: float
) -> list[TopicPartition]:
    """Wait (until ``deadline``) for ``topic``'s partitions, assign them all, seek to the start."""
    parts = consumer.partitions_for_topic(topic) or set()
    while not parts and time.monotonic() < deadline:
        time.sleep(0.1)
        parts = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    if tps:
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
    return tps


def read_topic(
    bootstrap_servers: str,
    topic: str,
    *,
    timeout_s: float = 15.0,
    min_records: int = 0,
    **client_kwargs: Any,
) -> list[RawRecord]:
    """Every record of ``topic`` from the beginning, for tests and DLQ inspection.

    Reads without a consumer group until each partition's position reaches its
    high-water mark (learnt from fetch responses) and at least ``min_records``
    records were read, or ``timeout_s`` passes.  Records come partition by
    partition in offset order.
    """
    consumer = _reader(bootstrap_servers, client_kwargs)
    try:
        deadline = time.monotonic() + timeout_s
        tps = _assign_from_beginning(consumer, topic, deadline)
        if not tps:
            return []
        out: dict[TopicPartition, list[RawRecord]] = {tp: [] for tp in tps}
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200, max_records=10000)
            for tp, recs in batch.items():
                out[tp].extend(_to_raw(r) for r in recs)
            done = all(
                (hw := consumer.highwater(tp)) is not None
                and (out[tp][-1].offset + 1 if out[tp] else 0) >= hw
                for tp in tps
            )
            if done and sum(len(v) for v in out.values()) >= min_records:
                break
        return [r for tp in tps for r in out[tp]]
    finally:
        consumer.close(autocommit=False)


def read_history(
    bootstrap_servers: str,
    topic: str,
    *,
    until_ts_ms: int | None = None,
    until_offset: int | None = None,
    max_records: int = 5_000_000,
    timeout_s: float = 60.0,
    **client_kwargs: Any,
) -> list[RawRecord]:
    """A topic's retained history for a warm start: bounded, without a consumer group.

    Reads every partition from its beginning until its position reaches the
    high-water mark the fetch responses report, keeping records with
    ``offset < until_offset`` and, when
    ``until_ts_ms`` is set, Kafka timestamp ``<= until_ts_ms`` (a partition
    stops at its first later record: timestamps are taken as non-decreasing
    per partition).  Stops at ``max_records`` in all or after ``timeout_s``;
    records come partition by partition in offset order.
    """
    consumer = _reader(bootstrap_servers, client_kwargs)
    try:
        deadline = time.monotonic() + timeout_s
        tps = _assign_from_beginning(consumer, topic, deadline)
        if not tps:
            return []
        limit = until_offset if until_offset is not None else 2**63
        out: dict[TopicPartition, list[RawRecord]] = {tp: [] for tp in tps}
        open_ = set(tps)
        total = 0
        while open_ and total < max_records and time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200, max_records=10000)
            for tp, recs in batch.items():
                for r in recs:
                    if tp not in open_ or total >= max_records:
                        break
                    late = until_ts_ms is not None and r.timestamp > until_ts_ms
                    if r.offset >= limit or late:
                        open_.discard(tp)
                        break
                    out[tp].append(_to_raw(r))
                    total += 1
            # the high-water mark as the latest fetch response tells it (Tansu's
            # ListOffsets can lag right after a produce)
            for tp in list(open_):
                hw = consumer.highwater(tp)
                pos = out[tp][-1].offset + 1 if out[tp] else consumer.position(tp)
                if pos >= limit or (hw is not None and pos >= hw):
                    open_.discard(tp)
        return [r for tp in tps for r in out[tp]]
    finally:
        consumer.close(autocommit=False)


# --------------------------------------------------------------------------
# the consumer
# --------------------------------------------------------------------------


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Seeks newly assigned partitions to the caller's offsets (default: earliest)."""

    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    def on_partitions_revoked(self, revoked: Any) -> None:
        self._source._on_revoked(list(revoked))

    def on_partitions_lost(self, lost: Any) -> None:
        self._source._on_revoked(list(lost))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self._source._on_assigned(list(assigned))


class KafkaSource:
    """A consumer-group member that reads raw records from ``topics``.

    - Offsets are never auto-committed (``enable_auto_commit=False``).
    - On every assignment each assigned partition is sought to the offset
      that ``offsets_for`` returns for it (the snapshot's next offsets);
      partitions it does not name -- or all, when it is ``None`` -- start at
      the earliest offset.  Kafka's committed offsets are ignored.  A sought
      offset beyond the partition's end is reported by :meth:`out_of_range`.
    - A partition that ``fingerprints_for`` names a fingerprint for is
      first sought to the fingerprinted record, which the first fetch
      verifies (see *Recreated topics* in the module docstring).
    - ``offsets_for``, ``fingerprints_for`` and ``on_revoked`` run inside kafka-python's poll during a
      rebalance: keep them quick, non-blocking and thread-safe (e.g. read an
      immutable offsets dict that the pipeline replaces).  ``on_revoked``
      tells the caller to drop buffered, unabsorbed records of the revoked
      partitions, since they will be read again from the offsets
      ``offsets_for`` gives on the next assignment.
    - After :meth:`pause_all`, partitions assigned later are paused too until
      :meth:`resume_all`; keep calling :meth:`poll` while paused so the
      member stays in the group.

    Parameters
    ----------
    bootstrap_servers:
        ``host:port[,host:port...]``.
    topics:
        One topic or several.
    group_id:
        Consumer group.
    offsets_for:
        Callback giving the next offset to read per ``(topic, partition)``.
    fingerprints_for:
        Callback giving the fingerprint of the record before that offset
        (the snapshot's), where known.
    on_revoked:
        Callback told which ``(topic, partition)`` keys were revoked or lost.
    session_timeout_ms:
        Group session timeout; Tansu's join takes about half of it.
    max_poll_interval_ms:
        Kafka's ``max.poll.interval.ms``, also the group's rebalance timeout: a
        member that dies during a rebalance holds the next join this long.
    client_kwargs:
        Passed to :class:`kafka.KafkaConsumer` (security settings etc.).
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topics: str | Sequence[str],
        group_id: str,
        *,
        offsets_for: OffsetsCallback | None = None,
        on_revoked: Callable[[list[TP]], None] | None = None,
        fingerprints_for: FingerprintsCallback | None = None,
        session_timeout_ms: int = 10000,
        max_poll_records: int = 1000,
        max_poll_interval_ms: int = 300_000,
        client_id: str | None = None,
        **client_kwargs: Any,
    ) -> None:
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.group_id = group_id
        self._offsets_for = offsets_for
        self._fingerprints_for = fingerprints_for
        self._on_revoked_cb = on_revoked
        self._paused = False
        self._assigned: frozenset[TopicPartition] = frozenset()
        #: Offsets sought at assignment whose range is not checked yet (no high-water mark).
        self._unchecked: dict[TopicPartition, int] = {}
        self._out_of_range: list[OutOfRange] = []
        #: Partitions sought to a fingerprinted record not yet fetched: (resume offset, print).
        self._verifying: dict[TopicPartition, tuple[int, RecordFingerprint]] = {}
        self.rebalances = 0
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            group_id=group_id,
            client_id=client_id or f"fogline-{uuid.uuid4().hex[:8]}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(100, session_timeout_ms // 3),
            max_poll_records=max_poll_records,
            max_poll_interval_ms=max_poll_interval_ms,
            bootstrap_timeout_ms=client_kwargs.pop("bootstrap_timeout_ms", 10000),
            **client_kwargs,
        )
        self._consumer.subscribe(self.topics, listener=_Listener(self))

    # -- rebalance callbacks ------------------------------------------------
    def _on_assigned(self, tps: list[TopicPartition]) -> None:
        self.rebalances += 1
        self._assigned = frozenset(tps)
        keys = [_tp_key(tp) for tp in tps]
        wanted: Mapping[TP, int] = self._offsets_for(keys) if self._offsets_for else {}
        prints: Mapping[TP, RecordFingerprint] = (
            self._fingerprints_for(keys) if self._fingerprints_for else {}
        )
        earliest = []
        unchecked: dict[TopicPartition, int] = {}
        verifying: dict[TopicPartition, tuple[int, RecordFingerprint]] = {}
        unprinted = []
        for tp, key in zip(tps, keys, strict=True):
            off = wanted.get(key)
            if off is None:
                earliest.append(tp)
                continue
            fp = prints.get(key)
            if fp is not None and 0 <= fp.offset < int(off):
                self._consumer.seek(tp, fp.offset)  # read the record before first
                verifying[tp] = (int(off), fp)
            else:
                self._consumer.seek(tp, int(off))
                if int(off) > 0:
                    unprinted.append(key)
            unchecked[tp] = int(off)
        self._unchecked = unchecked
        self._verifying = verifying
        if earliest:
            self._consumer.seek_to_beginning(*earliest)
        if self._paused and tps:
            self._consumer.pause(*tps)
        log.info(
            "partitions_assigned",
            partitions=_spelt(keys),
            offsets={partition_key(*k): v for k, v in sorted(wanted.items()) if k in keys},
            verifying=_spelt(_tp_key(tp) for tp in verifying),
        )
        if unprinted:
            log.info(
                "fingerprint_check_skipped",
                partitions=_spelt(unprinted),
                reason="the snapshot has no fingerprint for the record before the offset",
            )

    def _on_revoked(self, tps: list[TopicPartition]) -> None:
        keys = [_tp_key(tp) for tp in tps]
        self._assigned = self._assigned - frozenset(tps)
        for tp in tps:
            self._unchecked.pop(tp, None)
            self._verifying.pop(tp, None)
        if self._on_revoked_cb is not None and keys:
            self._on_revoked_cb(keys)
        if keys:
            log.info("partitions_revoked", partitions=_spelt(keys))

    def _check_ranges(self) -> None:
        """Compare offsets sought at assignment with high-water marks learnt since."""
        if not self._unchecked:
            return
        for tp, off in list(self._unchecked.items()):
            hw = self._consumer.highwater(tp)
            if hw is None:
                continue  # no fetch answered yet
            del self._unchecked[tp]
            if off > int(hw):
                self._verifying.pop(tp, None)  # nothing to verify: the offset is gone
                self._out_of_range.append(OutOfRange(_tp_key(tp), off, int(hw)))

    def _verify(self, batches: dict[Any, list[Any]]) -> dict[Any, list[Any]]:
        """Check the fingerprinted first record of each verifying partition in ``batches``.

        Returns ``batches`` with, per checked partition, the records before its
        resume offset withheld (all of them on a mismatch, which is reported).
        """
        out = {}
        for tp, recs in batches.items():
            pending = self._verifying.pop(tp, None)
            if pending is None or not recs:
                if pending is not None:
                    self._verifying[tp] = pending
                out[tp] = recs
                continue
            resume, fp = pending
            first = recs[0]
            seen = RecordFingerprint.of(first.offset, first.key, first.value, first.timestamp)
            if seen == fp:
                log.info(
                    "fingerprint_verified",
                    partition=partition_key(*_tp_key(tp)),
                    offset=fp.offset,
                    resume_offset=resume,
                )
                out[tp] = [r for r in recs if r.offset >= resume]
                continue
            cause = FINGERPRINT_MISMATCH if first.offset == fp.offset else RECORD_GONE
            hw = self._consumer.highwater(tp)
            self._unchecked.pop(tp, None)
            self._out_of_range.append(
                OutOfRange(_tp_key(tp), resume, int(hw) if hw is not None else -1, cause)
            )
            log.warning(
                "fingerprint_mismatch",
                partition=partition_key(*_tp_key(tp)),
                expected_offset=fp.offset,
                found_offset=first.offset,
                cause=cause,
            )
        return out

    # -- public API ---------------------------------------------------------
    @property
    def assignment(self) -> list[TP]:
        """Assigned partitions as sorted ``(topic, partition)`` keys."""
        return sorted(_tp_key(tp) for tp in self._consumer.assignment())

    @property
    def paused(self) -> bool:
        """True between :meth:`pause_all` and :meth:`resume_all`."""
        return self._paused

    def poll(self, max_records: int | None = None, timeout_ms: int = 100) -> list[RawRecord]:
        """Up to ``max_records`` raw records (partition order kept), waiting up to ``timeout_ms``.

        Joins the group on the first calls (which therefore may return
        nothing for a few seconds).  Returns ``[]`` while paused.
        """
        batches = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        if self._verifying:
            batches = self._verify(batches)
        out: list[RawRecord] = []
        for recs in batches.values():
            out.extend(_to_raw(r) for r in recs)
        self._check_ranges()
        return out

    def out_of_range(self) -> list[OutOfRange]:
        """Sought offsets found unusable since the last call (then cleared).

        A partition is checked once per assignment: beyond its end after the
        first fetch response that carries its high-water mark, its fingerprint
        on the first fetch that returns its records.
        """
        found, self._out_of_range = self._out_of_range, []
        return found

    def seek_checked(
        self, offsets: Mapping[TP, int], prints: Mapping[TP, RecordFingerprint]
    ) -> None:
        """Seek assigned partitions to resume offsets *with* the checks of an assignment.

        For keyed mode, which seeks a partition only once it holds its lease
        (after the assignment): each offset is checked against the partition's
        high-water mark, and a partition with a fingerprint in ``prints`` is
        first sought to that record and verified, exactly as
        ``offsets_for``/``fingerprints_for`` are on assignment; problems come
        out of :meth:`out_of_range`.
        """
        assigned = self._consumer.assignment()
        unprinted = []
        for key, off in offsets.items():
            tp = _tp(key)
            if tp not in assigned:
                continue
            fp = prints.get(key)
            self._verifying.pop(tp, None)
            if fp is not None and 0 <= fp.offset < int(off):
                self._consumer.seek(tp, fp.offset)  # read the record before first
                self._verifying[tp] = (int(off), fp)
            else:
                self._consumer.seek(tp, int(off))
                if int(off) > 0:
                    unprinted.append(key)
            self._unchecked[tp] = int(off)
        if unprinted:
            log.info(
                "fingerprint_check_skipped",
                partitions=_spelt(unprinted),
                reason="the snapshot has no fingerprint for the record before the offset",
            )

    def reset(self, key: TP, to: str, high_watermark: int | None = None) -> None:
        """Move ``key`` to its ``"earliest"`` offset, or ``"latest"`` (``high_watermark``)."""
        tp = _tp(key)
        if to == "earliest":
            self._consumer.seek_to_beginning(tp)
        elif to == "latest":
            if high_watermark is None:
                raise ValueError("reset to 'latest' needs the high-water mark")
            # seek_to_end() is wrong on Tansu: seek to the mark learnt from a fetch
            self._consumer.seek(tp, int(high_watermark))
        else:
            raise ValueError(f"reset to {to!r}: expected 'earliest' or 'latest'")

    def pause_all(self) -> None:
        """Stop fetching from every assigned (and later assigned) partition."""
        self._paused = True
        tps = self._consumer.assignment()
        if tps:
            self._consumer.pause(*tps)
        log.info("consumption_paused", partitions=_spelt(_tp_key(tp) for tp in tps))

    def resume_all(self) -> None:
        """Undo :meth:`pause_all`."""
        self._paused = False
        tps = self._consumer.paused()
        if tps:
            self._consumer.resume(*tps)
        log.info("consumption_resumed", partitions=_spelt(_tp_key(tp) for tp in tps))

    def pause(self, keys: Iterable[TP]) -> None:
        """Stop fetching from the assigned ones among ``keys`` (keyed mode: not yet owned)."""
        assigned = self._consumer.assignment()
        tps = [tp for tp in map(_tp, keys) if tp in assigned]
        if tps:
            self._consumer.pause(*tps)

    def resume(self, keys: Iterable[TP]) -> None:
        """Fetch again from the assigned ones among ``keys`` (unless :meth:`pause_all` holds)."""
        if self._paused:
            return
        assigned = self._consumer.assignment()
        tps = [tp for tp in map(_tp, keys) if tp in assigned]
        if tps:
            self._consumer.resume(*tps)

    def partition_count(self, topic: str | None = None) -> int | None:
        """Partitions of ``topic`` (default: the first subscribed) in the cluster metadata.

        ``None`` while the metadata does not know the topic yet.
        """
        parts = self._consumer.partitions_for_topic(topic or self.topics[0])
        return len(parts) if parts else None

    def seek(self, offsets: Mapping[TP, int]) -> None:
        """Move assigned partitions to the given next offsets (unassigned keys are ignored)."""
        assigned = self._consumer.assignment()
        for key, off in offsets.items():
            tp = _tp(key)
            if tp in assigned:
                self._consumer.seek(tp, int(off))

    def commit(self, offsets: Mapping[TP, int], timeout_ms: int = 5000) -> bool:
        """Commit next offsets to the group (for lag monitoring only).

        Keys are ``(topic, partition)``, values the next offset to read.  A
        failed commit (e.g. during a rebalance) is logged as
        ``offset_commit_failed`` and returns ``False``; it never raises, since
        the snapshot, not Kafka, holds the resume offsets.
        """
        if not offsets:
            return True
        payload = {_tp(k): OffsetAndMetadata(int(v), "", -1) for k, v in offsets.items()}
        try:
            self._consumer.commit(payload, timeout_ms=timeout_ms)
        except (KafkaError, OSError) as exc:
            log.warning("offset_commit_failed", error=repr(exc))
            return False
        return True

    def committed(self, key: TP) -> int | None:
        """The group's committed next offset of one partition, or ``None``."""
        return self._consumer.committed(_tp(key))  # type: ignore[no-any-return]

    def position(self, key: TP) -> int | None:
        """The consumer's fetch position (next offset ``poll`` returns) of an assigned partition."""
        return self._consumer.position(_tp(key))  # type: ignore[no-any-return]

    def lag(self, absorbed: Mapping[TP, int] | None = None) -> dict[TP, int]:
        """Records behind the high-water mark, per assigned ``(topic, partition)``.

        Uses :meth:`kafka.KafkaConsumer.highwater` (learnt from fetch
        responses; ``end_offsets`` is wrong on Tansu).  Lag is measured from
        ``absorbed[key]`` when given (what the posterior has absorbed), else
        from the consumer's position.  Partitions whose high-water mark is not
        known yet (no fetch answered) are left out.
        """
        out: dict[TP, int] = {}
        for tp in self._consumer.assignment():
            hw = self._consumer.highwater(tp)
            if hw is None:
                continue
            key = _tp_key(tp)
            pos = absorbed.get(key) if absorbed is not None else None
            if pos is None:
                pos = self._consumer.position(tp, timeout_ms=1000)
            if pos is None:
                continue
            out[key] = max(0, int(hw) - int(pos))
        return out

    def close(self) -> None:
        """Leave the group and close the consumer (never auto-commits)."""
        self._consumer.close(autocommit=False)

    def __enter__(self) -> KafkaSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def kafka_source(
    s: Settings,
    offsets_for: OffsetsCallback,
    on_revoked: Callable[[list[TP]], None],
    fingerprints_for: FingerprintsCallback,
) -> KafkaSource:
    """The daemon's consumer for ``s.kafka`` (the pipeline's default ``Clients.source``).

    Defined here, beside :class:`KafkaSource`, so that the consumer's child process
    (:mod:`fogline.daemon.stream.process_source`) builds it without importing the pipeline.
    """
    return KafkaSource(
        s.kafka.bootstrap_servers,
        s.kafka.topic,
        s.kafka.group_id,
        offsets_for=offsets_for,
        on_revoked=on_revoked,
        fingerprints_for=fingerprints_for,
        session_timeout_ms=s.kafka.session_timeout_ms,
        max_poll_records=s.kafka.max_poll_records,
        max_poll_interval_ms=s.kafka.max_poll_interval_ms,
        **security_kwargs(s.kafka),
    )


# --------------------------------------------------------------------------
# producers
# --------------------------------------------------------------------------


def _producer(bootstrap_servers: str, **client_kwargs: Any) -> KafkaProducer:
    cfg: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers,
        "acks": "all",
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "bootstrap_timeout_ms": 10000,
    }
    cfg.update(client_kwargs)
    return KafkaProducer(**cfg)


class _AckedProducer:
    """A kafka producer that remembers its sends' futures until :meth:`flush`.

    ``flush`` blocks until every queued record is acknowledged and raises if
    one failed; ``close`` flushes, then closes.
    """

    #: Default seconds :meth:`flush` waits (subclasses choose their own).
    flush_timeout_s: float = 30.0

    def __init__(self, bootstrap_servers: str, **client_kwargs: Any) -> None:
        self._producer = _producer(bootstrap_servers, **client_kwargs)
        self._futures: list[Any] = []
        self.sent = 0

    def flush(self, timeout_s: float | None = None) -> None:
        """Block until every queued record is acknowledged; raise if any failed."""
        timeout = self.flush_timeout_s if timeout_s is None else timeout_s
        self._producer.flush(timeout=timeout)
        futures, self._futures = self._futures, []
        for fut in futures:
            fut.get(timeout=timeout)

    def close(self) -> None:
        """Flush and close."""
        try:
            self.flush()
        finally:
            self._producer.close()


def dead_letter_headers(raw: RawRecord, reason: str) -> list[tuple[str, bytes]]:
    """The record's own headers (``fogline-*`` ones dropped) plus reason and source."""
    reason_b = reason.encode("utf-8", "replace")[:DLQ_REASON_MAX_BYTES]
    return [
        *[(k, v) for k, v in raw.headers if not k.startswith("fogline-")],
        (DLQ_REASON, reason_b),
        (DLQ_SOURCE_TOPIC, raw.topic.encode()),
        (DLQ_SOURCE_PARTITION, str(raw.partition).encode()),
        (DLQ_SOURCE_OFFSET, str(raw.offset).encode()),
    ]


def record_bytes(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]
) -> int:
    """Key, value and header bytes of one record (the framing is not counted)."""
    return len(key or b"") + len(value or b"") + sum(len(k.encode()) + len(v) for k, v in headers)


def truncated_copy(
    raw: RawRecord, reason: str, value_budget: int
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A dead letter of ``raw`` whose value is its first ``value_budget`` bytes.

    The headers are those of :func:`dead_letter_headers` plus ``fogline-truncated: 1``,
    ``fogline-original-size`` (bytes) and ``fogline-original-sha256`` (hex digest of
    the whole original value), so the original can be identified and re-read from
    the source topic at ``fogline-source-offset``.
    """
    value = raw.value or b""
    headers = dead_letter_headers(raw, reason)
    headers += [
        (DLQ_TRUNCATED, b"1"),
        (DLQ_ORIGINAL_SIZE, str(len(value)).encode()),
        (DLQ_ORIGINAL_SHA256, hashlib.sha256(value).hexdigest().encode()),
    ]
    return value[: max(0, value_budget)], headers


_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)


class DeadLetterProducer(_AckedProducer):
    """Sends records that fail to decode (or to learn) to ``<source topic>.dlq``.

    The dead-lettered record keeps the original key, value bytes, timestamp
    and headers, plus four UTF-8 headers: ``fogline-reason``,
    ``fogline-source-topic``, ``fogline-source-partition``,
    ``fogline-source-offset``.

    Size: the producer's ``max_request_size`` is ``max_request_bytes`` (the
    broker's ``message.max.bytes``; a setting, ``kafka.dlq_max_request_bytes``).
    A record that does not fit is still dead-lettered, as a truncated copy
    (:func:`truncated_copy`: the first bytes of the value, with the original's
    size and sha256 in the headers).  A copy the broker still refuses as too
    large is sent again cut to ``DLQ_FALLBACK_VALUE_BYTES``; so no single
    record can stop the loop (``dlq_record_truncated`` is logged).

    Flush semantics: :meth:`send` is asynchronous (buffered by the producer).
    Call :meth:`flush` *before* writing a snapshot or committing offsets that
    cover the bad record: then a crash can at worst send a record to the DLQ
    twice (at-least-once; deduplicate on source partition/offset), never
    lose it.  :meth:`flush` raises if any buffered send failed (other than
    for its size).
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        dlq_topic: str | None = None,
        create_topics: bool = True,
        max_request_bytes: int = DLQ_MAX_REQUEST_BYTES,
        producer: Any | None = None,
        **client_kwargs: Any,
    ) -> None:
        """``producer``: a ready ``KafkaProducer``-like object to use (tests); default: built."""
        self.bootstrap_servers = bootstrap_servers
        self.dlq_topic = dlq_topic
        self.max_request_bytes = int(max_request_bytes)
        self.truncated = 0
        self._create = create_topics
        self._created: set[str] = set()
        self._client_kwargs = dict(client_kwargs)
        #: (future, raw, reason) of every send since the last flush.
        self._pending: list[tuple[Any, RawRecord, str]] = []
        client_kwargs.setdefault("max_request_size", self.max_request_bytes)
        if producer is None:
            super().__init__(bootstrap_servers, **client_kwargs)
        else:
            self._producer, self._futures, self.sent = producer, [], 0

    def send(self, raw: RawRecord, reason: str) -> None:
        """Queue ``raw`` for its DLQ topic with ``reason`` in the headers (cut if too large)."""
        topic = self.dlq_topic or dlq_topic_for(raw.topic)
        if self._create and topic not in self._created:
            create_topic(self.bootstrap_servers, topic, 1, **self._client_kwargs)
            self._created.add(topic)
        headers = dead_letter_headers(raw, reason)
        value = raw.value
        if record_bytes(raw.key, value, headers) + DLQ_FRAMING_BYTES > self.max_request_bytes:
            budget = (
                self.max_request_bytes - DLQ_FRAMING_BYTES - record_bytes(raw.key, b"", headers)
            )
            value, headers = self._cut(raw, reason, budget)
        try:
            fut = self._send(topic, raw, value, headers)
        except _TOO_LARGE:  # the client's own estimate says it does not fit
            value, headers = self._cut(raw, reason, DLQ_FALLBACK_VALUE_BYTES)
            fut = self._send(topic, raw, value, headers)
        self._pending.append((fut, raw, reason))
        self.sent += 1

    def _send(
        self, topic: str, raw: RawRecord, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> Any:
        ts = raw.timestamp_ms if raw.timestamp_ms is not None and raw.timestamp_ms >= 0 else None
        return self._producer.send(
            topic, value=value, key=raw.key, headers=headers, timestamp_ms=ts
        )

    def _cut(
        self, raw: RawRecord, reason: str, budget: int
    ) -> tuple[bytes, list[tuple[str, bytes]]]:
        value, headers = truncated_copy(raw, reason, budget)
        self.truncated += 1
        log.warning(
            "dlq_record_truncated",
            topic=raw.topic,
            partition=raw.partition,
            offset=raw.offset,
            original_bytes=len(raw.value or b""),
            kept_bytes=len(value),
            max_request_bytes=self.max_request_bytes,
        )
        return value, headers

    def flush(self, timeout_s: float | None = None) -> None:
        """Block until every queued dead letter is acknowledged; raise if any failed.

        A dead letter the broker refused as too large is sent again, cut to
        ``DLQ_FALLBACK_VALUE_BYTES`` (once; a refusal of that raises).
        """
        timeout = self.flush_timeout_s if timeout_s is None else timeout_s
        self._producer.flush(timeout=timeout)
        pending, self._pending = self._pending, []
        retry: list[Any] = []
        for fut, raw, reason in pending:
            try:
                fut.get(timeout=timeout)
            except _TOO_LARGE:
                topic = self.dlq_topic or dlq_topic_for(raw.topic)
                value, headers = self._cut(raw, reason, DLQ_FALLBACK_VALUE_BYTES)
                retry.append(self._send(topic, raw, value, headers))
        if retry:
            self._producer.flush(timeout=timeout)
            for fut in retry:
                fut.get(timeout=timeout)


class ReplayProducer(_AckedProducer):
    """Produces records with their own timestamps and keys (``fogline replay``, tests).

    ``send`` is asynchronous; :meth:`flush` blocks until the broker has
    every queued record and raises if one failed.
    """

    flush_timeout_s = 60.0

    def __init__(self, bootstrap_servers: str, topic: str, **client_kwargs: Any) -> None:
        self.topic = topic
        super().__init__(bootstrap_servers, **client_kwargs)

    def send(
        self,
        value: bytes,
        *,
        key: bytes | str | None = None,
        timestamp_ms: int | None = None,
        partition: int | None = None,
        headers: Iterable[tuple[str, bytes]] | None = None,
    ) -> None:
        """Queue one record; ``key`` str is UTF-8 encoded."""
        kb = key.encode("utf-8") if isinstance(key, str) else key
        fut = self._producer.send(
            self.topic,
            value=value,
            key=kb,
            partition=partition,
            timestamp_ms=timestamp_ms,
            headers=list(headers) if headers else None,
        )
        self.sent += 1
        self._futures.append(fut)
        if len(self._futures) >= 10000:
            self._check_done()

    def _check_done(self) -> None:
        pending = []
        for fut in self._futures:
            if fut.is_done:
                if fut.failed():
                    raise fut.exception
            else:
                pending.append(fut)
        self._futures = pending

    def __enter__(self) -> ReplayProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
