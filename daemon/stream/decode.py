"""Decode and validate telemetry records (pure: no Kafka, no Redis).

Wire format (one JSON object per Kafka record value, UTF-8), in either of two
forms.  *Flat named fields*, as the model spec (:class:`~fogline.models.spec.ModelSpec`)
names them::

    {"<timestamp>": 1700000000.25, "cpu": 0.1, "mem": 2.0, ..., "<target>": 1.5,
     "<key>": "sensor-7"}

or the *x/y form*::

    {"ts": 1700000000.25 | 1700000000250 | "2023-11-14T22:13:20Z",
     "x": [0.1, 2.0, ...]  or  {"feature": value, ...},
     "y": 1.5,
     "key": "sensor-7"}            # optional

A :class:`Decoder` is built from the model's :class:`~fogline.models.schema.DataSchema`
(the stored state's ``data_schema()``) or from a bare list of feature names
(target ``y``, no transforms).  Rules, checked against the ordered feature
names ``features``:

- a value given as bytes is UTF-8 (RFC 8259 §8.1): anything else -- UTF-16 or
  UTF-32 with or without a BOM (which ``json.loads`` would otherwise detect and
  accept), invalid UTF-8 -- is rejected as ``not_utf8``.  A leading UTF-8 BOM
  is ignored, as RFC 8259 allows.

- a record with an ``x`` field is in the x/y form (unless ``x`` is itself a
  feature name); any other record is flat: every feature name is a field
  (``missing_feature`` names those absent; a record with none of them and no
  ``x`` is ``missing_field``), other fields are ignored.
- ``x`` as a list has exactly ``len(features)`` numbers in feature order; as an
  object it has exactly the feature names as keys (no missing, no extra).
- the target is the field named by the schema's target; when the record has
  no such field, ``y`` is (``missing_field: <target>`` when neither is there).
- every feature value and the target is a JSON number (not a bool, not a
  string), finite, and finite as a float32 too (``abs(v) < F32_LIMIT``; the
  model computes in float32).
- the timestamp is the schema's ``timestamp`` field, else ``ts``: a number or
  an ISO-8601 string.  Numbers with ``|ts| < 1e11`` are
  epoch **seconds**, larger ones epoch **milliseconds** (1e11 s is the year
  5138; 1e11 ms is March 1973).  A string without a zone is UTC.  The result
  is integer epoch milliseconds.  When it is absent the Kafka record's
  timestamp is used; when that is unknown too, the record is rejected.
- the key is the schema's ``key`` field, else ``key``: absent, ``null``, a
  string or an integer (kept as a string).
- other fields are ignored.
- raw units in, model units out: :func:`decode_batch` applies the schema's
  transforms (:meth:`~fogline.models.schema.DataSchema.x_to_model_np`) to the
  features and the target.  A value outside a transform's domain (``log1p``
  of a value <= -1) is ``out_of_domain: <column>``; one that is finite in raw
  units but not once transformed is ``out_of_range: <column>``.  A
  :class:`Record` keeps the raw values.

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

from fogline.models.schema import DataSchema

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
#: Marks an absent ``x`` field (``null`` is a present, bad one).
_ABSENT: Any = object()


class DecodeError(ValueError):
    """A record that cannot be decoded or does not validate.

    ``reason`` is a short stable code (``not_utf8``, ``invalid_json``, ``not_object``,
    ``missing_field``, ``bad_x``, ``x_length``, ``missing_feature``,
    ``unknown_feature``, ``non_numeric``, ``non_finite``, ``out_of_range``,
    ``out_of_domain``, ``bad_ts``, ``bad_key``, ``empty``) fit for a metric label; ``detail``
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
    """A decoded, validated record: ``x`` ordered by the feature list, raw units."""

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


def _transform_error(column: Any, value: float) -> DecodeError:
    """The reason a raw value of ``column`` (a schema Column) has no finite model value."""
    if column.transform == "log1p" and value <= -1.0:
        return DecodeError("out_of_domain", f"{column.name}: log1p needs values > -1")
    return DecodeError("out_of_range", f"{column.name}: not finite in model units")


class Decoder:
    """Decode records for one model's schema (or a bare ordered feature list).

    >>> d = Decoder(["a", "b"])
    >>> d.decode(b'{"ts": 1.5, "x": {"b": 2, "a": 1}, "y": 0.5, "key": "k"}')
    Record(x=(1.0, 2.0), y=0.5, ts_ms=1500, key='k')
    >>> d.decode(b'{"ts": 1.5, "b": 2, "a": 1, "y": 0.5, "host": "h1"}')
    Record(x=(1.0, 2.0), y=0.5, ts_ms=1500, key=None)
    >>> d.decode(b'{"ts": 1, "x": [1, NaN], "y": 0}')
    Traceback (most recent call last):
    ...
    fogline.daemon.stream.decode.DecodeError: non_finite: x[1]
    """

    def __init__(self, features: Sequence[str] | DataSchema) -> None:
        schema = features if isinstance(features, DataSchema) else None
        names = schema.feature_names if schema is not None else features
        assert not isinstance(names, DataSchema)
        feats = tuple(str(f) for f in names)
        if not feats:
            raise ValueError("a model needs at least one feature")
        if len(set(feats)) != len(feats):
            raise ValueError(f"duplicate feature names in {feats}")
        self.features = feats
        self.n_features = len(feats)
        self._set = frozenset(feats)
        #: ``None`` or a schema with no transform at all: values are used as they come.
        self.schema = schema if schema is not None and not schema.is_identity else None
        #: Record field of the target; ``y_alt``: the field used when it is absent.
        self.target = schema.target.name if schema is not None else "y"
        self.y_alt = "y" if self.target != "y" and "y" not in self._set else None
        ts_field = schema.timestamp if schema is not None else None
        self.ts_field = ts_field or "ts"
        self.ts_alt = "ts" if self.ts_field != "ts" else None
        key_field = schema.key if schema is not None else None
        self.key_field = key_field or "key"
        self.key_alt = "key" if self.key_field != "key" else None
        #: Field holding the x/y form's inputs (``None`` when ``x`` is a feature name).
        self.x_field: str | None = None if "x" in self._set else "x"

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

    def _flat(self, obj: dict[Any, Any]) -> list[Any]:
        """Feature values of a flat record, in feature order (unchecked numbers)."""
        try:
            return [obj[f] for f in self.features]
        except KeyError:
            missing = [f for f in self.features if f not in obj]
            if len(missing) == self.n_features and self.x_field is not None:
                detail = f"x (or the feature fields {','.join(self.features)})"
                raise DecodeError("missing_field", detail[:200]) from None
            raise DecodeError("missing_feature", ",".join(sorted(missing))[:200]) from None

    def parse(self, obj: Any, default_ts_ms: int | None = None) -> Record:
        """Validate an already-parsed JSON value."""
        if type(obj) is not dict:
            raise DecodeError("not_object", type(obj).__name__)
        xv = obj.get(self.x_field, _ABSENT) if self.x_field is not None else _ABSENT
        if self.target in obj:
            y_name: str | None = self.target
        else:
            y_name = self.y_alt if self.y_alt is not None and self.y_alt in obj else None
        if xv is _ABSENT:
            vals: Sequence[Any] = self._flat(obj)
        else:
            if y_name is None:  # the x/y form: both fields first, as they always were
                raise DecodeError("missing_field", self.target)
            vals = self._x(xv)
            if type(xv) is dict and len(xv) != self.n_features:
                extra = sorted(str(k) for k in xv if k not in self._set)
                raise DecodeError("unknown_feature", ",".join(extra)[:200])
        if y_name is None:
            raise DecodeError("missing_field", self.target)
        yv = obj[y_name]
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
            flat = xv is _ABSENT
            x = tuple(
                _number(v, self.features[i] if flat else f"x[{i}]") for i, v in enumerate(vals)
            )
        y = yv if type(yv) is float and -F32_LIMIT < yv < F32_LIMIT else _number(yv, y_name)
        tsv = obj.get(self.ts_field)
        if tsv is None and self.ts_alt is not None:
            tsv = obj.get(self.ts_alt)
        if type(tsv) is float and 0.0 <= tsv < SECONDS_LIMIT:
            ts = round(tsv * 1000.0)
        elif tsv is None:
            if default_ts_ms is None or default_ts_ms < 0:
                raise DecodeError("bad_ts", "no ts and no record timestamp")
            ts = int(default_ts_ms)
        else:
            ts = parse_ts(tsv)
        key = obj.get(self.key_field)
        if key is None and self.key_alt is not None:
            key = obj.get(self.key_alt)
        if key is not None and type(key) is not str:
            key = _key(key)
        if self.schema is not None:
            self._check_model_units(x, y)
        return Record(x, y, ts, key)

    def _check_model_units(self, x: tuple[float, ...], y: float) -> None:
        """:class:`DecodeError` when a value cannot be transformed to finite model units.

        Computed exactly as :func:`decode_batch` does (float32 values, the
        schema's numpy transforms), so both paths agree on every record.
        """
        schema = self.schema
        assert schema is not None
        x32 = np.array([x], dtype=np.float32)
        y32 = np.array([y], dtype=np.float32)
        zx = schema.x_to_model_np(x32)[0]
        zy = schema.y_to_model_np(y32)[0]
        for j in np.flatnonzero(~np.isfinite(zx)).tolist():
            raise _transform_error(schema.features[j], float(x32[0, j]))
        if not np.isfinite(zy):
            raise _transform_error(schema.target, float(y32[0]))

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
    features: Sequence[str] | DataSchema | Decoder,
) -> DecodedBatch:
    """Decode many records at once, into model units.

    ``raw_records`` holds :class:`RawRecord` (its Kafka timestamp stands in
    for a missing ``ts``) or bare values (``bytes``/``str``/``None``).
    Never raises for bad input: rejected records land in ``bad`` with their
    reason and position; order of the good ones is kept.  With a schema
    (``features`` a :class:`DataSchema`, or a :class:`Decoder` built from
    one) ``x`` and ``y`` are transformed to model units.
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
    absent, xf, tgt, y_alt = _ABSENT, dec.x_field, dec.target, dec.y_alt
    tsf, ts_alt, kf, key_alt = dec.ts_field, dec.ts_alt, dec.key_field, dec.key_alt
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
            xv = obj.get(xf, absent)
            if xv is absent:
                xv = [obj[f] for f in feats]  # a flat record (KeyError: exact path)
            else:
                tx = type(xv)
                if tx is dict and len(xv) == nf:
                    xv = [xv[f] for f in feats]
                elif tx is not list or len(xv) != nf:
                    raise TypeError
            yv = obj[tgt] if y_alt is None or tgt in obj else obj[y_alt]
            tsv = obj.get(tsf)
            if tsv is None and ts_alt is not None:
                tsv = obj.get(ts_alt)
            key = obj.get(kf)
            if key is None and key_alt is not None:
                key = obj.get(key_alt)
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
    # once, and again in model units after the schema's transforms; a rejected
    # row is decoded again one by one for its exact reason.
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is what we look for
        x = np.array(xs, dtype=np.float32) if good else np.empty((0, nf), dtype=np.float32)
        y = np.array(ys, dtype=np.float32)
    rows = _Rows(x, y, ts, keys, good, values)
    rows.reject(np.isfinite(x).all(axis=1) & np.isfinite(y), dec, bad)
    schema = dec.schema
    if schema is not None and len(rows.good):
        rows.x, rows.y = schema.x_to_model_np(rows.x), schema.y_to_model_np(rows.y)
        rows.reject(np.isfinite(rows.x).all(axis=1) & np.isfinite(rows.y), dec, bad)
    if len(bad) > 1:
        bad.sort(key=lambda b: b[2])
    return DecodedBatch(
        rows.x, rows.y, rows.good, bad, np.array(rows.ts, dtype=np.int64), rows.keys
    )


class _Rows:
    """The accepted rows of :func:`decode_batch` while they are checked (mutable)."""

    __slots__ = ("good", "keys", "ts", "values", "x", "y")

    def __init__(
        self,
        x: npt.NDArray[np.float32],
        y: npt.NDArray[np.float32],
        ts: list[int],
        keys: list[str | None],
        good: list[int],
        values: list[Any],
    ) -> None:
        self.x, self.y, self.ts, self.keys, self.good, self.values = x, y, ts, keys, good, values

    def reject(
        self, ok: npt.NDArray[np.bool_], dec: Decoder, bad: list[tuple[Any, str, int]]
    ) -> None:
        """Move the rows where ``ok`` is False to ``bad``, each with its exact reason."""
        if ok.all():
            return
        for row in np.flatnonzero(~ok).tolist():
            raw, value, default_ts = self.values[row]
            try:
                dec.decode(value, default_ts)
                reason = "non_finite: x"  # pragma: no cover - both paths share one rule
            except DecodeError as exc:
                reason = str(exc)
            bad.append((raw, reason, self.good[row]))
        keep = np.flatnonzero(ok)
        picks = keep.tolist()
        self.x, self.y = self.x[keep], self.y[keep]
        self.ts = [self.ts[r] for r in picks]
        self.keys = [self.keys[r] for r in picks]
        self.good = [self.good[r] for r in picks]
        self.values = [self.values[r] for r in picks]


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
