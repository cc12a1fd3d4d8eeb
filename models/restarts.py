"""Several restarts of a warm start, the best kept by a held-out or evidence score.

A small BNN fitted by SVI on a few hundred rows lands in a local optimum that
depends on the initialisation seed: on a square wave one restart learns the
edges, another explains them as noise.  The usual remedy is to fit from R
initialisations and keep the best by a score that never looks at labels:

* :func:`held_out_lpd`, the mean log predictive density of rows the fits did
  not see (the last part of a warm-up, the future of the rows fitted),

      LPD = (1/M) sum_i log (1/S) sum_s p(y_i | x_i, w_s),   w_s ~ q;

  it punishes a restart whose sharp fit of the training rows does not carry
  over (on NAB the highest-ELBO restart was often the overconfident one);
* :func:`elbo`, the quantity SVI maximises and a lower bound on log p(D),

      ELBO(q) = sum_i E_q[log p(y_i | x_i, w)] - KL(q(w) || p(w)),

  the expectation by S draws (1/S) sum_s log p(y_i | x_i, w_s), the KL in
  closed form (mean-field: :func:`fogline.models.priors.kl_to_prior`;
  low-rank: :func:`fogline.models.fprior.lowrank_kl`).

Both draw w_s from a generator seeded independently of the restart (the same
noise for every restart, so the comparison is not decided by Monte Carlo
luck).  Restart r uses seed ``seed + r * RESTART_STRIDE`` for its
initialisation and shuffling, so restart 0 is the single fit of ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fogline.models.fprior import lowrank_kl
from fogline.models.likelihoods import observation_dist
from fogline.models.network import forward_layers
from fogline.models.predictive import log_predictive_density, sample_ensemble
from fogline.models.priors import kl_to_prior
from fogline.models.state import PosteriorState

#: Seed offset between restarts (keeps restart seeds apart from ``seed + 1`` uses).
RESTART_STRIDE = 7919
#: Posterior draws of the ELBO estimate.
ELBO_SAMPLES = 64


@dataclass(frozen=True)
class RestartResult:
    """The kept state, its restart index and every restart's score."""

    state: PosteriorState
    best: int
    scores: tuple[float, ...]


def kl_to_prior_of(state: PosteriorState) -> float:
    """KL(q || prior) in nats of ``state`` (closed form, mean-field or low-rank)."""
    loc = state.params["loc"].detach()
    scale = torch.nn.functional.softplus(state.params["scale_unconstrained"].detach())
    if "cov_factor" in state.params:
        v = state.params["cov_factor"].detach()
        return float(lowrank_kl(loc, v, scale, state.prior.loc, state.prior.scale))
    return float(kl_to_prior(loc, scale, state.prior))


def elbo(
    state: PosteriorState,
    x_nd: torch.Tensor,
    y_n: torch.Tensor,
    samples: int = ELBO_SAMPLES,
    seed: int = 0,
) -> float:
    """ELBO of ``state`` on all rows (x [N, D], y [N]) in nats; see the module docstring."""
    ens = sample_ensemble(state, samples, seed)
    with torch.no_grad():
        out = forward_layers(list(ens.layers), x_nd, ens.config.activation)  # [S, N, O]
        if not bool(torch.isfinite(out).all()):
            return float("-inf")  # a diverged fit never wins
        df = torch.tensor(ens.df) if ens.df is not None else None
        lp = observation_dist(out, ens.config, df).log_prob(y_n.to(out.dtype))  # [S, N]
        expected = float(lp.double().mean(0).sum())
    value = expected - kl_to_prior_of(state)
    return value if math.isfinite(value) else float("-inf")


def held_out_lpd(
    state: PosteriorState,
    x_nd: torch.Tensor,
    y_n: torch.Tensor,
    samples: int = ELBO_SAMPLES,
    seed: int = 0,
) -> float:
    """Mean held-out log predictive density (nats per row) of ``state`` on (x [M, D], y [M]).

    (1/M) sum_i log (1/S) sum_s p(y_i | x_i, w_s), w_s ~ q (S seeded draws):
    how well the fitted posterior predicts rows it was not fitted on.
    """
    if not all(bool(torch.isfinite(v).all()) for v in state.params.values()):
        return float("-inf")  # a diverged fit never wins
    ens = sample_ensemble(state, samples, seed)
    with torch.no_grad():
        out = forward_layers(list(ens.layers), x_nd, ens.config.activation)
    if not bool(torch.isfinite(out).all()):
        return float("-inf")
    value = float(log_predictive_density(ens, x_nd, y_n).double().mean())
    return value if math.isfinite(value) else float("-inf")


def best_of(
    fit_one: Callable[[int], PosteriorState],
    score: Callable[[PosteriorState], float],
    restarts: int,
    seed: int,
) -> RestartResult:
    """Fit ``restarts`` times (``fit_one(seed_r)``) and keep the highest ``score``.

    ``score`` is e.g. :func:`elbo` on the training rows or :func:`held_out_lpd`
    on rows the fits did not see.  Ties go to the lower restart index;
    ``restarts = 1`` returns ``fit_one(seed)``.
    """
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    best_state: PosteriorState | None = None
    best, values = 0, []
    for r in range(restarts):
        state = fit_one(seed + r * RESTART_STRIDE)
        value = score(state)
        values.append(value)
        if best_state is None or value > values[best]:
            best_state, best = state, r
    assert best_state is not None
    return RestartResult(best_state, best, tuple(values))


__all__ = [
    "ELBO_SAMPLES",
    "RESTART_STRIDE",
    "RestartResult",
    "best_of",
    "elbo",
    "held_out_lpd",
    "kl_to_prior_of",
]
