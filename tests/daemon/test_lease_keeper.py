"""LeaseKeeper: renews while the body runs, stops after max_hold_s, on error and on exit."""

from __future__ import annotations

import threading
import time

import pytest

from fogline.daemon.stream.lease_keeper import LeaseKeeper


def _keepers() -> set[int]:
    """Idents of the live keeper threads."""
    return {t.ident for t in threading.enumerate() if t.name == "fogline-lease-keeper" and t.ident}


def test_renews_while_the_body_runs_and_never_after() -> None:
    calls: list[float] = []
    with LeaseKeeper(lambda: calls.append(time.monotonic()), 0.02, 60.0) as keeper:
        time.sleep(0.3)
    done = time.monotonic()
    time.sleep(0.1)
    assert len(calls) >= 3 and keeper.renewals == len(calls)
    assert all(t <= done for t in calls)
    before = _keepers()
    keeper.close()
    assert len(before - _keepers()) == 1


def test_one_thread_serves_every_body_and_renews_only_inside_them() -> None:
    """The daemon enters the keeper once per batch: one thread, renewals inside each body
    (counted from that body's start), none between bodies, none once closed."""
    calls: list[float] = []
    before = _keepers()
    keeper = LeaseKeeper(lambda: calls.append(time.monotonic()), 0.05, 60.0)
    spans = []
    for _ in range(3):
        with keeper:
            start = time.monotonic()
            time.sleep(0.2)
        spans.append((start, time.monotonic()))
        time.sleep(0.15)  # between batches: no renewal
    assert len(_keepers() - before) == 1
    for start, end in spans:
        inside = [t for t in calls if start <= t <= end]
        assert len(inside) >= 2
        assert all(t - start >= 0.05 - 0.01 for t in inside)  # none before the interval
    assert all(any(a <= t <= b for a, b in spans) for t in calls)
    with keeper:
        pass  # a short body renews nothing
    n = len(calls)
    keeper.close()
    time.sleep(0.1)
    assert len(calls) == n
    assert _keepers() == before
    with pytest.raises(RuntimeError, match="closed"), keeper:
        pass


def test_stops_renewing_after_max_hold() -> None:
    """A body stuck for longer than max_hold_s loses its leases, as a consumer that stopped
    polling loses its partitions."""
    calls: list[float] = []
    start = time.monotonic()
    with LeaseKeeper(lambda: calls.append(time.monotonic()), 0.02, 0.1) as keeper:
        time.sleep(0.4)
    keeper.close()
    assert calls and all(t - start < 0.1 + 0.05 for t in calls)


def test_a_failing_renewal_stops_the_keeper_not_the_body() -> None:
    calls = 0

    def renew() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("redis is down")

    with LeaseKeeper(renew, 0.02, 60.0) as keeper:
        time.sleep(0.2)
    assert calls == 1 and keeper.renewals == 0
    with keeper:  # the next body renews again (and fails again)
        time.sleep(0.1)
    assert calls == 2 and keeper.renewals == 0
    keeper.close()


def test_max_hold_counts_from_each_body_start() -> None:
    calls: list[float] = []
    keeper = LeaseKeeper(lambda: calls.append(time.monotonic()), 0.02, 0.1)
    starts = []
    for _ in range(2):
        with keeper:
            starts.append(time.monotonic())
            time.sleep(0.3)
    keeper.close()
    for a, b in zip(starts, [*starts[1:], float("inf")], strict=True):
        inside = [t for t in calls if a <= t < b]
        assert inside and all(t - a < 0.1 + 0.05 for t in inside)


def test_a_short_body_renews_nothing() -> None:
    calls: list[int] = []
    with LeaseKeeper(lambda: calls.append(1), 5.0, 60.0) as keeper:
        pass
    keeper.close()
    assert calls == []


@pytest.mark.parametrize(("interval", "hold"), [(0.0, 1.0), (1.0, 0.0), (-1.0, 5.0)])
def test_bad_intervals_are_refused(interval: float, hold: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        LeaseKeeper(lambda: None, interval, hold)


def test_a_body_that_starts_before_the_thread_wakes_is_renewed() -> None:
    """Batch after batch: one body ends and the next starts before the keeper thread has
    woken up from the first. The second body must still be renewed (it was not: the thread
    took it for the finished one and waited for a third, and a slow batch lost its leases)."""
    calls: list[float] = []
    keeper = LeaseKeeper(lambda: calls.append(time.monotonic()), 0.05, 60.0)
    keeper.__enter__()
    time.sleep(0.02)  # the thread now waits inside the first body
    with keeper._cond:  # the lock the thread needs to wake up: it cannot run in between
        keeper.__exit__(None, None, None)
        keeper.__enter__()
        start = time.monotonic()
    time.sleep(0.35)
    keeper.__exit__(None, None, None)
    keeper.close()
    assert len([t for t in calls if t >= start]) >= 3
