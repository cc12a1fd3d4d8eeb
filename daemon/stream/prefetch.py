"""One poll in flight: the next records are fetched and decoded while the posterior steps.

The daemon's time per batch is mostly kafka-python's fetch and record
unpacking, JSON decoding, and the update rule's torch ops.  Torch releases
the GIL inside its kernels, so on a machine with two cores the fetch and
decode of poll ``k + 1`` can run on one worker thread while the main thread
absorbs the batches of poll ``k`` (the host/device overlap of the design,
which pays on CPU too).

Mechanism (:class:`SerialSource`, a drop-in :class:`Source`):

1. :meth:`SerialSource.start` submits ``poll`` + ``decode`` to a single worker
   thread; at most one poll is in flight and at most one result is held, so
   memory stays bounded by one poll.
2. :meth:`SerialSource.take` returns that result (waiting for it), or polls
   and decodes on the calling thread when nothing was started.
3. **Every other consumer call** (seek, reset, commit, pause/resume,
   assignment, lag, out-of-range, close) first waits until the in-flight poll
   has returned; the result is kept for the next :meth:`take`.  The
   kafka-python consumer is not thread-safe, and this makes its calls strictly
   serial: never two at once, on whichever thread.  Rebalance callbacks run
   inside ``poll``, hence on the worker, while the main thread may be
   absorbing: the pipeline only records what they report and acts on it
   after :meth:`take` (see :class:`Polled.assigned`).

Prefetched records are *not read* as far as the commit path is concerned:
they enter the batcher (and the checkpoint's processed horizon) only when the
pipeline ingests them, so a snapshot taken meanwhile resumes before them, and
a stop or crash re-reads them after the restart, exactly like records the
broker has not yet sent.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from fogline.daemon.stream.batching import TopicPartition
from fogline.daemon.stream.decode import DecodedBatch, RawRecord
from fogline.daemon.stream.source import OutOfRange


class Source(Protocol):
    """The consumer: :class:`~fogline.daemon.stream.source.KafkaSource` or a fake."""

    @property
    def assignment(self) -> list[TopicPartition]: ...
    def poll(self, max_records: int | None = ..., timeout_ms: int = ...) -> list[RawRecord]: ...
    def out_of_range(self) -> list[OutOfRange]: ...
    def reset(self, key: TopicPartition, to: str, high_watermark: int | None = ...) -> None: ...
    def seek(self, offsets: Mapping[TopicPartition, int]) -> None: ...
    def commit(self, offsets: Mapping[TopicPartition, int]) -> bool: ...
    def pause_all(self) -> None: ...
    def resume_all(self) -> None: ...
    def lag(
        self, absorbed: Mapping[TopicPartition, int] | None = ...
    ) -> dict[TopicPartition, int]: ...
    def close(self) -> None: ...


@dataclass
class Polled:
    """One poll's raw records and their decoding (``decoded`` is ``None`` for no records).

    ``assigned`` maps each partition assigned during this poll to the offset
    the consumer was sought to then (``None``: the earliest); the pipeline
    compares it with what it has absorbed since (:meth:`Pipeline._reseek`).
    """

    raws: list[RawRecord]
    decoded: DecodedBatch | None
    assigned: dict[TopicPartition, int | None] = field(default_factory=dict)


class SerialSource:
    """``source`` with at most one ``poll`` (+ decode) running ahead on a worker thread.

    Parameters
    ----------
    source:
        The consumer; every call to it is serialised (see the module docstring).
    decode:
        ``raws -> DecodedBatch``, run right after the poll on the same thread.
    prefetch:
        ``False``: :meth:`start` does nothing, every poll runs in :meth:`take`
        on the caller's thread (the sequential loop).
    """

    def __init__(
        self,
        source: Source,
        decode: Callable[[list[RawRecord]], DecodedBatch],
        *,
        prefetch: bool = True,
    ) -> None:
        self.source = source
        self._decode = decode
        self.prefetch = prefetch
        self._pool = (
            cf.ThreadPoolExecutor(1, thread_name_prefix="fogline-prefetch") if prefetch else None
        )
        self._next: cf.Future[Polled] | None = None
        #: Partitions assigned during the poll now running (filled by the pipeline's callback).
        self.assigned: dict[TopicPartition, int | None] = {}
        #: Polls run ahead on the worker (for tests and logs).
        self.prefetched = 0

    # -- the poll ------------------------------------------------------------
    def _poll(self, max_records: int | None, timeout_ms: int) -> Polled:
        raws = self.source.poll(max_records=max_records, timeout_ms=timeout_ms)
        assigned, self.assigned = self.assigned, {}
        return Polled(raws, self._decode(raws) if raws else None, assigned)

    @property
    def in_flight(self) -> bool:
        """True while a started poll's result has not been taken."""
        return self._next is not None

    def start(self, max_records: int | None, timeout_ms: int) -> bool:
        """Run the next poll ahead on the worker; ``False`` if one is already held (or off)."""
        if self._pool is None or self._next is not None:
            return False
        self._next = self._pool.submit(self._poll, max_records, timeout_ms)
        self.prefetched += 1
        return True

    def take(self, max_records: int | None = None, timeout_ms: int = 100) -> Polled:
        """The started poll's result (re-raising its error), else a poll made here and now."""
        fut, self._next = self._next, None
        if fut is not None:
            return fut.result()
        return self._poll(max_records, timeout_ms)

    def quiesce(self) -> None:
        """Wait until no consumer call is running on the worker (the result stays held)."""
        if self._next is not None:
            cf.wait([self._next])

    # -- every other call: serialised after the in-flight poll --------------------
    @property
    def assignment(self) -> list[TopicPartition]:
        self.quiesce()
        return self.source.assignment

    def poll(self, max_records: int | None = None, timeout_ms: int = 100) -> list[RawRecord]:
        """:meth:`take`'s raw records (the :class:`Source` protocol's poll)."""
        return self.take(max_records, timeout_ms).raws

    def out_of_range(self) -> list[OutOfRange]:
        self.quiesce()
        return self.source.out_of_range()

    def reset(self, key: TopicPartition, to: str, high_watermark: int | None = None) -> None:
        self.quiesce()
        self.source.reset(key, to, high_watermark)

    def seek(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.quiesce()
        self.source.seek(offsets)

    def commit(self, offsets: Mapping[TopicPartition, int]) -> bool:
        self.quiesce()
        return self.source.commit(offsets)

    def pause_all(self) -> None:
        self.quiesce()
        self.source.pause_all()

    def resume_all(self) -> None:
        self.quiesce()
        self.source.resume_all()

    def lag(
        self, absorbed: Mapping[TopicPartition, int] | None = None
    ) -> dict[TopicPartition, int]:
        self.quiesce()
        return self.source.lag(absorbed)

    def close(self) -> None:
        """Wait for the in-flight poll (its records are dropped: never read), then close."""
        self.quiesce()
        self._next = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.source.close()
