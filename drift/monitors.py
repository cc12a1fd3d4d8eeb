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

:func:`monitor_state` / :func:`restore_monitor` write any of these detectors'
running state as strict JSON and continue a fresh detector from it, so a
monitor survives a daemon restart (River objects pickle, but snapshots do not
hold pickles).
"""

from __future__ import annotations

import base64
import collections
import copy
import functools
import inspect
import math
import random
from typing import Any

from river import base


def warning_of(detector: Any) -> bool:
    """``detector.warning_detected`` when it has one, else ``False``."""
    return bool(getattr(detector, "warning_detected", False))


def _river_drift() -> Any:
    """``river.drift``, imported on first use: its package imports ``river.datasets`` and,
    through it, scikit-learn and SciPy (~1.2 s at start-up, measured with ``-X importtime``),
    which the default ``threshold`` monitor never needs."""
    from river import drift

    return drift


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
        return _river_drift().ADWIN(
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
        return _river_drift().PageHinkley(
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
        return _river_drift().KSWIN(
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

    Its running state (``streak``, ``armed``, ``n_seen``, ``n_detections``)
    rides in snapshots like any detector's (:func:`monitor_state`).

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

    def __deepcopy__(self, memo: dict[int, Any]) -> ThresholdMonitor:
        """Every attribute is an immutable scalar: copying ``__dict__`` is a deep copy
        (the policy step copies its monitor every batch)."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        return out

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
        return _river_drift().NoDrift()
    if name not in MONITORS:
        raise ValueError(f"unknown monitor {name!r}; choose from {[*sorted(MONITORS), 'none']}")
    return MONITORS[name](**params)


# ----------------------------------------------------------------------------- persistence
#: Constructor arguments the drift loop fits itself (not compared on restore).
FITTED_PARAMS: frozenset[str] = frozenset({"threshold"})


def _encode(value: Any) -> Any:
    """One attribute of a detector as strict JSON (see :func:`monitor_state`)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else {"__float__": repr(float(value))}
    if isinstance(value, collections.deque):
        return {"__deque__": [_encode(v) for v in value], "maxlen": value.maxlen}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, random.Random):
        return {"__random__": _encode(value.getstate())}
    if isinstance(value, base.Base):
        return {"__river__": _attributes(value)}
    getstate = getattr(value, "__getstate__", None)
    if callable(getstate) and hasattr(value, "__setstate__"):
        blob = getstate()
        if isinstance(blob, bytes):  # River's Rust helpers (ADWIN's AdaptiveWindowing)
            return {"__bytes__": base64.b64encode(blob).decode("ascii")}
    raise TypeError(f"cannot store a detector attribute of type {type(value).__name__}")


def _attributes(obj: Any) -> dict[str, Any]:
    """``vars(obj)`` as JSON; bound methods and other callables are rebuilt by ``__init__``."""
    return {k: _encode(v) for k, v in vars(obj).items() if not callable(v)}


def _decode(enc: Any, current: Any) -> Any:
    """Inverse of :func:`_encode`; ``current`` is the attribute of a fresh detector (loaded
    in place for River objects and Rust helpers)."""
    if isinstance(enc, list):
        return [_decode(v, None) for v in enc]
    if not isinstance(enc, dict):
        return enc
    if "__float__" in enc:
        return float(enc["__float__"])
    if "__deque__" in enc:
        return collections.deque((_decode(v, None) for v in enc["__deque__"]), enc["maxlen"])
    if "__tuple__" in enc:
        return tuple(_decode(v, None) for v in enc["__tuple__"])
    if "__dict__" in enc:
        return {k: _decode(v, None) for k, v in enc["__dict__"].items()}
    if "__random__" in enc:
        rng = random.Random()
        rng.setstate(_decode(enc["__random__"], None))
        return rng
    if "__river__" in enc:
        if current is None:
            raise ValueError("a stored River object has no counterpart in the fresh detector")
        _load_attributes(current, enc["__river__"])
        return current
    if "__bytes__" in enc:
        if current is None:
            raise ValueError("a stored helper state has no counterpart in the fresh detector")
        current.__setstate__(base64.b64decode(enc["__bytes__"]))
        return current
    raise ValueError(f"unreadable detector attribute {sorted(enc)}")


def _load_attributes(obj: Any, attrs: dict[str, Any]) -> None:
    for k, v in attrs.items():
        setattr(obj, k, _decode(v, getattr(obj, k, None)))


@functools.cache
def _param_names(cls: Any) -> tuple[str, ...]:
    """The keyword arguments of ``cls.__init__`` (what River's ``_get_params`` reads)."""
    return tuple(
        name
        for name, p in inspect.signature(cls).parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )


def _settings(detector: Any) -> dict[str, Any]:
    """The scalar constructor arguments of a detector, minus :data:`FITTED_PARAMS`."""
    if not isinstance(detector, base.Base):
        return {}
    out: dict[str, Any] = {}
    cls: Any = type(detector)
    for k in _param_names(cls):
        v = getattr(detector, k, None)
        if k not in FITTED_PARAMS and (v is None or isinstance(v, (bool, int, float, str))):
            out[k] = _encode(v)
    return out


def monitor_state(detector: Any) -> dict[str, Any]:
    """The running state of any River-protocol detector as strict JSON (no pickle).

    ``{"type", "settings", "state"}``: the class, its scalar constructor
    arguments and every non-callable attribute, recursively: numbers
    (non-finite ones tagged), deques, tuples, ``random.Random`` states (KSWIN's
    sampler), nested River objects (PageHinkley's running ``Mean``, the
    wrapped detector of :class:`ADWINMonitor`) and helpers with a bytes
    ``__getstate__`` (ADWIN's Rust ``AdaptiveWindowing``, stored base64).  A
    detector holding anything else raises ``TypeError``, so an unsupported
    detector fails loudly instead of restarting silently.  Inverse:
    :func:`restore_monitor`.
    """
    return {
        "type": f"{type(detector).__module__}.{type(detector).__qualname__}",
        "settings": _settings(detector),
        "state": _attributes(detector),
    }


def restore_monitor(detector: Any, stored: dict[str, Any] | None) -> Any | None:
    """A copy of ``detector`` continued from ``stored`` (:func:`monitor_state`), or ``None``.

    ``detector`` is the configured (fresh) detector and is not modified.
    ``None`` when nothing is stored, when the stored detector is of another
    type or has other settings (:data:`FITTED_PARAMS` aside), or when its state
    cannot be read back (e.g. a helper state written by another River version):
    the caller then starts the configured detector empty.  A restored detector's next
    ``update`` gives exactly what the uninterrupted one would have.
    """
    if not stored or "type" not in stored:
        return None
    name = f"{type(detector).__module__}.{type(detector).__qualname__}"
    if stored["type"] != name or stored.get("settings") != _settings(detector):
        return None
    out = copy.deepcopy(detector)
    try:
        _load_attributes(out, stored["state"])
    except (KeyboardInterrupt, SystemExit):
        raise
    except (
        BaseException
    ):  # a Rust helper's bad state raises pyo3's PanicException (not an Exception)
        return None
    return out
