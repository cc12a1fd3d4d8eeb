"""Decode and validate telemetry records (pure: no Kafka, no Redis).

Wire format (one JSON object per Kafka record value, UTF-8)::

    {"ts": 1700000000.25 | 1700000000250 | "2023-11-14T22:13:20Z",
     "x": [0.1, 2.0, ...]  or  {"feature": value, ...},
     "y": 1.5,
     "key": "sensor-7"}            # optional

Rules, checked against the model's ordered feature list ``features``:

- a value given as bytes is UTF-8 (RFC 8259 §8.1): anything else -- UTF-16 or
  UTF-32 with or without a BOM (which ``json.loads`` would otherwise detect and
  accept), invalid UTF-8 -- is rejected as ``not_utf8``.  A leading UTF-8 BOM
  is ignored, as RFC 8259 allows.

- ``x`` as a list has exactly ``len(features)`` numbers in feature order; as an
  object it has exactly the feature names as keys (no missing, no extra).
- every ``x`` value and ``y`` is a JSON number (not a bool, not a string),
  finite, and finite as a float32 too (``abs(v) < F32_LIMIT``; the model
  computes in float32).
- ``ts`` is a number or an ISO-8601 string.  Numbers with ``|ts| < 1e11`` are
  epoch **seconds**, larger ones epoch **milliseconds** (1e11 s is the year
  5138; 1e11 ms is March 1973).  A string without a zone is UTC.  The result
  is integer epoch milliseconds.  When ``ts`` is absent the Kafka record's
  timestamp is used; when that is unknown too, the record is rejected.
- ``key`` is absent, ``null``, a string or an integer (kept as a string).
- other fields are ignored.

Whatever the input bytes, :func:`decode` returns a :class:`Record` or raises
:class:`DecodeError`, never anything else (a property test holds it to that).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

#: Largest finite float32.
F32_MAX = 3.4028234663852886e38
#: Smallest magnitude that rounds to infinity in float32 (F32_MAX + half an ulp):
#: a value is accepted iff ``abs(v) < F32_LIMIT``, i.e. iff it stays finite as float32.
F32_LIMIT = 2.0**128 - 2.0**103
#: ``|ts|`` below this is epoch seconds, at or above it epoch milliseconds.
SECONDS_LIMIT = 1e11
#: Timestamps are kept within signed 64-bit milliseconds.
_TS_MS_MAX = 2**63 - 1

_loads = json.loads
_isfinite = math.isfinite
_NUM_TYPES = frozenset({float, int})
_FLOAT_ONLY = {float}


class DecodeError(ValueError):
    """A record that cannot be decoded or does not validate.

    ``reason`` is a short stable code (``not_utf8``, ``invalid_json``, ``not_object``,
    ``missing_field``, ``bad_x``, ``x_length``, ``missing_feature``,
    ``unknown_feature``, ``non_numeric``, ``non_finite``, ``out_of_range``,
    ``bad_ts``, ``bad_key``, ``empty``) fit for a metric label; ``detail``
    says more.  ``str(err)`` is ``"reason: detail"``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def reason_code(reason: str) -> str:
    """The stable code of a reason text (``"non_finite: y"`` -> ``"non_finite"``)."""
    return reason.split(":", 1)[0]


def partition_key(topic: str, partition: int) -> str:
    """``"topic:partition"``, the key of every offset mapping in fogline."""
    return f"{topic}:{partition}"


class RawRecord(NamedTuple):
    """One record as read from Kafka (built by :mod:`fogline.daemon.stream.source`)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None
    headers: tuple[tuple[str, bytes], ...] = ()


class Record(NamedTuple):
    """A decoded, validated record: ``x`` ordered by the feature list."""

    x: tuple[float, ...]
    y: float
    ts_ms: int
    key: str | None


def next_offsets(records: Iterable[RawRecord]) -> dict[str, int]:
    """Next offset to read per ``"topic:partition"`` after ``records`` (max offset + 1)."""
    out: dict[str, int] = {}
    for r in records:
        k = partition_key(r.topic, r.partition)
        nxt = r.offset + 1
        if out.get(k, -1) < nxt:
            out[k] = nxt
    return out


# --------------------------------------------------------------------------
# field checks
# --------------------------------------------------------------------------


def _number(v: Any, what: str) -> float:
    t = type(v)
    if t is float:
        f: float = v
    elif t is int:
        try:
            f = float(v)
        except OverflowError:
            raise DecodeError("out_of_range", what) from None
    else:
        raise DecodeError("non_numeric", f"{what} is {t.__name__}")
    if not _isfinite(f):
        raise DecodeError("non_finite", what)
    if f >= F32_LIMIT or f <= -F32_LIMIT:
        raise DecodeError("out_of_range", what)
    return f


def parse_ts(v: Any) -> int:
    """A ``ts`` field (number or ISO-8601 string, see module doc) as epoch ms.

    >>> parse_ts(1.5), parse_ts(1_700_000_000_000), parse_ts("1970-01-01T00:00:02Z")
    (1500, 1700000000000, 2000)
    """
    t = type(v)
    if t is int or t is float:
        f = float(v) if t is float else v
        try:
            ms = v * 1000 if abs(f) < SECONDS_LIMIT else v
            if t is float and not _isfinite(ms):
                raise DecodeError("bad_ts", "not finite")
            out = round(ms)
        except (OverflowError, ValueError):
            raise DecodeError("bad_ts", "out of range") from None
    elif t is str:
        try:
            dt = datetime.fromisoformat(v)
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
            out = round(dt.timestamp() * 1000)
        except (ValueError, OverflowError, OSError):
            raise DecodeError("bad_ts", "not an ISO-8601 time") from None
    else:
        raise DecodeError("bad_ts", f"ts is {t.__name__}")
    if out > _TS_MS_MAX or out < -_TS_MS_MAX:
        raise DecodeError("bad_ts", "out of range")
    return int(out)


def _key(v: Any) -> str | None:
    if v is None:
        return None
    t = type(v)
    if t is str:
        return str(v)
    if t is int:
        return str(v)
    raise DecodeError("bad_key", f"key is {t.__name__}")


class Decoder:
    """Decode records for one model's ordered feature list.

    >>> d = Decoder(["a", "b"])
    >>> d.decode(b'{"ts": 1.5, "x": {"b": 2, "a": 1}, "y": 0.5, "key": "k"}')
    Record(x=(1.0, 2.0), y=0.5, ts_ms=1500, key='k')
    >>> d.decode(b'{"ts": 1, "x": [1, NaN], "y": 0}')
    Traceback (most recent call last):
    ...
    fogline.daemon.stream.decode.DecodeError: non_finite: x[1]
    """

    def __init__(self, features: Sequence[str]) -> None:
        feats = tuple(str(f) for f in features)
        if not feats:
            raise ValueError("a model needs at least one feature")
        if len(set(feats)) != len(feats):
            raise ValueError(f"duplicate feature names in {feats}")
        self.features = feats
        self.n_features = len(feats)
        self._set = frozenset(feats)

    def _x(self, xv: Any) -> tuple[float, ...] | list[Any]:
        """Values of ``x`` in feature order (unchecked numbers)."""
        t = type(xv)
        if t is list:
            if len(xv) != self.n_features:
                raise DecodeError("x_length", f"{len(xv)} values, model has {self.n_features}")
            return xv  # type: ignore[no-any-return]
        if t is dict:
            try:
                return [xv[f] for f in self.features]
            except KeyError:
                missing = sorted(self._set.difference(xv))
                raise DecodeError("missing_feature", ",".join(missing)[:200]) from None
        raise DecodeError("bad_x", f"x is {t.__name__}")

    def parse(self, obj: Any, default_ts_ms: int | None = None) -> Record:
        """Validate an already-parsed JSON value."""
        if type(obj) is not dict:
            raise DecodeError("not_object", type(obj).__name__)
        try:
            xv = obj["x"]
            yv = obj["y"]
        except KeyError as exc:
            raise DecodeError("missing_field", str(exc.args[0])) from None
        vals = self._x(xv)
        if type(xv) is dict and len(xv) != self.n_features:
            extra = sorted(str(k) for k in xv if k not in self._set)
            raise DecodeError("unknown_feature", ",".join(extra)[:200])
        # Fast path, all C-level: only float/int values, and sum, max and min
        # within float32 range (a NaN or inf fails the comparisons).  Anything
        # else takes the exact per-value path, which names the culprit.
        types = set(map(type, vals))
        x: tuple[float, ...] | None = None
        if types <= _NUM_TYPES:
            try:
                s = sum(vals)
                if -F32_LIMIT < s < F32_LIMIT and max(vals) < F32_LIMIT and min(vals) > -F32_LIMIT:
                    x = tuple(vals) if int not in types else tuple(map(float, vals))
            except OverflowError:
                x = None
        if x is None:
            x = tuple(_number(v, f"x[{i}]") for i, v in enumerate(vals))
        y = yv if type(yv) is float and -F32_LIMIT < yv < F32_LIMIT else _number(yv, "y")
        tsv = obj.get("ts")
        if type(tsv) is float and 0.0 <= tsv < SECONDS_LIMIT:
            ts = round(tsv * 1000.0)
        elif tsv is None:
            if default_ts_ms is None or default_ts_ms < 0:
                raise DecodeError("bad_ts", "no ts and no record timestamp")
            ts = int(default_ts_ms)
        else:
            ts = parse_ts(tsv)
        key = obj.get("key")
        if key is not None and type(key) is not str:
            key = _key(key)
        return Record(x, y, ts, key)

    def decode(
        self, value: bytes | bytearray | str | None, default_ts_ms: int | None = None
    ) -> Record:
        """Decode one record value; raise :class:`DecodeError` and nothing else."""
        if not value:
            raise DecodeError("empty", "no value")
        if isinstance(value, bytes | bytearray):
            value = _utf8(value)
        try:
            obj = _loads(value)
        except (ValueError, TypeError, RecursionError) as exc:
            raise DecodeError("invalid_json", type(exc).__name__) from None
        try:
            return self.parse(obj, default_ts_ms)
        except DecodeError:
            raise
        except (
            TypeError,
            ValueError,
            OverflowError,
            RecursionError,
            MemoryError,
        ) as exc:  # pragma: no cover
            # defensive: every known path raises DecodeError already
            raise DecodeError("invalid", type(exc).__name__) from None


def _utf8(value: bytes | bytearray) -> str:
    """``value`` as UTF-8 text (a leading BOM dropped); :class:`DecodeError` ``not_utf8`` else."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError("not_utf8", f"{exc.reason} at byte {exc.start}") from None
    return text[1:] if text.startswith("\ufeff") else text


def decode(
    value: bytes | bytearray | str | None,
    features: Sequence[str],
    default_ts_ms: int | None = None,
) -> Record:
    """Decode one record value against ``features`` (see :class:`Decoder`)."""
    return Decoder(features).decode(value, default_ts_ms)


class DecodedBatch:
    """Result of :func:`decode_batch`; iterates as ``(x, y, good, bad)``.

    Attributes
    ----------
    x : ndarray, shape (n_good, n_features), float32
    y : ndarray, shape (n_good,), float32
    good : list[int]
        Position in the input of each row of ``x``.
    bad : list[tuple[raw, reason, position]]
        Each rejected input with ``str(DecodeError)`` (``"code: detail"``).
    ts_ms : ndarray, shape (n_good,), int64
    keys : list[str | None]
    """

    __slots__ = ("bad", "good", "keys", "ts_ms", "x", "y")

    def __init__(
        self,
        x: npt.NDArray[np.float32],
        y: npt.NDArray[np.float32],
        good: list[int],
        bad: list[tuple[Any, str, int]],
        ts_ms: npt.NDArray[np.int64],
        keys: list[str | None],
    ) -> None:
        self.x = x
        self.y = y
        self.good = good
        self.bad = bad
        self.ts_ms = ts_ms
        self.keys = keys

    def __iter__(self) -> Any:
        return iter((self.x, self.y, self.good, self.bad))

    def __len__(self) -> int:
        return len(self.good)

    def __repr__(self) -> str:
        return f"DecodedBatch(good={len(self.good)}, bad={len(self.bad)})"


def decode_batch(
    raw_records: Sequence[Any],
    features: Sequence[str] | Decoder,
) -> DecodedBatch:
    """Decode many records at once.

    ``raw_records`` holds :class:`RawRecord` (its Kafka timestamp stands in
    for a missing ``ts``) or bare values (``bytes``/``str``/``None``).
    Never raises for bad input: rejected records land in ``bad`` with their
    reason and position; order of the good ones is kept.
    """
    dec = features if isinstance(features, Decoder) else Decoder(features)
    xs: list[Any] = []
    ys: list[float] = []
    ts: list[int] = []
    keys: list[str | None] = []
    good: list[int] = []
    bad: list[tuple[Any, str, int]] = []
    # Hot loop: the common well-formed record is checked inline with C-level
    # builtins; anything unusual (an error, ISO ts, int ts out of the seconds
    # range, dict x, ...) goes through Decoder.decode, which is exact and
    # names the reason.  A property test holds both paths to the same result.
    loads, nf, feats, lim = _loads, dec.n_features, dec.features, SECONDS_LIMIT
    values: list[Any] = []  # value of each good row, to re-check a row the arrays reject
    for i, raw in enumerate(raw_records):
        if type(raw) is RawRecord:
            value: Any = raw.value
            default_ts = raw.timestamp_ms
        else:
            value, default_ts = raw, None
        try:
            # bytes must be UTF-8: json.loads(bytes) would also accept UTF-16/32
            # (a failure here sends the record to the exact path, which names it)
            obj = loads(value.decode("utf-8") if type(value) is bytes else value)
            xv = obj["x"]
            yv = obj["y"]
            tsv = obj.get("ts")
            key = obj.get("key")
            tx = type(xv)
            if tx is dict and len(xv) == nf:
                xv = [xv[f] for f in feats]
            elif tx is not list or len(xv) != nf:
                raise TypeError
            types = set(map(type, xv))
            if types != _FLOAT_ONLY:
                if not types <= _NUM_TYPES:
                    raise TypeError
                xv = list(map(float, xv))  # OverflowError for huge ints
            ty = type(yv)
            if ty is int:
                yv = float(yv)
            elif ty is not float:
                raise TypeError
            if key is not None and type(key) is not str:
                raise TypeError
            tt = type(tsv)
            if (tt is float or tt is int) and 0 <= tsv < lim:
                t_ms = round(tsv * 1000)
            elif tsv is None and default_ts is not None and default_ts >= 0:
                t_ms = int(default_ts)
            else:
                raise TypeError
        except Exception:
            try:
                rec = dec.decode(value, default_ts)
            except DecodeError as exc:
                bad.append((raw, str(exc), i))
                continue
            xv, yv, t_ms, key = rec
        xs.append(xv)
        ys.append(yv)
        ts.append(t_ms)
        keys.append(key)
        good.append(i)
        values.append((raw, value, default_ts))
    # Finiteness (NaN, inf, beyond float32) is checked on the float32 arrays at
    # once; a rejected row is decoded again one by one for its exact reason.
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is what we look for
        x = np.array(xs, dtype=np.float32) if good else np.empty((0, nf), dtype=np.float32)
        y = np.array(ys, dtype=np.float32)
    ok = np.isfinite(x).all(axis=1) & np.isfinite(y)
    if not ok.all():
        for row in np.flatnonzero(~ok).tolist():
            raw, value, default_ts = values[row]
            try:
                dec.decode(value, default_ts)
                reason = "non_finite: x"  # pragma: no cover - both paths share one rule
            except DecodeError as exc:
                reason = str(exc)
            bad.append((raw, reason, good[row]))
        bad.sort(key=lambda b: b[2])
        keep = np.flatnonzero(ok)
        x, y = x[keep], y[keep]
        ts = [ts[r] for r in keep.tolist()]
        keys = [keys[r] for r in keep.tolist()]
        good = [good[r] for r in keep.tolist()]
    return DecodedBatch(x, y, good, bad, np.array(ts, dtype=np.int64), keys)


def encode(record: Record | Mapping[str, Any]) -> bytes:
    """Encode a record in the wire format (list ``x``; ``ts`` in seconds or ms, see above).

    Handy for tests and the replay tool; ``decode(encode(r), f) == r``.
    """
    if isinstance(record, Record):
        ms = record.ts_ms
        ts: float | int = ms / 1000 if abs(ms) < SECONDS_LIMIT * 1000 else ms
        obj: dict[str, Any] = {"ts": ts, "x": list(record.x), "y": record.y}
        if record.key is not None:
            obj["key"] = record.key
    else:
        obj = dict(record)
    return json.dumps(obj, separators=(",", ":"), allow_nan=True).encode()
