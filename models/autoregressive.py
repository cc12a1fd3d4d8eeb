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


def detect_period(
    values: npt.ArrayLike,
    min_lag: int = 2,
    max_lag: int | None = None,
    min_acf: float = 0.5,
    min_prominence: float = 0.5,
) -> int | None:
    """The dominant period of a series (records) from its autocorrelation, or ``None``.

    With r(k) the Pearson correlation of (v_0..v_{n-1-k}) with (v_k..v_{n-1})
    for k = 2..``max_lag`` (default n // 2, so at least n / 2 pairs), the
    period is the k >= ``min_lag`` of largest prominence

        r(k) - min_{2 <= j <= k} r(j)

    (how far the correlation climbs back after its first decay: a trend or a
    smooth series has a slowly decaying r with no such climb), accepted only
    when r(k) >= ``min_acf`` and the prominence >= ``min_prominence``.  The
    multiples of a period are periods too: when k*/m (m = 2, 3, ...; within a
    record) reaches 90 % of the best prominence, the smallest such is taken.
    A constant or too short series has no period.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    n = len(v)
    top = n // 2 if max_lag is None else min(max_lag, n // 2)
    if top < max(min_lag, 2) or not np.all(np.isfinite(v)) or np.ptp(v) == 0:
        return None
    ks = np.arange(2, top + 1)
    r = np.zeros(len(ks))
    for i, k in enumerate(ks):
        a, b = v[:-k], v[k:]
        sa, sb = a.std(), b.std()
        if sa > 0 and sb > 0:
            r[i] = float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))
    prominence = r - np.minimum.accumulate(r)
    ok = (ks >= min_lag) & (r >= min_acf) & (prominence >= min_prominence)
    if not ok.any():
        return None
    score = np.where(ok, prominence, -np.inf)
    i = int(np.argmax(score))
    k_best, best = int(ks[i]), float(score[i])
    period = k_best
    for m in range(2, k_best // max(min_lag, 2) + 1):
        c = round(k_best / m) - 2  # index of lag k*/m (ks[j] = j + 2)
        near = [j for j in (c - 1, c, c + 1) if 0 <= j < len(ks)]
        j = max(near, key=lambda j: score[j])
        if score[j] >= 0.9 * best:
            period = int(ks[j])
    return period


def seasonal_lags(lags: int, period: int | None) -> tuple[int, ...]:
    """The lags of the inputs: 1..``lags`` and, with a period P, P - 1, P and P + 1 (sorted, unique).

    The value one season ago (and its neighbours, for a phase that jitters by
    a record) lets the model predict a daily or weekly pattern that the last
    ``lags`` values cannot see.
    """
    if lags < 1:
        raise ValueError(f"lags: must be >= 1, got {lags}")
    out = set(range(1, lags + 1))
    if period is not None:
        if period < 2:
            raise ValueError(f"period: must be >= 2, got {period}")
        out |= {period - 1, period, period + 1}
    return tuple(sorted(out))


def select_lags(
    x: npt.NDArray[np.float64], max_lag: int, lags: Sequence[int], calendar: bool
) -> npt.NDArray[np.float64]:
    """The columns of ``lags`` (and the calendar terms) out of :func:`build_features` output.

    ``x`` holds lag_1 .. lag_``max_lag`` (newest first) then, with ``calendar``,
    the four calendar terms.
    """
    if not lags or min(lags) < 1 or max(lags) > max_lag:
        raise ValueError(f"lags: must lie in 1..{max_lag}, got {tuple(lags)}")
    cols = [k - 1 for k in lags]
    if calendar:
        cols += list(range(max_lag, max_lag + len(CALENDAR_FEATURES)))
    return np.ascontiguousarray(x[:, cols])


def seasonal_naive(
    x: npt.NDArray[np.float64], lags: Sequence[int], period: int
) -> npt.NDArray[np.float64]:
    """The seasonal naive forecast f_t = v_{t-P} + (v_{t-1} - v_{t-1-P}) [M] from lag columns.

    ``x`` holds the columns of ``lags`` in that order (:func:`select_lags`),
    which must include 1, P and P + 1.  Last season's value moved by the
    change of level since then: exact for a repeating pattern on a drifting
    level, and one input direction the model can follow from a short warm-up
    (a daily square wave has two edges a day, too few to learn from lags alone).
    """
    pos = {k: i for i, k in enumerate(lags)}
    missing = [k for k in (1, period, period + 1) if k not in pos]
    if missing:
        raise ValueError(f"lags: need {missing} for the seasonal naive forecast of period {period}")
    return np.asarray(x[:, pos[period]] + x[:, pos[1]] - x[:, pos[period + 1]], dtype=np.float64)


__all__ = [
    "CALENDAR_FEATURES",
    "LagState",
    "Record",
    "build_features",
    "calendar_features",
    "detect_period",
    "feature_names",
    "parse_ts",
    "seasonal_lags",
    "seasonal_naive",
    "select_lags",
]
