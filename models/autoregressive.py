"""Univariate telemetry ``{ts, value, key}`` as model inputs: a key's last L values plus calendar.

The most common telemetry is one number per key per time stamp.  In
``autoregressive`` mode (:class:`fogline.models.spec.ModelSpec`: ``mode``,
``lags``, ``calendar``) the model predicts a record's value from

    x_t = (v_{t-1}, ..., v_{t-L},                  the same key's last L values, newest first
           sin(2 pi h/24), cos(2 pi h/24),          hour of day h in [0, 24) (UTC)
           sin(2 pi d/7),  cos(2 pi d/7))           day of week d = weekday + h/24 in [0, 7)

with y_t = v_t.  The calendar terms (only with ``calendar``) let the model
carry a daily or weekly cycle that L lags cannot see.

:func:`build_features` is a pure function of the records and a :class:`LagState`
(each key's last L values, oldest first): it returns the features of every
record whose key already has L past values, and the new state.  The state is
explicit and JSON-able (:meth:`LagState.to_json` / :meth:`LagState.from_json`,
floats written with ``repr`` so they read back bit for bit), so it can ride in
a snapshot and a restarted daemon builds exactly the features the
uninterrupted one would have.  Records are taken in the order given (the
stream's order); a record whose key has fewer than L past values only fills
the key's buffer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

#: The calendar inputs appended after the lags, in order.
CALENDAR_FEATURES: tuple[str, ...] = ("hour_sin", "hour_cos", "dow_sin", "dow_cos")


def feature_names(lags: int, calendar: bool) -> tuple[str, ...]:
    """Names of the inputs: ``lag_1 .. lag_L`` (newest first), then the calendar terms."""
    if lags < 1:
        raise ValueError(f"lags: must be >= 1, got {lags}")
    return tuple(f"lag_{k}" for k in range(1, lags + 1)) + (CALENDAR_FEATURES if calendar else ())


@dataclass(frozen=True)
class Record:
    """One telemetry record: time stamp, value, key."""

    ts: datetime
    value: float
    key: str = ""


@dataclass(frozen=True)
class LagState:
    """Each key's last ``lags`` values, oldest first (immutable)."""

    lags: int
    buffers: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Strict JSON with exact floats (``repr`` strings)."""
        return {
            "lags": self.lags,
            "buffers": {k: [repr(float(v)) for v in b] for k, b in sorted(self.buffers.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LagState:
        """Inverse of :meth:`to_json`."""
        lags = int(data["lags"])
        buffers = {str(k): tuple(float(v) for v in b) for k, b in data["buffers"].items()}
        for k, b in buffers.items():
            if len(b) > lags:
                raise ValueError(f"buffers[{k!r}]: {len(b)} values, more than lags={lags}")
        return cls(lags, buffers)


def parse_ts(value: Any) -> datetime:
    """A time stamp as an aware UTC datetime: ISO 8601 text, a datetime, or epoch seconds."""
    if isinstance(value, datetime):
        ts = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"ts: {value!r} is not a finite epoch time")
        return datetime.fromtimestamp(float(value), tz=UTC)
    elif isinstance(value, str):
        try:
            ts = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"ts: {value!r} is not an ISO 8601 time stamp") from None
    else:
        raise ValueError(f"ts: {value!r} is neither a time stamp nor epoch seconds")
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def calendar_features(ts: datetime) -> tuple[float, float, float, float]:
    """(sin, cos) of the hour of day and of the day of week (module docstring), in UTC."""
    t = parse_ts(ts)
    h = t.hour + t.minute / 60.0 + (t.second + t.microsecond / 1e6) / 3600.0
    d = t.weekday() + h / 24.0
    a, b = 2.0 * math.pi * h / 24.0, 2.0 * math.pi * d / 7.0
    return (math.sin(a), math.cos(a), math.sin(b), math.cos(b))


def build_features(
    records: Sequence[Record], state: LagState, calendar: bool = True
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.int64], LagState]:
    """Features of a run of records: ``(x [M, L (+4)], y [M], rows [M], new state)``.

    ``rows`` are the positions in ``records`` of the M records that have
    features (their key had ``state.lags`` past values); every record updates
    its key's buffer.  A non-finite value raises ``ValueError`` naming the row.
    """
    lags = state.lags
    width = lags + (len(CALENDAR_FEATURES) if calendar else 0)
    buffers = {k: list(v) for k, v in state.buffers.items()}
    xs: list[list[float]] = []
    ys: list[float] = []
    rows: list[int] = []
    for i, r in enumerate(records):
        v = float(r.value)
        if not math.isfinite(v):
            raise ValueError(f"row {i}: value {r.value!r} is not a finite number")
        buf = buffers.setdefault(r.key, [])
        if len(buf) == lags:
            feats = buf[::-1]
            if calendar:
                feats = feats + list(calendar_features(r.ts))
            xs.append(feats)
            ys.append(v)
            rows.append(i)
        buf.append(v)
        if len(buf) > lags:
            del buf[0]
    x = np.asarray(xs, dtype=np.float64).reshape(len(xs), width)
    new = LagState(lags, {k: tuple(b) for k, b in buffers.items()})
    return x, np.asarray(ys, dtype=np.float64), np.asarray(rows, dtype=np.int64), new


__all__ = [
    "CALENDAR_FEATURES",
    "LagState",
    "Record",
    "build_features",
    "calendar_features",
    "feature_names",
    "parse_ts",
]
