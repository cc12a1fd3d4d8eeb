"""The drift loop's settings: one :class:`PolicyConfig` (pydantic, no torch or River import).

It is the daemon's ``drift`` settings section as it is (``fogline.daemon.config``
imports it, so reading the configuration stays light), the settings an
:class:`fogline.drift.experiment.ExperimentConfig` runs with, and what the
policy state stores in every snapshot.  The policy itself is
:mod:`fogline.drift.policy`.
"""

from __future__ import annotations

from typing import Literal, cast

from pydantic import BaseModel, ConfigDict, Field

PolicyName = Literal["none", "reset", "forget", "vb"]
POLICIES: tuple[str, ...] = ("none", "reset", "forget", "vb")


class PolicyConfig(BaseModel):
    """Settings of the drift loop: signal, detector, calibration and the policy's action.

    One definition for every user: it *is* the daemon's ``drift`` settings
    section (``fogline.daemon.config.DriftSettings``; ``FOGLINE_DRIFT__GAMMA``
    etc.), :class:`fogline.drift.experiment.ExperimentConfig` carries one, and
    the policy state stores it in every snapshot.  Frozen and validated: a bad
    value fails at construction (in the daemon: at start-up, naming
    ``drift.<field>``).

    Parameters
    ----------
    policy:
        ``none``, ``reset``, ``forget`` or ``vb`` (see the module docstring);
        ``off`` (daemon only) runs plain SVI without a drift loop.
    ert:
        Target expected run time between false alarms, in batches; the
        threshold detector is calibrated to it.
    signal:
        Which batch statistic feeds the monitor (both are calibrated to ``ert``).
    detector:
        ``threshold`` (calibrated), or River's ``adwin``, ``page_hinkley``, ``kswin``.
    consecutive:
        Exceedances in a row that raise an alarm (threshold detector).
    ensemble_size:
        Posterior samples of the reference predictive (and of every ensemble).
    n_streams:
        Bootstrap streams used to fit the threshold.
    predictive_kl_rows:
        While ``stable`` and calibrated, the predictive KL (a metric only) is
        estimated on the first this-many rows of the batch (0: all rows).
        Wherever the policy reads the step KL, all rows are used.
    gamma:
        Forgetting weight on the base prior on entering ``shifted``.
    lr_boost:
        Learning-rate multiplier on entering ``shifted``; lowered geometrically
        by ``decay`` per batch in ``recovering``, back to 1 in ``stable``.
    shift_steps:
        SVI steps per batch while ``shifted`` (the daemon's own count otherwise).
    recovery_steps:
        SVI steps per batch while ``recovering`` (``forget`` only).
    recovery_streaming:
        ``forget`` only: absorb the forgetting prior with data size = the
        batch's rows while ``recovering`` too (as in ``shifted``).  Default
        False: the configured data size N, so the prior term weighs 1/N per
        record and does not hold back the extra recovery steps.
    reset_adam:
        When ``forget`` zeroes Adam's moments: on the alarm, when recovery
        starts, or never.
    cooldown:
        Batches spent in ``shifted`` before ``recovering``.
    recovery_window:
        W: consecutive batches with ``step_kl <= kl_threshold`` that end recovery
        (once at least ``min_recovery`` batches were spent recovering).
    max_recovery:
        Recovery ends after this many batches in any case.
    calibration:
        Where the first alarm threshold comes from.  ``history`` (default): the
        warm start's holdout stored in the state (:mod:`fogline.drift.history`),
        so the loop can alarm from its first batch; a state without one falls
        back to ``stream`` (logged as ``drift_calibration``).  ``stream``: the
        first ``calibration_batches`` stream batches, assumed free of drift.
        After a recovery the thresholds are always re-fitted on the stream.
    calibration_batches:
        Batches of no-drift data collected after (re-)anchoring to fit the thresholds
        (with ``history`` calibration: the batches whose step KL fits the recovery
        threshold at the start, while alarms are already live).
    calibration_block:
        Block length, in batches, of the record block bootstrap that fits the
        threshold (:func:`fogline.drift.calibration.calibrate_batch_statistic`):
        simulated batches are runs of consecutive records, so autocorrelated
        telemetry is not calibrated as if its records were independent.
        0: records drawn independently.  With ``calibration_block_auto`` this is
        the *least* block length.
    calibration_block_auto:
        Lengthen the block to what the window's own batch signal needs: twice
        its dependence horizon (:func:`fogline.drift.calibration.dependence_horizon`,
        the lag after which its autocorrelation stays insignificant), at most
        half the window.  A daily cycle seen through batches then gets blocks of
        about a period, so the simulated streams keep the cycle's runs of high
        values instead of scattering them.
    calibration_cycles:
        With ``calibration_block_auto``: when the window's surprisal shows a
        cycle of d records, keep collecting until the window holds this many
        cycles (at most ``calibration_max_batches`` batches) before fitting.  A
        threshold for a cyclic signal is set by the cycle's peaks, and a window
        that saw two peaks knows them too poorly (0: fit when the window is full).
    calibration_max_batches:
        The longest a calibration window is extended to (batches).
    recalibration_screen:
        r: keep contaminated batches out of a *re*-calibration window (one
        collected while an alarm threshold is in force: after a recovery, or
        while a window is extended); 0 (default) keeps every batch.  A batch is
        kept out when it lies in a run of at least r batches in a row whose
        signal, under the re-anchored reference, exceeds the threshold in force
        (the one fitted before the alarm)
        (:func:`fogline.drift.calibration.contaminated_batches`); r =
        ``consecutive`` keeps out what that monitor would have alarmed on.  The
        window is extended by the batches kept out (up to
        ``calibration_max_batches``); when they would be the majority of the
        window the screen is not applied (the new regime's level, not a
        contamination, lies above the old threshold).  A window without such a
        run fits exactly as without the screen.  On a drift-free window of n
        batches a run of r exceedances occurs with probability about
        n / ERT^(r / consecutive), so a longer r screens clean windows less
        often (docs/drift.md, "Contamination-screened re-calibration").
    max_outlier_fraction, min_weight:
        Outlier down-weighting (see the module docstring).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: Literal["off", "none", "reset", "forget", "vb"] = "forget"
    ert: float = Field(default=1000.0, gt=1)
    signal: Literal["surprisal_inlier", "surprisal"] = "surprisal_inlier"
    detector: Literal["threshold", "adwin", "page_hinkley", "kswin"] = "threshold"
    consecutive: int = Field(default=2, ge=1)
    ensemble_size: int = Field(default=64, ge=2)
    n_streams: int = Field(default=500, ge=10)
    predictive_kl_rows: int = Field(default=64, ge=0)
    gamma: float = Field(default=0.1, ge=0, le=1)
    lr_boost: float = Field(default=1.0, gt=0)
    decay: float = Field(default=0.9, gt=0, le=1)
    shift_steps: int = Field(default=1, ge=1)
    recovery_steps: int = Field(default=2, ge=1)
    recovery_streaming: bool = False
    reset_adam: Literal["alarm", "recovering", "never"] = "recovering"
    cooldown: int = Field(default=5, ge=0)
    recovery_window: int = Field(default=5, ge=1)
    min_recovery: int = Field(default=15, ge=0)
    max_recovery: int = Field(default=60, ge=1)
    calibration: Literal["history", "stream"] = "history"
    calibration_batches: int = Field(default=40, ge=0)
    calibration_block: int = Field(default=2, ge=0)
    calibration_block_auto: bool = True
    calibration_cycles: int = Field(default=4, ge=0)
    calibration_max_batches: int = Field(default=200, ge=1)
    recalibration_screen: int = Field(default=0, ge=0)
    max_outlier_fraction: float = Field(default=0.4, gt=0, le=1)
    min_weight: float = Field(default=0.2, gt=0, le=1)

    @property
    def name(self) -> PolicyName:
        """The policy of a drift loop (``off`` has none: :class:`ValueError`)."""
        if self.policy == "off":
            raise ValueError("drift.policy = off runs no drift loop")
        return cast(PolicyName, self.policy)

    def with_policy(self, policy: str) -> PolicyConfig:
        """The same settings for another policy (validated)."""
        return type(self).model_validate({**self.model_dump(), "policy": policy})


__all__ = ["POLICIES", "PolicyConfig", "PolicyName"]
