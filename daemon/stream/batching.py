"""Micro-batching by size or maximum wait, whichever comes first (pure: no Kafka).

Two modes:

- **count-based** (``max_wait_ms=None``): a batch is emitted exactly when
  ``max_records`` items are buffered, so batch boundaries depend only on the
  item sequence (item ``i`` lands in batch ``i // max_records``), never on
  timing or on how the items were chunked when added.  The crash-recovery
  test needs this: a restart that resumes from a snapshot taken at a batch
  boundary rebuilds the same batches, hence the same posterior, bit for bit.
  A final partial batch only leaves through :meth:`MicroBatcher.flush`.
- **time-bounded** (``max_wait_ms`` set): as above, plus a partial batch is
  due once its oldest item has waited ``max_wait_ms`` (see
  :meth:`MicroBatcher.due` and :meth:`MicroBatcher.poll_due`).

Invariant (property-tested): the concatenation of every emitted batch plus
what is still buffered equals the concatenation of everything added, in
order -- nothing lost, nothing duplicated -- and no batch is empty or longer
than ``max_records``.

The clock is injectable (``clock() -> seconds``) so tests drive time by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items`` of length ``size`` (the last may be shorter)."""
    if size < 1:
        raise ValueError("size must be >= 1")
    for start in range(0, len(items), size):
        yield items[start : start + size]


class MicroBatcher(Generic[T]):
    """Buffer items and cut them into batches of ``max_records``.

    Parameters
    ----------
    max_records:
        Batch size; a full batch is emitted as soon as it is complete.
    max_wait_ms:
        ``None`` for count-based mode; else the longest an item may wait in a
        partial batch before :meth:`poll_due` emits it.
    clock:
        Monotonic seconds (default :func:`time.monotonic`).

    >>> b = MicroBatcher[int](3)
    >>> b.add([1, 2]), b.add([3, 4, 5, 6, 7]), b.flush()
    ([], [[1, 2, 3], [4, 5, 6]], [7])
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
        self._buf: list[T] = []
        self._since: float | None = None  # clock() when the oldest buffered item arrived
        self.emitted_batches = 0
        self.emitted_items = 0

    @property
    def count_based(self) -> bool:
        """True when batch boundaries depend only on the item sequence."""
        return self.max_wait_ms is None

    @property
    def pending(self) -> int:
        """Items buffered in the current partial batch."""
        return len(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def add(self, items: Iterable[T]) -> list[list[T]]:
        """Buffer ``items``; return every batch that became full (maybe none)."""
        out: list[list[T]] = []
        buf = self._buf
        for item in items:
            if not buf:
                self._since = self._clock()
            buf.append(item)
            if len(buf) >= self.max_records:
                out.append(self._take())
                buf = self._buf
        return out

    def age_ms(self) -> float:
        """How long the oldest buffered item has waited (0 when empty)."""
        if not self._buf or self._since is None:
            return 0.0
        return max(0.0, (self._clock() - self._since) * 1000.0)

    def due(self) -> bool:
        """True when a partial batch has waited ``max_wait_ms`` (never in count mode)."""
        return (
            self.max_wait_ms is not None and bool(self._buf) and self.age_ms() >= self.max_wait_ms
        )

    def timeout_ms(self, idle_ms: float) -> float:
        """How long a caller may block waiting for input before :meth:`poll_due` is due.

        ``idle_ms`` when nothing is buffered or in count mode.
        """
        if self.max_wait_ms is None or not self._buf:
            return idle_ms
        return max(0.0, min(idle_ms, self.max_wait_ms - self.age_ms()))

    def poll_due(self) -> list[T] | None:
        """The partial batch if :meth:`due`, else ``None``."""
        return self._take() if self.due() else None

    def flush(self) -> list[T] | None:
        """Whatever is buffered, as one batch (``None`` when empty), e.g. at shutdown."""
        return self._take() if self._buf else None

    def discard(self, keep: Callable[[T], bool] | None = None) -> list[T]:
        """Drop buffered items (those for which ``keep`` is false); return the dropped ones.

        Used when partitions are revoked: their unabsorbed items will be read
        again from the snapshot's offsets.
        """
        if keep is None:
            dropped, self._buf = self._buf, []
        else:
            dropped = [it for it in self._buf if not keep(it)]
            self._buf = [it for it in self._buf if keep(it)]
        if not self._buf:
            self._since = None
        return dropped

    def _take(self) -> list[T]:
        batch, self._buf = self._buf, []
        self._since = None
        self.emitted_batches += 1
        self.emitted_items += len(batch)
        return batch
