"""Drift per key: each key its own monitor, alarm and policy state; one batched update.

Each key k carries the package's typed :class:`~fogline.drift.runner.DriftState`
(policy state and monitor, reference posterior and its ensemble, base prior,
calibration window): the same loop :class:`~fogline.drift.runner.DriftLoop`
runs for one model, run per key, so "which host shifted, and when" is the
key's own policy transitions.  Per micro-batch (:meth:`KeyedDriftLoop.step`):

1. every key's batch scored under the key's reference, all keys at once
   (:func:`fogline.drift.keyed_signals.pre_signals`: one ensemble pass over the
   rows of all keys that share a reference), then per key
   ``DriftLoop.prepare_scored``: the calibration window, the key's policy
   (monitor) stepped, its action applied to the key's state;
2. ONE :func:`fogline.models.keyed.keyed_step` over all keys of the batch
   (keys grouped by the number of inner steps their action asks for), each
   with its own data size and likelihood weight;
3. the post-update signals of all keys in stacked passes
   (:func:`fogline.drift.keyed_signals.post_signals`), then per key
   ``DriftLoop.finish_signals``: re-anchoring and calibration, the drift state
   stored in the key's posterior (:func:`~fogline.drift.runner.store_drift`).

Steps 1 and 3 equal the one-model loop's ``prepare`` / ``post_signals`` run on
each key alone (``per_key=True``, the reference path) to float rounding; the
monitors, policy steps and calibration stay per key (Python objects, cheap).

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
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fogline.drift.config import PolicyConfig
from fogline.drift.keyed_signals import PostJob, post_signals, pre_signals, stacked_supported
from fogline.drift.policy import Action
from fogline.drift.runner import (
    DriftLoop,
    DriftState,
    Prepared,
    has_drift,
    post_rows,
    step_kl_wanted,
    without_loop,
)
from fogline.drift.signals import Reference
from fogline.models.keyed import keyed_step
from fogline.models.state import PosteriorState, StepInfo

#: The post-update signals of a key whose pass was skipped (``metrics=False``).
UNREAD_POST: dict[str, float] = {
    "predictive_kl": math.nan,
    "weight_kl": math.nan,
    "step_kl": math.nan,
}

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
    key shares them (and the reference ensembles' seed).  Drift states are
    passed in and returned (:meth:`step`), as :meth:`DriftLoop.step` does for
    one model; the object only remembers, for the states it returned while
    they live, the drift state each carries (:meth:`drift_for` then skips the
    restore; results are the same).

    ``metrics=False`` skips the post-update pass of a key whose step KL no later
    batch reads (a calibrated ``stable`` key: :func:`~fogline.drift.runner.step_kl_wanted`
    is false): its ``predictive_kl``, ``weight_kl`` and ``step_kl`` are NaN.  Those
    two KLs are then only metrics, and the keyed daemon exports no per-key signal
    (bounded cardinality), so it computes them only where the loop reads them;
    actions, alarms, modes, thresholds and parameters are the same either way.  Its
    threshold fits then skip the ERT check (``ert_estimate`` null in the stored calibration
    and in ``thresholds_calibrated``; the threshold is the same), about half of a per-key fit.

    ``per_key=True`` is the reference path: every key's signals computed alone
    (``DriftLoop.prepare`` / ``post_signals``), every drift state restored from
    its posterior state on each batch.  The default computes the signals of
    all keys at once (:mod:`fogline.drift.keyed_signals`; Gaussian likelihood,
    others per key), equal to the reference path's to float rounding.
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
        per_key: bool = False,
        metrics: bool = True,
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
        self.per_key = per_key
        self.metrics = metrics
        self._loop: DriftLoop | None = None
        self._anchored: tuple[PosteriorState, DriftState] | None = None
        #: id(state) -> (the state, the drift state it carries) for the states :meth:`step`
        #: returned, while they live: :meth:`drift_for` of one of them needs no restore.
        self._held: dict[int, tuple[weakref.ref[PosteriorState], DriftState]] = {}

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

        A state that :meth:`step` returned (and that is still alive) gives back the
        drift state stored in it without restoring it: the very object
        :func:`~fogline.drift.runner.load_drift` would rebuild (restores are
        exact).  A restored key whose reference is the anchored one (equal
        parameters) shares that one :class:`~fogline.drift.signals.Reference`:
        the same ensemble bits, held once, scored in one pass with the other keys.
        """
        held = self._held.get(id(state))
        if held is not None and held[0]() is state and not self.per_key:
            return held[1]
        anchored = self._anchored
        if anchored is not None and not has_drift(state) and _same_posterior(state, anchored[0]):
            return anchored[1]
        loop = DriftLoop.resume(state, batch_size=self.batch_size, **self.settings)
        loop.estimate_ert = self.metrics
        if self._loop is None:
            self._loop = loop
        if not has_drift(state):
            # every new key of one fleet prior anchors the same loop (its reference is
            # the fleet posterior): fitted once, shared (immutable) until a key re-anchors
            self._anchored = (state, loop.drift)
        elif (
            not self.per_key
            and anchored is not None
            and _same_reference(loop.drift.reference, anchored[1].reference)
        ):
            return loop.drift.replace(reference=anchored[1].reference)
        return loop.drift

    def _hold(self, state: PosteriorState, drift: DriftState) -> None:
        """Remember that ``state`` carries ``drift`` (until ``state`` is freed)."""
        i = id(state)
        held = self._held

        def gone(_: weakref.ref[PosteriorState], i: int = i) -> None:
            held.pop(i, None)

        held[i] = (weakref.ref(state, gone), drift)

    def new_key(self, fleet: PosteriorState) -> PosteriorState:
        """``fleet`` without any drift loop it carries, so each key anchors its own."""
        return without_loop(fleet)

    def _runner(self, state: PosteriorState, drift: DriftState) -> DriftLoop:
        if self._loop is None:
            self._loop = DriftLoop(
                reference_state=state, base_prior=drift.base_prior, drift=drift, **self.settings
            )
            self._loop.estimate_ert = self.metrics
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
        batched = not self.per_key and stacked_supported(states[first].config)
        if batched:
            prepared = self._prepare_batched(loop, drifts, states, batches)
        else:
            prepared = {
                k: loop.prepare(states[k], x, y, drifts[k]) for k, (x, y) in batches.items()
            }
        stepped, infos = self._step(loop, prepared)
        read = {k: p for k, p in prepared.items() if self.metrics or step_kl_wanted(p.drift)}
        if batched:
            posts = self._post_batched(loop, read, stepped)
        else:
            posts = {k: loop.post_signals(prep, stepped[k]) for k, prep in read.items()}
        for k in prepared.keys() - read.keys():  # unread metrics (``metrics=False``)
            posts[k] = dict(UNREAD_POST)
        out_d: dict[str, DriftState] = {}
        out_s: dict[str, PosteriorState] = {}
        out_sig: dict[str, dict[str, float]] = {}
        actions: dict[str, Action] = {}
        for k, prep in prepared.items():
            out_d[k], out_s[k], out_sig[k] = loop.finish_signals(prep, stepped[k], posts[k])
            actions[k] = prep.action
            if not self.per_key:
                self._hold(out_s[k], out_d[k])
        return KeyedDriftResult(
            out_d,
            out_s,
            {k: infos[k] for k in prepared},
            out_sig,
            actions,
            fleet_signal(out_d, actions, out_sig),
        )

    def _prepare_batched(
        self,
        loop: DriftLoop,
        drifts: Mapping[str, DriftState],
        states: Mapping[str, PosteriorState],
        batches: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> dict[str, Prepared]:
        """Step 1 for every key: pre-update signals of all keys at once
        (:func:`~fogline.drift.keyed_signals.pre_signals`), then per key the policy."""
        keys = list(batches)
        scored = pre_signals(
            [drifts[k].reference for k in keys],
            [batches[k][0] for k in keys],
            [batches[k][1] for k in keys],
            max_outlier_fraction=self.policy.max_outlier_fraction,
        )
        return {
            k: loop.prepare_scored(
                states[k], *batches[k], drifts[k], ks.signals, ks.scores, ks.record
            )
            for k, ks in zip(keys, scored, strict=True)
        }

    def _step(
        self, loop: DriftLoop, prepared: Mapping[str, Prepared]
    ) -> tuple[dict[str, PosteriorState], dict[str, StepInfo]]:
        """Step 2: one batched SVI step per group of keys with the same number of inner steps."""
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
        return stepped, infos

    def _post_batched(
        self,
        loop: DriftLoop,
        prepared: Mapping[str, Prepared],
        stepped: Mapping[str, PosteriorState],
    ) -> dict[str, dict[str, float]]:
        """Step 3's signals of every key in stacked passes
        (:func:`~fogline.drift.keyed_signals.post_signals`), one per ensemble size and seed."""
        groups: dict[tuple[int, int], list[str]] = {}
        for k, prep in prepared.items():
            ref = prep.drift.reference
            groups.setdefault((ref.num_samples, ref.seed), []).append(k)
        out: dict[str, dict[str, float]] = {}
        for (num_samples, seed), keys in groups.items():
            eps, z = loop._noise.draws(stepped[keys[0]], num_samples, seed)
            jobs = []
            for k in keys:
                prep = prepared[k]
                d = prep.drift
                r = post_rows(d, self.policy, prep.rows)
                jobs.append(
                    PostJob(
                        after=stepped[k],
                        before=prep.before if step_kl_wanted(d) else None,
                        x=prep.x_all[:r],
                        ref_mean=prep.scores.mean[:r],
                        ref_var=prep.scores.var[:r],
                        ref_loc=d.reference.loc,
                        ref_scale=d.reference.scale,
                    )
                )
            out.update(zip(keys, post_signals(jobs, eps, z), strict=True))
        return out


def _same_reference(a: Reference, b: Reference) -> bool:
    """Do ``a`` and ``b`` hold the same reference posterior (equal parameters, draws)?"""
    pa, pb = a.state.params, b.state.params
    return (
        a.num_samples == b.num_samples
        and a.seed == b.seed
        and a.state.config == b.state.config
        and pa.keys() == pb.keys()
        and all(torch.equal(pa[k], pb[k]) for k in pa)
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
