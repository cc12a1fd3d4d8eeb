"""Alarm calibration from history: the warm start's holdout as the no-drift reference window.

With ``drift.calibration = "stream"`` the alarm threshold is fitted on the first
``calibration_batches`` stream batches, assumed free of drift.  A stream that
already differs from the history when it starts is then absorbed into the
threshold and never flagged, and nothing can alarm before that window is full
(record 10,240 at the defaults).  ``history`` calibration (the default) fits
the threshold before the stream starts, on the warm start's holdout.

The maths
---------
Let q_ref be the warm-start posterior (the loop's reference when it is
anchored) and H = {(x_i, y_i)}, i = 1..R, the warm start's holdout in model
units (rows the fit never saw).  For every record the loop computes, against
the reference ensemble w_1..w_S ~ q_ref (``drift.ensemble_size`` draws, seed
``stream.seed``),

    u_i = -log (1/S) sum_s p(y_i | f_{w_s}(x_i))        (surprisal)
    o_i = 1[a_i > 0.9999],  a_i = 1 - 2 min(F(y_i), 1 - F(y_i))   (gross outlier)

(:func:`fogline.drift.signals.record_scores`), and the batch signal
``surprisal_inlier`` is the mean of u over the batch's non-outlier records.  The
reference is fixed, so under no drift a stream record and a holdout record are
exchangeable draws of (u, o): the signal of a stream batch of B records has the
law of the same statistic over B records drawn from H.
:func:`fogline.drift.calibration.calibrate_batch_statistic` draws such batches
with replacement from the R pairs (u_i, o_i), and for ``consecutive = k`` and
a target ERT sets the threshold h to the (1 - 1/ERT)^(L-k+1) quantile of
max_t min(s_{t-k+1..t}) over simulated streams of length L.  The loop then
alarms from its first batch (the k-th, with k consecutive exceedances).

What is stored, and when it is fitted
-------------------------------------
:func:`calibrate_from_history` stores the holdout itself, ``aux["drift_history.x"]``
[R, D] and ``aux["drift_history.y"]`` [R] (float32, model units, at most
``max_records`` rows, a seeded subsample beyond), and ``extra["drift_history"]``
(rows, features, source and the warm start's own fit, for the report).  The
holdout rather than the pairs (u_i, o_i): the daemon recomputes them against its
own reference ensemble (``drift.ensemble_size``, ``stream.seed``) and refits h for
its own ``stream.batch_size``, ``drift.ert``, ``drift.consecutive`` and signal at
start-up (:func:`history_drift`, called by
:meth:`fogline.drift.runner.DriftLoop.resume` when the state carries no drift
loop).  The fit is a seeded bootstrap of fixed records, so every start-up with
the same settings gets the same threshold bit for bit (about 2 s at 256-record
batches, 500 streams).  The history stays in the state (and in snapshots, about
R x (D + 1) x 4 bytes) but is only read when a new loop is anchored.

The recovery threshold (twice the 90 % quantile of the step KL) needs SVI steps
on stream batches, so a history-calibrated loop still collects the step KL over
its first ``calibration_batches`` batches, with alarms already live
(``DriftState.kl_window``); an alarm before that ends the window unfitted (the
first recovery then ends after ``min_recovery`` batches) and the re-anchored
loop calibrates both thresholds on the stream, as after every recovery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
import torch

from fogline.drift.calibration import Calibration
from fogline.drift.config import PolicyConfig
from fogline.drift.monitors import ThresholdMonitor
from fogline.drift.runner import DriftState, fit_alarm
from fogline.drift.signals import Reference, make_reference, record_scores
from fogline.models.state import PosteriorState

log = structlog.get_logger()

#: ``extra`` key of the history reference's JSON part.
EXTRA_KEY = "drift_history"
_AUX_X = "drift_history.x"
_AUX_Y = "drift_history.y"
#: Default cap on the stored holdout rows (a seeded subsample beyond): 50 stream
#: batches of 256, more than the default on-stream window (40 x 256).
MAX_RECORDS = 12_800
#: Below this many records a fit is reported as imprecise (``history_reference_small``).
MIN_RECORDS = 2_000


@dataclass(frozen=True)
class HistoryReference:
    """The stored holdout: ``x`` [R, D], ``y`` [R] (float32, model units) and its JSON ``info``."""

    x: torch.Tensor
    y: torch.Tensor
    info: dict[str, Any]

    @property
    def rows(self) -> int:
        """R, the number of stored records."""
        return int(self.y.shape[0])


def _check_holdout(
    state: PosteriorState, x_held: torch.Tensor, y_held: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [R, D], y [R])`` as float32 CPU tensors, or :class:`ValueError` naming the field/row."""
    x = torch.as_tensor(x_held).detach()
    y = torch.as_tensor(y_held).detach()
    d = state.config.in_features
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"x_held: shape {tuple(x.shape)}, the model needs [rows, {d}]")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y_held: shape {tuple(y.shape)}, expected [{x.shape[0]}] (one per x row)")
    if x.shape[0] == 0:
        raise ValueError("x_held: no rows")
    x, y = x.to("cpu", torch.float32), y.to("cpu", torch.float32)
    for name, bad in (("x_held", ~torch.isfinite(x).all(1)), ("y_held", ~torch.isfinite(y))):
        if bool(bad.any()):
            raise ValueError(f"{name}: row {int(bad.nonzero()[0, 0])} is not finite")
    return x, y


def attach_history(
    state: PosteriorState,
    x_held: torch.Tensor,
    y_held: torch.Tensor,
    *,
    source: str = "holdout",
    max_records: int = MAX_RECORDS,
    seed: int = 0,
) -> PosteriorState:
    """``state`` carrying the holdout (model units) as its history reference.

    More than ``max_records`` rows are subsampled without replacement (seeded
    with ``seed``); the rows keep their order.
    """
    x, y = _check_holdout(state, x_held, y_held)
    total = int(x.shape[0])
    if max_records < 1:
        raise ValueError(f"max_records: {max_records}, need at least 1")
    if total > max_records:
        gen = torch.Generator().manual_seed(seed)
        keep = torch.randperm(total, generator=gen)[:max_records].sort().values
        x, y = x[keep].contiguous(), y[keep].contiguous()
    info: dict[str, Any] = {
        "rows": int(x.shape[0]),
        "rows_offered": total,
        "features": int(x.shape[1]),
        "source": source,
    }
    return state.replace(
        extra={**state.extra, EXTRA_KEY: info},
        aux={**state.aux, _AUX_X: x, _AUX_Y: y},
    )


def history_reference(state: PosteriorState) -> HistoryReference | None:
    """The history reference ``state`` carries, or ``None``."""
    info = state.extra.get(EXTRA_KEY)
    if not info or _AUX_X not in state.aux or _AUX_Y not in state.aux:
        return None
    return HistoryReference(state.aux[_AUX_X], state.aux[_AUX_Y], dict(info))


def has_history(state: PosteriorState) -> bool:
    """Does ``state`` carry a history reference?"""
    return history_reference(state) is not None


def without_history(state: PosteriorState) -> PosteriorState:
    """``state`` without its history reference (a new loop then calibrates on the stream)."""
    if EXTRA_KEY not in state.extra and _AUX_X not in state.aux and _AUX_Y not in state.aux:
        return state
    extra = {k: v for k, v in state.extra.items() if k != EXTRA_KEY}
    aux = {k: v for k, v in state.aux.items() if k not in (_AUX_X, _AUX_Y)}
    return state.replace(extra=extra, aux=aux)


def history_records(reference: Reference, history: HistoryReference) -> np.ndarray:
    """``[R, 2]`` float64 (u_i, o_i): each holdout record's surprisal and outlier flag under
    ``reference``, the pairs the stream calibration collects per batch."""
    device = reference.state.device
    scores = record_scores(reference, history.x.to(device), history.y.to(device))
    return np.stack(
        [scores.nll.cpu().numpy(), scores.outlier.cpu().numpy().astype(np.float64)], 1
    ).astype(np.float64)


def _consecutive(monitor: Any) -> int:
    return int(getattr(monitor, "consecutive", 1))


def history_calibration(
    state: PosteriorState,
    config: PolicyConfig,
    *,
    batch_size: int,
    reference: Reference | None = None,
    ert: float | None = None,
    consecutive: int | None = None,
    n_streams: int | None = None,
    seed: int = 0,
) -> Calibration:
    """The alarm threshold fitted on ``state``'s history reference (module docstring).

    ``reference``: the loop's reference (default: anchored at ``state`` with
    ``config.ensemble_size`` draws and ``seed``); ``ert``, ``consecutive``,
    ``n_streams``: default ``config``'s.  :class:`ValueError` when ``state``
    carries no history or fewer records than one batch.
    """
    history = history_reference(state)
    if history is None:
        raise ValueError("state: carries no history reference (calibrate_from_history)")
    if batch_size < 1:
        raise ValueError(f"batch_size: {batch_size}, need at least 1")
    if history.rows < batch_size:
        raise ValueError(
            f"drift_history: {history.rows} records, fewer than one batch of {batch_size}"
        )
    ref = reference if reference is not None else make_reference(state, config.ensemble_size, seed)
    return fit_alarm(
        history_records(ref, history),
        batch_size,
        config,
        ert=ert if ert is not None else config.ert,
        consecutive=consecutive if consecutive is not None else config.consecutive,
        n_streams=n_streams if n_streams is not None else config.n_streams,
        seed=seed,
    )


def calibrate_from_history(
    state: PosteriorState,
    x_held: torch.Tensor,
    y_held: torch.Tensor,
    config: PolicyConfig,
    *,
    batch_size: int,
    seed: int = 0,
    source: str = "holdout",
    max_records: int = MAX_RECORDS,
) -> PosteriorState:
    """The warm start's step: store the holdout as the alarm's reference window and fit it.

    Parameters
    ----------
    state:
        The warm-start posterior (the future loop's reference q_ref).
    x_held, y_held:
        The holdout, ``[R, D]`` and ``[R]``, in **model units** (after the
        schema's transforms), rows the fit did not train on.
    config:
        The drift settings the daemon will run with (``ert``, ``consecutive``,
        ``signal``, ``ensemble_size``, ``n_streams``).
    batch_size:
        Records per stream batch (``stream.batch_size``); a daemon with another
        one refits at start-up from the stored holdout.
    seed:
        The daemon's ``stream.seed`` (reference ensemble and bootstrap).

    Returns
    -------
    ``state`` with ``aux["drift_history.x|y"]`` and ``extra["drift_history"]``,
    whose ``calibration`` is this fit (:meth:`Calibration.to_dict` plus the
    ``batch_size``, ``ensemble_size`` and ``seed`` it was made for).
    """
    out = attach_history(state, x_held, y_held, source=source, max_records=max_records, seed=seed)
    cal = history_calibration(out, config, batch_size=batch_size, seed=seed)
    info = dict(out.extra[EXTRA_KEY])
    info["calibration"] = {
        **cal.to_dict(),
        "batch_size": batch_size,
        "ensemble_size": config.ensemble_size,
        "signal": config.signal,
    }
    log.info(
        "history_calibrated",
        records=info["rows"],
        batch_size=batch_size,
        threshold=cal.threshold,
        ert_target=cal.ert_target,
        ert_estimate=cal.ert_estimate if math.isfinite(cal.ert_estimate) else None,
    )
    if info["rows"] < MIN_RECORDS:
        log.warning("history_reference_small", records=info["rows"], recommended=MIN_RECORDS)
    return out.replace(extra={**out.extra, EXTRA_KEY: info})


def _unusable(
    config: PolicyConfig,
    state: PosteriorState,
    history: HistoryReference | None,
    batch_size: int | None,
) -> str | None:
    """Why a new loop cannot calibrate from ``history`` (``None``: it can)."""
    if config.calibration == "stream":
        return "drift.calibration = stream"
    if history is None:
        return "the state carries no history reference"
    if history.x.shape[1] != state.config.in_features:
        return f"history has {history.x.shape[1]} features, the model {state.config.in_features}"
    if batch_size is None:
        return "no batch size given and none stored"
    if history.rows < batch_size:
        return f"history has {history.rows} records, fewer than one batch of {batch_size}"
    return None


def history_drift(
    drift: DriftState,
    state: PosteriorState,
    config: PolicyConfig,
    *,
    batch_size: int | None,
    ert: float,
    n_streams: int,
    seed: int,
) -> DriftState:
    """A new loop's drift state, calibrated from ``state``'s history where it can be.

    ``drift`` is the fresh (stream-calibrating) state anchored at ``state``.  With
    ``config.calibration == "history"`` and a usable history reference, the
    threshold is fitted on it for ``batch_size`` (default: the warm start's) with
    ``drift``'s reference ensemble and monitor, the policy starts calibrated
    (``calibrating = 0``) and the step-KL window opens (``kl_window``).
    Otherwise ``drift`` is returned as it is.  Either way one ``drift_calibration``
    event says which source the loop uses and why.
    """
    history = history_reference(state)
    if batch_size is None and history is not None:
        batch_size = history.info.get("calibration", {}).get("batch_size")
    reason = _unusable(config, state, history, batch_size)
    if reason is not None or history is None or batch_size is None:
        quiet = config.calibration == "stream" or history is None
        (log.info if quiet else log.warning)(
            "drift_calibration",
            source="stream",
            reason=reason,
            batches=config.calibration_batches,
        )
        return drift
    monitor = drift.policy.monitor
    cal = history_calibration(
        state,
        config,
        batch_size=int(batch_size),
        reference=drift.reference,
        ert=ert,
        consecutive=_consecutive(monitor),
        n_streams=n_streams,
        seed=seed,
    )
    if isinstance(monitor, ThresholdMonitor):
        monitor = monitor.clone({"threshold": cal.threshold})
    summary = {**cal.to_dict(), "source": "history", "batch_size": int(batch_size)}
    log.info(
        "drift_calibration",
        source="history",
        records=history.rows,
        batch_size=int(batch_size),
        threshold=cal.threshold,
        ert_target=cal.ert_target,
        kl_window=config.calibration_batches,
    )
    ps = drift.policy.replace(
        calibrating=0, threshold=cal.threshold, calibration=summary, monitor=monitor
    )
    return drift.replace(policy=ps, kl_window=config.calibration_batches)


def alarm_summary(state: PosteriorState) -> dict[str, Any]:
    """What a state's stored alarm reference is (for the warm start's report): its rows and
    the threshold it was fitted to for a batch size, ERT and ``consecutive``."""
    info = state.extra[EXTRA_KEY]
    cal = info["calibration"]
    return {
        "rows": info["rows"],
        "batch_size": cal["batch_size"],
        "ert": cal["ert_target"],
        "consecutive": cal["consecutive"],
        "threshold": cal["threshold"],
        "ert_estimate": cal["ert_estimate"],
    }


__all__ = [
    "EXTRA_KEY",
    "MAX_RECORDS",
    "HistoryReference",
    "alarm_summary",
    "attach_history",
    "calibrate_from_history",
    "has_history",
    "history_calibration",
    "history_drift",
    "history_records",
    "history_reference",
    "without_history",
]
