"""Drift per key: each key its own monitor, alarm and policy state; one batched update.

Each key k carries the package's typed :class:`~fogline.drift.runner.DriftState`
(policy state and monitor, reference posterior and its ensemble, base prior,
calibration window): the same loop :class:`~fogline.drift.runner.DriftLoop`
runs for one model, run per key, so "which host shifted, and when" is the
key's own policy transitions.  Per micro-batch (:meth:`KeyedDriftLoop.step`):

1. per key, ``DriftLoop.prepare``: the key's batch scored under the key's
   reference, the key's policy stepped, its action applied to the key's state;
2. ONE :func:`fogline.models.keyed.keyed_step` over all keys of the batch
   (keys grouped by the number of inner steps their action asks for), each
   with its own data size and likelihood weight;
3. per key, the post-update signals and calibration (``DriftLoop`` step 3),
   the drift state stored in the key's posterior (:func:`~fogline.drift.runner.store_drift`).

Calibration is per key: each key fits its alarm threshold for the ERT on its
own first ``calibration_batches`` batches (or on the warm start's history
reference when ``policy.calibration == "history"``), so every key's false
alarms run at the configured ERT in that key's own batches.

Serialisation.  A key's drift state rides in the key's own
:class:`~fogline.models.state.PosteriorState` (``extra["drift"]``,
``extra["drift_loop"]``, ``aux["drift.*"]``, written by ``store_drift``),
so the key's blob (:func:`fogline.models.serialize.to_bytes`) holds it and
:meth:`KeyedDriftLoop.drift_for` restores it (:func:`~fogline.drift.runner.load_drift`,
the monitor's running state included): a partition snapshot of key blobs
resumes every key's drift exactly.

Fleet signal.  :class:`FleetSignal` summarises a micro-batch over its keys:
the keys that alarmed, how many keys are not ``stable``, and the fleet's mean
surprisal; a fleet-wide shift shows as many keys alarming together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fogline.drift.config import PolicyConfig
from fogline.drift.policy import Action
from fogline.drift.runner import DriftLoop, DriftState, Prepared, has_drift, without_loop
from fogline.models.keyed import keyed_step
from fogline.models.state import PosteriorState, StepInfo

#: The batched step the loop calls (``keyed_step``; ``keyed_step_loop`` in reference checks).
KeyedStepFn = Callable[..., tuple[dict[str, PosteriorState], dict[str, StepInfo]]]


@dataclass(frozen=True)
class FleetSignal:
    """A micro-batch's drift over its keys.

    ``keys``: keys stepped; ``alarmed``: the keys whose monitor alarmed on
    this batch (sorted); ``not_stable``: keys of the batch whose mode is
    ``shifted`` or ``recovering`` after it; ``mean_surprisal``: the mean over
    keys of each key's batch surprisal under its reference (NaN while none
    is finite).
    """

    keys: int
    alarmed: tuple[str, ...]
    not_stable: int
    mean_surprisal: float

    @property
    def alarm_fraction(self) -> float:
        """Share of the batch's keys that alarmed."""
        return len(self.alarmed) / self.keys if self.keys else 0.0

    def to_json(self) -> dict[str, Any]:
        """Strict JSON (NaN as ``None``)."""
        return {
            "keys": self.keys,
            "alarmed": list(self.alarmed),
            "not_stable": self.not_stable,
            "mean_surprisal": self.mean_surprisal if math.isfinite(self.mean_surprisal) else None,
        }


@dataclass(frozen=True)
class KeyedDriftResult:
    """What :meth:`KeyedDriftLoop.step` returns, per key (only the keys of the batch)."""

    drifts: dict[str, DriftState]
    states: dict[str, PosteriorState]
    infos: dict[str, StepInfo]
    signals: dict[str, dict[str, float]]
    actions: dict[str, Action]
    fleet: FleetSignal


class KeyedDriftLoop:
    """The drift loop over many keys: one set of settings, one :class:`DriftState` per key.

    The settings are those of :class:`~fogline.drift.runner.DriftLoop`; every
    key shares them (and the reference ensembles' seed).  The object holds no
    per-key state: drift states are passed in and returned
    (:meth:`step`), as :meth:`DriftLoop.step` does for one model.
    """

    def __init__(
        self,
        policy: PolicyConfig,
        *,
        base_lr: float,
        data_size: int | None,
        num_steps: int = 1,
        ert: float | None = None,
        ensemble_size: int | None = None,
        seed: int = 0,
        n_streams: int | None = None,
        functional_prior: bool = True,
        batch_size: int | None = None,
        step_fn: KeyedStepFn = keyed_step,
    ) -> None:
        policy.name  # noqa: B018 -- raises for policy "off" (no loop)
        self.policy = policy
        self.settings: dict[str, Any] = {
            "base_lr": base_lr,
            "data_size": data_size,
            "policy": policy,
            "ert": ert,
            "num_steps": num_steps,
            "ensemble_size": ensemble_size,
            "seed": seed,
            "n_streams": n_streams,
            "functional_prior": functional_prior,
        }
        self.batch_size = batch_size
        self.step_fn = step_fn
        self._loop: DriftLoop | None = None
        self._anchored: tuple[PosteriorState, DriftState] | None = None

    def drift_for(self, state: PosteriorState) -> DriftState:
        """The drift state of a key whose posterior is ``state``.

        Restored from the drift state ``state`` carries (a key's snapshot),
        else a new loop anchored at ``state`` (a new key from the fleet prior:
        its reference is the fleet posterior, and with ``drift.calibration =
        history`` its alarm threshold is fitted on the fleet's history
        reference; see :meth:`DriftLoop.resume`).  New keys of the same fleet
        prior (the same parameter tensors, :func:`~fogline.models.keyed.new_key_state`)
        share that one anchored state: it is fitted once, and its reference
        ensemble is held once until a key re-anchors.
        """
        anchored = self._anchored
        if anchored is not None and not has_drift(state) and _same_posterior(state, anchored[0]):
            return anchored[1]
        loop = DriftLoop.resume(state, batch_size=self.batch_size, **self.settings)
        if self._loop is None:
            self._loop = loop
        if not has_drift(state):
            # every new key of one fleet prior anchors the same loop (its reference is
            # the fleet posterior): fitted once, shared (immutable) until a key re-anchors
            self._anchored = (state, loop.drift)
        return loop.drift

    def new_key(self, fleet: PosteriorState) -> PosteriorState:
        """``fleet`` without any drift loop it carries, so each key anchors its own."""
        return without_loop(fleet)

    def _runner(self, state: PosteriorState, drift: DriftState) -> DriftLoop:
        if self._loop is None:
            self._loop = DriftLoop(
                reference_state=state, base_prior=drift.base_prior, drift=drift, **self.settings
            )
        return self._loop

    def step(
        self,
        drifts: Mapping[str, DriftState],
        states: Mapping[str, PosteriorState],
        batches: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> KeyedDriftResult:
        """One micro-batch over its keys: per-key prepare, one batched step, per-key finish.

        ``batches`` maps key -> ``(x [n_k, D], y [n_k])``; every key in it needs
        a drift state and a posterior state.  Nothing passed in is modified.
        """
        missing = [k for k in batches if k not in drifts or k not in states]
        if missing:
            raise ValueError(f"batches: keys without a drift or posterior state: {missing[:5]}")
        if not batches:
            return KeyedDriftResult({}, {}, {}, {}, {}, FleetSignal(0, (), 0, math.nan))
        first = next(iter(batches))
        loop = self._runner(states[first], drifts[first])
        prepared: dict[str, Prepared] = {
            k: loop.prepare(states[k], x, y, drifts[k]) for k, (x, y) in batches.items()
        }
        stepped: dict[str, PosteriorState] = {}
        infos: dict[str, StepInfo] = {}
        by_steps: dict[int, list[str]] = {}
        for k, prep in prepared.items():
            by_steps.setdefault(int(prep.step_kwargs["num_steps"]), []).append(k)
        for num_steps, keys in by_steps.items():
            new, info = self.step_fn(
                {k: prepared[k].state for k in keys},
                {k: prepared[k].batch for k in keys},
                num_steps=num_steps,
                data_size={k: prepared[k].step_kwargs["data_size"] for k in keys},
                likelihood_weight={k: prepared[k].step_kwargs["likelihood_weight"] for k in keys},
                functional_prior=loop.functional_prior,
            )
            stepped.update(new)
            infos.update(info)
        out_d: dict[str, DriftState] = {}
        out_s: dict[str, PosteriorState] = {}
        out_sig: dict[str, dict[str, float]] = {}
        actions: dict[str, Action] = {}
        for k, prep in prepared.items():
            out_d[k], out_s[k], out_sig[k] = loop._finish(prep, stepped[k])
            actions[k] = prep.action
        return KeyedDriftResult(
            out_d,
            out_s,
            {k: infos[k] for k in prepared},
            out_sig,
            actions,
            fleet_signal(out_d, actions, out_sig),
        )


def _same_posterior(a: PosteriorState, b: PosteriorState) -> bool:
    """Do ``a`` and ``b`` hold the very same variational parameters and prior (by identity)?"""
    return (
        a.prior.loc is b.prior.loc
        and a.prior.scale is b.prior.scale
        and a.params.keys() == b.params.keys()
        and all(a.params[k] is b.params[k] for k in a.params)
        and a.aux.keys() == b.aux.keys()
        and all(a.aux[k] is b.aux[k] for k in a.aux)
    )


def fleet_signal(
    drifts: Mapping[str, DriftState],
    actions: Mapping[str, Action],
    signals: Mapping[str, Mapping[str, float]],
) -> FleetSignal:
    """The :class:`FleetSignal` of one micro-batch's per-key results."""
    surprisal = [
        float(s["surprisal"])
        for s in signals.values()
        if "surprisal" in s and math.isfinite(float(s["surprisal"]))
    ]
    return FleetSignal(
        keys=len(drifts),
        alarmed=tuple(sorted(k for k, a in actions.items() if a.alarm)),
        not_stable=sum(1 for d in drifts.values() if d.policy.mode != "stable"),
        mean_surprisal=sum(surprisal) / len(surprisal) if surprisal else math.nan,
    )


__all__ = ["FleetSignal", "KeyedDriftLoop", "KeyedDriftResult", "fleet_signal"]
