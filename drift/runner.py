"""One batch of the drift loop: signals -> monitor -> policy -> step -> signals.

:class:`DriftLoop` is the code the daemon's pipeline and ``fogline
experiment`` share.  Per batch (``process`` = ``prepare`` + ``models.svi.step``
+ ``finish``):

1. ``prepare``: score the batch under the reference posterior *before* the
   update (surprisal, anomaly scores, outlier fraction), call
   :func:`fogline.drift.policy.policy_step`, and apply its :class:`~fogline.drift.policy.Action`
   to the state (prior swap, learning rate, posterior/optimizer reset) and to
   the batch (drop gross outliers); return the step's keyword arguments
   (``num_steps``, ``data_size``, ``likelihood_weight``).
2. the caller runs ``models.stream.stream_step(state, batch, **kwargs)``
   (``models.svi.step``, plus the warm start's functional prior if the state
   carries one).
3. ``finish``: post-update signals (predictive KL vs the reference, step KL,
   weight KL), collect calibration data, re-anchor the reference and refit the
   thresholds when the policy asks, and store the policy state in
   ``state.extra["drift"]``.  ``records_absorbed`` counts every record of the
   batch, dropped outliers included (they were seen and given weight 0).

Everything the loop needs to continue exactly rides in the returned state, so
a snapshot taken after any batch resumes bit for bit (:meth:`DriftLoop.resume`):

* ``extra["drift"]``: the policy state (mode, counters, thresholds,
  transitions, the threshold monitor's running state; strict JSON);
* ``extra["drift_loop"]``: the previous batch's step KL, the calibration
  window's step KLs and batch sizes;
* ``aux["drift.reference.<param>"]``: the reference posterior's variational
  parameters (its ensemble is re-sampled from them with the same seed);
* ``aux["drift.base_prior.loc|scale"]``: the base prior p0;
* ``aux["drift.calibration_records"]`` [n, 2] float64: per-record NLL and
  outlier flag of the calibration window collected so far.

The previous batch's ensemble (for the step KL) is re-sampled from the
restored posterior itself, with the same seed.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import structlog
import torch

from fogline.drift.calibration import Calibration, calibrate_batch_statistic
from fogline.drift.monitors import ThresholdMonitor
from fogline.drift.policy import (
    Action,
    PolicyConfig,
    forgetting_prior,
    init_policy_state,
    json_threshold,
    policy_step,
    threshold_value,
)
from fogline.drift.signals import (
    RecordScores,
    Reference,
    make_reference,
    post_update_signals,
    pre_update_signals,
)
from fogline.models.predictive import Ensemble, sample_ensemble
from fogline.models.priors import posterior_as_prior
from fogline.models.state import Minibatch, PosteriorState, PriorSpec, StepInfo
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


#: Prefixes/keys of what :meth:`DriftLoop.finish` stores in ``PosteriorState.aux``.
AUX_PREFIX = "drift."
AUX_REFERENCE = AUX_PREFIX + "reference."
AUX_BASE_PRIOR = AUX_PREFIX + "base_prior."
AUX_CAL_RECORDS = AUX_PREFIX + "calibration_records"
#: Key of the loop's own JSON state in ``PosteriorState.extra``.
EXTRA_LOOP = "drift_loop"


def without_loop(state: PosteriorState) -> PosteriorState:
    """``state`` with everything :meth:`DriftLoop.finish` stored removed (``extra["drift"]``,
    ``extra["drift_loop"]``, ``aux["drift.*"]``): the next :meth:`DriftLoop.resume` anchors
    a new loop at it."""
    extra = {k: v for k, v in state.extra.items() if k not in ("drift", EXTRA_LOOP)}
    aux = {k: v for k, v in state.aux.items() if not k.startswith(AUX_PREFIX)}
    return state.replace(extra=extra, aux=aux)


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


@dataclass
class DriftLoop:
    """Reference, monitor, policy state and calibration of one model's stream.

    Parameters
    ----------
    reference_state:
        The posterior to anchor the reference at (the warm-start posterior).
    base_prior:
        p0, the prior of normal operation.
    base_lr, data_size, num_steps:
        Normal-operation step settings (``data_size`` N, ``num_steps`` K).
    policy:
        The :class:`PolicyConfig`.
    monitor:
        Any River-protocol detector; a :class:`ThresholdMonitor`'s threshold
        is (re)fitted for ``ert`` after each calibration window.
    ert:
        Target expected run time between false alarms, in batches.
    ensemble_size, seed:
        Reference ensemble size and seed (common to every ensemble).
    n_streams:
        Bootstrap streams used to fit the threshold.
    functional_prior:
        Keep applying the functional prior a warm-start state carries
        (:func:`fogline.models.stream.stream_step`).
    """

    reference_state: PosteriorState
    base_prior: PriorSpec
    base_lr: float
    data_size: int | None
    policy: PolicyConfig
    monitor: Any = None
    ert: float = 1000.0
    num_steps: int = 1
    ensemble_size: int = 64
    seed: int = 0
    n_streams: int = 500
    functional_prior: bool = True
    policy_state: dict[str, Any] = field(default_factory=dict)
    reference: Reference | None = None
    calibration: Calibration | None = None
    _cal_records: list[np.ndarray] = field(default_factory=list)
    _cal_kl: list[float] = field(default_factory=list)
    _prev_ens: Ensemble | None = None
    _last_step_kl: float = math.nan

    def __post_init__(self) -> None:
        if self.monitor is None:
            self.monitor = ThresholdMonitor()
        if not self.policy_state:
            self.policy_state = init_policy_state(self.policy)
        if self.reference is None:
            self.reference = make_reference(self.reference_state, self.ensemble_size, self.seed)

    @classmethod
    def resume(
        cls,
        state: PosteriorState,
        *,
        base_lr: float,
        data_size: int | None,
        policy: PolicyConfig,
        monitor: Any = None,
        ert: float = 1000.0,
        num_steps: int = 1,
        ensemble_size: int = 64,
        seed: int = 0,
        n_streams: int = 500,
        functional_prior: bool = True,
    ) -> DriftLoop:
        """The loop for ``state``: continued from what :meth:`finish` stored in it, if anything.

        A state that carries no drift loop (a warm-start file, a fresh prior,
        a snapshot of policy ``none`` from before) anchors a new loop: the
        reference is ``state`` itself and the base prior p0 is ``state.prior``.
        Otherwise the reference, base prior, policy state, calibration window
        and the threshold monitor's running state are restored, so the next
        batch computes exactly what it would have without the restart.  The
        ``policy`` given wins over the stored one (a changed setting is logged
        as ``drift_policy_changed``; mode and counters are kept).  Only the
        :class:`ThresholdMonitor` has a persistent state; River's detectors
        start empty after a restart (logged as ``drift_monitor_restarted``).
        """
        kwargs: dict[str, Any] = {
            "base_lr": base_lr,
            "data_size": data_size,
            "policy": policy,
            "monitor": monitor,
            "ert": ert,
            "num_steps": num_steps,
            "ensemble_size": ensemble_size,
            "seed": seed,
            "n_streams": n_streams,
            "functional_prior": functional_prior,
        }
        ref_params = {
            k[len(AUX_REFERENCE) :]: v for k, v in state.aux.items() if k.startswith(AUX_REFERENCE)
        }
        stored = state.extra.get("drift")
        if not stored or not ref_params:
            return cls(reference_state=state, base_prior=state.prior, **kwargs)
        ps = copy.deepcopy(stored)
        new_cfg = asdict(policy)
        if ps.get("config") != new_cfg:
            log.info("drift_policy_changed", stored=ps.get("config"), now=new_cfg)
            ps["config"] = new_cfg
        base = PriorSpec(state.aux[AUX_BASE_PRIOR + "loc"], state.aux[AUX_BASE_PRIOR + "scale"])
        ref_state = state.replace(params=ref_params)
        if monitor is None:
            monitor = ThresholdMonitor()
        if isinstance(monitor, ThresholdMonitor):
            monitor = monitor.clone({"threshold": threshold_value(ps.get("threshold"))})
            monitor.load_state(ps.get("monitor", {}))
        elif int(ps.get("batch", 0)) > 0:
            log.warning("drift_monitor_restarted", monitor=type(monitor).__name__)
        kwargs["monitor"] = monitor
        loop = cls(reference_state=ref_state, base_prior=base, policy_state=ps, **kwargs)
        extra = state.extra.get(EXTRA_LOOP, {})
        last = extra.get("last_step_kl")
        loop._last_step_kl = math.nan if last is None else float(last)
        loop._cal_kl = [float(v) for v in extra.get("cal_kl", [])]
        sizes = [int(n) for n in extra.get("cal_sizes", [])]
        if sizes:
            records = state.aux[AUX_CAL_RECORDS].cpu().numpy()
            loop._cal_records = list(np.split(records, np.cumsum(sizes)[:-1]))
        if int(ps.get("batch", 0)) > 0:
            loop._prev_ens = sample_ensemble(state, ensemble_size, seed)
        return loop

    def _persist(self, state: PosteriorState) -> PosteriorState:
        """Store the loop's state in ``state.extra`` / ``state.aux`` (module docstring)."""
        assert self.reference is not None
        aux = dict(without_loop(state).aux)
        for name, value in self.reference.state.params.items():
            aux[AUX_REFERENCE + name] = value.detach()
        aux[AUX_BASE_PRIOR + "loc"] = self.base_prior.loc
        aux[AUX_BASE_PRIOR + "scale"] = self.base_prior.scale
        if self._cal_records:
            aux[AUX_CAL_RECORDS] = torch.from_numpy(np.concatenate(self._cal_records))
        last = self._last_step_kl
        loop = {
            "last_step_kl": last if math.isfinite(last) else None,
            "cal_kl": list(self._cal_kl),
            "cal_sizes": [len(r) for r in self._cal_records],
        }
        extra = {**state.extra, "drift": self.policy_state, EXTRA_LOOP: loop}
        return state.replace(extra=extra, aux=aux)

    # -- per batch -----------------------------------------------------------------
    def prepare(self, state: PosteriorState, x: torch.Tensor, y: torch.Tensor) -> Prepared:
        """Steps 1: signals, policy, apply the action; returns what to step."""
        assert self.reference is not None
        pre, scores = pre_update_signals(
            self.reference, x, y, max_outlier_fraction=self.policy.max_outlier_fraction
        )
        signals = {**pre, "step_kl": self._last_step_kl}
        if self.policy_state["calibrating"] > 0 and self.policy_state["mode"] == "stable":
            self._cal_records.append(
                np.stack([scores.nll.numpy(), scores.outlier.numpy().astype(np.float64)], 1)
            )
            if math.isfinite(self._last_step_kl):
                self._cal_kl.append(self._last_step_kl)
        self.policy_state, action = policy_step(self.policy_state, signals, self.monitor)
        state = self.apply(state, action)
        keep = ~scores.outlier if action.drop_outliers else torch.ones_like(scores.outlier)
        batch = Minibatch(x[keep], y[keep]) if not bool(keep.all()) else Minibatch(x, y)
        kwargs = {
            "num_steps": action.num_steps or self.num_steps,
            "data_size": batch.rows if action.streaming else self.data_size,
            "likelihood_weight": action.likelihood_weight,
        }
        return Prepared(state, batch, kwargs, action, signals, scores, x, int(x.shape[0]))

    def apply(self, state: PosteriorState, action: Action) -> PosteriorState:
        """Apply an action's prior, learning rate and resets to ``state``."""
        if action.reset_posterior:
            fresh = init_state(
                state.config,
                seed=self.seed + 7919 * (state.step_count + 1),
                lr=self.base_lr,
                prior=self.base_prior,
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
            prior = self.base_prior
        elif action.prior == "posterior":
            prior = posterior_as_prior(state)
        else:
            loc, scale = forgetting_prior(
                state.params["loc"].detach(),
                state.posterior_scale().detach(),
                self.base_prior.loc,
                self.base_prior.scale,
                action.gamma,
            )
            prior = PriorSpec(loc, scale)
        return state.replace(prior=prior, lr=self.base_lr * action.lr_scale)

    def finish(
        self, prepared: Prepared, state: PosteriorState, info: StepInfo
    ) -> tuple[PosteriorState, dict[str, float]]:
        """Step 3: post-update signals, re-anchoring/calibration, policy state into ``extra``."""
        assert self.reference is not None
        post, ens = post_update_signals(
            self.reference,
            prepared.scores,
            prepared.x_all,
            state,
            self._prev_ens if self._step_kl_needed() else None,
        )
        self._prev_ens = ens
        self._last_step_kl = post["step_kl"]
        if prepared.action.reanchor:
            self.reference = make_reference(state, self.ensemble_size, self.seed)
            self._cal_records, self._cal_kl = [], []
            log.info("reference_reanchored", batch=self.policy_state["batch"] - 1)
        if (
            self.policy_state["calibrating"] == 0
            and self.policy_state["mode"] == "stable"
            and self._cal_records
        ):
            self._fit_thresholds()
        absorbed = prepared.state.records_absorbed + prepared.rows
        state = self._persist(state.replace(records_absorbed=absorbed))
        return state, {**prepared.signals, **post}

    def _step_kl_needed(self) -> bool:
        """Will the next batch read this batch's step KL?

        Only the recovery test (next mode ``shifted``/``recovering``) and the
        calibration window (``stable`` while calibrating) do; elsewhere the
        third ensemble pass is skipped and ``step_kl`` is NaN.
        """
        ps = self.policy_state
        return ps["mode"] != "stable" or ps["calibrating"] > 0

    def process(
        self, state: PosteriorState, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[PosteriorState, StepInfo, dict[str, float], Action]:
        """``prepare`` + ``models.stream.stream_step`` + ``finish`` for one batch."""
        prep = self.prepare(state, x, y)
        new, info = stream_step(
            prep.state, prep.batch, functional_prior=self.functional_prior, **prep.step_kwargs
        )
        new, signals = self.finish(prep, new, info)
        return new, info, signals, prep.action

    # -- calibration ---------------------------------------------------------------
    def _fit_thresholds(self) -> None:
        records = np.concatenate(self._cal_records)
        batch_size = max(1, int(np.median([len(r) for r in self._cal_records])))
        consecutive = int(getattr(self.monitor, "consecutive", 1))
        cal = calibrate_batch_statistic(
            records,
            batch_size,
            self.ert,
            statistic=batch_statistic(self.policy.signal, self.policy.max_outlier_fraction),
            consecutive=consecutive,
            n_streams=self.n_streams,
            seed=self.seed,
        )
        self.calibration = cal
        kl = np.asarray(self._cal_kl) if self._cal_kl else np.asarray([math.inf])
        kl_thr = float(2.0 * np.quantile(kl, 0.9))
        self.policy_state["threshold"] = json_threshold(cal.threshold)
        self.policy_state["kl_threshold"] = json_threshold(kl_thr)
        self.policy_state["calibration"] = cal.to_dict()
        if isinstance(self.monitor, ThresholdMonitor):
            self.monitor = self.monitor.clone({"threshold": cal.threshold})
            self.policy_state["monitor"] = self.monitor.state_dict()
        self._cal_records, self._cal_kl = [], []
        log.info(
            "thresholds_calibrated",
            threshold=cal.threshold,
            ert_target=cal.ert_target,
            ert_estimate=cal.ert_estimate,
            kl_threshold=kl_thr,
            reference_records=cal.reference_size,
        )
