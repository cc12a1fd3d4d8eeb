"""The daemon's update rule: how one micro-batch is absorbed into the posterior.

``UpdateRule`` is ``(state, x [N, D], y [N]) -> (state, info, signals)``.  Two
rules exist, chosen by ``drift.policy``:

``off``
    :class:`PlainUpdate`: ``K = stream.steps_per_batch`` steps of
    :func:`fogline.models.stream.stream_step` (:func:`fogline.models.svi.step`, plus the warm
    start's functional prior when the state carries one and
    ``stream.functional_prior`` is on) with ``data_size = stream.data_size``;
    no drift signals, no monitor (the cheapest path).
``none`` / ``reset`` / ``forget`` / ``vb``
    :class:`DriftUpdate`: :class:`fogline.drift.runner.DriftLoop` around the same step
    (signals under the reference posterior, calibrated alarm, the policy's
    action, post-update KLs).  ``none`` runs plain streaming SVI with the base
    prior but still measures, alarms and exports the drift metrics; the
    other policies also act (see ``docs/drift.md``).

Everything the drift loop needs to continue after a restart, the monitor's
running state included, rides in the returned state
(:func:`fogline.drift.runner.store_drift`), so a daemon restarted from a
snapshot reaches the same posterior bit for bit (:meth:`DriftLoop.resume`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import structlog
import torch

from fogline.daemon import metrics
from fogline.daemon.config import Settings
from fogline.drift.policy import make_monitor_for
from fogline.drift.runner import DriftLoop, has_drift
from fogline.models.state import Minibatch, PosteriorState, StepInfo
from fogline.models.stream import stream_step
from fogline.models.svi import init_state, step

log = structlog.get_logger(__name__)

#: The policy modes exported as ``fogline_policy_state{state=...}``.
MODES = ("stable", "shifted", "recovering")


class UpdateRule(Protocol):
    """Absorb one batch: ``(state, x [N, D], y [N]) -> (state, info, signals)``."""

    name: str

    def __call__(
        self, state: PosteriorState, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[PosteriorState, StepInfo, dict[str, float]]: ...


@dataclass
class PlainUpdate:
    """``K`` SVI steps per batch, nothing else (``drift.policy = "off"``)."""

    num_steps: int = 1
    data_size: int | None = None
    functional_prior: bool = True
    name: str = "off"

    def __call__(
        self, state: PosteriorState, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[PosteriorState, StepInfo, dict[str, float]]:
        new, info = stream_step(
            state,
            Minibatch(x, y),
            num_steps=self.num_steps,
            data_size=self.data_size,
            functional_prior=self.functional_prior,
        )
        return new, info, {}


@dataclass
class DriftUpdate:
    """The drift loop's ``process`` plus the daemon's drift metrics."""

    loop: DriftLoop
    name: str

    def __call__(
        self, state: PosteriorState, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[PosteriorState, StepInfo, dict[str, float]]:
        new, info, signals, action = self.loop.process(state, x, y)
        ps = self.loop.policy_state
        signal = self.loop.policy.signal
        metrics.PREDICTIVE_KL.set(signals["predictive_kl"])
        metrics.STEP_KL.set(signals["step_kl"])
        metrics.PREDICTIVE_KL_THRESHOLD.set(_gauge_threshold(ps.kl_threshold))
        metrics.SURPRISAL.set(signals[signal])
        metrics.SURPRISAL_THRESHOLD.set(_gauge_threshold(ps.threshold))
        metrics.LIKELIHOOD_WEIGHT.set(action.likelihood_weight)
        metrics.DRIFT_CALIBRATING.set(1 if action.calibrating else 0)
        for mode in MODES:
            metrics.POLICY_STATE.labels(state=mode).set(1 if mode == action.mode else 0)
        if action.alarm:
            metrics.DRIFT_ALARMS.inc()
        dropped = int(x.shape[0]) - info.rows
        if dropped > 0 and not info.rejected:
            metrics.OUTLIERS_DROPPED.inc(dropped)
        out = {
            "surprisal": signals["surprisal"],
            "alarm_signal": signals[signal],
            "predictive_kl": signals["predictive_kl"],
            "step_kl": signals["step_kl"],
            "weight_kl": signals["weight_kl"],
            "outlier_fraction": signals.get("outlier_fraction", 0.0),
            "likelihood_weight": action.likelihood_weight,
        }
        return new, info, out


def _gauge_threshold(value: float) -> float:
    """A threshold for a gauge: NaN while it is not fitted (+inf)."""
    return value if math.isfinite(value) else math.nan


def make_update_rule(settings: Settings, state: PosteriorState) -> UpdateRule:
    """The update rule for ``settings.drift.policy``, resumed from ``state`` where it carries one."""
    s = settings.stream
    if settings.drift.policy == "off":
        return PlainUpdate(
            num_steps=s.steps_per_batch,
            data_size=s.data_size,
            functional_prior=s.functional_prior,
        )
    loop = DriftLoop.resume(
        state,
        base_lr=s.lr,
        data_size=s.data_size,
        policy=settings.drift,
        monitor=make_monitor_for(settings.drift),
        num_steps=s.steps_per_batch,
        seed=s.seed,
        functional_prior=s.functional_prior,
        batch_size=s.batch_size,
    )
    ps = loop.policy_state
    log.info(
        "drift_loop_ready",
        policy=settings.drift.policy,
        detector=settings.drift.detector,
        signal=settings.drift.signal,
        mode=ps.mode,
        batch=ps.batch,
        calibrating=ps.calibrating,
        threshold=ps.threshold if math.isfinite(ps.threshold) else None,
        calibration=(ps.calibration or {}).get("source", "stream"),
        resumed=has_drift(state),
    )
    return DriftUpdate(loop=loop, name=settings.drift.policy)


def warm_up(state: PosteriorState, rows: int, num_steps: int, data_size: int | None) -> None:
    """Run the SVI step twice on a throwaway state and an all-zero batch of ``rows`` rows.

    This moves the one-off ``torch.jit.trace`` of the ELBO (about 25 slow
    steps' worth) out of the first real batch.  The real state, its RNG and
    the global RNG are untouched.
    """
    dummy = init_state(state.config, seed=0, lr=state.lr, device=state.device)
    x = torch.zeros(rows, state.config.in_features)
    y = torch.zeros(rows)
    for _ in range(2):
        dummy, _ = step(dummy, Minibatch(x, y), num_steps=num_steps, data_size=data_size)
