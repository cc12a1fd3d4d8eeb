"""Per-record anomaly scores worth thresholding: an anomaly likelihood over normal scores.

Three stages, each a pure function (and :class:`AnomalyLikelihood`, the same
statistic record by record with its state explicit):

1. **Tail probability** (:func:`log_tail_probability`). Under the predictive
   mixture p(y | x) = (1/S) sum_s N(y; mu_s, s_s^2) of an ensemble, the
   two-sided tail probability of a record is

       p_i = 2 min(F(y_i), 1 - F(y_i)),   F(y) = (1/S) sum_s Phi((y - mu_s) / s_s),

   computed on the log scale, log F = logsumexp_s log Phi(z_s) - log S, so
   it keeps full resolution far into the tails (where 1 - F rounds to 0 in
   float32).  ``noise_floor`` replaces s_s by sqrt(s_s^2 + floor^2): a model
   that has learnt a near-zero noise (a flat series) cannot turn a rounding
   error into a 40-sigma event.
2. **Normal score** (:func:`normal_scores`): zeta_i = Phi^{-1}(1 - p_i), which
   is N(0, 1) when the predictive is calibrated (p_i ~ U(0, 1)), clipped to
   [-cap, cap] so one record moves the next statistic by at most cap / K.
3. **Anomaly likelihood** (:func:`anomaly_likelihood`, after Numenta's HTM
   detector).  The short-window mean m_t = (1/K) sum_{j<K} zeta_{t-j} is
   compared with the distribution of the same statistic over the long
   window of the past W values m_{t-W..t-1}, summarised robustly (median
   mu_t, sd_t = 1.4826 MAD, floored at ``sd_floor / sqrt(K)``, a fraction of
   the sd of m under a calibrated model), so autocorrelation and a
   mis-calibrated model are measured, not assumed:

       z_t = (m_t - mu_t) / sd_t,    q_t = 1 - Phi(z_t)  (upper tail),

   and the written score is its log scale,

       score_t = min(1, -log10(q_t) / D),   D = ``decades`` (default 10),

   so a threshold h means "a short-window mean this extreme happens with
   probability 10^(-D h) per record" (h = 0.5: 1e-5): resolution near 1
   is the resolution of log q.  Until ``min_history`` window means exist the
   score is 0 (there is nothing to compare with).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.special import log_ndtr as _np_log_ndtr
from scipy.special import ndtri as _np_ndtri

from fogline.models.predictive import Ensemble, component_params, mixture_cdf

FloatArray = npt.NDArray[np.float64]

#: MAD -> sd for a Gaussian.
MAD_TO_SD = 1.482602218505602
_LN10 = math.log(10.0)


class LikelihoodConfig(BaseModel):
    """Settings of the anomaly score (module docstring), frozen and validated.

    ``short`` K and ``long`` W (records), ``min_history`` (window means needed
    before a score is given), ``decades`` D of the log score, ``cap`` on
    |zeta|, ``sd_floor`` (fraction of the calibrated sd 1/sqrt(K) below which
    the long-window sd is not trusted) and ``noise_floor`` (in the model's
    target units; standardised targets: a fraction of the series' sd).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    short: int = Field(default=8, ge=1)
    long: int = Field(default=1000, ge=2)
    min_history: int = Field(default=100, ge=1)
    decades: float = Field(default=10.0, gt=0)
    cap: float = Field(default=6.0, gt=0)
    sd_floor: float = Field(default=0.25, gt=0)
    noise_floor: float = Field(default=0.01, ge=0)
    estimator: Literal["mean_sd", "median_mad"] = "mean_sd"

    @model_validator(mode="after")
    def _history_fits(self) -> LikelihoodConfig:
        if self.min_history > self.long:
            raise ValueError(f"min_history: must be <= long ({self.long}), got {self.min_history}")
        return self


# ----------------------------------------------------------------------------- 1. tail probability
def log_tail_probability(
    ens: Ensemble, x: torch.Tensor, y: torch.Tensor, noise_floor: float = 0.0
) -> FloatArray:
    """log p_i [N] (float64) of the two-sided tail of the predictive mixture (stage 1)."""
    with torch.no_grad():
        mu, sigma = component_params(ens, x)
        mu, sigma = mu.double(), sigma.double()
        if noise_floor > 0:
            sigma = (sigma.pow(2) + noise_floor**2).sqrt()
        yy = y.reshape(-1).to(torch.float64)
        s = mu.shape[0]
        if ens.config.likelihood == "gaussian":
            z = (yy - mu) / sigma
            log_lo = torch.logsumexp(torch.special.log_ndtr(z), 0) - math.log(s)
            log_hi = torch.logsumexp(torch.special.log_ndtr(-z), 0) - math.log(s)
            log_p = math.log(2.0) + torch.minimum(log_lo, log_hi)
        else:
            cdf = mixture_cdf(ens, yy.to(mu.dtype), mu, sigma).double()
            log_p = (2.0 * torch.minimum(cdf, 1.0 - cdf)).clamp_min(1e-300).log()
        return np.asarray(log_p.clamp_max(0.0).numpy(), dtype=np.float64)


# ----------------------------------------------------------------------------- 2. normal score
def normal_scores(log_p: npt.ArrayLike, cap: float = 6.0) -> FloatArray:
    """zeta_i = Phi^{-1}(1 - p_i) = -Phi^{-1}(p_i), clipped to [-cap, cap] (stage 2)."""
    lp = np.asarray(log_p, dtype=np.float64)
    p = np.exp(np.maximum(lp, -700.0))
    return np.clip(-_np_ndtri(p), -cap, cap)


# ----------------------------------------------------------------------------- 3. likelihood
def _upper_log10_tail(z: FloatArray) -> FloatArray:
    """log10(1 - Phi(z)), accurate for large z."""
    return np.asarray(_np_log_ndtr(-z) / _LN10)


def _score_from(m: float | FloatArray, hist_med: Any, hist_sd: Any, cfg: LikelihoodConfig) -> Any:
    z = (m - hist_med) / hist_sd
    log10_q = _upper_log10_tail(np.asarray(z, dtype=np.float64))
    lam = -log10_q
    return lam / (lam + cfg.decades), log10_q


def _robust(hist: FloatArray, cfg: LikelihoodConfig, axis: int = -1) -> tuple[Any, Any]:
    if cfg.estimator == "median_mad":
        med = np.median(hist, axis=axis)
        sd = MAD_TO_SD * np.median(np.abs(hist - np.expand_dims(med, axis)), axis=axis)
    else:
        med = np.mean(hist, axis=axis)
        sd = np.std(hist, axis=axis)
    return med, np.maximum(sd, cfg.sd_floor / math.sqrt(cfg.short))


def window_means(zeta: npt.ArrayLike, short: int) -> FloatArray:
    """m_t = mean of zeta over the last ``short`` records (fewer at the start)."""
    z = np.asarray(zeta, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(z)])
    idx = np.arange(1, len(z) + 1)
    lo = np.maximum(idx - short, 0)
    return np.asarray((c[idx] - c[lo]) / (idx - lo))


def anomaly_likelihood(
    zeta: npt.ArrayLike, cfg: LikelihoodConfig | None = None
) -> tuple[FloatArray, FloatArray]:
    """(score [N] in [0, 1], log10 q [N]) for a whole sequence of normal scores (stage 3).

    Causal: record t sees only zeta_0..t.  Equal to feeding the sequence through
    :class:`AnomalyLikelihood` (the test checks it); records without enough
    history get score 0 and log10 q = 0.
    """
    cfg = cfg or LikelihoodConfig()
    m = window_means(zeta, cfg.short)
    n = len(m)
    score = np.zeros(n)
    log10_q = np.zeros(n)
    if n <= cfg.min_history:
        return score, log10_q
    # history of record t: m[max(0, t - W) : t]; full windows once t >= W
    for t in range(cfg.min_history, min(cfg.long, n)):
        med, sd = _robust(m[:t], cfg)
        score[t], log10_q[t] = _score_from(m[t], med, sd, cfg)
    if n > cfg.long:
        hist = np.lib.stride_tricks.sliding_window_view(m[:-1], cfg.long)  # rows t-W..t-1
        med, sd = _robust(hist, cfg)
        s, q = _score_from(m[cfg.long :], med, sd, cfg)
        score[cfg.long :], log10_q[cfg.long :] = s, q
    return score, log10_q


class AnomalyLikelihood:
    """:func:`anomaly_likelihood` one record at a time, with explicit state.

    The state is the last ``short`` normal scores and the last ``long`` window
    means (:meth:`state_dict` / :meth:`from_state`, plain lists of floats), so
    a restarted scorer continues exactly.
    """

    def __init__(self, cfg: LikelihoodConfig | None = None) -> None:
        self.cfg = cfg or LikelihoodConfig()
        self._zeta: deque[float] = deque(maxlen=self.cfg.short)
        self._means: deque[float] = deque(maxlen=self.cfg.long)

    def update(self, zeta: Iterable[float]) -> tuple[FloatArray, FloatArray]:
        """Score the next records (their normal scores); returns (score, log10 q)."""
        scores, qs = [], []
        for z in zeta:
            self._zeta.append(float(z))
            m = sum(self._zeta) / len(self._zeta)
            if len(self._means) >= self.cfg.min_history:
                med, sd = _robust(np.asarray(self._means), self.cfg)
                s, q = _score_from(m, med, sd, self.cfg)
                scores.append(float(s))
                qs.append(float(q))
            else:
                scores.append(0.0)
                qs.append(0.0)
            self._means.append(m)
        return np.asarray(scores), np.asarray(qs)

    def state_dict(self) -> dict[str, list[float]]:
        """The running state as JSON."""
        return {"zeta": list(self._zeta), "means": list(self._means)}

    @classmethod
    def from_state(
        cls, state: dict[str, list[float]], cfg: LikelihoodConfig | None = None
    ) -> AnomalyLikelihood:
        """A scorer continued from :meth:`state_dict`."""
        out = cls(cfg)
        out._zeta.extend(float(v) for v in state["zeta"])
        out._means.extend(float(v) for v in state["means"])
        return out


__all__ = [
    "AnomalyLikelihood",
    "LikelihoodConfig",
    "anomaly_likelihood",
    "log_tail_probability",
    "normal_scores",
    "window_means",
]
