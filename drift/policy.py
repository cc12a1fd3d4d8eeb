"""The adaptation policy: a pure state machine over per-batch signals.

``step(state, signals) -> (state, Action)`` is called once per batch *before*
the SVI step (by the daemon's pipeline and by :mod:`fogline.drift.experiment`
alike, through :class:`fogline.drift.runner.DriftLoop`); ``init(config,
monitor)`` makes the first state.  The state is a frozen :class:`PolicyState`
that holds the monitor, any River-protocol detector; ``step`` updates a copy
of it, never the caller's.  :mod:`fogline.drift.runner` writes the state into
every snapshot.

States and transitions (every transition is logged as ``policy_transition``
and appended to ``state.transitions``)::

    stable --alarm--> shifted --cooldown batches--> recovering
    recovering --step_kl <= kl_threshold for W batches (or max_recovery)--> stable
                 (re-anchor the reference, re-calibrate for calibration_batches)

Alarms are only possible in ``stable`` once calibration is done (hysteresis:
nothing is re-detected while the model is still adapting).  Every policy runs
the same machine, so detections are comparable; they differ in the *action*:

``none``   frozen base prior, data size N, base lr: plain streaming SVI.
``vb``     posterior-as-prior streaming VB (prior = q_{t-1}, data size = batch
           rows), never reacts to alarms.
``reset``  on alarm the posterior restarts from the base prior (fresh q, zeroed
           Adam moments); otherwise as ``none``.
``forget`` on alarm, and through ``shifted``/``recovering``, each batch's prior
           is the stabilised-forgetting mix of the current posterior and the
           base prior (:func:`forgetting_prior`).  In ``shifted`` it is absorbed
           as exact streaming (data size = batch rows); when ``recovering``
           starts Adam's moments are zeroed, and each recovering batch takes
           ``recovery_steps`` (2) SVI steps with data size N, gamma lowered
           geometrically by ``decay`` (an optional ``lr_boost`` is lowered with
           it); on return to ``stable`` the prior, data size, step count and
           learning rate return to normal.  In every state, a batch with gross
           outliers that is *not* a sustained shift (0 < outlier fraction <=
           ``max_outlier_fraction``) has its outlier records dropped and the rest
           absorbed with the bounded likelihood weight
           ``beta = max(min_weight, 1 - outlier_fraction)`` (generalised Bayes:
           p(w | D) ∝ p(w) p(D | w)^beta).

Stabilised forgetting (Kulhavý & Zarrop): with q = N(m_q, s_q^2) and base prior
p0 = N(m_0, s_0^2) per coordinate, the prior ∝ q^(1-γ) p0^γ is Gaussian with
natural parameters mixed linearly,

    precision  λ = (1-γ)/s_q^2 + γ/s_0^2
    mean       m = [(1-γ) m_q/s_q^2 + γ m_0/s_0^2] / λ,

so no coordinate's precision can fall below γ/s_0^2 (its variance never blows
up past s_0^2/γ), and γ = 0 is exact Bayesian streaming (prior = posterior).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
import torch

from fogline.drift.config import PolicyConfig
from fogline.drift.monitors import ThresholdMonitor, make_monitor
from fogline.models.state import frozen_replace

Mode = Literal["stable", "shifted", "recovering"]

log = structlog.get_logger()


def make_monitor_for(config: PolicyConfig) -> Any:
    """The configured detector (fresh): a threshold monitor (fitted to ``config.ert``
    after each calibration window) with ``config.consecutive``, or River's."""
    if config.detector == "threshold":
        return ThresholdMonitor(consecutive=config.consecutive)
    return make_monitor(config.detector)


@dataclass(frozen=True)
class Action:
    """What the caller must do to the posterior before (and after) this batch's step.

    ``prior``: ``base`` (the base prior p0), ``posterior`` (q_{t-1}, streaming VB)
    or ``forget`` (:func:`forgetting_prior` with ``gamma``); ``streaming``: use
    data size = the batch's rows instead of the configured N; ``lr_scale``
    multiplies the base learning rate; ``drop_outliers``: remove records whose
    anomaly score marks them gross outliers; ``reset_posterior`` /
    ``reset_optimizer``: restart q from the base prior / zero Adam's moments;
    ``reanchor``: after the step, anchor the reference at the new posterior and
    collect ``calibration_batches`` batches to refit the thresholds.
    """

    mode: str
    prior: Literal["base", "posterior", "forget"] = "base"
    gamma: float = 0.0
    streaming: bool = False
    lr_scale: float = 1.0
    num_steps: int | None = None
    likelihood_weight: float = 1.0
    drop_outliers: bool = False
    reset_posterior: bool = False
    reset_optimizer: bool = False
    reanchor: bool = False
    alarm: bool = False
    calibrating: bool = False
    transition: tuple[str, str] | None = None


def threshold_value(value: float | None) -> float:
    """A stored threshold as a float: ``None`` (not fitted yet) reads as +inf.

    Policy states are strict JSON (they ride in snapshots), which has no
    infinity, so an unfitted or unbounded threshold is stored as ``None``.
    """
    return math.inf if value is None else float(value)


def json_threshold(value: float) -> float | None:
    """The stored form of a threshold: ``None`` for a non-finite value."""
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class Transition:
    """One mode change: at ``batch``, ``from_mode`` -> ``to_mode`` because of ``reason``."""

    batch: int
    from_mode: Mode
    to_mode: Mode
    reason: str


#: Transitions kept in the state (the newest ones).
MAX_TRANSITIONS = 50


@dataclass(frozen=True)
class PolicyState:
    """Everything the policy carries from batch to batch (immutable; :func:`step` returns a new one).

    ``monitor`` is the River-protocol detector itself: :func:`step` updates a
    copy, so a state (and the detector a caller handed in) never changes behind
    anyone's back.  ``threshold`` / ``kl_threshold`` are +inf until fitted;
    ``calibrating`` counts the no-drift batches still to collect.
    ``calibration`` is the last fit's summary
    (:meth:`fogline.drift.calibration.Calibration.to_dict`).
    """

    config: PolicyConfig
    monitor: Any
    mode: Mode = "stable"
    batch: int = 0
    mode_since: int = 0
    quiet: int = 0
    calibrating: int = 0
    threshold: float = math.inf
    kl_threshold: float = math.inf
    alarms: int = 0
    last_alarm: int | None = None
    transitions: tuple[Transition, ...] = ()
    calibration: dict[str, Any] | None = None

    def replace(self, **changes: Any) -> PolicyState:
        """A copy with ``changes`` (``dataclasses.replace``, :func:`~fogline.models.state.frozen_replace`)."""
        return frozen_replace(self, **changes)  # type: ignore[no-any-return]


def init(config: PolicyConfig, monitor: Any = None, threshold: float = math.inf) -> PolicyState:
    """A fresh policy state, calibrating from the first batch.

    ``monitor``: any River-protocol detector (default: the configured one,
    :func:`make_monitor_for`).
    """
    return PolicyState(
        config=config,
        monitor=monitor if monitor is not None else make_monitor_for(config),
        calibrating=config.calibration_batches,
        threshold=threshold,
    )


def _transition(ps: PolicyState, new: Mode, reason: str) -> PolicyState:
    tr = Transition(ps.batch, ps.mode, new, reason)
    log.info(
        "policy_transition",
        policy=ps.config.name,
        batch=ps.batch,
        from_mode=ps.mode,
        to_mode=new,
        reason=reason,
    )
    return ps.replace(
        transitions=(*ps.transitions[-(MAX_TRANSITIONS - 1) :], tr),
        mode=new,
        mode_since=ps.batch,
        quiet=0,
    )


def step(state: PolicyState, signals: Mapping[str, float]) -> tuple[PolicyState, Action]:
    """Advance the policy by one batch: ``(state, signals) -> (state, action)``.

    Parameters
    ----------
    state:
        The :class:`PolicyState` (:func:`init`); not mutated, nor is its monitor.
    signals:
        This batch's pre-update signals (``surprisal_inlier``,
        ``outlier_fraction``, ...) plus the previous batch's ``step_kl``.
        A copy of ``state.monitor`` is updated with ``signals[config.signal]``
        in ``stable`` once calibrated, and goes into the returned state.

    Returns
    -------
    The new policy state and the :class:`Action` for this batch.
    """
    ps = state
    cfg = ps.config
    b = ps.batch
    alarm = False
    transition: tuple[str, str] | None = None
    calibrating = ps.calibrating > 0
    if ps.mode == "stable" and not calibrating:
        monitor = copy.deepcopy(ps.monitor)
        monitor.update(float(signals[cfg.signal]))
        alarm = bool(monitor.drift_detected)
        ps = ps.replace(monitor=monitor)
        if alarm:
            ps = ps.replace(alarms=ps.alarms + 1, last_alarm=b)
            log.info(
                "drift_detected",
                policy=cfg.name,
                batch=b,
                signal=cfg.signal,
                value=float(signals[cfg.signal]),
                threshold=json_threshold(ps.threshold),
            )
            ps = _transition(ps, "shifted", "alarm")
            transition = ("stable", "shifted")
    elif ps.mode == "shifted" and b - ps.mode_since >= cfg.cooldown:
        ps = _transition(ps, "recovering", "cooldown_over")
        transition = ("shifted", "recovering")
    reanchor = False
    if ps.mode == "recovering":
        step_kl = float(signals.get("step_kl", math.nan))
        ps = ps.replace(quiet=ps.quiet + 1 if step_kl <= ps.kl_threshold else 0)
        settled = ps.quiet >= cfg.recovery_window and b - ps.mode_since >= cfg.min_recovery
        if settled or b - ps.mode_since >= cfg.max_recovery:
            ps = _transition(ps, "stable", "kl_settled" if settled else "max_recovery")
            ps = ps.replace(calibrating=cfg.calibration_batches)
            transition = ("recovering", "stable")
            reanchor = True
    elif calibrating:
        ps = ps.replace(calibrating=ps.calibrating - 1)

    frac = float(signals.get("outlier_fraction", 0.0))
    outlier_batch = 0.0 < frac <= cfg.max_outlier_fraction
    mode = ps.mode
    since = b - ps.mode_since
    common: dict[str, Any] = {
        "mode": mode,
        "alarm": alarm,
        "transition": transition,
        "calibrating": ps.calibrating > 0,
    }
    action = Action(reanchor=reanchor, **common)
    if cfg.name == "vb":
        action = Action(prior="posterior", streaming=True, reanchor=reanchor, **common)
    elif cfg.name == "reset" and alarm:
        action = Action(reset_posterior=True, reset_optimizer=True, **common)
    elif cfg.name == "forget":
        weight = max(cfg.min_weight, 1.0 - frac) if outlier_batch else 1.0
        common.update(reanchor=reanchor, drop_outliers=outlier_batch, likelihood_weight=weight)
        if mode == "shifted":
            action = Action(
                prior="forget",
                gamma=cfg.gamma,
                streaming=True,
                lr_scale=cfg.lr_boost,
                num_steps=cfg.shift_steps,
                reset_optimizer=alarm and cfg.reset_adam == "alarm",
                **common,
            )
        elif mode == "recovering":
            k = cfg.decay ** (since + 1)
            action = Action(
                prior="forget",
                gamma=cfg.gamma * k,
                streaming=cfg.recovery_streaming,
                lr_scale=1.0 + (cfg.lr_boost - 1.0) * k,
                num_steps=cfg.recovery_steps,
                reset_optimizer=since == 0 and cfg.reset_adam == "recovering",
                **common,
            )
        else:
            action = Action(reset_optimizer=reanchor, **common)
    return ps.replace(batch=b + 1), action


def forgetting_prior(
    loc_q: torch.Tensor,
    scale_q: torch.Tensor,
    loc_0: torch.Tensor,
    scale_0: torch.Tensor,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stabilised forgetting of a mean-field Gaussian: q^(1-γ) · p0^γ, normalised.

    Returns ``(loc, scale)`` [P] of the Gaussian with precision
    ``(1-γ)/s_q² + γ/s_0²`` and the precision-weighted mean (module docstring).
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError("gamma must lie in [0, 1]")
    prec_q = scale_q.pow(-2)
    prec_0 = scale_0.pow(-2)
    prec = (1.0 - gamma) * prec_q + gamma * prec_0
    loc = ((1.0 - gamma) * prec_q * loc_q + gamma * prec_0 * loc_0) / prec
    return loc, prec.rsqrt()


def forget_natural(
    precision_q: torch.Tensor,
    shift_q: torch.Tensor,
    precision_0: torch.Tensor,
    shift_0: torch.Tensor,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same operator on full natural parameters (precision Λ [P, P], shift η = Λ m [P]).

    ``Λ = (1-γ) Λ_q + γ Λ_0``, ``η = (1-γ) η_q + γ η_0``: used by the conjugate
    check, where the posterior is a full-covariance Gaussian.
    """
    return (1.0 - gamma) * precision_q + gamma * precision_0, (
        1.0 - gamma
    ) * shift_q + gamma * shift_0


@dataclass
class PolicyLog:
    """Per-batch record of modes, alarms and actions (for plots and metrics)."""

    modes: list[str] = field(default_factory=list)
    alarms: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
