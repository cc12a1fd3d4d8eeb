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

With a period P (``season``: fixed in the spec, or detected by the warm
start, :func:`resolve_season`) the inputs also hold the values P - 1, P and
P + 1 records ago (``season_lag_k``, those beyond L) and, after the calendar,
the seasonal naive forecast ``season_naive`` = v_{t-P} + v_{t-1} - v_{t-1-P};
each key's buffer keeps max(L, P + 1) values.  These are the inputs
``fogline bench nab`` builds (:func:`fogline.drift.experiment.load_nab` calls
:func:`features_for` too).

Everything outside this module builds inputs through ONE function,
:func:`features_for` (warm start, daemon, query, experiment), which takes the
:class:`~fogline.models.spec.ModelSpec` and a :class:`SeriesState` (the
:class:`LagState` plus each key's last two time stamps, for a query's default
time).  The daemon and the snapshot layer treat its JSON
(:meth:`SeriesState.to_json`, stored under ``state.extra["autoregressive"]``,
inside the checksum) as opaque, so inputs added here plug in without them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from fogline.models.spec import ModelSpec

#: ``PosteriorState.extra`` slot of an autoregressive model: ``{"spec": ModelSpec JSON,
#: "series": SeriesState JSON}`` (written by the warm start and every daemon snapshot).
EXTRA_KEY = "autoregressive"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: The calendar inputs appended after the lags, in order.
CALENDAR_FEATURES: tuple[str, ...] = ("hour_sin", "hour_cos", "dow_sin", "dow_cos")
#: The name of the seasonal naive forecast input (:func:`seasonal_naive`), the last column.
SEASON_NAIVE = "season_naive"


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


#: Values of the lagged pairs that :func:`lag_correlations` lays end to end at once
#: (a few arrays of this many float64, 0.5 MB each: they stay in cache).
LAG_CHUNK_ELEMENTS = 65_536


def lag_correlations(v: npt.NDArray[np.float64], top: int) -> npt.NDArray[np.float64]:
    """r(k) for k = 2..``top``: the Pearson correlation of ``v[:-k]`` with ``v[k:]``
    (0 where either is constant), ``[top - 1]``.

    Bit for bit what ``np.mean((a - a.mean()) * (b - b.mean())) / (a.std() * b.std())``
    gives per lag (numpy's ``_mean`` and ``_var``): the same elementwise operations
    and the same sums, each an ``np.add.reduce`` over one lag's m = n - k values
    (a row of a ``[rows, m]`` slice reduces as that row alone does, pairwise), while
    the elementwise work of many lags is one call on their values laid end to end.
    The Python loop is left with two reductions per lag instead of about twenty calls.
    """
    n = int(v.shape[0])
    r = np.zeros(max(top - 1, 0))
    add = np.add.reduce
    lo = 2
    while lo <= top:
        # lags lo..hi-1: as many as fit LAG_CHUNK_ELEMENTS (at least one)
        hi = lo + 1
        size = n - lo
        while hi <= top and size + n - hi <= LAG_CHUNK_ELEMENTS:
            size += n - hi
            hi += 1
        lags = np.arange(lo, hi)
        ms = n - lags  # pairs per lag
        ends = np.cumsum(ms)
        starts = ends - ms
        bounds = list(zip(starts.tolist(), ends.tolist(), strict=True))
        pos = np.arange(size) - np.repeat(starts, ms)  # 0..m-1 within each lag
        x = np.empty((2, size))  # row 0: a = v[:-k], row 1: b = v[k:], lag after lag
        np.take(v, pos, out=x[0])
        np.take(v, pos + np.repeat(lags, ms), out=x[1])
        sums = np.empty((2, len(lags)))
        for i, (s, e) in enumerate(bounds):
            sums[:, i] = add(x[:, s:e], axis=1)
        d = x - np.repeat(sums / ms, ms, axis=1)  # a - a.mean(), b - b.mean()
        p = np.empty((3, size))
        np.multiply(d, d, out=p[:2])
        np.multiply(d[0], d[1], out=p[2])
        moments = np.empty((3, len(lags)))
        for i, (s, e) in enumerate(bounds):
            moments[:, i] = add(p[:, s:e], axis=1)
        sd = np.sqrt(moments[:2] / ms)  # a.std(), b.std()
        ok = (sd[0] > 0) & (sd[1] > 0)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
            np.divide(moments[2] / ms, sd[0] * sd[1], out=r[lo - 2 : hi - 2], where=ok)
        lo = hi
    return r


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
    r = lag_correlations(v, top)
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


def spec_period(spec: ModelSpec) -> int | None:
    """The spec's period P (``season`` an integer), else ``None``.

    ``"auto"`` is resolved by the warm start (:func:`resolve_season`); a spec
    still ``"auto"`` when inputs are built (a fresh prior, nothing to detect
    on) has no seasonal inputs.
    """
    return spec.season if isinstance(spec.season, int) else None


def spec_depth(spec: ModelSpec) -> int:
    """How many past values each key's buffer keeps: max(L, P + 1)."""
    return max(seasonal_lags(spec.lags, spec_period(spec)))


def spec_feature_names(spec: ModelSpec) -> tuple[str, ...]:
    """The input names of an autoregressive spec (what ``spec.features`` is set to).

    ``lag_1 .. lag_L``; with a period P the lags of :func:`seasonal_lags`
    beyond L as ``season_lag_k`` (k in P - 1, P, P + 1); the calendar terms;
    with P the seasonal naive forecast ``season_naive`` last: the column order
    of :func:`select_lags` + :func:`seasonal_naive`, as ``bench nab`` builds them.
    """
    period = spec_period(spec)
    names = list(feature_names(spec.lags, False))
    names += [f"season_lag_{k}" for k in seasonal_lags(spec.lags, period) if k > spec.lags]
    if spec.calendar:
        names += CALENDAR_FEATURES
    if period is not None:
        names.append(SEASON_NAIVE)
    return tuple(names)


def resolve_season(spec: ModelSpec, values: npt.ArrayLike) -> ModelSpec:
    """``spec`` with ``season = "auto"`` resolved on a key's history ``values``.

    The period is :func:`detect_period` of the values with ``min_lag = 2 L``
    (the rule ``bench nab`` uses on its probationary period); none found:
    ``season = "none"``.  A spec with an integer or ``"none"`` (or not
    autoregressive) is returned as is.  The warm start passes the longest
    key's history (the first such key on a tie); one period serves every key,
    since the inputs are the model's.
    """
    if spec.mode != "autoregressive" or spec.season != "auto":
        return spec
    period = detect_period(values, min_lag=2 * spec.lags)
    return with_season(spec, period if period is not None else "none")


def with_season(spec: ModelSpec, season: int | str) -> ModelSpec:
    """A copy of ``spec`` with ``season`` set (its derived inputs and transforms rebuilt)."""
    from fogline.models.spec import ModelSpec

    data = spec.model_dump(mode="json", exclude={"features"})
    data["transforms"] = {  # the derived seasonal columns are rebuilt for the new season
        k: v
        for k, v in data["transforms"].items()
        if not (k.startswith("season_lag_") or k == SEASON_NAIVE)
    }
    data["season"] = season
    return ModelSpec.model_validate(data)


def ts_from_ms(ms: int) -> datetime:
    """Epoch milliseconds as an aware UTC datetime (exact: no float division)."""
    return _EPOCH + timedelta(milliseconds=int(ms))


@dataclass(frozen=True)
class SeriesState:
    """What a stream of ``{ts, value, key}`` records carries between batches (immutable).

    ``lags``: each key's last L values (:class:`LagState`); ``clock``: each
    key's last two time stamps in epoch ms (oldest first), so a query without
    ``ts`` predicts at last + (last - previous).
    """

    lags: LagState
    clock: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def empty(cls, spec: ModelSpec) -> SeriesState:
        """No history for any key (buffers of depth max(L, P + 1), :func:`spec_depth`)."""
        return cls(LagState(spec_depth(spec)))

    def known_keys(self) -> list[str]:
        """Keys seen so far, sorted."""
        return sorted(self.lags.buffers)

    def history(self, key: str) -> int:
        """How many past values ``key`` has in its buffer (0 .. depth)."""
        return len(self.lags.buffers.get(key, ()))

    def next_ts_ms(self, key: str) -> int | None:
        """The key's next time stamp by its last step (its last one with a single record)."""
        c = self.clock.get(key)
        if not c:
            return None
        return c[-1] + (c[-1] - c[-2]) if len(c) > 1 else c[-1]

    def to_json(
        self, previous: Mapping[str, Any] | None = None, changed: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """Strict JSON, exact (floats as ``repr`` strings, times as integers).

        With ``previous`` (this state's JSON before a batch) and ``changed`` (the
        keys the batch touched) only those keys are written anew and the rest
        is shared with ``previous``: O(touched keys) instead of O(all keys).
        Same content as the full form (key order aside, which canonical JSON
        ignores).
        """
        if previous is None or changed is None:
            return {
                "lags": self.lags.to_json(),
                "clock": {k: [int(t) for t in v] for k, v in sorted(self.clock.items())},
            }
        keys = [k for k in dict.fromkeys(changed) if k in self.lags.buffers]
        part = LagState(self.lags.lags, {k: self.lags.buffers[k] for k in keys}).to_json()
        lags = dict(previous["lags"])
        for name, value in part.items():  # per-key sections merged, the rest replaced
            old = lags.get(name)
            lags[name] = (
                {**old, **value} if isinstance(value, dict) and isinstance(old, dict) else value
            )
        clock = {**previous["clock"], **{k: [int(t) for t in self.clock[k]] for k in keys}}
        return {"lags": lags, "clock": clock}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SeriesState:
        """Inverse of :meth:`to_json`."""
        clock = {str(k): tuple(int(t) for t in v) for k, v in data.get("clock", {}).items()}
        return cls(LagState.from_json(data["lags"]), clock)


@dataclass(frozen=True)
class SeriesFeatures:
    """:func:`features_for`'s result: ``x`` [M, D], ``y`` [M] (raw units, float64),
    ``rows`` [M] (positions of the featured records), the new state, and
    ``warming``: records that only filled their key's buffer (fewer than L past values)."""

    x: npt.NDArray[np.float64]
    y: npt.NDArray[np.float64]
    rows: npt.NDArray[np.int64]
    state: SeriesState
    warming: int


def features_for(spec: ModelSpec, records: Sequence[Record], state: SeriesState) -> SeriesFeatures:
    """The model inputs of ``records`` (in the order given) for an autoregressive ``spec``.

    The one place inputs are built: :func:`build_features` with the spec's
    ``calendar`` on buffers of depth max(L, P + 1); with a period P
    (``spec.season``) the columns of :func:`seasonal_lags` are kept
    (:func:`select_lags`) and the seasonal naive forecast appended
    (:func:`seasonal_naive`), in the order of :func:`spec_feature_names`.
    Each key's clock is advanced.  A record whose key has fewer than
    max(L, P + 1) past values only fills the buffer (``warming``).
    ``state`` must have been built for the same spec (its depth).
    """
    depth = spec_depth(spec)
    if state.lags.lags != depth:
        raise ValueError(
            f"lags: the series state keeps {state.lags.lags} values, the spec needs {depth} "
            f"(lags={spec.lags}, season={spec.season!r})"
        )
    # keys are independent: only the batch's keys go through the builder, and the
    # others are shared with the old state (O(batch), not O(all keys), per batch)
    touched = {r.key for r in records}
    old = state.lags.buffers
    part = LagState(depth, {k: old[k] for k in touched if k in old})
    x, y, rows, built = build_features(records, part, calendar=spec.calendar)
    period = spec_period(spec)
    if period is not None:
        lags = seasonal_lags(spec.lags, period)
        x = select_lags(x, depth, lags, spec.calendar)
        naive = seasonal_naive(x, lags, period).reshape(len(rows), 1)
        x = np.ascontiguousarray(np.concatenate([x, naive], axis=1))
    lag_state = LagState(depth, {**old, **built.buffers})
    clock = dict(state.clock)
    for r in records:
        ms = (r.ts - _EPOCH) // timedelta(milliseconds=1)
        prev = clock.get(r.key, ())
        clock[r.key] = (*prev[-1:], ms)
    return SeriesFeatures(x, y, rows, SeriesState(lag_state, clock), len(records) - len(rows))


class ShortHistory(LookupError):
    """A key has fewer than L past values (or none): it cannot be predicted yet."""

    def __init__(self, key: str, have: int, need: int) -> None:
        self.key, self.have, self.need = key, have, need
        what = "no history" if have == 0 else f"{have} past values"
        super().__init__(f"key {key!r}: {what}; a prediction needs {need}")


def next_inputs(
    spec: ModelSpec, state: SeriesState, key: str, ts_ms: int | None = None
) -> tuple[npt.NDArray[np.float64], int]:
    """Raw inputs ``[1, D]`` of ``key``'s NEXT value at ``ts_ms`` (default: the key's next step).

    Built by :func:`features_for` on a placeholder record (its value only
    enters the returned, discarded state).  Returns ``(x, ts_ms)``; raises
    :class:`ShortHistory` when the key has fewer than max(L, P + 1) past values.
    """
    have, need = state.history(key), spec_depth(spec)
    if have < need:
        raise ShortHistory(key, have, need)
    ts = ts_ms if ts_ms is not None else state.next_ts_ms(key)
    if ts is None:  # pragma: no cover - a buffer always comes with a clock
        ts = 0
    feats = features_for(spec, [Record(ts_from_ms(ts), 0.0, key)], state)
    return feats.x, int(ts)


def series_extra(
    spec: ModelSpec,
    state: SeriesState,
    previous: Mapping[str, Any] | None = None,
    changed: Iterable[str] | None = None,
) -> dict[str, Any]:
    """The ``state.extra[EXTRA_KEY]`` value: the spec and the series state (JSON).

    ``previous`` (the value before a batch) and ``changed`` (the batch's keys)
    make it incremental (:meth:`SeriesState.to_json`).
    """
    if previous is None or changed is None:
        return {"spec": spec.model_dump(mode="json"), "series": state.to_json()}
    return {"spec": previous["spec"], "series": state.to_json(previous["series"], changed)}


def stored_series(extra: Mapping[str, Any]) -> tuple[ModelSpec, SeriesState] | None:
    """The spec and series state kept in a ``PosteriorState.extra`` (``None``: not AR)."""
    from fogline.models.spec import ModelSpec

    slot = extra.get(EXTRA_KEY)
    if not slot:
        return None
    spec = ModelSpec.model_validate(slot["spec"])
    return spec, SeriesState.from_json(slot["series"])


__all__ = [
    "CALENDAR_FEATURES",
    "EXTRA_KEY",
    "SEASON_NAIVE",
    "LagState",
    "Record",
    "SeriesFeatures",
    "SeriesState",
    "ShortHistory",
    "build_features",
    "calendar_features",
    "detect_period",
    "feature_names",
    "features_for",
    "next_inputs",
    "parse_ts",
    "resolve_season",
    "seasonal_lags",
    "seasonal_naive",
    "select_lags",
    "series_extra",
    "spec_depth",
    "spec_feature_names",
    "spec_period",
    "stored_series",
    "ts_from_ms",
    "with_season",
]
