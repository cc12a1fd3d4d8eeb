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

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fogline.daemon.stream.series_decode import (
    SeriesDecoded,
    SeriesDecoder,
)
from fogline.models import autoregressive as ar
from fogline.models.schema import DataSchema
from fogline.models.spec import ModelSpec
from fogline.models.state import PosteriorState


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
