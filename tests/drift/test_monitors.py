"""River-protocol monitors: protocol, cloning, and pinned detection positions."""

from __future__ import annotations

import random

import pytest
from river import drift as rdrift

from fogline.drift.monitors import (
    ADWINMonitor,
    KSWINMonitor,
    PageHinkleyMonitor,
    ThresholdMonitor,
    make_monitor,
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
    state = m.state_dict()
    m2 = ThresholdMonitor(threshold=1.0, consecutive=2)
    m2.load_state(state)
    assert m2.state_dict() == state == {"streak": 0, "armed": False, "n_seen": 8, "n_detections": 2}


def test_make_monitor_and_river_baselines() -> None:
    assert isinstance(make_monitor("none"), rdrift.NoDrift)
    assert make_monitor("threshold", threshold=2.0).threshold == 2.0  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="unknown monitor"):
        make_monitor("cusum")
    dummy = rdrift.DummyDriftDetector(t_0=10)
    assert _detections(dummy, [0.0] * 25) == [9, 19]
    assert warning_of(dummy) is False and warning_of(ThresholdMonitor()) is False
