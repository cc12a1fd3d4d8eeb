"""Decoding univariate ``{ts, value, key}`` records: one row of ``meta`` per good record.

Per record, value, time stamp and key are checked with the rules and reason
codes of :mod:`fogline.daemon.stream.decode`; a good record becomes a row of
``meta`` = (value, ts ms, key id) -- float64, exact -- that the micro-batcher
carries with an empty ``x`` (the inputs are built when the batch is absorbed,
:mod:`fogline.daemon.stream.series`).  Key ids are interned per process; a
batch decoded in the keyed consumer's child is re-numbered in the parent by
:meth:`SeriesDecoder.adopt`.  This module does not import torch, so the child
can decode.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
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
from fogline.models.schema import DataSchema

#: Columns of ``Rows.meta`` for a series record.
META_VALUE, META_TS, META_KEY = 0, 1, 2


class SeriesDecoded(DecodedBatch):
    """:class:`DecodedBatch` of series records: ``x`` [N, 0], ``y`` the raw values, and ``meta``."""

    __slots__ = ("meta",)

    def __init__(self, base: DecodedBatch, meta: npt.NDArray[np.float64]) -> None:
        super().__init__(base.x, base.y, base.good, base.bad, base.ts_ms, base.keys)
        self.meta = meta


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

    # -- between processes ------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Pickle the schema only: key ids are process-local (a copy numbers its own)."""
        return {"schema": self.schema}

    def __setstate__(self, state: dict[str, Any]) -> None:
        SeriesDecoder.__init__(self, state["schema"])

    def adopt(self, dec: SeriesDecoded) -> SeriesDecoded:
        """``dec`` (decoded by another process's copy) with this decoder's key ids.

        The key column of ``meta`` is rewritten from the decoded keys
        (``dec.keys``, aligned with the good rows) through :meth:`key_id`; the
        rest is kept.  Decoding in the consumer's child and adopting here
        gives the meta this decoder's own :meth:`decode_batch` gives.
        """
        meta = dec.meta.copy()
        if len(dec.keys):
            meta[:, META_KEY] = [float(self.key_id(k if k is not None else "")) for k in dec.keys]
        base = DecodedBatch(dec.x, dec.y, dec.good, dec.bad, dec.ts_ms, dec.keys)
        return SeriesDecoded(base, meta)


__all__ = ["META_KEY", "META_TS", "META_VALUE", "SeriesDecoded", "SeriesDecoder"]
