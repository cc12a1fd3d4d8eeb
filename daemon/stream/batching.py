"""Micro-batching of decoded records as array slices, by size or maximum wait (pure: no Kafka).

Decoded records stay columns (:class:`Rows`: ``x`` [N, D], ``y`` [N],
``partition`` [N], ``offset`` [N] of one topic); the batcher keeps the chunks
it was given and emits **slices** of them -- a batch is a view into one
chunk, or one concatenation when it straddles chunks -- never per-row tuples.

Two modes:

- **count-based** (``max_wait_ms=None``): a batch is emitted exactly when
  ``max_records`` rows are buffered, so batch boundaries depend only on the
  row sequence (row ``i`` lands in batch ``i // max_records``), never on
  timing or on how the rows were chunked when added.  The crash-recovery
  test needs this: a restart that resumes from a snapshot taken at a batch
  boundary rebuilds the same batches, hence the same posterior, bit for bit.
  A final partial batch only leaves through :meth:`MicroBatcher.flush`.
- **time-bounded** (``max_wait_ms`` set): as above, plus a partial batch is
  due once its oldest row has waited ``max_wait_ms`` (see
  :meth:`MicroBatcher.due` and :meth:`MicroBatcher.poll_due`).

Invariant (property-tested): the concatenation of every emitted batch plus
what is still buffered equals the concatenation of everything added, in
order -- nothing lost, nothing duplicated -- and no batch is empty or longer
than ``max_records``.

The clock is injectable (``clock() -> seconds``) so tests drive time by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

T = TypeVar("T")

#: ``(topic, partition)``: the key of every offset mapping in memory.
TopicPartition = tuple[str, int]


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items`` of length ``size`` (the last may be shorter)."""
    if size < 1:
        raise ValueError("size must be >= 1")
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(frozen=True, eq=False)
class Rows:
    """Decoded records of one topic as columns of equal length N.

    ``x`` [N, D] float32, ``y`` [N] float32, ``partition`` [N] int32 and
    ``offset`` [N] int64 (each row's Kafka partition and offset).  Slicing
    (``rows[a:b]``) gives views; :meth:`concat` copies.

    >>> r = Rows.of("t", np.zeros((3, 2), np.float32), np.arange(3, dtype=np.float32),
    ...             np.array([0, 1, 0]), np.array([7, 4, 8]))
    >>> len(r[1:]), r.first_offsets()
    (2, {('t', 0): 7, ('t', 1): 4})
    """

    topic: str
    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.float32]
    partition: npt.NDArray[np.int32]
    offset: npt.NDArray[np.int64]
    #: Optional per-row columns [N, K] float64 that ride along unchanged (autoregressive
    #: records: value, ts ms, key id; :mod:`fogline.daemon.stream.series`).
    meta: npt.NDArray[np.float64] | None = None

    @classmethod
    def of(
        cls,
        topic: str,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        partition: npt.ArrayLike,
        offset: npt.ArrayLike,
        meta: npt.ArrayLike | None = None,
    ) -> Rows:
        """Columns from array-likes (checked for one length N)."""
        xa = np.asarray(x, dtype=np.float32)
        ya = np.asarray(y, dtype=np.float32)
        pa = np.asarray(partition, dtype=np.int32)
        oa = np.asarray(offset, dtype=np.int64)
        n = ya.shape[0]
        if xa.ndim != 2 or xa.shape[0] != n or pa.shape != (n,) or oa.shape != (n,):
            raise ValueError(
                f"Rows needs x [N, D] and y, partition, offset [N]; got {xa.shape}, "
                f"{ya.shape}, {pa.shape}, {oa.shape}"
            )
        ma = None if meta is None else np.asarray(meta, dtype=np.float64)
        if ma is not None and (ma.ndim != 2 or ma.shape[0] != n):
            raise ValueError(f"Rows meta must be [N, K] with N={n}; got {ma.shape}")
        return cls(topic, xa, ya, pa, oa, ma)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, index: slice | npt.NDArray[np.bool_]) -> Rows:
        """A slice (a view) or the rows where a boolean mask is true (a copy)."""
        meta = None if self.meta is None else self.meta[index]
        return Rows(
            self.topic,
            self.x[index],
            self.y[index],
            self.partition[index],
            self.offset[index],
            meta,
        )

    @staticmethod
    def concat(parts: Sequence[Rows]) -> Rows:
        """The rows of ``parts`` in order, as one chunk (all of one topic)."""
        if len(parts) == 1:
            return parts[0]
        topic = parts[0].topic
        if any(p.topic != topic for p in parts):
            raise ValueError("Rows of different topics cannot be concatenated")
        return Rows(
            topic,
            np.concatenate([p.x for p in parts]),
            np.concatenate([p.y for p in parts]),
            np.concatenate([p.partition for p in parts]),
            np.concatenate([p.offset for p in parts]),
            _concat_meta(parts),
        )

    def keys(self) -> set[TopicPartition]:
        """The ``(topic, partition)`` pairs present."""
        return {(self.topic, int(p)) for p in np.unique(self.partition)}

    def first_offsets(self) -> dict[TopicPartition, int]:
        """Offset of the first row of each partition present."""
        parts, first = np.unique(self.partition, return_index=True)
        return {
            (self.topic, int(p)): int(self.offset[i]) for p, i in zip(parts, first, strict=True)
        }

    def last_offset(self) -> int:
        """Offset of the last row (-1 when empty)."""
        return int(self.offset[-1]) if len(self) else -1


def _concat_meta(parts: Sequence[Rows]) -> npt.NDArray[np.float64] | None:
    """The ``meta`` columns of ``parts`` in order (``None`` when they have none)."""
    metas = [p.meta for p in parts if p.meta is not None]
    if not metas:
        return None
    if len(metas) != len(parts):
        raise ValueError("Rows with and without meta cannot be concatenated")
    return np.concatenate(metas)


class MicroBatcher:
    """Buffer :class:`Rows` chunks and cut them into batches of ``max_records`` rows.

    Parameters
    ----------
    max_records:
        Batch size; a full batch is emitted as soon as it is complete.
    max_wait_ms:
        ``None`` for count-based mode; else the longest a row may wait in a
        partial batch before :meth:`poll_due` emits it.
    clock:
        Monotonic seconds (default :func:`time.monotonic`).

    >>> b = MicroBatcher(3)
    >>> def rows(offsets):
    ...     n = len(offsets)
    ...     return Rows.of("t", np.zeros((n, 1)), np.zeros(n), np.zeros(n), offsets)
    >>> b.add(rows([0, 1])), [r.offset.tolist() for r in b.add(rows([2, 3, 4, 5, 6]))]
    ([], [[0, 1, 2], [3, 4, 5]])
    >>> b.flush().offset.tolist()
    [6]
    """

    def __init__(
        self,
        max_records: int,
        max_wait_ms: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_records < 1:
            raise ValueError("max_records must be >= 1")
        if max_wait_ms is not None and max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0 or None")
        self.max_records = int(max_records)
        self.max_wait_ms = max_wait_ms
        self._clock = clock
        self._parts: list[Rows] = []  # slices of the chunks added, oldest first
        self._n = 0  # rows in _parts
        self._since: float | None = None  # clock() when the oldest buffered row arrived
        self.emitted_batches = 0
        self.emitted_items = 0

    @property
    def count_based(self) -> bool:
        """True when batch boundaries depend only on the row sequence."""
        return self.max_wait_ms is None

    @property
    def pending(self) -> int:
        """Rows buffered in the current partial batch."""
        return self._n

    def __len__(self) -> int:
        return self._n

    def buffered(self) -> list[Rows]:
        """The chunks of the current partial batch, oldest first (do not mutate)."""
        return self._parts

    def add(self, chunk: Rows) -> list[Rows]:
        """Buffer ``chunk``; return every batch that became full (maybe none)."""
        out: list[Rows] = []
        start, n = 0, len(chunk)
        while start < n:
            if self._n == 0:
                self._since = self._clock()
            take = min(self.max_records - self._n, n - start)
            self._parts.append(chunk if take == n else chunk[start : start + take])
            self._n += take
            start += take
            if self._n >= self.max_records:
                out.append(self._take())
        return out

    def age_ms(self) -> float:
        """How long the oldest buffered row has waited (0 when empty)."""
        if not self._n or self._since is None:
            return 0.0
        return max(0.0, (self._clock() - self._since) * 1000.0)

    def due(self) -> bool:
        """True when a partial batch has waited ``max_wait_ms`` (never in count mode)."""
        return self.max_wait_ms is not None and self._n > 0 and self.age_ms() >= self.max_wait_ms

    def timeout_ms(self, idle_ms: float) -> float:
        """How long a caller may block waiting for input before :meth:`poll_due` is due.

        ``idle_ms`` when nothing is buffered or in count mode.
        """
        if self.max_wait_ms is None or not self._n:
            return idle_ms
        return max(0.0, min(idle_ms, self.max_wait_ms - self.age_ms()))

    def poll_due(self) -> Rows | None:
        """The partial batch if :meth:`due`, else ``None``."""
        return self._take() if self.due() else None

    def flush(self) -> Rows | None:
        """Whatever is buffered, as one batch (``None`` when empty), e.g. at shutdown."""
        return self._take() if self._n else None

    def discard(self, keep: Callable[[Rows], npt.NDArray[np.bool_]] | None = None) -> list[Rows]:
        """Drop buffered rows (those where ``keep`` is false); return the dropped chunks.

        Used when partitions are revoked: their unabsorbed rows will be read
        again from the snapshot's offsets.  The kept rows keep their order and
        their place in the current partial batch.
        """
        if keep is None:
            dropped, self._parts, self._n = self._parts, [], 0
        else:
            dropped, kept = [], []
            for part in self._parts:
                mask = keep(part)
                if not mask.all():
                    dropped.append(part[~mask])
                if mask.any():
                    kept.append(part if mask.all() else part[mask])
            self._parts = kept
            self._n = sum(len(p) for p in kept)
        if not self._n:
            self._since = None
        return dropped

    def _take(self) -> Rows:
        batch = Rows.concat(self._parts)
        self._parts, self._n = [], 0
        self._since = None
        self.emitted_batches += 1
        self.emitted_items += len(batch)
        return batch
