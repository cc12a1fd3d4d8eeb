"""The Redis writer lease of one model: acquire (waiting if asked), renew, release.

Two daemons for one model must never both write snapshots.  The store's
``write(..., lease=)`` checks the token inside its transaction; this module
decides when to take, renew and give up the lease, and whether a lease that
vanished (Redis restarted empty, a long pause) may be taken back: only if no
other writer wrote since our last snapshot.
"""

from __future__ import annotations

import contextlib
import time
from typing import Protocol

import structlog

from fogline.daemon.names import process_identity
from fogline.daemon.stream.runtime import Retry, StopFlag
from fogline.daemon.stream.store import Lease, StoreUnavailable

log = structlog.get_logger(__name__)

#: Exit status when the writer lease is held by another daemon or lost to one.
EXIT_LEASE = 3


class LeaseUnavailable(RuntimeError):
    """Another daemon holds (or took over) the writer lease of this model."""


class LeaseStore(Protocol):
    """What the keeper needs of :class:`~fogline.daemon.stream.store.SnapshotStore`."""

    @property
    def model_name(self) -> str: ...
    def acquire_lease(self, owner: str, ttl_s: float) -> Lease | None: ...
    def renew(self, lease: Lease) -> bool: ...
    def release(self, lease: Lease) -> bool: ...
    def lease_owner(self) -> str | None: ...
    def latest_version(self) -> int | None: ...


#: Lease owner name of this process: ``host:pid`` (the snapshot writer's name too).
default_owner = process_identity


class LeaseKeeper:
    """The writer lease of one model: acquire (waiting if asked), renew, release.

    ``lease`` is ``None`` while the lease is not held (e.g. Redis restarted
    empty during an outage).  :meth:`ensure` takes it back only when no other
    writer has written since our last snapshot (``latest`` is ours or gone);
    otherwise another daemon owns the model now and :class:`LeaseUnavailable`
    is raised, so this one exits without writing.
    """

    def __init__(self, store: LeaseStore, ttl_s: float, owner: str | None = None) -> None:
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
