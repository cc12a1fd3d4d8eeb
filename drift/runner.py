"""One batch of the drift loop: signals -> monitor -> policy -> step -> signals.

:class:`DriftLoop` is the code the daemon's pipeline and ``fogline
experiment`` share.  Per batch (``process`` = ``prepare`` + ``models.svi.step``
+ ``finish``):

1. ``prepare``: score the batch under the reference posterior *before* the
   update (surprisal, anomaly scores, outlier fraction), call
   :func:`fogline.drift.policy.step`, and apply its :class:`~fogline.drift.policy.Action`
   to the state (prior swap, learning rate, posterior/optimizer reset) and to
   the batch (drop gross outliers); return the step's keyword arguments
   (``num_steps``, ``data_size``, ``likelihood_weight``).
2. the caller runs ``models.stream.stream_step(state, batch, **kwargs)``
   (``models.svi.step``, plus the warm start's functional prior if the state
   carries one).
3. ``finish``: post-update signals (predictive KL vs the reference, step KL,
   weight KL), collect calibration data, re-anchor the reference and refit the
   thresholds when the policy asks, and store the drift state in the
   returned posterior state (:func:`store_drift`).  ``records_absorbed`` counts every record of the
   batch, dropped outliers included (they were seen and given weight 0).

The loop's state is a frozen :class:`DriftState` (policy state with its
monitor, reference, base prior, calibration window); each batch replaces it.
Everything the loop needs to continue exactly rides in the returned
``PosteriorState`` (:func:`store_drift`, the one function that writes the
drift part of a snapshot, and :func:`load_drift`, the one that reads it), so
a snapshot taken after any batch resumes bit for bit (:meth:`DriftLoop.resume`),
monitors included: River's ADWIN, Page-Hinkley and KSWIN continue from their
stored running state (:func:`fogline.drift.monitors.monitor_state`).  Code
outside :mod:`fogline.drift` reads the stored state through typed accessors
(:func:`drift_mode`, :func:`drift_summary`, :func:`has_drift`).

The ensemble of the posterior before the batch (for the step KL) is formed from
the state passed in, with the same draws, so nothing but the state is needed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
import torch

from fogline.drift.calibration import (
    Calibration,
    calibrate_batch_statistic,
    contaminated_batches,
    dependence_horizon,
)
from fogline.drift.monitors import ThresholdMonitor, monitor_state, restore_monitor
from fogline.drift.policy import (
    Action,
    PolicyConfig,
    PolicyState,
    Transition,
    forgetting_prior,
    json_threshold,
    make_monitor_for,
    threshold_value,
)
from fogline.drift.policy import init as policy_init
from fogline.drift.policy import step as policy_step
from fogline.drift.signals import (
    NoiseCache,
    RecordScores,
    Reference,
    make_reference,
    post_update_signals,
    pre_update_signals,
)
from fogline.models.autoregressive import detect_period
from fogline.models.predictive import Ensemble
from fogline.models.priors import posterior_as_prior
from fogline.models.state import Minibatch, PosteriorState, PriorSpec, StepInfo, frozen_replace
from fogline.models.stream import stream_step
from fogline.models.svi import init_state, reset_optimizer

log = structlog.get_logger()


def inlier_batch_statistic(max_outlier_fraction: float) -> Any:
    """Vectorised ``surprisal_inlier`` over bootstrap batches ``v [..., B, 2]``
    (column 0 the record NLL, column 1 the outlier flag)."""

    def stat(v: np.ndarray) -> np.ndarray:
        nll, out = v[..., 0], v[..., 1] > 0.5
        frac = out.mean(-1, keepdims=True)
        keep = (~out) | (frac > max_outlier_fraction)
        return np.asarray((nll * keep).sum(-1) / np.maximum(keep.sum(-1), 1))

    return stat


def mean_batch_statistic(v: np.ndarray) -> np.ndarray:
    """Vectorised ``surprisal`` (the plain mean NLL) over bootstrap batches ``v [..., B, 2]``."""
    return np.asarray(v[..., 0].mean(-1))


def batch_statistic(signal: str, max_outlier_fraction: float) -> Any:
    """The bootstrap statistic that reproduces ``signal`` from per-record (NLL, outlier) pairs.

    Only record-level signals computed against the fixed reference can be
    calibrated this way: ``surprisal_inlier`` and ``surprisal``.
    """
    if signal == "surprisal_inlier":
        return inlier_batch_statistic(max_outlier_fraction)
    if signal == "surprisal":
        return mean_batch_statistic
    raise ValueError(
        f"signal {signal!r} cannot be calibrated by record bootstrap; "
        "use surprisal_inlier or surprisal"
    )


@dataclass(frozen=True)
class DriftState:
    """Everything the drift loop carries from batch to batch (immutable).

    ``policy`` (mode, counters, thresholds, the monitor), ``reference`` (q_ref
    and its cached ensemble), ``base_prior`` p0, the previous batch's
    ``last_step_kl`` (NaN when it was not computed) and the calibration window
    collected so far: ``cal_records`` (per batch, [n_b, 2] float64 per-record
    NLL and outlier flag) and ``cal_kl`` (step KLs).  ``kl_window``: batches
    of step KL still to collect for the recovery threshold while alarms are
    already live (a loop calibrated from history, :mod:`fogline.drift.history`;
    0 otherwise).  It rides in the posterior's snapshot through
    :func:`store_drift` / :func:`load_drift`.
    """

    policy: PolicyState
    reference: Reference
    base_prior: PriorSpec
    last_step_kl: float = math.nan
    cal_records: tuple[np.ndarray, ...] = ()
    cal_kl: tuple[float, ...] = ()
    kl_window: int = 0

    def replace(self, **changes: Any) -> DriftState:
        """A copy with ``changes`` (``dataclasses.replace``, :func:`~fogline.models.state.frozen_replace`)."""
        return frozen_replace(self, **changes)  # type: ignore[no-any-return]


def init_drift(
    config: PolicyConfig,
    reference_state: PosteriorState,
    base_prior: PriorSpec,
    *,
    monitor: Any = None,
    ensemble_size: int | None = None,
    seed: int = 0,
) -> DriftState:
    """A fresh drift state anchored at ``reference_state`` (calibrating from the first batch)."""
    return DriftState(
        policy=policy_init(config, monitor if monitor is not None else make_monitor_for(config)),
        reference=make_reference(reference_state, ensemble_size or config.ensemble_size, seed),
        base_prior=base_prior,
    )


# ----------------------------------------------------------------------------- snapshot layout
# The one place that reads and writes the drift state's part of a PosteriorState:
#   extra["drift"]       the policy state (strict JSON, monitor included);
#   extra["drift_loop"]  last step KL, the calibration window's step KLs and batch sizes
#                        (and ``kl_window`` while a history-calibrated loop collects step KLs);
#   aux["drift.reference.<param>"], aux["drift.base_prior.loc|scale"],
#   aux["drift.calibration_records"]  [sum n_i, 2] float64: the collected batches one after
#                        another (split again by extra["drift_loop"]["cal_sizes"]).
# Snapshots of 2026-12-01 to 2026-12-03 hold one tensor per batch,
# aux["drift.calibration_records.<i>"] ([n_i, 2]); they still load.
_EXTRA_POLICY = "drift"
_EXTRA_LOOP = "drift_loop"
_AUX_PREFIX = "drift."
_AUX_REFERENCE = _AUX_PREFIX + "reference."
_AUX_BASE_PRIOR = _AUX_PREFIX + "base_prior."
#: The calibration window as one concatenated tensor (the layout written).
_AUX_CAL_RECORDS_JOINED = _AUX_PREFIX + "calibration_records"
#: One tensor per collected batch (read only: snapshots written 2026-12-01 to 2026-12-03).
_AUX_CAL_RECORDS = _AUX_PREFIX + "calibration_records."


def _json_float(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _float(v: Any) -> float:
    return math.nan if v is None else float(v)


@functools.lru_cache(maxsize=16)
def _config_json(config: PolicyConfig) -> dict[str, Any]:
    return config.model_dump(mode="json")


def policy_to_json(ps: PolicyState) -> dict[str, Any]:
    """The policy state as strict JSON (thresholds +inf as ``None``; the monitor by
    :func:`~fogline.drift.monitors.monitor_state`)."""
    out: dict[str, Any] = {
        "config": dict(_config_json(ps.config)),
        "mode": ps.mode,
        "batch": ps.batch,
        "mode_since": ps.mode_since,
        "quiet": ps.quiet,
        "calibrating": ps.calibrating,
        "threshold": json_threshold(ps.threshold),
        "kl_threshold": json_threshold(ps.kl_threshold),
        "alarms": ps.alarms,
        "last_alarm": ps.last_alarm,
        "transitions": [
            {"batch": t.batch, "from": t.from_mode, "to": t.to_mode, "reason": t.reason}
            for t in ps.transitions
        ],
        "monitor": monitor_state(ps.monitor),
    }
    if ps.calibration is not None:
        out["calibration"] = ps.calibration
    return out


def policy_from_json(
    data: dict[str, Any], config: PolicyConfig, monitor: Any = None
) -> PolicyState:
    """Inverse of :func:`policy_to_json` with the *configured* ``config`` and ``monitor``.

    A changed setting wins (logged as ``drift_policy_changed``; mode and
    counters are kept).  The stored monitor continues when it is of the
    configured type and settings (:func:`~fogline.drift.monitors.restore_monitor`);
    otherwise the configured one starts empty (``drift_monitor_restarted``).
    """
    now = _config_json(config)
    if data.get("config") != now:
        log.info("drift_policy_changed", stored=data.get("config"), now=now)
    fresh = monitor if monitor is not None else make_monitor_for(config)
    threshold = threshold_value(data.get("threshold"))
    if isinstance(fresh, ThresholdMonitor):
        fresh = fresh.clone({"threshold": threshold})
    restored = restore_monitor(fresh, data.get("monitor"))
    if restored is None and int(data.get("batch", 0)) > 0:
        log.warning("drift_monitor_restarted", monitor=type(fresh).__name__)
    return PolicyState(
        config=config,
        monitor=restored if restored is not None else fresh,
        mode=data["mode"],
        batch=int(data["batch"]),
        mode_since=int(data["mode_since"]),
        quiet=int(data["quiet"]),
        calibrating=int(data["calibrating"]),
        threshold=threshold,
        kl_threshold=threshold_value(data.get("kl_threshold")),
        alarms=int(data["alarms"]),
        last_alarm=data.get("last_alarm"),
        transitions=tuple(
            Transition(int(t["batch"]), t["from"], t["to"], t["reason"])
            for t in data.get("transitions", [])
        ),
        calibration=data.get("calibration"),
    )


def store_drift(state: PosteriorState, drift: DriftState) -> PosteriorState:
    """``state`` carrying ``drift`` in its ``extra`` / ``aux`` (the layout above).

    The calibration window goes in as one tensor (the batches concatenated): one
    tensor per key instead of one per collected batch, which the keyed daemon
    would otherwise rebuild for every key on every batch and write in every blob.
    """
    extra, aux = _without_drift_entries(state)
    for name, value in drift.reference.state.params.items():
        aux[_AUX_REFERENCE + name] = value.detach()
    aux[_AUX_BASE_PRIOR + "loc"] = drift.base_prior.loc
    aux[_AUX_BASE_PRIOR + "scale"] = drift.base_prior.scale
    if drift.cal_records:
        aux[_AUX_CAL_RECORDS_JOINED] = torch.from_numpy(np.concatenate(drift.cal_records))
    loop: dict[str, Any] = {
        "last_step_kl": _json_float(drift.last_step_kl),
        "cal_kl": list(drift.cal_kl),
        "cal_sizes": [len(r) for r in drift.cal_records],
    }
    if drift.kl_window:
        loop["kl_window"] = drift.kl_window
    extra[_EXTRA_POLICY] = policy_to_json(drift.policy)
    extra[_EXTRA_LOOP] = loop
    return state.replace(extra=extra, aux=aux)


def load_drift(
    state: PosteriorState,
    config: PolicyConfig,
    *,
    monitor: Any = None,
    ensemble_size: int | None = None,
    seed: int = 0,
) -> DriftState | None:
    """The drift state :func:`store_drift` put in ``state``, or ``None`` if it carries none.

    The reference ensemble is re-sampled from the stored reference parameters
    with the same seed, so it is the one the uninterrupted loop holds.
    """
    ref_params = {
        k[len(_AUX_REFERENCE) :]: v for k, v in state.aux.items() if k.startswith(_AUX_REFERENCE)
    }
    stored = state.extra.get(_EXTRA_POLICY)
    if not stored or not ref_params:
        return None
    loop = state.extra.get(_EXTRA_LOOP, {})
    sizes = [int(n) for n in loop.get("cal_sizes", [])]
    if sizes and _AUX_CAL_RECORDS_JOINED in state.aux:
        joined = state.aux[_AUX_CAL_RECORDS_JOINED].cpu().numpy()
        cal_records = tuple(np.split(joined, np.cumsum(sizes)[:-1]))
    else:  # the per-batch layout of 2026-12-01 to 2026-12-03
        cal_records = tuple(
            state.aux[f"{_AUX_CAL_RECORDS}{i}"].cpu().numpy() for i in range(len(sizes))
        )
    return DriftState(
        policy=policy_from_json(stored, config, monitor),
        reference=make_reference(
            state.replace(params=ref_params), ensemble_size or config.ensemble_size, seed
        ),
        base_prior=PriorSpec(
            state.aux[_AUX_BASE_PRIOR + "loc"], state.aux[_AUX_BASE_PRIOR + "scale"]
        ),
        last_step_kl=_float(loop.get("last_step_kl")),
        cal_records=cal_records,
        cal_kl=tuple(float(v) for v in loop.get("cal_kl", [])),
        kl_window=int(loop.get("kl_window", 0)),
    )


def without_loop(state: PosteriorState) -> PosteriorState:
    """``state`` with everything :func:`store_drift` stored removed: the next
    :meth:`DriftLoop.resume` anchors a new loop at it."""
    if _EXTRA_POLICY not in state.extra and not any(k.startswith(_AUX_PREFIX) for k in state.aux):
        return state
    extra, aux = _without_drift_entries(state)
    return state.replace(extra=extra, aux=aux)


def _without_drift_entries(
    state: PosteriorState,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Copies of ``state.extra`` / ``state.aux`` without what :func:`store_drift` writes."""
    extra = {k: v for k, v in state.extra.items() if k not in (_EXTRA_POLICY, _EXTRA_LOOP)}
    aux = {k: v for k, v in state.aux.items() if not k.startswith(_AUX_PREFIX)}
    return extra, aux


def has_drift(state: PosteriorState) -> bool:
    """Does ``state`` carry a drift loop?"""
    return bool(state.extra.get(_EXTRA_POLICY))


def drift_mode(state: PosteriorState) -> str:
    """The policy mode ``state`` carries (``stable``/``shifted``/``recovering``), ``none`` without a loop."""
    return str(state.extra.get(_EXTRA_POLICY, {}).get("mode", "none"))


def drift_summary(state: PosteriorState) -> dict[str, Any]:
    """The stored policy state as JSON (snapshot metadata); ``{}`` without a loop."""
    return dict(state.extra.get(_EXTRA_POLICY, {}))


# ----------------------------------------------------------------------------- the loop
@dataclass
class Prepared:
    """Output of :meth:`DriftLoop.prepare`."""

    state: PosteriorState
    batch: Minibatch
    step_kwargs: dict[str, Any]
    action: Action
    signals: dict[str, float]
    scores: RecordScores
    x_all: torch.Tensor
    rows: int
    drift: DriftState
    before: PosteriorState


class DriftLoop:
    """The drift loop of one model's stream: settings plus the current :class:`DriftState`.

    Parameters
    ----------
    reference_state:
        The posterior to anchor the reference at (the warm-start posterior).
    base_prior:
        p0, the prior of normal operation.
    base_lr, data_size, num_steps:
        Normal-operation step settings (``data_size`` N, ``num_steps`` K).
    policy:
        The :class:`PolicyConfig` (its ``ert``, ``ensemble_size``,
        ``n_streams`` and detector unless given here).
    monitor:
        Any River-protocol detector (default: the configured one,
        :func:`~fogline.drift.policy.make_monitor_for`); a
        :class:`ThresholdMonitor`'s threshold is (re)fitted for ``ert`` after
        each calibration window.  The loop works on copies: the object passed
        in is never updated.
    ert:
        Target expected run time between false alarms, in batches.
    ensemble_size, seed:
        Reference ensemble size and seed (common to every ensemble).
    n_streams:
        Bootstrap streams used to fit the threshold.
    functional_prior:
        Keep applying the functional prior a warm-start state carries
        (:func:`fogline.models.stream.stream_step`).
    drift:
        A drift state to continue from (:meth:`resume`); default a fresh one.
    """

    def __init__(
        self,
        reference_state: PosteriorState,
        base_prior: PriorSpec,
        base_lr: float,
        data_size: int | None,
        policy: PolicyConfig,
        monitor: Any = None,
        ert: float | None = None,
        num_steps: int = 1,
        ensemble_size: int | None = None,
        seed: int = 0,
        n_streams: int | None = None,
        functional_prior: bool = True,
        drift: DriftState | None = None,
    ) -> None:
        policy.name  # noqa: B018 -- raises for policy "off" (no loop)
        self.base_lr = base_lr
        self.data_size = data_size
        self.policy = policy
        self.ert = ert if ert is not None else policy.ert
        self.num_steps = num_steps
        self.ensemble_size = ensemble_size if ensemble_size is not None else policy.ensemble_size
        self.seed = seed
        self.n_streams = n_streams if n_streams is not None else policy.n_streams
        self.functional_prior = functional_prior
        self.drift = (
            drift
            if drift is not None
            else init_drift(
                policy,
                reference_state,
                base_prior,
                monitor=monitor,
                ensemble_size=ensemble_size,
                seed=seed,
            )
        )
        #: The last threshold fit of this loop object (diagnostics).
        self.calibration: Calibration | None = None
        #: Whether a stream-window fit also measures its ERT on fresh bootstrap streams
        #: (``ert_estimate``, a diagnostic; off in the keyed daemon, which fits per key).
        self.estimate_ert = True
        #: The last post-update ensemble (the experiments' prequential scores reuse it).
        self.last_ensemble: Ensemble | None = None
        self._noise = NoiseCache()

    # read-only views of the current drift state
    @property
    def policy_state(self) -> PolicyState:
        """The current :class:`PolicyState`."""
        return self.drift.policy

    @property
    def reference(self) -> Reference:
        """The current reference posterior."""
        return self.drift.reference

    @property
    def base_prior(self) -> PriorSpec:
        """p0."""
        return self.drift.base_prior

    @property
    def monitor(self) -> Any:
        """The current monitor (a copy is updated each batch)."""
        return self.drift.policy.monitor

    @classmethod
    def resume(
        cls,
        state: PosteriorState,
        *,
        base_lr: float,
        data_size: int | None,
        policy: PolicyConfig,
        monitor: Any = None,
        ert: float | None = None,
        num_steps: int = 1,
        ensemble_size: int | None = None,
        seed: int = 0,
        n_streams: int | None = None,
        functional_prior: bool = True,
        batch_size: int | None = None,
    ) -> DriftLoop:
        """The loop for ``state``: continued from the drift state it carries, if any.

        A state that carries no drift loop (a warm-start file, a fresh prior,
        a snapshot of policy ``off``) anchors a new loop: the reference is
        ``state`` itself and the base prior p0 is ``state.prior``.  With
        ``policy.calibration == "history"`` and a history reference in
        ``state`` (:func:`fogline.drift.history.calibrate_from_history`), the
        new loop starts calibrated: its alarm threshold is fitted on the stored
        holdout for ``batch_size`` records per batch (default: the size the
        warm start fitted for), so it can alarm from its first batch;
        otherwise it calibrates on the first ``calibration_batches`` batches
        (logged as ``drift_calibration``).  Otherwise
        the stored :class:`DriftState` is restored (:func:`load_drift`), the
        monitor's running state included (River's ADWIN, Page-Hinkley and
        KSWIN as well as the threshold monitor), so the next batch computes
        exactly what it would have without the restart.  The ``policy`` and
        ``monitor`` given win over stored ones of other settings.
        """
        loaded = load_drift(state, policy, monitor=monitor, ensemble_size=ensemble_size, seed=seed)
        loop = cls(
            reference_state=state,
            base_prior=state.prior,
            base_lr=base_lr,
            data_size=data_size,
            policy=policy,
            monitor=monitor,
            ert=ert,
            num_steps=num_steps,
            ensemble_size=ensemble_size,
            seed=seed,
            n_streams=n_streams,
            functional_prior=functional_prior,
            drift=loaded,
        )
        if loaded is None:
            # history builds on this module (DriftState, fit_alarm): imported here, not at the top
            from fogline.drift.history import history_drift

            loop.drift = history_drift(
                loop.drift,
                state,
                policy,
                batch_size=batch_size,
                ert=loop.ert,
                n_streams=loop.n_streams,
                seed=seed,
            )
        return loop

    # -- per batch -----------------------------------------------------------------
    def step(
        self, drift: DriftState, state: PosteriorState, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[DriftState, PosteriorState, StepInfo, dict[str, float], Action]:
        """One batch, as a function: ``(drift, state, x, y) -> (drift, state, info, signals, action)``.

        ``drift`` and ``state`` are not modified (the loop object holds only settings and
        caches derived from its inputs: the ensemble draws, the last threshold fit).
        """
        prep = self.prepare(state, x, y, drift)
        new, info = stream_step(
            prep.state, prep.batch, functional_prior=self.functional_prior, **prep.step_kwargs
        )
        d, new, signals = self._finish(prep, new)
        return d, new, info, signals, prep.action

    def prepare(
        self,
        state: PosteriorState,
        x: torch.Tensor,
        y: torch.Tensor,
        drift: DriftState | None = None,
    ) -> Prepared:
        """Step 1: signals, policy, apply the action; returns what to step.

        ``drift``: the drift state to advance (default: the loop's current one).
        """
        d = drift if drift is not None else self.drift
        pre, scores = pre_update_signals(
            d.reference, x, y, max_outlier_fraction=self.policy.max_outlier_fraction
        )
        return self.prepare_scored(state, x, y, d, pre, scores)

    def prepare_scored(
        self,
        state: PosteriorState,
        x: torch.Tensor,
        y: torch.Tensor,
        drift: DriftState,
        pre: dict[str, float],
        scores: RecordScores,
        cal_record: np.ndarray | None = None,
    ) -> Prepared:
        """Step 1 from the batch's pre-update signals, already computed.

        ``pre`` and ``scores`` are what :func:`~fogline.drift.signals.pre_update_signals`
        returns for ``(drift.reference, x, y)`` (the keyed loop computes them for all
        keys of a micro-batch at once, :mod:`fogline.drift.keyed_signals`);
        ``cal_record``: the batch's [n, 2] float64 (NLL, outlier) calibration record
        if the caller has it (default: formed from ``scores``).  The rest is
        :meth:`prepare`: calibration window, policy step, the action applied.
        """
        d = drift
        signals = {**pre, "step_kl": d.last_step_kl}
        if d.policy.calibrating > 0 and d.policy.mode == "stable":
            rec = (
                cal_record
                if cal_record is not None
                else np.stack([scores.nll.numpy(), scores.outlier.numpy().astype(np.float64)], 1)
            )
            d = d.replace(
                cal_records=(*d.cal_records, rec),
                cal_kl=(*d.cal_kl, d.last_step_kl) if math.isfinite(d.last_step_kl) else d.cal_kl,
            )
        ps, action = policy_step(d.policy, signals)
        d = d.replace(policy=ps)
        batch = Minibatch(x, y)
        if action.drop_outliers:
            keep = ~scores.outlier
            if not bool(keep.all()):
                batch = Minibatch(x[keep], y[keep])
        kwargs = {
            "num_steps": action.num_steps or self.num_steps,
            "data_size": batch.rows if action.streaming else self.data_size,
            "likelihood_weight": action.likelihood_weight,
        }
        return Prepared(
            self.apply(state, action, d.base_prior),
            batch,
            kwargs,
            action,
            signals,
            scores,
            x,
            int(x.shape[0]),
            d,
            state,
        )

    def apply(
        self, state: PosteriorState, action: Action, base_prior: PriorSpec | None = None
    ) -> PosteriorState:
        """Apply an action's prior, learning rate and resets to ``state``."""
        p0 = base_prior if base_prior is not None else self.drift.base_prior
        if action.reset_posterior:
            fresh = init_state(
                state.config,
                seed=self.seed + 7919 * (state.step_count + 1),
                lr=self.base_lr,
                prior=p0,
                device=state.device,
            )
            state = fresh.replace(
                step_count=state.step_count,
                offsets=state.offsets,
                records_absorbed=state.records_absorbed,
                extra=state.extra,
            )
        if action.reset_optimizer:
            state = reset_optimizer(state)
        if action.prior == "base":
            prior = p0
        elif action.prior == "posterior":
            prior = posterior_as_prior(state)
        else:
            loc, scale = forgetting_prior(
                state.params["loc"].detach(),
                state.posterior_scale().detach(),
                p0.loc,
                p0.scale,
                action.gamma,
            )
            prior = PriorSpec(loc, scale)
        return state.replace(prior=prior, lr=self.base_lr * action.lr_scale)

    def finish(
        self, prepared: Prepared, state: PosteriorState, info: StepInfo
    ) -> tuple[PosteriorState, dict[str, float]]:
        """Step 3: post-update signals, re-anchoring/calibration, the drift state into ``state``
        (and into the loop: :attr:`drift`)."""
        self.drift, state, signals = self._finish(prepared, state)
        return state, signals

    def _finish(
        self, prepared: Prepared, state: PosteriorState
    ) -> tuple[DriftState, PosteriorState, dict[str, float]]:
        post = self.post_signals(prepared, state)
        return self.finish_signals(prepared, state, post)

    def post_signals(self, prepared: Prepared, state: PosteriorState) -> dict[str, float]:
        """Step 3's signals of ``state`` (the posterior after the batch): ``predictive_kl``,
        ``weight_kl`` and ``step_kl`` (NaN where no later batch reads it, :func:`post_rows`)."""
        d = prepared.drift
        ref = d.reference
        after = self._noise.ensemble(state, ref.num_samples, ref.seed)
        before = None
        if step_kl_wanted(d):
            # the posterior before this batch (as it came in, before any reset), same draws;
            # a loop's first batch has no step KL (NaN), as its input is the anchor itself
            before = self._noise.ensemble(prepared.before, ref.num_samples, ref.seed)
        rows = post_rows(d, self.policy, prepared.rows)
        scores, x_kl = prepared.scores, prepared.x_all
        if rows < x_kl.shape[0]:
            # the predictive KL is only a metric here: estimate it on a subset of rows
            scores, x_kl = scores.head(rows), x_kl[:rows]
        post = post_update_signals(ref, scores, x_kl, state, before, ensemble=after)[0]
        self.last_ensemble = after
        return post

    def finish_signals(
        self, prepared: Prepared, state: PosteriorState, post: dict[str, float]
    ) -> tuple[DriftState, PosteriorState, dict[str, float]]:
        """Step 3 from the post-update signals, already computed (:meth:`post_signals`, or
        the keyed loop's batched pass): step-KL window, re-anchoring, calibration, and the
        drift state stored in ``state``.  Returns (drift state, state, the batch's signals)."""
        d = prepared.drift
        d = d.replace(last_step_kl=post["step_kl"])
        if d.kl_window > 0:
            d = _kl_window_step(d, post["step_kl"])
        if prepared.action.reanchor:
            d = d.replace(
                reference=make_reference(state, self.ensemble_size, self.seed),
                cal_records=(),
                cal_kl=(),
            )
            log.info("reference_reanchored", batch=d.policy.batch - 1)
        if d.policy.calibrating == 0 and d.policy.mode == "stable" and d.cal_records:
            screen = self._screen(d)
            kept = screen.kept(d.cal_records)
            plan = (
                CalibrationPlan(self.policy.calibration_block, extend=screen.extend)
                if screen.extend
                else calibration_plan(kept, self.policy, collected=len(d.cal_records))
            )
            if plan.extend:
                log.info(
                    "calibration_extended",
                    batches=len(d.cal_records),
                    more=plan.extend,
                    reason="screen" if screen.extend else "cycle",
                )
                d = d.replace(policy=d.policy.replace(calibrating=plan.extend))
            else:
                d = self._fit_thresholds(d, plan, kept, screen)
        absorbed = prepared.before.records_absorbed + prepared.rows
        state = store_drift(state.replace(records_absorbed=absorbed), d)
        return d, state, {**prepared.signals, **post}

    def process(
        self, state: PosteriorState, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[PosteriorState, StepInfo, dict[str, float], Action]:
        """:meth:`step` from the loop's current drift state, which it then replaces."""
        self.drift, new, info, signals, action = self.step(self.drift, state, x, y)
        return new, info, signals, action

    # -- calibration ---------------------------------------------------------------
    def _screen(self, d: DriftState) -> WindowScreen:
        """The contamination screen of ``d``'s full window (:func:`screen_window`), or none."""
        if not self.policy.recalibration_screen:
            return WindowScreen()
        screen = screen_window(
            d.cal_records,
            self.policy,
            threshold=d.policy.threshold,
            run=self.policy.recalibration_screen,
        )
        if screen.abandoned:
            log.info(
                "calibration_screen_abandoned",
                batches=len(d.cal_records),
                flagged=screen.flagged,
                threshold=json_threshold(d.policy.threshold),
            )
        return screen

    def _fit_thresholds(
        self,
        d: DriftState,
        plan: CalibrationPlan,
        window: tuple[np.ndarray, ...] | None = None,
        screen: WindowScreen | None = None,
    ) -> DriftState:
        """Fit the thresholds on ``window`` (default: the whole collected window)."""
        cal_records = d.cal_records if window is None else window
        records = np.concatenate(cal_records)
        batch_size = max(1, int(np.median([len(r) for r in cal_records])))
        monitor = d.policy.monitor
        block, period = plan.block, plan.period
        cal = fit_alarm(
            records,
            batch_size,
            self.policy,
            ert=self.ert,
            consecutive=int(getattr(monitor, "consecutive", 1)),
            n_streams=self.n_streams,
            seed=self.seed,
            block=min(block * batch_size, len(records)),
            period=period,
            estimate=self.estimate_ert,
        )
        self.calibration = cal
        kl_thr = kl_threshold(d.cal_kl)
        if isinstance(monitor, ThresholdMonitor):
            monitor = monitor.clone({"threshold": cal.threshold})
        log.info(
            "thresholds_calibrated",
            threshold=cal.threshold,
            ert_target=cal.ert_target,
            ert_estimate=cal.ert_estimate if math.isfinite(cal.ert_estimate) else None,
            kl_threshold=kl_thr,
            reference_records=cal.reference_size,
            block_records=cal.block,
            period_records=cal.period,
            # every simulated stream had the same maximum: the window's signal repeats
            # exactly (a noise-free series), and no false alarm is expected at any ERT
            deterministic=cal.deterministic,
            screened_batches=screen.excluded if screen is not None else 0,
        )
        summary = cal.to_dict()
        if screen is not None and screen.excluded:
            summary["screened_batches"] = screen.excluded
        ps = d.policy.replace(
            threshold=cal.threshold,
            kl_threshold=kl_thr,
            calibration=summary,
            monitor=monitor,
        )
        return d.replace(policy=ps, cal_records=(), cal_kl=())


@dataclass(frozen=True)
class CalibrationPlan:
    """How a calibration window is bootstrapped (:func:`calibration_plan`).

    ``block``: block length in batches; ``period``: the cycle in records (0: none),
    for the seasonal block bootstrap; ``extend``: batches still to collect before
    fitting (0: fit now).
    """

    block: int
    period: int = 0
    extend: int = 0


def calibration_plan(
    cal_records: tuple[np.ndarray, ...], policy: PolicyConfig, *, collected: int | None = None
) -> CalibrationPlan:
    """The bootstrap of a calibration window of R records in n batches of B.

    ``collected``: the batches collected so far, when ``cal_records`` is what a
    contamination screen kept of them (:func:`screen_window`); the window's extension
    is capped at ``policy.calibration_max_batches`` collected batches (default n).

    ``policy.calibration_block`` (b_0) without ``policy.calibration_block_auto``.
    With it, from the window itself:

    1. a cycle: the period d of the records' surprisal sequence
       (:func:`fogline.models.autoregressive.detect_period`, d >= 2 B: a shorter
       cycle averages out within a batch).  While the window holds fewer than
       ``policy.calibration_cycles`` cycles and fewer than
       ``policy.calibration_max_batches`` batches, ``extend`` asks for the
       batches still missing.  When it holds every phase at least twice
       (R >= 2 d + b_0 B), the bootstrap is seasonal (``period = d``, blocks of
       b_0 batches): a daily cycle is a profile to keep, not noise to shuffle.
    2. otherwise blocks of ``min(n // 2, max(b_0, 2 m))`` batches, m the
       dependence horizon of the window's batch signal s_1..s_n
       (:func:`~fogline.drift.calibration.dependence_horizon`; 2 m is Politis
       and White's lag-window bandwidth): a cycle seen less than twice, a trend
       or slow autocorrelation is drawn in long runs.
    """
    base = policy.calibration_block
    n = len(cal_records)
    if not policy.calibration_block_auto or n < 4:
        return CalibrationPlan(base)
    batch = max(1, int(np.median([len(r) for r in cal_records])))
    nll = np.concatenate([r[:, 0] for r in cal_records])
    period = detect_period(nll, min_lag=2 * batch)
    if period is not None:
        missing = math.ceil((policy.calibration_cycles * period - len(nll)) / batch)
        extend = max(0, min(missing, policy.calibration_max_batches - (collected or n)))
        if extend > 0:
            return CalibrationPlan(base, 0, extend)
        if len(nll) >= 2 * period + max(base, 1) * batch:
            return CalibrationPlan(base, int(period))
    stat = batch_statistic(policy.signal, policy.max_outlier_fraction)
    if len({len(r) for r in cal_records}) == 1:
        # batches of one size: one call on [n, B, 2], each batch reduced as it is alone
        signal = np.asarray(stat(np.stack(cal_records)), dtype=np.float64)
    else:
        signal = np.array([float(stat(r[None])[0]) for r in cal_records])
    return CalibrationPlan(max(base, min(n // 2, 2 * dependence_horizon(signal))))


@dataclass(frozen=True)
class WindowScreen:
    """What a contamination screen (:func:`screen_window`) keeps of a calibration window.

    ``keep``: per collected batch, is it kept (empty: every batch); ``extend``:
    batches still to collect before fitting (0: fit now); ``flagged``: batches the
    threshold in force flags; ``abandoned``: they would be the majority, so the
    screen is not applied.
    """

    keep: tuple[bool, ...] = ()
    extend: int = 0
    flagged: int = 0
    abandoned: bool = False

    @property
    def excluded(self) -> int:
        """Batches kept out of the fit."""
        return len(self.keep) - sum(self.keep)

    def kept(self, cal_records: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        """The batches of ``cal_records`` the fit uses (all of them without a screen)."""
        if not self.keep:
            return cal_records
        return tuple(r for r, k in zip(cal_records, self.keep, strict=True) if k)


def window_signal(cal_records: tuple[np.ndarray, ...], policy: PolicyConfig) -> np.ndarray:
    """The monitor's signal s_1..s_n of a calibration window's batches (float64)."""
    stat = batch_statistic(policy.signal, policy.max_outlier_fraction)
    return np.array([float(stat(r[None])[0]) for r in cal_records])


def screen_window(
    cal_records: tuple[np.ndarray, ...],
    policy: PolicyConfig,
    *,
    threshold: float,
    run: int,
) -> WindowScreen:
    """Keep contaminated batches out of a re-calibration window (``recalibration_screen``).

    With the window's batch signal s_1..s_n (under the re-anchored reference), the
    threshold in force h (fitted before the alarm; +inf before the first fit) and
    r = ``run``, F is the set of batches in runs of at least r batches with s_t > h
    (:func:`~fogline.drift.calibration.contaminated_batches`):

    * F empty: every batch is kept (the fit is the unscreened one, bit for bit);
    * 2 |F| > n: the screen is ``abandoned`` and every batch kept: most of the window
      lies above h, so h (a threshold of the old reference and regime) does not
      describe the new one, and a screen would keep only its low tail;
    * otherwise the batches of F are kept out; while fewer than n_0 =
      ``policy.calibration_batches`` are kept, the window is extended by the
      shortfall n_0 - (n - |F|), up to ``policy.calibration_max_batches`` collected
      batches; at that cap the fit uses the n - |F| >= n / 2 kept batches.
    """
    n = len(cal_records)
    flagged = contaminated_batches(window_signal(cal_records, policy), threshold, run)
    count = int(np.count_nonzero(flagged))
    if count == 0:
        return WindowScreen()
    if 2 * count > n:
        return WindowScreen(flagged=count, abandoned=True)
    missing = policy.calibration_batches - (n - count)
    extend = max(0, min(missing, policy.calibration_max_batches - n))
    return WindowScreen(tuple(bool(f) for f in ~flagged), extend, count)


def fit_alarm(
    records: np.ndarray,
    batch_size: int,
    policy: PolicyConfig,
    *,
    ert: float,
    consecutive: int,
    n_streams: int,
    seed: int,
    block: int = 1,
    period: int = 0,
    estimate: bool = True,
) -> Calibration:
    """The alarm threshold for ``policy.signal`` from per-record ``[R, 2]`` (NLL, outlier)
    pairs: :func:`~fogline.drift.calibration.calibrate_batch_statistic` with batches of
    ``batch_size`` records, drawn as runs of ``block`` consecutive records (the stream
    window's and the history's fit alike); ``estimate=False``: no ERT check (NaN)."""
    return calibrate_batch_statistic(
        records,
        batch_size,
        ert,
        statistic=batch_statistic(policy.signal, policy.max_outlier_fraction),
        consecutive=consecutive,
        n_streams=n_streams,
        seed=seed,
        block=block,
        period=period,
        estimate=estimate,
    )


def kl_threshold(step_kls: tuple[float, ...]) -> float:
    """The recovery threshold: twice the 90 % quantile of no-drift step KLs (+inf without any)."""
    kl = np.asarray(step_kls) if step_kls else np.asarray([math.inf])
    return float(2.0 * np.quantile(kl, 0.9))


def _kl_window_step(d: DriftState, step_kl: float) -> DriftState:
    """One batch of a history-calibrated loop's step-KL window (alarms already live).

    In ``stable`` the batch's step KL is collected; when the window is full the
    recovery threshold is fitted (:func:`kl_threshold`).  An alarm first ends the
    window unfitted (its step KLs may already be the new regime's): the recovery
    then ends after ``min_recovery`` batches and the re-anchored loop calibrates both
    thresholds on the stream as usual.
    """
    ps = d.policy
    if ps.mode != "stable":
        log.info("kl_window_abandoned", batch=ps.batch - 1, collected=len(d.cal_kl))
        return d.replace(kl_window=0, cal_kl=())
    cal_kl = (*d.cal_kl, step_kl) if math.isfinite(step_kl) else d.cal_kl
    left = d.kl_window - 1
    if left > 0:
        return d.replace(kl_window=left, cal_kl=cal_kl)
    thr = kl_threshold(cal_kl)
    log.info("kl_threshold_calibrated", kl_threshold=thr, batches=len(cal_kl))
    return d.replace(kl_window=0, cal_kl=(), policy=ps.replace(kl_threshold=thr))


def step_kl_wanted(d: DriftState) -> bool:
    """Is this batch's step KL computed (the third ensemble pass, of the posterior before)?

    When a later batch reads it (:func:`_step_kl_needed`, or a step-KL window being
    collected), except on a loop's first batch, whose input is the anchor itself (NaN).
    ``d`` is the drift state after the batch's policy step (``Prepared.drift``).
    """
    return _step_kl_read(d) and d.policy.batch > 1


def post_rows(d: DriftState, policy: PolicyConfig, rows: int) -> int:
    """Rows of a batch of ``rows`` records its post-update signals are computed on.

    All of them wherever a later batch reads the step KL; otherwise (the predictive
    KL is only a metric) the first ``policy.predictive_kl_rows`` (0: all).
    """
    limit = policy.predictive_kl_rows
    return limit if not _step_kl_read(d) and 0 < limit < rows else rows


def _step_kl_read(d: DriftState) -> bool:
    """Does a later batch read this batch's step KL (the policy, or a step-KL window)?"""
    return _step_kl_needed(d.policy) or d.kl_window > 0


def _step_kl_needed(ps: PolicyState) -> bool:
    """Will the next batch read this batch's step KL?

    Only the recovery test (next mode ``shifted``/``recovering``) and the
    calibration window (``stable`` while calibrating) do; elsewhere the
    third ensemble pass is skipped and ``step_kl`` is NaN.
    """
    return ps.mode != "stable" or ps.calibrating > 0
