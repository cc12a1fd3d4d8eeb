"""LeaseKeeper: renews while the body runs, stops after max_hold_s, on error and on exit."""

from __future__ import annotations

import threading
import time

import pytest

from fogline.daemon.stream.lease_keeper import LeaseKeeper


def test_renews_while_the_body_runs_and_never_after() -> None:
    calls: list[float] = []
    with LeaseKeeper(lambda: calls.append(time.monotonic()), 0.02, 60.0) as keeper:
        time.sleep(0.3)
    done = time.monotonic()
    time.sleep(0.1)
    assert len(calls) >= 3 and keeper.renewals == len(calls)
    assert all(t <= done for t in calls)
    assert not [t for t in threading.enumerate() if t.name == "fogline-lease-keeper"]


def test_stops_renewing_after_max_hold() -> None:
    """A body stuck for longer than max_hold_s loses its leases, as a consumer that stopped
    polling loses its partitions."""
    calls: list[float] = []
    start = time.monotonic()
    with LeaseKeeper(lambda: calls.append(time.monotonic()), 0.02, 0.1):
        time.sleep(0.4)
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


def test_a_short_body_renews_nothing() -> None:
    calls: list[int] = []
    with LeaseKeeper(lambda: calls.append(1), 5.0, 60.0):
        pass
    assert calls == []


@pytest.mark.parametrize(("interval", "hold"), [(0.0, 1.0), (1.0, 0.0), (-1.0, 5.0)])
def test_bad_intervals_are_refused(interval: float, hold: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        LeaseKeeper(lambda: None, interval, hold)
