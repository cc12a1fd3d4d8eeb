"""Keep writer leases alive while one long update runs: a heartbeat thread.

The daemon renews a partition lease between batches, a third of its TTL after
the last renewal (:meth:`fogline.daemon.stream.keyed.KeyedPipeline._renew`).
One batch can take longer than the TTL: the batch in which many keys end their
calibration window fits one alarm threshold per key (a bootstrap each), a key
cache refill, a slow CPU.  Without renewals during it every lease lapses, the
partitions are dropped and re-read from their last checkpoint, and the same
slow batch runs again: a livelock that absorbs nothing (seen with 1,000 keys
and a 2 s TTL).

:class:`LeaseKeeper` is Kafka's answer to the same problem (the consumer's
heartbeat thread beside ``max.poll.interval.ms``): while the ``with`` body
runs, a thread calls ``renew()`` every ``interval_s``; it stops renewing
after ``max_hold_s`` (the daemon passes Kafka's rebalance timeout,
``kafka.max_poll_interval_ms``), so a daemon stuck in one batch loses its
leases as a consumer that stopped polling loses its partitions, and a live
one never does.  The thread only renews; a renewal that fails (the lease was
lost, Redis is down) is logged, and the owner's next renewal between batches
finds and handles it as before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType

import structlog

log = structlog.get_logger()


class LeaseKeeper:
    """``with LeaseKeeper(renew, interval_s, max_hold_s): long_update()``.

    ``renew`` is called from a daemon thread every ``interval_s`` seconds while
    the body runs, never after ``max_hold_s`` seconds from entry, never after
    the body has returned; it must be safe to call from another thread (the
    Redis client is) and should not raise (an exception is logged, and the
    keeper stops); what it returns is ignored.  ``renewals`` counts the calls.
    """

    def __init__(self, renew: Callable[[], object], interval_s: float, max_hold_s: float) -> None:
        if interval_s <= 0 or max_hold_s <= 0:
            raise ValueError("interval_s and max_hold_s must be > 0")
        self._renew = renew
        self.interval_s = interval_s
        self.max_hold_s = max_hold_s
        self.renewals = 0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LeaseKeeper:
        self._done.clear()
        self._thread = threading.Thread(target=self._run, name="fogline-lease-keeper", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        start = time.monotonic()
        while not self._done.wait(self.interval_s):
            held = time.monotonic() - start
            if held >= self.max_hold_s:
                log.warning("lease_keeper_stopped", held_s=round(held, 1), reason="max_hold")
                return
            try:
                self._renew()
            except Exception as exc:  # the owner's own renewal reports and handles it
                log.warning("lease_keeper_failed", error=str(exc))
                return
            self.renewals += 1


__all__ = ["LeaseKeeper"]
