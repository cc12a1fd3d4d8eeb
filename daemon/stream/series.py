"""Univariate ``{ts, value, key}`` records in the daemon: decoding and per-batch inputs.

An autoregressive model (``model.mode = "autoregressive"``) reads one number
per record: the spec's ``target`` field (e.g. ``value``), its ``timestamp``
field and its ``key`` field (the series identity; absent or ``null``, or no
``key`` in the spec: the one series ``""``).  Its inputs are built from the key's past values, so they
depend on the stream's order and on every earlier record of the key:

* **decode** (:class:`SeriesDecoder`): per record, value, time stamp and key
  are checked (``missing_field``, ``non_numeric``, ``non_finite``,
  ``out_of_range``, ``out_of_domain``, ``bad_ts``, ``bad_key``: the rules and
  reason codes of :mod:`fogline.daemon.stream.decode`); a bad record goes to
  the dead-letter topic.  A good one becomes a row of ``meta`` = (value,
  ts ms, key id) -- float64, exact -- carried through the micro-batcher with
  an empty ``x``.
* **inputs** (:class:`SeriesInputs`): when a batch is absorbed, its rows go
  through :func:`fogline.models.autoregressive.features_for` with the
  series state stored in the posterior state (``extra["autoregressive"]``),
  in batch order.  Rows whose key has fewer than L past values only fill the
  buffer (counted as *warming*: neither learnt nor dead-lettered); the others
  are mapped to model units by the state's schema and stepped on.  The new
  series state is written into the stepped state, so it always corresponds
  to the snapshot's offsets: a record that is fetched but not absorbed is in
  neither, and a restart rebuilds the same batches and the same inputs.

The series state is opaque JSON here (:meth:`SeriesState.to_json`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fogline.daemon.stream.decode import (
    DecodedBatch,
    DecodeError,
    RawRecord,
    _key,
    _number,
    _transform_error,
    _utf8,
    parse_ts,
)
from fogline.models import autoregressive as ar
from fogline.models.schema import DataSchema
from fogline.models.spec import ModelSpec
from fogline.models.state import PosteriorState

#: Columns of ``Rows.meta`` for a series record.
META_VALUE, META_TS, META_KEY = 0, 1, 2


class SeriesDecoded(DecodedBatch):
    """:class:`DecodedBatch` of series records: ``x`` [N, 0], ``y`` the raw values, and ``meta``."""

    __slots__ = ("meta",)

    def __init__(self, base: DecodedBatch, meta: npt.NDArray[np.float64]) -> None:
        super().__init__(base.x, base.y, base.good, base.bad, base.ts_ms, base.keys)
        self.meta = meta


def series_spec(model: ModelSpec | None, state: PosteriorState) -> ModelSpec | None:
    """The autoregressive spec the daemon runs: the state's stored one, else the settings'.

    ``None`` for a tabular model.  (A settings spec that disagrees with the
    stored one is refused before this, by :func:`fogline.models.spec.contradictions`.)
    """
    stored = ar.stored_series(state.extra)
    if stored is not None:
        return stored[0]
    if model is not None and model.mode == "autoregressive":
        return model
    return None


def settings_spec(model: ModelSpec | None, state: PosteriorState) -> ModelSpec | None:
    """The settings' spec as compared with ``state``: ``season = "auto"`` takes the stored period.

    The warm start stores the season it resolved (a period or ``"none"``);
    settings that leave it ``"auto"`` agree with any of them, so the stored
    value is filled in before :func:`fogline.models.spec.contradictions`
    compares the inputs.  An explicit ``season`` is checked by :func:`series_problems`.
    """
    stored = ar.stored_series(state.extra)
    if model is None or stored is None or model.mode != "autoregressive":
        return model
    if model.season == "auto" and stored[0].season != "auto":
        return ar.with_season(model, stored[0].season)
    return model


def series_problems(model: ModelSpec | None, state: PosteriorState) -> list[str]:
    """Where an autoregressive settings spec contradicts the one stored in ``state``.

    Lags and calendar show up as ``model.features`` already
    (:func:`fogline.models.spec.contradictions`); this adds the series' record
    fields, which decide which lags a record extends, and an explicit
    ``season`` that is not the stored (resolved) one.
    """
    stored = ar.stored_series(state.extra)
    if model is None or stored is None or model.mode != "autoregressive":
        return []
    have = stored[0]
    return [
        f"model.{name}: settings say {getattr(model, name)!r}, the state's series has "
        f"{getattr(have, name)!r}"
        for name in ("key", "timestamp", "season")
        if getattr(model, name) != getattr(have, name)
        and not (name == "season" and model.season == "auto")
    ]


class SeriesDecoder:
    """Decode ``{<timestamp>, <target>, <key>}`` records for one model's schema."""

    def __init__(self, schema: DataSchema) -> None:
        self.schema = schema
        self.target = schema.target.name
        self.ts_field = schema.timestamp or "ts"
        #: ``None`` (no ``model.key``): one series, whatever fields the records carry.
        self.key_field = schema.key
        #: Key strings by id (the id is process-local: it only lives in ``Rows.meta``).
        #: Decoding may run on the prefetch worker while batches are absorbed: ids are
        #: only ever appended, under a lock.
        self.key_names: list[str] = []
        self._ids: dict[str, int] = {}
        self._lock = threading.Lock()

    def key_id(self, key: str) -> int:
        """The id of ``key`` (interned on first sight)."""
        i = self._ids.get(key)
        if i is None:
            with self._lock:
                i = self._ids.get(key)
                if i is None:
                    i = len(self.key_names)
                    self.key_names.append(key)
                    self._ids[key] = i
        return i

    def parse(
        self, obj: Any, default_ts_ms: int | None = None, check_units: bool = True
    ) -> tuple[float, int, str]:
        """``(value, ts ms, key)`` of an already-parsed JSON value; :class:`DecodeError` else.

        ``check_units=False`` leaves out the model-unit check (:meth:`decode_batch`
        does it for all rows at once).
        """
        if type(obj) is not dict:
            raise DecodeError("not_object", type(obj).__name__)
        if self.target not in obj:
            raise DecodeError("missing_field", self.target)
        value = _number(obj[self.target], self.target)
        if check_units:
            z = self.schema.y_to_model_np(np.array([value], dtype=np.float32))
            if not np.isfinite(z[0]):
                raise _transform_error(self.schema.target, value)
        tsv = obj.get(self.ts_field)
        if tsv is None:
            if default_ts_ms is None or default_ts_ms < 0:
                raise DecodeError("bad_ts", f"no {self.ts_field} and no record timestamp")
            ts = int(default_ts_ms)
        else:
            ts = parse_ts(tsv)
        key = _key(obj.get(self.key_field)) if self.key_field is not None else None
        return value, ts, key if key is not None else ""

    def decode(
        self,
        value: bytes | bytearray | str | None,
        default_ts_ms: int | None = None,
        check_units: bool = True,
    ) -> tuple[float, int, str]:
        """Decode one record value (bytes are UTF-8, see :mod:`~fogline.daemon.stream.decode`)."""
        if not value:
            raise DecodeError("empty", "no value")
        text = _utf8(value) if isinstance(value, bytes | bytearray) else value
        try:
            obj = json.loads(text)
        except (ValueError, TypeError, RecursionError) as exc:
            raise DecodeError("invalid_json", type(exc).__name__) from None
        return self.parse(obj, default_ts_ms, check_units)

    def decode_batch(self, raw_records: Sequence[Any]) -> SeriesDecoded:
        """Decode many records (never raises for bad input; order kept)."""
        good: list[int] = []
        bad: list[tuple[Any, str, int]] = []
        meta: list[tuple[float, float, float]] = []
        ts: list[int] = []
        keys: list[str | None] = []
        for i, raw in enumerate(raw_records):
            if type(raw) is RawRecord:
                value, default_ts = raw.value, raw.timestamp_ms
            else:
                value, default_ts = raw, None
            try:
                v, t, k = self.decode(value, default_ts, check_units=False)
            except DecodeError as exc:
                bad.append((raw, str(exc), i))
                continue
            good.append(i)
            meta.append((v, float(t), float(self.key_id(k))))
            ts.append(t)
            keys.append(k)
        m = np.array(meta, dtype=np.float64).reshape(len(good), 3)
        # model units, all rows at once: a value the target's transform cannot take
        z = self.schema.y_to_model_np(m[:, META_VALUE].astype(np.float32))
        if not np.isfinite(z).all():
            ok = np.isfinite(z)
            for row in np.flatnonzero(~ok).tolist():
                i = good[row]
                err = _transform_error(self.schema.target, float(m[row, META_VALUE]))
                bad.append((raw_records[i], str(err), i))
            keep = np.flatnonzero(ok).tolist()
            m = m[keep]
            good = [good[r] for r in keep]
            ts = [ts[r] for r in keep]
            keys = [keys[r] for r in keep]
            bad.sort(key=lambda b: b[2])
        base = DecodedBatch(
            np.empty((len(good), 0), dtype=np.float32),
            m[:, META_VALUE].astype(np.float32),
            good,
            bad,
            np.array(ts, dtype=np.int64),
            keys,
        )
        return SeriesDecoded(base, m)


@dataclass(frozen=True)
class SeriesStep:
    """One batch's inputs: model-unit ``x`` [M, D] and ``y`` [M] (float32), the batch
    positions ``rows`` [M] they come from, ``warming`` (rows that only filled a buffer),
    and the series state's JSON after the whole batch."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.float32]
    rows: npt.NDArray[np.int64]
    warming: int
    extra: dict[str, Any]


class SeriesInputs:
    """Per-batch inputs of an autoregressive model (see the module docstring)."""

    def __init__(self, spec: ModelSpec, schema: DataSchema, decoder: SeriesDecoder) -> None:
        self.spec = spec
        self.schema = schema
        self.decoder = decoder
        #: The last series state built and the JSON written for it: the next batch
        #: starts from the object instead of parsing its JSON again.
        self._last: tuple[dict[str, Any], ar.SeriesState] | None = None

    def state_of(self, state: PosteriorState) -> ar.SeriesState:
        """The series state stored in ``state`` (empty when it has none yet)."""
        slot = state.extra.get(ar.EXTRA_KEY)
        if self._last is not None and slot is self._last[0]:
            return self._last[1]
        stored = ar.stored_series(state.extra)
        return stored[1] if stored is not None else ar.SeriesState.empty(self.spec)

    def step(self, state: PosteriorState, meta: npt.NDArray[np.float64]) -> SeriesStep:
        """The inputs of a batch's rows (``Rows.meta``) given the state before it."""
        names = self.decoder.key_names
        records = [
            ar.Record(ar.ts_from_ms(int(t)), float(v), names[int(k)]) for v, t, k in meta.tolist()
        ]
        feats = ar.features_for(self.spec, records, self.state_of(state))
        with np.errstate(over="ignore", invalid="ignore"):
            x = self.schema.x_to_model_np(feats.x.astype(np.float32))
            y = self.schema.y_to_model_np(feats.y.astype(np.float32))
        previous = state.extra.get(ar.EXTRA_KEY)
        changed = [r.key for r in records] if previous is not None else None
        extra = ar.series_extra(self.spec, feats.state, previous, changed)
        self._last = (extra, feats.state)
        return SeriesStep(
            np.ascontiguousarray(x, dtype=np.float32),
            np.ascontiguousarray(y, dtype=np.float32),
            feats.rows,
            feats.warming,
            extra,
        )


__all__ = [
    "SeriesDecoded",
    "SeriesDecoder",
    "SeriesInputs",
    "SeriesStep",
    "series_problems",
    "series_spec",
    "settings_spec",
]
