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
heartbeat thread beside ``max.poll.interval.ms``): while a ``with`` body
runs, its thread calls ``renew()`` every ``interval_s``; it stops renewing
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
    """``with keeper: long_update()``, as often as there are updates.

    ``renew`` is called from one daemon thread every ``interval_s`` seconds while
    a ``with`` body runs (the first call ``interval_s`` after the body starts),
    never after ``max_hold_s`` seconds from the body's start, never after the
    body has returned (leaving the ``with`` waits for a renewal in flight); it
    must be safe to call from another thread (the Redis client is) and should
    not raise (an exception is logged, and the keeper renews nothing more
    until the next body); what it returns is ignored.  ``renewals`` counts the
    calls.

    The thread starts with the first body and then waits for the next one
    (one thread for the daemon's life, not one per batch: starting and joining
    a thread per batch took about 1 ms of the keyed daemon's main loop, 4 % of
    it with ``drift.policy = off``); :meth:`close` stops it.
    """

    def __init__(self, renew: Callable[[], object], interval_s: float, max_hold_s: float) -> None:
        if interval_s <= 0 or max_hold_s <= 0:
            raise ValueError("interval_s and max_hold_s must be > 0")
        self._renew = renew
        self.interval_s = interval_s
        self.max_hold_s = max_hold_s
        self.renewals = 0
        self._cond = threading.Condition()
        #: Start of the body now running (None: none), and how many bodies have started.
        self._since: float | None = None
        self._bodies = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LeaseKeeper:
        with self._cond:
            if self._closed:
                raise RuntimeError("LeaseKeeper is closed")
            self._since = time.monotonic()
            self._bodies += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="fogline-lease-keeper", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._cond:  # a renewal runs under the lock: none is in flight past here
            self._since = None
            self._cond.notify()

    def close(self) -> None:
        """Stop the thread (after a renewal in flight); the keeper cannot be entered again."""
        with self._cond:
            self._closed = True
            self._since = None
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._since is None:
                    self._cond.wait()
                    continue
                body = self._bodies
                self._hold(body, self._since)
                # that body is over, or its renewals stopped: wait for the next one (a body
                # that started while the thread was renewing or waking up is served at once)
                while not self._closed and self._bodies == body and self._since is not None:
                    self._cond.wait()

    def _hold(self, body: int, start: float) -> None:
        """Renew every ``interval_s`` while body number ``body`` runs (lock held)."""
        due = start + self.interval_s
        while not self._closed and self._bodies == body and self._since is not None:
            now = time.monotonic()
            if now < due:
                self._cond.wait(due - now)
                continue
            held = now - start
            if held >= self.max_hold_s:
                log.warning("lease_keeper_stopped", held_s=round(held, 1), reason="max_hold")
                return
            try:
                self._renew()
            except Exception as exc:  # the owner's own renewal reports and handles it
                log.warning("lease_keeper_failed", error=str(exc))
                return
            self.renewals += 1
            due = now + self.interval_s


__all__ = ["LeaseKeeper"]
