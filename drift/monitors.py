"""Drift monitors that speak River's protocol.

A monitor consumes one scalar per batch with ``update(x)`` and exposes the
read-only properties ``drift_detected`` and ``warning_detected`` (true *after*
the update that raised them).  Settings are stored under the constructor's
argument names, so monitors print, compare and ``clone()`` like any River
object.  Any signal of :mod:`fogline.drift.signals` can feed any monitor.

* :class:`ADWINMonitor`, :class:`PageHinkleyMonitor`, :class:`KSWINMonitor`
  wrap River's detectors (no re-implementation) and add a warning flag.
* :class:`ThresholdMonitor` alarms when ``x > threshold`` for ``consecutive``
  batches in a row; with ``warning_threshold`` it also warns, and with
  ``rearm_below`` (hysteresis) it will not alarm again until the signal has
  dropped below ``rearm_below``.  Its threshold is what
  :mod:`fogline.drift.calibration` fits for a target ERT.

River's own ``NoDrift`` and ``DummyDriftDetector`` satisfy the same protocol
(minus the warning flag) and drive the policy tests; use :func:`warning_of`
to read a warning from any detector.
"""

from __future__ import annotations

import math
from typing import Any

from river import base
from river import drift as rdrift


def warning_of(detector: Any) -> bool:
    """``detector.warning_detected`` when it has one, else ``False``."""
    return bool(getattr(detector, "warning_detected", False))


class _Wrapped(base.DriftAndWarningDetector):
    """A River detector wrapped with a warning on large values.

    ``warning_threshold`` (optional) raises ``warning_detected`` whenever the
    latest value exceeds it, independently of the wrapped test.
    """

    _inner: Any

    def __init__(self, warning_threshold: float | None = None) -> None:
        super().__init__()
        self.warning_threshold = warning_threshold
        self.n_detections = 0

    def _make(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _reset(self) -> None:
        super()._reset()
        self._inner = self._make()

    def update(self, x: float) -> None:
        """Feed one value (a batch's signal)."""
        self._inner.update(float(x))
        self._drift_detected = bool(self._inner.drift_detected)
        self.n_detections += int(self._drift_detected)
        self._warning_detected = self.warning_threshold is not None and float(x) > float(
            self.warning_threshold
        )


class ADWINMonitor(_Wrapped):
    """River's ``ADWIN`` (adaptive windowing; alarm when two sub-windows' means differ).

    Parameters are River's (``delta`` is the confidence of the mean-difference
    test) plus ``warning_threshold``.
    """

    def __init__(
        self,
        delta: float = 0.002,
        clock: int = 1,
        max_buckets: int = 5,
        min_window_length: int = 5,
        grace_period: int = 10,
        warning_threshold: float | None = None,
    ) -> None:
        self.delta = delta
        self.clock = clock
        self.max_buckets = max_buckets
        self.min_window_length = min_window_length
        self.grace_period = grace_period
        super().__init__(warning_threshold)
        self._reset()

    def _make(self) -> Any:
        return rdrift.ADWIN(
            delta=self.delta,
            clock=self.clock,
            max_buckets=self.max_buckets,
            min_window_length=self.min_window_length,
            grace_period=self.grace_period,
        )


class PageHinkleyMonitor(_Wrapped):
    """River's ``PageHinkley`` cumulative-sum test (alarm when the CUSUM exceeds ``threshold``)."""

    def __init__(
        self,
        min_instances: int = 30,
        delta: float = 0.005,
        threshold: float = 50.0,
        alpha: float = 1 - 0.0001,
        mode: str = "up",
        warning_threshold: float | None = None,
    ) -> None:
        self.min_instances = min_instances
        self.delta = delta
        self.threshold = threshold
        self.alpha = alpha
        self.mode = mode
        super().__init__(warning_threshold)
        self._reset()

    def _make(self) -> Any:
        return rdrift.PageHinkley(
            min_instances=self.min_instances,
            delta=self.delta,
            threshold=self.threshold,
            alpha=self.alpha,
            mode=self.mode,
        )


class KSWINMonitor(_Wrapped):
    """River's ``KSWIN`` (Kolmogorov-Smirnov test between old and recent values of a window)."""

    def __init__(
        self,
        alpha: float = 0.005,
        window_size: int = 100,
        stat_size: int = 30,
        seed: int | None = 0,
        warning_threshold: float | None = None,
    ) -> None:
        self.alpha = alpha
        self.window_size = window_size
        self.stat_size = stat_size
        self.seed = seed
        super().__init__(warning_threshold)
        self._reset()

    def _make(self) -> Any:
        return rdrift.KSWIN(
            alpha=self.alpha,
            window_size=self.window_size,
            stat_size=self.stat_size,
            seed=self.seed,
        )


class ThresholdMonitor(base.DriftAndWarningDetector):
    """Alarm when the signal exceeds ``threshold`` for ``consecutive`` batches in a row.

    Parameters
    ----------
    threshold:
        Drift threshold (fit it with :func:`fogline.drift.calibration.calibrate_threshold`).
    consecutive:
        Number of consecutive exceedances needed for an alarm (1 = every exceedance).
    warning_threshold:
        ``warning_detected`` is true while ``x > warning_threshold`` (default: never).
    rearm_below:
        Hysteresis: after an alarm the monitor stays quiet until the signal has
        dropped below ``rearm_below`` (``None``: re-arm at once; the streak
        counter always restarts from zero after an alarm).

    The state (``streak``, ``armed``, ``n_seen``, ``n_detections``) is
    JSON-able through :meth:`state_dict` / :meth:`load_state`, so it can ride
    in a snapshot.

    >>> m = ThresholdMonitor(threshold=1.0, consecutive=2)
    >>> [(m.update(v), m.drift_detected)[1] for v in [2, 0, 2, 2, 2]]
    [False, False, False, True, False]
    """

    def __init__(
        self,
        threshold: float = math.inf,
        consecutive: int = 1,
        warning_threshold: float | None = None,
        rearm_below: float | None = None,
    ) -> None:
        super().__init__()
        if consecutive < 1:
            raise ValueError("consecutive must be >= 1")
        self.threshold = threshold
        self.consecutive = consecutive
        self.warning_threshold = warning_threshold
        self.rearm_below = rearm_below
        self._reset()

    def _reset(self) -> None:
        super()._reset()
        self.streak = 0
        self.armed = True
        self.n_seen = 0
        self.n_detections = 0

    def update(self, x: float) -> None:
        """Feed one value (a batch's signal)."""
        v = float(x)
        self.n_seen += 1
        self._drift_detected = False
        self._warning_detected = self.warning_threshold is not None and v > self.warning_threshold
        if not self.armed:
            if self.rearm_below is None or v < self.rearm_below:
                self.armed = True
            else:
                return
        self.streak = self.streak + 1 if v > self.threshold else 0
        if self.streak >= self.consecutive:
            self._drift_detected = True
            self.n_detections += 1
            self.streak = 0
            self.armed = self.rearm_below is None

    def state_dict(self) -> dict[str, Any]:
        """JSON-able running state (not the settings)."""
        return {
            "streak": self.streak,
            "armed": self.armed,
            "n_seen": self.n_seen,
            "n_detections": self.n_detections,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore the running state written by :meth:`state_dict`."""
        self.streak = int(state.get("streak", 0))
        self.armed = bool(state.get("armed", True))
        self.n_seen = int(state.get("n_seen", 0))
        self.n_detections = int(state.get("n_detections", 0))


MONITORS: dict[str, type[base.DriftDetector]] = {
    "threshold": ThresholdMonitor,
    "adwin": ADWINMonitor,
    "page_hinkley": PageHinkleyMonitor,
    "kswin": KSWINMonitor,
}


def make_monitor(name: str, **params: Any) -> base.DriftDetector:
    """Build a monitor by name (``threshold``, ``adwin``, ``page_hinkley``, ``kswin``,
    ``none`` for River's ``NoDrift``)."""
    if name == "none":
        return rdrift.NoDrift()
    if name not in MONITORS:
        raise ValueError(f"unknown monitor {name!r}; choose from {[*sorted(MONITORS), 'none']}")
    return MONITORS[name](**params)
