"""Process mechanics of the daemon: stop signals, device choice, retry pacing, the writer lease.

Nothing here knows about Kafka records or the model's mathematics; the
pipeline (:mod:`fogline.daemon.stream.pipeline`) composes these pieces.

- :class:`StopFlag` turns SIGTERM/SIGINT into a flag the loop checks between
  SVI steps, so the step in progress always finishes.
- :func:`select_device` maps ``stream.device`` (``auto|cpu|cuda``) to a torch device.
- :class:`Retry` paces retries of an unavailable service with
  :func:`fogline.daemon.stream.store.retry_backoff`.
- :class:`LeaseKeeper` takes, renews and releases the Redis writer lease of
  one model, and decides whether a lost lease may be taken back.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import structlog

from fogline.daemon.names import process_identity
from fogline.daemon.stream.store import Lease, SnapshotStore, StoreUnavailable, retry_backoff

log = structlog.get_logger(__name__)

#: Exit status when the writer lease is held by another daemon or lost to one.
EXIT_LEASE = 3


class LeaseUnavailable(RuntimeError):
    """Another daemon holds (or took over) the writer lease of this model."""


class StopFlag:
    """Set by SIGTERM/SIGINT (or :meth:`set`); the loop checks it between steps.

    :meth:`install` only works on the main thread; elsewhere (tests that run
    the pipeline in a thread) the flag is set by hand.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopFlag:
        """Handle SIGTERM and SIGINT by setting the flag (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous signal handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._event.is_set():
            log.warning("stop_signal_repeated", signal=name)
        self.signal_name = name
        self._event.set()

    def set(self, reason: str = "requested") -> None:
        """Ask the loop to stop after the current step."""
        self.signal_name = reason
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s`` unless the flag is set; return the flag."""
        return self._event.wait(max(0.0, timeout_s))


def select_device(choice: str) -> Any:
    """``torch.device`` for ``stream.device``: ``auto`` is CUDA when available, else CPU.

    ``cuda`` without a usable GPU raises :class:`RuntimeError` naming the setting.
    """
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("stream.device is 'cuda' but torch sees no CUDA device")
    return torch.device(choice)


#: Lease owner name of this process: ``host:pid`` (the snapshot writer's name too).
default_owner = process_identity


class Retry:
    """Paces retries: ``due()`` says when to try again, ``failed()`` backs off, ``ok()`` resets."""

    def __init__(self, *, base_s: float = 0.1, cap_s: float = 5.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0
        self.next_at = 0.0
        self.failing_since: float | None = None

    @property
    def failing(self) -> bool:
        """True between a failure and the next success."""
        return self.failing_since is not None

    def due(self, now: float | None = None) -> bool:
        """True when the next attempt may run."""
        return (time.monotonic() if now is None else now) >= self.next_at

    def failed(self) -> float:
        """Record a failure; return the wait before the next attempt."""
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        wait = retry_backoff(self.attempt, base_s=self.base_s, cap_s=self.cap_s)
        self.attempt += 1
        self.next_at = now + wait
        return wait

    def ok(self) -> None:
        """Record a success."""
        self.attempt = 0
        self.next_at = 0.0
        self.failing_since = None


class LeaseKeeper:
    """The writer lease of one model: acquire (waiting if asked), renew, release.

    ``lease`` is ``None`` while the lease is not held (e.g. Redis restarted
    empty during an outage).  :meth:`ensure` takes it back only when no other
    writer has written since our last snapshot (``latest`` is ours or gone);
    otherwise another daemon owns the model now and :class:`LeaseUnavailable`
    is raised, so this one exits without writing.
    """

    def __init__(self, store: SnapshotStore, ttl_s: float, owner: str | None = None) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.owner = owner or default_owner()
        self.lease: Lease | None = None
        self.last_version: int | None = None
        self._renewed_at = 0.0

    def acquire(self, wait_s: float | None, stop: StopFlag, poll_s: float | None = None) -> bool:
        """Take the lease; wait up to ``wait_s`` seconds (``None``: forever) while it is held.

        Returns ``False`` when ``stop`` was set while waiting.  Raises
        :class:`LeaseUnavailable` when the wait runs out (at once for
        ``wait_s=0``).  Redis being unreachable is retried with backoff.
        """
        deadline = None if wait_s is None else time.monotonic() + wait_s
        poll = poll_s if poll_s is not None else min(1.0, max(0.05, self.ttl_s / 5))
        retry = Retry()
        announced = False
        while not stop:
            try:
                self.lease = self.store.acquire_lease(self.owner, self.ttl_s)
                holder = None if self.lease else self.store.lease_owner()
            except StoreUnavailable as exc:
                log.warning("redis_unavailable", op="acquire_lease", error=str(exc))
                stop.wait(retry.failed())
                continue
            retry.ok()
            if self.lease is not None:
                self._renewed_at = time.monotonic()
                log.info("lease_acquired", owner=self.owner, ttl_s=self.ttl_s)
                return True
            if deadline is not None and time.monotonic() >= deadline:
                raise LeaseUnavailable(
                    f"model {self.store.model_name!r}: another daemon ({holder}) holds the "
                    f"writer lease; not starting a second writer"
                )
            if not announced:
                log.warning("lease_held_elsewhere", holder=holder, waiting_s=wait_s)
                announced = True
            stop.wait(poll)
        return False

    def renew_due(self) -> bool:
        """True when a third of the ttl has passed since the last renewal."""
        return time.monotonic() - self._renewed_at >= self.ttl_s / 3

    def renew(self) -> None:
        """Renew the lease (or take it back, see :meth:`ensure`); raises StoreUnavailable."""
        if self.lease is not None and self.store.renew(self.lease):
            self._renewed_at = time.monotonic()
            return
        self.lease = None
        self.ensure()

    def ensure(self) -> Lease:
        """The held lease, re-acquired if it vanished and nobody else wrote since.

        Raises :class:`LeaseUnavailable` or :class:`StoreUnavailable`.
        """
        if self.lease is not None:
            return self.lease
        lease = self.store.acquire_lease(self.owner, self.ttl_s)
        if lease is None:
            raise LeaseUnavailable(
                f"model {self.store.model_name!r}: writer lease lost to "
                f"{self.store.lease_owner()}; stopping without writing"
            )
        latest = self.store.latest_version()
        if latest is not None and latest != self.last_version:
            self.store.release(lease)
            raise LeaseUnavailable(
                f"model {self.store.model_name!r}: writer lease lapsed and version {latest} "
                f"was written by someone else; stopping without writing"
            )
        self.lease = lease
        self._renewed_at = time.monotonic()
        log.warning("lease_reacquired", owner=self.owner, latest_version=latest)
        return lease

    def release(self) -> None:
        """Give the lease up (best effort)."""
        if self.lease is None:
            return
        with contextlib.suppress(StoreUnavailable):
            self.store.release(self.lease)
        self.lease = None


def call_with_retry(
    fn: Callable[[], Any], stop: StopFlag, *, what: str, deadline_s: float | None = None
) -> Any:
    """Call ``fn`` until it stops raising :class:`StoreUnavailable` (backoff between tries).

    Gives up (re-raising) after ``deadline_s`` seconds, or when ``stop`` is set
    and ``deadline_s`` is ``None``.
    """
    retry = Retry()
    end = None if deadline_s is None else time.monotonic() + deadline_s
    while True:
        try:
            return fn()
        except StoreUnavailable as exc:
            wait = retry.failed()
            log.warning("redis_unavailable", op=what, error=str(exc), retry_in_s=round(wait, 3))
            if end is not None and time.monotonic() + wait > end:
                raise
            if end is None and stop:
                raise
            time.sleep(wait)
