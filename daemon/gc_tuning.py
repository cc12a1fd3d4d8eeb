"""Python's cyclic garbage collector tuned for a long-running streaming daemon.

Every micro-batch allocates many short-lived containers (per-key dicts, states,
tensors' Python wrappers), so with CPython's default thresholds (700, 10, 10)
the collector runs a young-generation pass every 700 net allocations and a
full pass, which traverses every tracked object of the process (torch's and
the imported modules' included), every 100 young passes.  Measured on the keyed
drift loop (167 keys of ~8 rows, 48 batches, one thread): 2.0 s of 7.0 s in the
collector, 1.5 s of it in 9 full passes.

:func:`tune_for_streaming` is called once by ``fogline run`` after start-up:

* ``gc.freeze()`` moves everything alive then (imported modules, settings, the
  loaded start state) to the permanent generation, which no later pass
  traverses;
* ``gc.set_threshold(threshold0, 20, 20)``: a young pass after ``threshold0``
  net allocations (default 50,000) and older passes less often.

Reference counting frees acyclic garbage immediately either way; the collector
only reclaims reference cycles, which the hot path does not create, so memory
stays bounded (a cycle waits at most for the next pass of its generation).
Library users (tests, notebooks) keep CPython's defaults: only the daemon's
entry point calls this.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

log = structlog.get_logger(__name__)

#: Young-generation threshold of the daemon's collector (CPython's default is 700).
THRESHOLD0 = 50_000


def tune_for_streaming(threshold0: int = THRESHOLD0) -> tuple[int, int, int]:
    """Freeze the start-up heap and raise the collector's thresholds; returns the old ones."""
    if threshold0 < 1:
        raise ValueError(f"threshold0: must be >= 1, got {threshold0}")
    old = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(threshold0, 20, 20)
    log.info(
        "gc_tuned",
        frozen_objects=gc.get_freeze_count(),
        threshold=list(gc.get_threshold()),
        previous=list(old),
    )
    return old


@contextmanager
def streaming_gc(threshold0: int = THRESHOLD0) -> Iterator[None]:
    """The block under :func:`tune_for_streaming`'s settings; the old thresholds after.

    For a benchmark's baseline loop, timed under the collector settings the
    daemon's processes run with.  On exit the heap is unfrozen (everything
    frozen, including what was frozen before the block) and the previous
    thresholds are set again.
    """
    old = tune_for_streaming(threshold0)
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


__all__ = ["THRESHOLD0", "streaming_gc", "tune_for_streaming"]
