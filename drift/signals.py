"""Per-batch drift signals: pure functions of model state(s) and a batch.

Notation: q_t is the variational posterior after batch t, q_ref the
*reference* posterior (the warm-start posterior, re-anchored after a confirmed
regime change), and for inputs x_i the posterior predictive of q is the
ensemble mixture p_q(y | x_i) = (1/S) sum_s p(y | f_{w_s}(x_i)), w_s ~ q.

Predictive KL (moment-matched)
    Each predictive mixture is replaced by the Gaussian with the same mean and
    variance (law of total variance: m_i = mean_s mu_s, v_i = var_s mu_s +
    mean_s sigma_s^2), and

        KL_i = KL(N(m_i, v_i) || N(m0_i, v0_i))
             = 1/2 [ log(v0_i / v_i) + (v_i + (m_i - m0_i)^2) / v0_i - 1 ],

    averaged over the batch's rows.  ``predictive_kl`` compares q_t (after
    absorbing the batch) with q_ref; ``step_kl`` compares q_t with q_{t-1}
    (how much this batch moved the predictive).  The approximation ignores the
    mixtures' higher moments (skew, multi-modality); for the unimodal
    predictives of a mean-field BNN it is close, and it is exact when both
    predictives are Gaussian.  Both ensembles use the same seed (common random
    numbers), so the KL measures the parameter change, not resampling noise.

Weight-space KL (closed form, mean-field marginals)
    KL(q_t || q_ref) = sum_j log(s0_j / s_j) + (s_j^2 + (m_j - m0_j)^2) / (2 s0_j^2) - 1/2.

Surprisal
    Per-record negative log predictive density under q_ref *before* the
    update, -log p_ref(y_i | x_i) (log-mean-exp over the ensemble); the
    batch's ``surprisal`` is its mean, ``surprisal_median`` its median and
    ``surprisal_inlier`` the mean over the records that are not gross outliers
    (see below; all records when more than half are).

Anomaly score
    a_i = 1 - 2 min(F(y_i), 1 - F(y_i)) in [0, 1], F the reference predictive
    mixture CDF: 0 at the median, -> 1 in either tail.  Records with
    a_i > ``outlier_score`` are gross outliers; ``outlier_fraction`` is their
    share of the batch.

Cost: the reference ensemble is sampled once per anchoring
(:func:`make_reference`); per batch the signals need one forward pass of the
reference ensemble and one of the updated posterior's ensemble.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fogline.drift.ensemble_pass import component_params
from fogline.models.likelihoods import df_from_unconstrained
from fogline.models.predictive import (
    Ensemble,
    ensemble_from_weights,
    log_predictive_density,
    mixture_cdf,
    predictive_moments,
    sample_ensemble,
)
from fogline.models.state import PosteriorState

#: Records whose anomaly score exceeds this are gross outliers (|z| > 3.89 for a Gaussian).
OUTLIER_SCORE = 0.9999
#: Above this outlier fraction a batch is a shift, not an outlier burst: nothing is trimmed.
MAX_OUTLIER_FRACTION = 0.5
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class Reference:
    """A reference posterior with its cached predictive ensemble.

    ``loc`` / ``scale`` [P] are q_ref's mean-field marginals, ``ensemble``
    ``num_samples`` draws of q_ref (seed ``seed``).
    """

    state: PosteriorState
    ensemble: Ensemble
    loc: torch.Tensor
    scale: torch.Tensor
    num_samples: int
    seed: int


def make_reference(state: PosteriorState, num_samples: int = 64, seed: int = 0) -> Reference:
    """Anchor the reference at ``state`` and cache its ensemble."""
    return Reference(
        state=state,
        ensemble=sample_ensemble(state, num_samples, seed),
        loc=state.params["loc"].detach().clone(),
        scale=state.posterior_scale().detach().clone(),
        num_samples=num_samples,
        seed=seed,
    )


@dataclass(frozen=True)
class RecordScores:
    """Per-record scores of a batch under the reference predictive (before the update).

    ``nll`` [N] = -log p_ref(y_i | x_i); ``anomaly`` [N] in [0, 1];
    ``outlier`` [N] bool (``anomaly > outlier_score``); ``mean`` / ``var`` [N]
    the moment-matched reference predictive (reused by the KL).
    """

    nll: torch.Tensor
    anomaly: torch.Tensor
    outlier: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor

    def head(self, n: int) -> RecordScores:
        """The scores of the first ``n`` records."""
        return RecordScores(
            self.nll[:n], self.anomaly[:n], self.outlier[:n], self.mean[:n], self.var[:n]
        )


def gaussian_mixture_moments(
    mu: torch.Tensor, sigma: torch.Tensor, dim: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Moment-matched (mean, var) of the equal-weight mixture of N(mu_s, sigma_s^2) over ``dim``:
    mean = mean_s mu_s, var = var_s mu_s + mean_s sigma_s^2."""
    return mu.mean(dim), mu.var(dim, unbiased=False) + sigma.pow(2).mean(dim)


def gaussian_mixture_nll(z: torch.Tensor, sigma: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """-log (1/S) sum_s N(y; mu_s, sigma_s^2) over ``dim`` from z_s = (y - mu_s) / sigma_s."""
    lp = -0.5 * z * z - sigma.log() - _HALF_LOG_2PI
    return -(torch.logsumexp(lp, dim) - math.log(z.shape[dim]))


def two_sided_anomaly(cdf: torch.Tensor) -> torch.Tensor:
    """The anomaly score a = 1 - 2 min(F, 1 - F) in [0, 1] of a predictive CDF value F."""
    return (1.0 - 2.0 * torch.minimum(cdf, 1.0 - cdf)).clamp(0.0, 1.0)


def _moments_and_scores(
    ens: Ensemble, x: torch.Tensor, y: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(mean, var, nll, cdf) of the predictive mixture; nll/cdf only with ``y``."""
    with torch.no_grad():
        mu, sigma = component_params(ens, x)
        if ens.config.likelihood == "gaussian":
            mean, var = gaussian_mixture_moments(mu, sigma)
        else:
            mean, epi, ale = predictive_moments(ens, x)
            var = epi + ale
        if y is None:
            return mean, var, None, None
        y = y.to(mu.dtype).reshape(-1)
        if ens.config.likelihood == "gaussian":
            nll = gaussian_mixture_nll((y - mu) / sigma, sigma)
        else:
            nll = -log_predictive_density(ens, x, y)
        cdf = mixture_cdf(ens, y, mu, sigma)
        return mean, var, nll, cdf


def record_scores(
    ref: Reference, x: torch.Tensor, y: torch.Tensor, outlier_score: float = OUTLIER_SCORE
) -> RecordScores:
    """Surprisal and anomaly score of every record under the reference predictive."""
    mean, var, nll, cdf = _moments_and_scores(ref.ensemble, x, y)
    assert nll is not None and cdf is not None
    anomaly = two_sided_anomaly(cdf)
    return RecordScores(nll, anomaly, anomaly > outlier_score, mean, var)


def anomaly_scores(ref: Reference, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-record anomaly score [N] in [0, 1] (two-sided tail of the reference predictive)."""
    return record_scores(ref, x, y).anomaly


def gaussian_kl(
    m1: torch.Tensor, v1: torch.Tensor, m0: torch.Tensor, v0: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(m1, v1) || N(m0, v0))."""
    return 0.5 * ((v0 / v1).log() + (v1 + (m1 - m0).pow(2)) / v0 - 1.0)


def weight_kl(
    loc: torch.Tensor, scale: torch.Tensor, ref_loc: torch.Tensor, ref_scale: torch.Tensor
) -> float:
    """Closed-form KL(N(loc, diag scale^2) || N(ref_loc, diag ref_scale^2)) in nats."""
    with torch.no_grad():
        return float(gaussian_kl(loc, scale.pow(2), ref_loc, ref_scale.pow(2)).sum())


def predictive_kl(
    ens: Ensemble, x: torch.Tensor, ref_mean: torch.Tensor, ref_var: torch.Tensor
) -> float:
    """Mean over rows of KL(moment-matched predictive of ``ens`` || N(ref_mean, ref_var))."""
    mean, var, _, _ = _moments_and_scores(ens, x, None)
    return float(gaussian_kl(mean, var, ref_mean, ref_var).mean())


def pre_update_signals(
    ref: Reference,
    x: torch.Tensor,
    y: torch.Tensor,
    outlier_score: float = OUTLIER_SCORE,
    max_outlier_fraction: float = MAX_OUTLIER_FRACTION,
) -> tuple[dict[str, float], RecordScores]:
    """Signals of a batch under the reference, before the update.

    Returns ``({surprisal, surprisal_median, surprisal_inlier, outlier_fraction,
    anomaly_mean}, record scores)``.
    """
    rs = record_scores(ref, x, y, outlier_score)
    frac = float(rs.outlier.float().mean())
    keep = ~rs.outlier if frac <= max_outlier_fraction else torch.ones_like(rs.outlier)
    inlier = float(rs.nll[keep].mean()) if bool(keep.any()) else float(rs.nll.mean())
    return (
        {
            "surprisal": float(rs.nll.mean()),
            "surprisal_median": float(rs.nll.median()),
            "surprisal_inlier": inlier,
            "outlier_fraction": frac,
            "anomaly_mean": float(rs.anomaly.mean()),
        },
        rs,
    )


def inlier_statistic(
    nll: torch.Tensor, outlier: torch.Tensor, max_outlier_fraction: float
) -> float:
    """``surprisal_inlier`` from per-record NLL and outlier flags (used by calibration)."""
    frac = float(outlier.float().mean())
    keep = ~outlier if frac <= max_outlier_fraction else torch.ones_like(outlier)
    return float(nll[keep].mean()) if bool(keep.any()) else float(nll.mean())


def post_update_signals(
    ref: Reference,
    scores: RecordScores,
    x: torch.Tensor,
    after: PosteriorState,
    before: Ensemble | None = None,
    ensemble: Ensemble | None = None,
) -> tuple[dict[str, float], Ensemble]:
    """Signals after absorbing the batch: ``predictive_kl``, ``step_kl``, ``weight_kl``.

    ``before`` is the ensemble of the posterior *before* the update (the
    previous call's return value; same seed); without it ``step_kl`` is NaN.
    Returns the signals and the updated posterior's ensemble (cache it for the
    next batch).  ``ensemble``: ``after``'s ensemble if the caller already has it
    (e.g. from a :class:`NoiseCache`).
    """
    ens = ensemble if ensemble is not None else sample_ensemble(after, ref.num_samples, ref.seed)
    mean, var, _, _ = _moments_and_scores(ens, x, None)
    out = {
        "predictive_kl": float(gaussian_kl(mean, var, scores.mean, scores.var).mean()),
        "weight_kl": weight_kl(
            after.params["loc"].detach(), after.posterior_scale().detach(), ref.loc, ref.scale
        ),
        "step_kl": float("nan"),
    }
    if before is not None:
        m0, v0, _, _ = _moments_and_scores(before, x, None)
        out["step_kl"] = float(gaussian_kl(mean, var, m0, v0).mean())
    return out, ens


class NoiseCache:
    """The standard-normal draws behind ``sample_ensemble(state, S, seed)``, drawn once.

    Every ensemble of the drift loop uses the same seed (common random
    numbers), so eps [S, P] (and z [S, K] for a low-rank posterior) are the
    same on every batch; only ``w_s = loc + scale * eps_s (+ z_s V^T)``
    changes.  :meth:`ensemble` computes exactly what
    :func:`fogline.models.predictive.sample_ensemble` does (same draws, same
    operations, so bit for bit) without re-running the generator.
    """

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._eps: torch.Tensor | None = None
        self._z: torch.Tensor | None = None

    def draws(
        self, state: PosteriorState, num_samples: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The draws (eps [S, P], z [S, K] or ``None``) of ``state``'s shape (cached; read-only)."""
        return self._draws(state, num_samples, seed)

    def _draws(
        self, state: PosteriorState, num_samples: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = state.params["loc"].shape[0]
        k = state.params["cov_factor"].shape[1] if "cov_factor" in state.params else 0
        key = (num_samples, seed, p, k, str(state.device))
        if key != self._key or self._eps is None:
            gen = torch.Generator(device=state.device).manual_seed(seed)
            self._eps = torch.randn(num_samples, p, generator=gen, device=state.device)
            self._z = torch.randn(num_samples, k, generator=gen, device=state.device) if k else None
            self._key = key
        return self._eps, self._z

    def ensemble(self, state: PosteriorState, num_samples: int, seed: int) -> Ensemble:
        """``sample_ensemble(state, num_samples, seed)`` from the cached draws."""
        eps, z = self._draws(state, num_samples, seed)
        loc = state.params["loc"].detach()
        scale = torch.nn.functional.softplus(state.params["scale_unconstrained"].detach())
        w = loc + scale * eps
        if z is not None:
            w = w + z @ state.params["cov_factor"].detach().T
        df: float | None = state.config.df
        if state.config.learns_df:
            df = float(df_from_unconstrained(state.params["df_unconstrained"].detach())[0])
        return ensemble_from_weights(state.config, w, df)


def posterior_moments(
    state: PosteriorState, x: torch.Tensor, num_samples: int = 64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [N], var [N]) of the moment-matched posterior predictive of ``state`` at ``x``."""
    mean, var, _, _ = _moments_and_scores(sample_ensemble(state, num_samples, seed), x, None)
    return mean, var


def softplus_inv(s: torch.Tensor) -> torch.Tensor:
    """Inverse of softplus (for writing a scale back as ``scale_unconstrained``)."""
    return s + torch.log(-torch.expm1(-s))


__all__ = [
    "NoiseCache",
    "RecordScores",
    "Reference",
    "anomaly_scores",
    "gaussian_kl",
    "inlier_statistic",
    "make_reference",
    "post_update_signals",
    "posterior_moments",
    "pre_update_signals",
    "predictive_kl",
    "record_scores",
    "softplus_inv",
    "weight_kl",
]
