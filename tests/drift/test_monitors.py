"""River-protocol monitors: protocol, cloning, and pinned detection positions."""

from __future__ import annotations

import json
import random

import pytest
from river import drift as rdrift

from fogline.drift.monitors import (
    ADWINMonitor,
    KSWINMonitor,
    PageHinkleyMonitor,
    ThresholdMonitor,
    make_monitor,
    monitor_state,
    restore_monitor,
    warning_of,
)


def _shift_stream(seed: int = 42, n: int = 400, at: int = 200, size: float = 3.0) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(0.0, 1.0) + (size if i >= at else 0.0) for i in range(n)]


def _detections(monitor: object, data: list[float]) -> list[int]:
    out = []
    for i, v in enumerate(data):
        monitor.update(v)  # type: ignore[attr-defined]
        if monitor.drift_detected:  # type: ignore[attr-defined]
            out.append(i)
    return out


# Pinned on the seeded stream above, as River pins its own ADWIN tests.
@pytest.mark.parametrize(
    ("monitor", "expected"),
    [
        (ADWINMonitor(), [209]),
        (PageHinkleyMonitor(threshold=20.0), [169, 205]),
        (KSWINMonitor(seed=0), [214]),
        (ThresholdMonitor(threshold=2.5, consecutive=2), [201, 203, 206, 210]),
    ],
)
def test_pinned_detection_positions(monitor: object, expected: list[int]) -> None:
    got = _detections(monitor, _shift_stream())
    assert got[: len(expected)] == expected


@pytest.mark.parametrize(
    "monitor",
    [
        ADWINMonitor(delta=0.01),
        PageHinkleyMonitor(threshold=7.0),
        KSWINMonitor(alpha=0.01),
        ThresholdMonitor(threshold=1.5, consecutive=3, rearm_below=0.5),
    ],
)
def test_river_protocol(monitor: object) -> None:
    clone = monitor.clone()  # type: ignore[attr-defined]
    assert type(clone) is type(monitor)
    assert clone._get_params() == monitor._get_params()  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        monitor.drift_detected = True  # type: ignore[attr-defined,misc]
    with pytest.raises(AttributeError):
        monitor.warning_detected = True  # type: ignore[attr-defined,misc]
    data = _shift_stream(seed=1)
    # a clone is independent and replays identically
    assert _detections(monitor, data) == _detections(clone, data)


def test_threshold_consecutive_and_hysteresis() -> None:
    m = ThresholdMonitor(threshold=1.0, consecutive=2, warning_threshold=0.5, rearm_below=0.0)
    seen = []
    for v in [2, 2, 2, 2, 0.7, -1, 2, 2]:
        m.update(v)
        seen.append((m.drift_detected, m.warning_detected))
    assert [d for d, _ in seen] == [False, True, False, False, False, False, False, True]
    assert [w for _, w in seen] == [True, True, True, True, True, False, True, True]
    stored = monitor_state(m)
    assert stored["state"]["streak"] == 0 and stored["state"]["armed"] is False
    assert (stored["state"]["n_seen"], stored["state"]["n_detections"]) == (8, 2)


def test_make_monitor_and_river_baselines() -> None:
    assert isinstance(make_monitor("none"), rdrift.NoDrift)
    assert make_monitor("threshold", threshold=2.0).threshold == 2.0  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="unknown monitor"):
        make_monitor("cusum")
    dummy = rdrift.DummyDriftDetector(t_0=10)
    assert _detections(dummy, [0.0] * 25) == [9, 19]
    assert warning_of(dummy) is False and warning_of(ThresholdMonitor()) is False


RESTARTABLE = [
    pytest.param(lambda: ADWINMonitor(), id="adwin"),
    pytest.param(lambda: PageHinkleyMonitor(threshold=20.0, mode="both"), id="page_hinkley"),
    pytest.param(lambda: KSWINMonitor(seed=1), id="kswin"),
    pytest.param(lambda: rdrift.ADWIN(clock=4), id="river_adwin"),
    pytest.param(lambda: rdrift.PageHinkley(), id="river_page_hinkley"),
    pytest.param(lambda: rdrift.KSWIN(seed=3), id="river_kswin"),
    pytest.param(lambda: ThresholdMonitor(threshold=2.5, consecutive=2, rearm_below=1.0), id="thr"),
]


def _two_shifts(seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    return [
        rng.gauss(0.0, 1.0) + (2.0 if i >= 300 else 0.0) + (3.0 if i >= 700 else 0.0)
        for i in range(1000)
    ]


@pytest.mark.parametrize("make", RESTARTABLE)
@pytest.mark.parametrize("every", [1, 37, 250])
def test_restarted_monitor_detects_exactly_as_an_uninterrupted_one(make, every: int) -> None:  # type: ignore[no-untyped-def]
    """Stop every ``every`` values, store the state as strict JSON, continue a fresh detector."""
    data = _two_shifts()
    expected = _detections(make(), data)
    assert expected  # both shifts are detected
    got: list[int] = []
    m = make()
    for i, v in enumerate(data):
        if i and i % every == 0:
            blob = json.dumps(monitor_state(m), allow_nan=False)
            fresh = make()
            m = restore_monitor(fresh, json.loads(blob))
            assert m is not fresh
            assert not _detections(fresh, []) and fresh._get_params() == make()._get_params()
        m.update(v)
        if m.drift_detected:
            got.append(i)
    assert got == expected


def test_restore_refuses_another_type_or_setting() -> None:
    m = ADWINMonitor()
    for v in _two_shifts()[:50]:
        m.update(v)
    stored = monitor_state(m)
    assert restore_monitor(ADWINMonitor(delta=0.01), stored) is None
    assert restore_monitor(KSWINMonitor(), stored) is None
    assert restore_monitor(ADWINMonitor(), None) is None
    assert restore_monitor(ADWINMonitor(), stored) is not None
    # an unreadable helper state (another River version's) restarts the detector instead
    bad = json.loads(json.dumps(stored))
    bad["state"]["_inner"]["__river__"]["_helper"]["__bytes__"] = "AAAA"
    assert restore_monitor(ADWINMonitor(), bad) is None
    # the fitted threshold is not a setting: it is restored with the state
    t = ThresholdMonitor(threshold=1.5)
    back = restore_monitor(ThresholdMonitor(), monitor_state(t))
    assert back is not None and back.threshold == 1.5


def test_unknown_attribute_types_fail_loudly() -> None:
    m = ThresholdMonitor()
    m.extra = object()  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="cannot store"):
        monitor_state(m)


def test_threshold_monitor_copies_are_independent() -> None:
    import copy

    m = ThresholdMonitor(threshold=1.0, consecutive=2, rearm_below=0.0)
    m.update(2.0)
    c = copy.deepcopy(m)
    assert monitor_state(c) == monitor_state(m) and c is not m
    c.update(2.0)
    assert c.drift_detected and not m.drift_detected and m.streak == 1 and m.n_seen == 1
