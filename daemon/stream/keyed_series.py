"""Autoregressive records in keyed mode: each key's series state rides in the key's own state.

Keyed mode (``keyed.enabled``) with ``model.mode = "autoregressive"`` gives each
key its own posterior *and* its own series state: the key's last max(L, P + 1)
values and its last two time stamps (:class:`fogline.models.autoregressive.SeriesState`
restricted to that key), stored in the key's state under
``extra["autoregressive"]`` like the single-model daemon stores every key's.
So the key's blob carries exactly what its next inputs need, and evicting and
reloading the key, a revoke and re-assign of its partition or a kill and
restart rebuild the same inputs bit for bit (a function of the key's record
sequence, hence of its partition's, in count batching).

Per batch of one partition (:meth:`KeyedSeries.inputs`), for each key k with
rows r_1..r_m (in offset order) and series state S_k before the batch:

    (x_k, y_k, rows_k, S_k') = features_for(spec, r_1..r_m, S_k)

(:func:`fogline.models.autoregressive.features_for`, the one builder), the
inputs mapped to model units by the fleet's schema.  Records whose key has
fewer than max(L, P + 1) past values only fill the buffer (*warming*: counted,
neither learnt nor dead-lettered); a key whose rows all warm is not stepped
but its state still takes S_k'.  A key's state after the batch is its stepped
(or unchanged) posterior with S_k' written in.

A new key starts from the fleet prior (the warm-start posterior, trained on
every key's history) with its series state cut down to its own part of the
warm start's (:meth:`KeyedSeries.own`): a key that was in the history continues
from its last values there, a new one starts empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from fogline.daemon.stream.series import SeriesDecoder, SeriesInputs
from fogline.models import autoregressive as ar
from fogline.models.schema import DataSchema
from fogline.models.spec import ModelSpec
from fogline.models.state import Minibatch, PosteriorState


@dataclass(frozen=True)
class KeyedInputs:
    """One batch's autoregressive inputs per key.

    ``batches``: the keys with featured rows and their minibatch (model units);
    ``rows``: for those keys, the batch positions of the featured rows (in the
    minibatch's order); ``extras``: every key's ``extra["autoregressive"]`` after
    the batch; ``warming``: rows that only filled a buffer.
    """

    batches: dict[str, Minibatch]
    rows: dict[str, list[int]]
    extras: dict[str, dict[str, Any]]
    warming: int


class KeyedSeries:
    """The autoregressive side of the keyed daemon (see the module docstring)."""

    def __init__(self, spec: ModelSpec, schema: DataSchema) -> None:
        self.spec = spec
        self.decoder = SeriesDecoder(schema)
        self._inputs = SeriesInputs(spec, schema, self.decoder)
        #: The fleet's parsed series state, by the identity of its ``extra`` slot.
        self._fleet: tuple[object, ar.SeriesState] | None = None

    def _fleet_series(self, state: PosteriorState) -> ar.SeriesState:
        slot = state.extra.get(ar.EXTRA_KEY)
        if self._fleet is None or self._fleet[0] is not slot:
            stored = ar.stored_series(state.extra)
            series = stored[1] if stored is not None else ar.SeriesState.empty(self.spec)
            self._fleet = (slot, series)
        return self._fleet[1]

    def own(self, fleet: PosteriorState, key: str) -> PosteriorState:
        """``fleet`` (a new key's first state) with the series state of ``key`` alone.

        The warm start's buffer and clock of ``key`` if it had any, else empty
        (of the spec's depth); the spec stored in ``fleet`` is kept as it is.
        """
        series = self._fleet_series(fleet)
        buf = series.lags.buffers.get(key)
        clock = series.clock.get(key)
        mine = ar.SeriesState(
            ar.LagState(series.lags.lags, {key: buf} if buf is not None else {}),
            {key: clock} if clock is not None else {},
        )
        slot = fleet.extra.get(ar.EXTRA_KEY)
        spec_json = slot["spec"] if slot else self.spec.model_dump(mode="json")
        extra = {"spec": spec_json, "series": mine.to_json()}
        return fleet.replace(extra={**fleet.extra, ar.EXTRA_KEY: extra})

    def inputs(
        self,
        states: Mapping[str, PosteriorState],
        rows: Mapping[str, Sequence[int]],
        meta: npt.NDArray[np.float64],
    ) -> KeyedInputs:
        """The inputs of a batch whose rows ``rows[k]`` (positions in ``meta``) are key k's."""
        batches: dict[str, Minibatch] = {}
        featured: dict[str, list[int]] = {}
        extras: dict[str, dict[str, Any]] = {}
        warming = 0
        for k, idx in rows.items():
            pos = np.asarray(idx, dtype=np.int64)
            step = self._inputs.step(states[k], meta[pos])
            warming += step.warming
            extras[k] = step.extra
            if len(step.rows):
                batches[k] = Minibatch(torch.from_numpy(step.x), torch.from_numpy(step.y))
                featured[k] = pos[step.rows].tolist()
        return KeyedInputs(batches, featured, extras, warming)

    @staticmethod
    def with_series(state: PosteriorState, extra: dict[str, Any]) -> PosteriorState:
        """``state`` with its series state after the batch (``extra["autoregressive"]``)."""
        return state.replace(extra={**state.extra, ar.EXTRA_KEY: extra})


__all__ = ["KeyedInputs", "KeyedSeries"]
