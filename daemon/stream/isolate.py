"""Which records of a rejected batch make the step non-finite (pure: no Kafka, no Redis).

A step whose loss or parameters come out non-finite is rejected and returns
the old state (``models.svi.step``).  Dropping the whole batch would lose its
good records; :func:`isolate` finds the records to set aside instead, by
bisection with the step itself as the oracle.

Let ``R(S)`` be "the step on the rows ``S`` is rejected" (``rejected`` below,
always stepped from the same, unchanged state).  For a rejected index list
``S``::

    bisect(S) = S                       if |S| = 1
              = bisect(L) ∪ bisect(H)   for the halves L, H of S with R(L) or R(H)
                                        (a half that is not rejected is kept whole)
              = H                       if neither half is rejected alone
                                        (non-finite only together: L is learnt alone)

and :func:`isolate` repeats ``good ← good \\ bisect(good)`` while ``R(good)``
holds, so the good set it returns is stepped without rejection (or is empty).
Every round removes at least one row, so it ends; with ``b`` poisoned rows
in ``n`` it costs about ``2 b log2(n)`` probes.  The halves are split at
``len // 2`` in batch order and the probe is a pure function of (state, rows),
so the split -- hence the learnt posterior -- is the same on every run: a
restart that rebuilds the batch reaches the same state bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fogline.daemon.stream.decode import RawRecord

#: Reason code of a dead letter whose record made the SVI step non-finite.
STEP_REJECTED = "step_rejected"

#: ``rejected(indices) -> bool``: is the step on these rows of the batch rejected?
RejectedProbe = Callable[[Sequence[int]], bool]


@dataclass(frozen=True)
class Isolation:
    """The split of one rejected batch: rows to learn and rows to dead-letter.

    ``good`` and ``bad`` are disjoint, sorted and together every row index;
    ``probes`` counts calls of the probe.
    """

    good: tuple[int, ...]
    bad: tuple[int, ...]
    probes: int


def isolate(n: int, rejected: RejectedProbe, *, known_rejected: bool = True) -> Isolation:
    """Split rows ``0..n-1`` into a learnable set and the rows that make the step non-finite.

    Parameters
    ----------
    n:
        Rows in the batch.
    rejected:
        The step as an oracle on a list of row indices (ascending); it must
        step from the same state every time (see the module docstring).
    known_rejected:
        ``True`` when the caller already saw the whole batch rejected (saves
        one probe).

    >>> bad = {2, 5}
    >>> iso = isolate(8, lambda rows: any(r in bad for r in rows))
    >>> iso.good, iso.bad
    ((0, 1, 3, 4, 6, 7), (2, 5))
    """
    probes = 0

    def probe(rows: Sequence[int]) -> bool:
        nonlocal probes
        probes += 1
        return rejected(rows)

    def bisect(rows: list[int]) -> list[int]:
        # ``rows`` is known to be rejected
        if len(rows) == 1:
            return rows
        mid = len(rows) // 2
        lo, hi = rows[:mid], rows[mid:]
        out: list[int] = []
        if probe(lo):
            out += bisect(lo)
        if probe(hi):
            out += bisect(hi)
        return out if out else hi

    good = list(range(n))
    bad: list[int] = []
    first = known_rejected
    while good and (first or probe(good)):
        first = False
        drop = set(bisect(good))
        bad += drop
        good = [i for i in good if i not in drop]
    return Isolation(tuple(good), tuple(sorted(bad)), probes)


def rejected_record(
    topic: str,
    partition: int,
    offset: int,
    x: npt.NDArray[np.float32],
    y: float,
    reason: str = STEP_REJECTED,
) -> tuple[RawRecord, str]:
    """A dead letter for a decoded row that the step could not learn, and its reason.

    The daemon no longer holds the original bytes of a decoded record, so the
    value is the row as decoded, ``{"x": [...], "y": ...}`` (float32 values
    written as JSON numbers); the headers name the source topic, partition and
    offset, where the original stays readable.
    """
    value = json.dumps({"x": [float(v) for v in x], "y": float(y)}).encode()
    return RawRecord(topic, int(partition), int(offset), None, value, None, ()), reason
