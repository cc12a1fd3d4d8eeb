"""Per-record anomaly scores worth thresholding: an anomaly likelihood over normal scores.

Stages, each a pure function (and :class:`AnomalyLikelihood`, the same
statistic record by record with its state explicit):

1. **Tail probability** (:func:`log_tail_probability`). Under the predictive
   mixture p(y | x) = (1/S) sum_s N(y; mu_s, s_s^2) of an ensemble, the
   two-sided tail probability of a record is

       p_i = 2 min(F(y_i), 1 - F(y_i)),   F(y) = (1/S) sum_s Phi((y - mu_s) / s_s),

   computed on the log scale, log F = logsumexp_s log Phi(z_s) - log S, so
   it keeps full resolution far into the tails (where 1 - F rounds to 0 in
   float32).  ``noise_floor`` replaces s_s by sqrt(s_s^2 + floor^2): a model
   that has learnt a near-zero noise (a flat series) cannot turn a rounding
   error into a 40-sigma event.  The caller sets the floor to
   f = max(``noise_floor``, ``noise_floor_relative`` r), r the warm-up's
   one-step scale (:func:`effective_noise_floor`).
2. **Normal score** (:func:`normal_scores`): zeta_i = Phi^{-1}(1 - p_i), which
   is N(0, 1) when the predictive is calibrated (p_i ~ U(0, 1)), clipped to
   [-cap, cap] so one record moves the next statistic by at most cap / K.
   ``cap`` = :data:`ZETA_CAP` = 12 (p = 1.8e-33; 6, p = 1e-9, until
   2026-12-07): below the clip the score keeps the surprisal's magnitude, so
   on a series whose ordinary spikes already reach p ~ 1e-9 a record a
   hundred orders of magnitude less likely still stands out; a record at
   zeta <= 6 alone stays far from an alarm, and any more extreme one weighs
   no more than one at the cap (docs/drift.md, "A wider clip").
3. **Anomaly likelihood** (:func:`anomaly_likelihood`, after Numenta's HTM
   detector).  For each window length K in ``short`` (default 8 and 64
   records: a sharp event and a subtle sustained one), the window mean
   m_t = (1/K) sum_{j<K} zeta_{t-j} is compared with the distribution of the
   same statistic over the past W = ``long`` records, m_{t-W..t-1}, by its
   mean mu_t and sd sd_t (floored at ``sd_floor / sqrt(K)``, a fraction of
   the sd of m under a calibrated model).  Autocorrelation (a daily cycle
   the model does not explain) and a mis-calibrated predictive are thus
   measured on the series itself, not assumed away:

       z_t = (m_t - mu_t) / sd_t,    log10 q_t,K = log10(1 - Phi(z_t)),

   **Recurrence floor** (``recurrence`` m, default 0.02): the Gaussian tail
   extrapolates from the history's mean and sd, and on a regular series (a
   square wave's edges, a spike every 100 records) it calls a pattern that
   recurs in the history a 10-sigma event.  The history itself says how
   often a window mean this high occurs: with c_t = #{j in the history:
   m_j >= m_t} of its n_t values, the per-record rate is c_t / n_t, and

       q_t,K = max(1 - Phi(z_t),  m c_t / n_t)

   so the extrapolation may go at most a factor 1/m (50) below the observed
   frequency of such values.  A record above every value of its history
   (c_t = 0, a first-of-its-kind event) keeps its Gaussian tail; m = 0 turns
   the floor off.

   The scales are combined with a Bonferroni correction,
   lambda_t = max(0, max_K(-log10 q_t,K) - log10 |short|), i.e. a per-record
   tail probability q_t = 10^(-lambda_t), and written as

       score_t = 1 - q_t = 1 - 10^(-lambda_t)     (``scale = "rate"``, default),

   so **a threshold 1 - q means a nominal false-alarm rate q per record**
   (score >= 1 - q  <=>  q_t <= q) for every q >= q_0 = 10^(-L_0), L_0 =
   :data:`RATE_TAIL_DECADES` = 10.  Float64 cannot tell 1 - q from 1 below
   q = 2^-53, so beyond q_0 the excess x = lambda_t - L_0 is written on the
   bounded log scale inside the last q_0 of the interval,

       score_t = 1 - q_0 D / (x + D)              (lambda_t > L_0),

   continuous and increasing at L_0, below 1 for every finite lambda_t, and
   apart by at least one float64 step per decade up to lambda_t ~ 1,000
   (D = ``decades``): the most extreme records keep their order instead
   of tying at the top; ``scale = "log"`` writes the earlier bounded log scale
   lambda_t / (lambda_t + D), D = ``decades`` (h = 1/3: q = 1e-5).  Both are
   increasing in lambda_t, so they rank records identically.  Until
   ``min_history`` window means exist the score is 0 (there is nothing to
   compare with).  ``tail = "student_t"`` replaces 1 - Phi(z) by the
   predictive Student-t tail of a window mean given n_eff = n_hist / K
   effective past values (heavier where the history is short; not the
   default, docs/drift.md).
4. **Repeat suppression** (:func:`suppress_repeats`).  A detector is worth
   its *first* detection of an event (NAB counts the earliest detection in a
   window and charges every detection outside one); an excursion of the
   score above a threshold lasts several records.  On the log scale
   s_t = lambda_t / (lambda_t + D) (whatever ``scale`` is written), a record
   is kept only when ``suppress_ratio`` times s_t exceeds every s of the
   previous ``suppress`` records (S = 128: twice the longest window, over which
   one event's 64-record window means rise and fall again),

       kept_t  <=>  r s_t > max(s_{t-S..t-1}),   written score_t = 0 otherwise,

   so at any threshold the first record of an excursion above it is kept
   (its predecessors were below) and the rest of the excursion only when it
   climbs by more than a factor 1/r over its peak so far.  The estimator
   ``median_mad`` (median, 1.4826 MAD) is available; on NAB it ignored the
   regular large excursions of periodic series and scored far worse
   (docs/drift.md).
5. **Calibration** (optional, ``calibration``: a :class:`~fogline.drift.pot.TailConfig`).
   The written score becomes 1 - q^_t, q^_t = P^(A >= a_t) of the event
   statistic a_t = lambda_t (kept record) or 0 (suppressed) estimated from
   the stream's own past values (:mod:`fogline.drift.pot`: rank bulk,
   generalised-Pareto tail), so a threshold 1 - q is a rate q of alarm
   events whatever the residuals' tails; the nominal 10^(-lambda_t) until
   the calibrator has its history.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.special import log_ndtr as _np_log_ndtr
from scipy.special import ndtri as _np_ndtri
from scipy.special import stdtr as _np_stdtr

from fogline.drift.pot import TailCalibrator, TailConfig, calibrate
from fogline.models.predictive import Ensemble, component_params, mixture_cdf

FloatArray = npt.NDArray[np.float64]

#: MAD -> sd for a Gaussian.
MAD_TO_SD = 1.482602218505602
#: Default clip of the normal scores, |zeta| <= 12 (stage 2): a tail probability p = Phi(-12) = 1.8e-33.
ZETA_CAP = 12.0
_LN10 = math.log(10.0)
#: The largest float64 below 1: the top of the rate-scale score.
_BELOW_ONE = float(np.nextafter(1.0, 0.0))
#: L_0: the rate-scale score is 1 - q for q >= 10^-L_0 and log-scaled beyond (:func:`written_score`).
RATE_TAIL_DECADES = 10.0


class LikelihoodConfig(BaseModel):
    """Settings of the anomaly score (module docstring), frozen and validated.

    ``short`` the window lengths K and ``long`` W (records), ``min_history``
    (window means needed before a score is given), ``decades`` D of the log
    scale (the suppression's scale, and the written one with ``scale = "log"``),
    ``tail`` (Gaussian or predictive Student-t), ``scale`` of the written score,
    ``calibration`` (None: off; else stage 5 with these settings),
    score, ``cap`` on |zeta|, ``sd_floor`` (fraction of the calibrated sd
    1/sqrt(K) below which the long-window sd is not trusted), ``noise_floor``
    (in the model's target units; standardised targets: a fraction of the
    series' sd), ``noise_floor_relative`` c (the floor is max(``noise_floor``, c r),
    r the warm-up's one-step scale, :func:`effective_noise_floor`; 0: the fixed
    floor alone), the long-window ``estimator``, and the repeat suppression's
    window ``suppress`` S (records; 0: off) and ratio ``suppress_ratio`` r, and the
    ``recurrence`` floor's weight m (q_t,K >= m c_t / n_t, module docstring; 0: off).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    short: tuple[int, ...] = (8, 64)
    long: int = Field(default=1000, ge=2)
    min_history: int = Field(default=100, ge=1)
    decades: float = Field(default=10.0, gt=0)
    cap: float = Field(default=ZETA_CAP, gt=0)
    sd_floor: float = Field(default=0.5, gt=0)
    noise_floor: float = Field(default=0.01, ge=0)
    noise_floor_relative: float = Field(default=0.2, ge=0)
    estimator: Literal["mean_sd", "median_mad"] = "mean_sd"
    suppress: int = Field(default=128, ge=0)
    suppress_ratio: float = Field(default=0.9, gt=0, le=1)
    tail: Literal["gaussian", "student_t"] = "gaussian"
    scale: Literal["rate", "log"] = "rate"
    calibration: TailConfig | None = None
    recurrence: float = Field(default=0.02, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> LikelihoodConfig:
        if not self.short or min(self.short) < 1:
            raise ValueError(f"short: window lengths must be >= 1, got {self.short}")
        if self.min_history > self.long:
            raise ValueError(f"min_history: must be <= long ({self.long}), got {self.min_history}")
        return self


# ----------------------------------------------------------------------------- 1. tail probability
def _log_cdf_pair(
    ens: Ensemble, x: torch.Tensor, yy: torch.Tensor, noise_floor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log F(y), log(1 - F(y))) [N] (float64) of one ensemble's predictive mixture."""
    mu, sigma = component_params(ens, x)
    mu, sigma = mu.double(), sigma.double()
    if noise_floor > 0:
        sigma = (sigma.pow(2) + noise_floor**2).sqrt()
    s = mu.shape[0]
    if ens.config.likelihood == "gaussian":
        z = (yy - mu) / sigma
        log_lo = torch.logsumexp(torch.special.log_ndtr(z), 0) - math.log(s)
        log_hi = torch.logsumexp(torch.special.log_ndtr(-z), 0) - math.log(s)
        return log_lo, log_hi
    cdf = mixture_cdf(ens, yy.to(mu.dtype), mu, sigma).double()
    return cdf.clamp_min(1e-300).log(), (1.0 - cdf).clamp_min(1e-300).log()


def log_tail_probability(
    ens: Ensemble | Sequence[Ensemble],
    x: torch.Tensor,
    y: torch.Tensor,
    noise_floor: float = 0.0,
) -> FloatArray:
    """log p_i [N] (float64) of the two-sided tail of the predictive mixture (stage 1).

    ``ens`` may be a sequence of R ensembles (independently fitted posteriors,
    e.g. warm-start restarts): the predictive is then their equal-weight
    mixture, F(y) = (1/R) sum_r F_r(y), i.e. log F = logsumexp_r log F_r - log R
    (with R equal-sized ensembles, the pooled mixture of all R S draws).
    """
    members = [ens] if isinstance(ens, Ensemble) else list(ens)
    if not members:
        raise ValueError("log_tail_probability: no ensemble")
    with torch.no_grad():
        yy = y.reshape(-1).to(torch.float64)
        pairs = [_log_cdf_pair(e, x, yy, noise_floor) for e in members]
        log_r = math.log(len(members))
        log_lo = torch.logsumexp(torch.stack([lo for lo, _ in pairs]), 0) - log_r
        log_hi = torch.logsumexp(torch.stack([hi for _, hi in pairs]), 0) - log_r
        log_p = math.log(2.0) + torch.minimum(log_lo, log_hi)
        return np.asarray(log_p.clamp_max(0.0).numpy(), dtype=np.float64)


def mean_normal_score_log_tail(
    log_ps: Sequence[npt.ArrayLike], cap: float = ZETA_CAP
) -> FloatArray:
    """log p-bar [N] of the members' mean normal score: p-bar = Phi(-zeta-bar).

    zeta-bar_i = (1/R) sum_r zeta_ri, zeta_ri = Phi^{-1}(1 - p_ri) clipped to
    [-cap, cap] (:func:`normal_scores`) for R members' tail probabilities
    p_ri (``log_ps``, each [N]): the members' evidence averaged on the normal
    scale (a committee), where the predictive mixture is dominated by the
    least surprised member.
    """
    if not log_ps:
        raise ValueError("mean_normal_score_log_tail: no member")
    zeta = np.mean([normal_scores(lp, cap) for lp in log_ps], axis=0)
    return np.asarray(_np_log_ndtr(-zeta), dtype=np.float64)


def one_step_scale(y: npt.ArrayLike) -> float:
    """r = sqrt(mean((y_t - y_{t-1})^2) / 2) of consecutive values ``y`` (0 if fewer than 2).

    The noise sd sigma of a series that is a constant plus i.i.d. noise
    (E (y_t - y_{t-1})^2 = 2 sigma^2); for a smooth or piecewise-constant
    series, the typical one-step move.
    """
    v = np.asarray(y, dtype=np.float64).reshape(-1)
    if len(v) < 2:
        return 0.0
    return float(np.sqrt(np.mean(np.diff(v) ** 2) / 2.0))


def effective_noise_floor(cfg: LikelihoodConfig, warm_y: npt.ArrayLike) -> float:
    """f = max(``noise_floor``, ``noise_floor_relative`` r), r = :func:`one_step_scale` of the warm-up."""
    if cfg.noise_floor_relative <= 0:
        return cfg.noise_floor
    return max(cfg.noise_floor, cfg.noise_floor_relative * one_step_scale(warm_y))


# ----------------------------------------------------------------------------- 2. normal score
def normal_scores(log_p: npt.ArrayLike, cap: float = ZETA_CAP) -> FloatArray:
    """zeta_i = Phi^{-1}(1 - p_i) = -Phi^{-1}(p_i), clipped to [-cap, cap] (stage 2)."""
    lp = np.asarray(log_p, dtype=np.float64)
    p = np.exp(np.maximum(lp, -700.0))
    return np.clip(-_np_ndtri(p), -cap, cap)


# ----------------------------------------------------------------------------- 3. likelihood
def _upper_log10_tail(z: Any) -> Any:
    """log10(1 - Phi(z)), accurate for large z."""
    return _np_log_ndtr(-np.asarray(z, dtype=np.float64)) / _LN10


def _tail_lambda(z: Any, n_hist: int, k: int, cfg: LikelihoodConfig) -> Any:
    """-log10 P(Z >= z) of the standardised window mean, Gaussian or predictive Student-t."""
    if cfg.tail == "gaussian":
        return -_upper_log10_tail(z)
    n_eff = max(n_hist / k, 2.0)
    sf = _np_stdtr(n_eff - 1.0, -np.asarray(z, dtype=np.float64) / math.sqrt(1.0 + 1.0 / n_eff))
    return -np.log10(np.maximum(sf, 1e-300))


def _location_scale(hist: FloatArray, k: int, cfg: LikelihoodConfig) -> tuple[Any, Any]:
    """(mu, sd) of window means ``hist`` along the last axis."""
    if cfg.estimator == "median_mad":
        mu = np.median(hist, axis=-1)
        sd = MAD_TO_SD * np.median(np.abs(hist - mu[..., None]), axis=-1)
    else:
        mu = np.mean(hist, axis=-1)
        sd = np.std(hist, axis=-1)
    return mu, np.maximum(sd, cfg.sd_floor / math.sqrt(k))


def _recurrence_cap(count: Any, n_hist: Any, cfg: LikelihoodConfig) -> Any:
    """-log10(m c / n): the largest lambda the recurrence floor allows (inf where c = 0 or m = 0)."""
    rate = (
        cfg.recurrence * np.asarray(count, dtype=np.float64) / np.asarray(n_hist, dtype=np.float64)
    )
    with np.errstate(divide="ignore"):
        return -np.log10(rate)


#: Rows of the [rows, W] comparison matrix :func:`_recurrence_counts` builds at a time.
_COUNT_BLOCK = 2048


def _recurrence_counts(hist: FloatArray, m: FloatArray) -> FloatArray:
    """c_t = #{j: hist[t, j] >= m[t]} per row of the sliding history ``hist`` [T, W]."""
    out = np.empty(len(m))
    for lo in range(0, len(m), _COUNT_BLOCK):
        hi = lo + _COUNT_BLOCK
        out[lo:hi] = np.count_nonzero(hist[lo:hi] >= m[lo:hi, None], axis=1)
    return out


def _score(lam_k: FloatArray, cfg: LikelihoodConfig) -> tuple[FloatArray, FloatArray]:
    """(log-scale score, lambda) from the per-scale -log10 q [n_scales, ...]."""
    lam = np.maximum(np.max(lam_k, axis=0) - math.log10(len(cfg.short)), 0.0)
    return lam / (lam + cfg.decades), lam


def written_score(lam: npt.ArrayLike, cfg: LikelihoodConfig) -> FloatArray:
    """The written score of lambda = -log10 q: the rate scale (default) or lambda / (lambda + D).

    Rate scale: 1 - q for lambda <= L_0 (:data:`RATE_TAIL_DECADES`), where a
    threshold 1 - q is the false-alarm rate q; beyond, 1 - q_0 D / (x + D) with
    q_0 = 10^-L_0, x = lambda - L_0 and D = ``cfg.decades`` (module docstring):
    1 - q itself rounds to 1 below q = 2^-53 and would tie every record past it.
    The result is capped at the largest float below 1 (lambda = inf).
    """
    lv = np.asarray(lam, dtype=np.float64)
    if cfg.scale == "log":
        return np.asarray(lv / (lv + cfg.decades))
    l0, d = RATE_TAIL_DECADES, cfg.decades
    rate = -np.expm1(-_LN10 * np.minimum(lv, l0))
    tail = 1.0 - 10.0**-l0 * d / (np.maximum(lv - l0, 0.0) + d)  # 1 at lambda = inf: capped
    return np.asarray(np.minimum(np.where(lv > l0, tail, rate), _BELOW_ONE))


def window_means(zeta: npt.ArrayLike, short: int) -> FloatArray:
    """m_t = mean of zeta over the last ``short`` records (fewer at the start)."""
    z = np.asarray(zeta, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(z)])
    idx = np.arange(1, len(z) + 1)
    lo = np.maximum(idx - short, 0)
    return np.asarray((c[idx] - c[lo]) / (idx - lo))


def _scale_lambda(m: FloatArray, k: int, cfg: LikelihoodConfig) -> FloatArray:
    """-log10 q_t for one window length (0 before ``min_history``)."""
    n, w = len(m), cfg.long
    lam = np.zeros(n)
    floor = cfg.recurrence > 0
    for t in range(cfg.min_history, min(w, n)):  # growing history m[:t]
        mu, sd = _location_scale(m[:t], k, cfg)
        lam[t] = _tail_lambda((m[t] - mu) / sd, t, k, cfg)
        if floor:
            lam[t] = min(lam[t], _recurrence_cap(np.count_nonzero(m[:t] >= m[t]), t, cfg))
    if n > w:
        hist = np.lib.stride_tricks.sliding_window_view(m[:-1], w)  # row j: m[j : j + W]
        mu, sd = _location_scale(hist, k, cfg)
        lam[w:] = _tail_lambda((m[w:] - mu) / sd, w, k, cfg)
        if floor:
            cap = _recurrence_cap(_recurrence_counts(hist, m[w:]), w, cfg)
            lam[w:] = np.minimum(lam[w:], cap)
    return lam


def suppress_repeats(score: npt.ArrayLike, window: int, ratio: float = 0.9) -> FloatArray:
    """s'_t = s_t where ``ratio`` s_t > max(s_{t-window..t-1}), else 0 (stage 4; causal).

    ``window = 0`` returns the scores unchanged.
    """
    s = np.asarray(score, dtype=np.float64)
    if window <= 0 or len(s) == 0:
        return s.copy()
    padded = np.concatenate([np.full(window, -np.inf), s[:-1]])
    prev = np.lib.stride_tricks.sliding_window_view(padded, window).max(axis=1)
    return np.where(ratio * s > prev, s, 0.0)


def anomaly_likelihood(
    zeta: npt.ArrayLike, cfg: LikelihoodConfig | None = None
) -> tuple[FloatArray, FloatArray]:
    """(score [N] in [0, 1), lambda [N] = -log10 q) of a sequence of normal scores (stages 3-4).

    The score is repeat-suppressed (:func:`suppress_repeats` on the log-scale
    score, ``cfg.suppress``); lambda is not, so :func:`written_score` of lambda
    is the raw (unsuppressed) score.  Causal: record t
    sees only zeta_0..t.  Equal to feeding the sequence through
    :class:`AnomalyLikelihood` (the test checks it); records without enough
    history get score 0.
    """
    cfg = cfg or LikelihoodConfig()
    z = np.asarray(zeta, dtype=np.float64)
    if len(z) <= cfg.min_history:
        return np.zeros(len(z)), np.zeros(len(z))
    lam_k = np.stack([_scale_lambda(window_means(z, k), k, cfg) for k in cfg.short])
    raw, lam = _score(lam_k, cfg)
    kept = suppress_repeats(raw, cfg.suppress, cfg.suppress_ratio) > 0
    if cfg.calibration is not None:  # stage 5
        a, nominal = np.where(kept, lam, 0.0), np.where(kept, 10.0**-lam, 1.0)
        q = calibrate(a, nominal, cfg.calibration)
        return np.where(kept, 1.0 - q, 0.0), lam
    return np.where(kept, written_score(lam, cfg), 0.0), lam


class AnomalyLikelihood:
    """:func:`anomaly_likelihood` one record at a time, with explicit state.

    The state is the last max(``short``) normal scores, per window length
    the last ``long`` window means, and the last ``suppress`` raw scores
    (:meth:`state_dict` / :meth:`from_state`, plain lists of floats), so a
    restarted scorer continues exactly.
    """

    def __init__(self, cfg: LikelihoodConfig | None = None) -> None:
        self.cfg = cfg or LikelihoodConfig()
        self._zeta: deque[float] = deque(maxlen=max(self.cfg.short))
        self._means: list[deque[float]] = [deque(maxlen=self.cfg.long) for _ in self.cfg.short]
        self._raw: deque[float] = deque(maxlen=max(self.cfg.suppress, 1))
        cal = self.cfg.calibration
        self._tail = TailCalibrator(cal) if cal is not None else None

    def update(self, zeta: Iterable[float]) -> tuple[FloatArray, FloatArray]:
        """Score the next records (their normal scores); returns (score, lambda)."""
        out_s, out_l = [], []
        for value in zeta:
            self._zeta.append(float(value))
            recent = np.asarray(self._zeta)
            lam_k = np.zeros(len(self.cfg.short))
            for i, k in enumerate(self.cfg.short):
                m = float(recent[-k:].mean())
                hist = self._means[i]
                if len(hist) >= self.cfg.min_history:
                    past = np.asarray(hist)
                    mu, sd = _location_scale(past, k, self.cfg)
                    lam_k[i] = _tail_lambda((m - mu) / sd, len(hist), k, self.cfg)
                    if self.cfg.recurrence > 0:
                        c = np.count_nonzero(past >= m)
                        lam_k[i] = min(lam_k[i], _recurrence_cap(c, len(hist), self.cfg))
                hist.append(m)
            ready = len(self._means[0]) > self.cfg.min_history
            s, lam = _score(lam_k[:, None], self.cfg) if ready else (np.zeros(1), np.zeros(1))
            raw = float(s[0])
            keep = (
                self.cfg.suppress == 0
                or not self._raw
                or self.cfg.suppress_ratio * raw > max(self._raw)
            )
            if self.cfg.suppress:
                self._raw.append(raw)
            kept = keep and raw > 0
            if self._tail is not None:  # stage 5 (every record enters its history)
                a, q0 = (float(lam[0]), 10.0 ** -float(lam[0])) if kept else (0.0, 1.0)
                q = float(self._tail.update([a], [q0])[0])
                out_s.append(1.0 - q if kept else 0.0)
            else:
                out_s.append(float(written_score(lam[0], self.cfg)) if kept else 0.0)
            out_l.append(float(lam[0]))
        return np.asarray(out_s), np.asarray(out_l)

    def state_dict(self) -> dict[str, list[Any]]:
        """The running state as JSON."""
        out: dict[str, list[Any]] = {
            "zeta": list(self._zeta),
            "means": [list(h) for h in self._means],
            "raw": list(self._raw),
        }
        if self._tail is not None:
            out["tail"] = self._tail.state_dict()["history"]
        return out

    @classmethod
    def from_state(
        cls, state: dict[str, list[Any]], cfg: LikelihoodConfig | None = None
    ) -> AnomalyLikelihood:
        """A scorer continued from :meth:`state_dict`."""
        out = cls(cfg)
        out._zeta.extend(float(v) for v in state["zeta"])
        for h, stored in zip(out._means, state["means"], strict=True):
            h.extend(float(v) for v in stored)
        out._raw.extend(float(v) for v in state.get("raw", []))
        if out.cfg.calibration is not None:
            out._tail = TailCalibrator.from_state(
                {"history": list(state.get("tail", []))}, out.cfg.calibration
            )
        return out


__all__ = [
    "RATE_TAIL_DECADES",
    "ZETA_CAP",
    "AnomalyLikelihood",
    "LikelihoodConfig",
    "anomaly_likelihood",
    "effective_noise_floor",
    "log_tail_probability",
    "mean_normal_score_log_tail",
    "normal_scores",
    "one_step_scale",
    "suppress_repeats",
    "window_means",
    "written_score",
]
