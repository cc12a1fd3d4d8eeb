"""A functional (noise-contrastive) prior: epistemic uncertainty away from the data.

Why
---
With a weight-space prior alone, a mean-field posterior of a ReLU net is
confident far from the data: the posterior mean keeps the slope it had at the
edge of the data (measured: f(x0=-5) = 8.4 where the truth is -0.65) and its
epistemic standard deviation there stays ~0.3, a few % of the predictive
variance.  Wider weight priors, smaller or larger initial scales, low-rank
covariance and independent restarts do not change this (see docs/model.md).

What
----
Following Hafner et al. (2019), *Noise Contrastive Priors for Functional
Uncertainty*, the warm start adds a data prior in *function space* at inputs
x~ outside the observed range: there, the predictive mean f_w(x~) should look
like a draw from N(mu_0, sigma_0^2).  With q(f(x~)) the distribution of the
mean output under w ~ q, moment-matched to N(m(x~), v(x~)) from S
reparameterised samples, the objective per observation becomes

    L(lambda) = -(1/n) sum_i E_q log p(y_i | x_i, w) + KL(q || p(w)) / N
                + gamma * mean_j KL( N(m(x~_j), v(x~_j)) || N(mu_0, sigma_0^2) ),

    KL(N(m, v) || N(mu_0, s0^2)) = log(s0 / sqrt(v)) + (v + (m - mu_0)^2) / (2 s0^2) - 1/2.

This (mode-seeking) direction rewards epistemic variance up to sigma_0^2 and
pulls the mean gently towards mu_0 *only where the data are silent*; inside
the data the likelihood term dominates.  gamma = 0 is exactly the ELBO of
:mod:`fogline.models.svi`.

Out-of-data inputs x~ are training rows with one feature j (drawn from
``features``) replaced by a value beyond its observed range [lo_j, hi_j]:
lo_j - U(0, margin) or hi_j + U(0, margin), side chosen at random.

The term is one optional term of the single objective of
:func:`fogline.models.svi.step` (``functional_prior=``); this module holds the
prior's description, its KL and the one low-rank weight-space KL both the
objective and the diagnostics use (:func:`lowrank_kl`).  The warm start
stores the prior in the state (``extra["functional_prior"]``), and the daemon
keeps applying it while streaming (:func:`fogline.models.stream.stream_step`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from fogline.models.state import PosteriorState

#: Where a state carries its functional prior (set by the warm start).
EXTRA_KEY = "functional_prior"
#: Where a low-rank state carries its factor's step scale (set by the warm start).
LR_SCALE_KEY = "cov_factor_lr_scale"


@dataclass(frozen=True)
class FunctionalPrior:
    """N(loc, scale^2) on the mean output at inputs beyond the observed range.

    Parameters
    ----------
    weight:
        gamma, the weight of the functional KL per observation.
    scale, loc:
        sigma_0 and mu_0 of the function-space prior.
    lo, hi:
        Observed range [lo_j, hi_j] of every feature (length D).
    features:
        Features whose range is extended to make x~.
    margin:
        How far beyond the observed range x~ may fall.
    samples:
        S, weight samples used to moment-match q(f(x~)).
    """

    weight: float
    scale: float
    lo: tuple[float, ...]
    hi: tuple[float, ...]
    features: tuple[int, ...] = (0,)
    loc: float = 0.0
    margin: float = 3.0
    samples: int = 8

    def __post_init__(self) -> None:
        if self.weight < 0 or self.scale <= 0 or self.margin <= 0 or self.samples < 2:
            raise ValueError(
                "FunctionalPrior needs weight >= 0, scale > 0, margin > 0, samples >= 2"
            )
        if len(self.lo) != len(self.hi) or any(j >= len(self.lo) for j in self.features):
            raise ValueError("FunctionalPrior: lo/hi must cover every feature in `features`")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored in ``PosteriorState.extra["functional_prior"]``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FunctionalPrior:
        """Inverse of :meth:`to_dict`."""
        return cls(
            weight=float(d["weight"]),
            scale=float(d["scale"]),
            lo=tuple(float(v) for v in d["lo"]),
            hi=tuple(float(v) for v in d["hi"]),
            features=tuple(int(j) for j in d.get("features", (0,))),
            loc=float(d.get("loc", 0.0)),
            margin=float(d.get("margin", 3.0)),
            samples=int(d.get("samples", 8)),
        )

    @classmethod
    def of(cls, state: PosteriorState) -> FunctionalPrior | None:
        """The functional prior a state carries (``extra["functional_prior"]``), if any."""
        d = state.extra.get(EXTRA_KEY)
        return cls.from_dict(d) if d else None

    @classmethod
    def from_data(
        cls, x_nd: torch.Tensor, *, weight: float, scale: float, **kwargs: object
    ) -> FunctionalPrior:
        """Build with the observed range of ``x_nd`` [N, D]."""
        lo = tuple(float(v) for v in x_nd.min(0).values)
        hi = tuple(float(v) for v in x_nd.max(0).values)
        return cls(weight=weight, scale=scale, lo=lo, hi=hi, **kwargs)  # type: ignore[arg-type]

    def ood_inputs(self, x_nd: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x~ [N, D]: rows of ``x_nd`` with one feature moved beyond the observed range."""
        n = x_nd.shape[0]
        dev = x_nd.device
        feats = torch.tensor(self.features, device=dev)
        j = feats[torch.randint(len(self.features), (n,), generator=generator, device=dev)]
        lo = torch.tensor(self.lo, dtype=x_nd.dtype, device=dev)[j]
        hi = torch.tensor(self.hi, dtype=x_nd.dtype, device=dev)[j]
        dist_ = torch.rand(n, generator=generator, dtype=x_nd.dtype, device=dev) * self.margin
        left = torch.rand(n, generator=generator, device=dev) < 0.5
        value = torch.where(left, lo - dist_, hi + dist_)
        out = x_nd.clone()
        out[torch.arange(n, device=dev), j] = value
        return out


def functional_kl(mean_sn: torch.Tensor, prior: FunctionalPrior) -> torch.Tensor:
    """mean_j KL(N(m_j, v_j) || N(mu_0, sigma_0^2)) for mean outputs ``mean_sn`` [S, N]."""
    loc = torch.tensor(prior.loc, dtype=mean_sn.dtype, device=mean_sn.device)
    scale = torch.tensor(prior.scale, dtype=mean_sn.dtype, device=mean_sn.device)
    return functional_kl_tensor(mean_sn, loc, scale)


def functional_kl_tensor(
    mean_sn: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """:func:`functional_kl` with mu_0 = ``loc`` and sigma_0 = ``scale`` as 0-d tensors.

    m_j and v_j are the sample mean and (unbiased) variance over the S rows,
    v_j + 1e-8 to keep log v finite.  Every constant is a tensor argument, so
    ``torch.jit.trace`` of a caller serves any prior (no Python float is
    frozen into the graph).
    """
    m = mean_sn.mean(0)
    v = mean_sn.var(0) + 1e-8
    return (scale.log() - 0.5 * v.log() + (v + (m - loc).pow(2)) / (2 * scale * scale) - 0.5).mean()


def lowrank_kl(
    loc: torch.Tensor,
    cov_factor: torch.Tensor,
    scale: torch.Tensor,
    prior_loc: torch.Tensor,
    prior_scale: torch.Tensor,
) -> torch.Tensor:
    """KL(N(m, V V^T + diag(s^2)) || N(m0, diag(s0^2))), computed in float64.

    = 1/2 [ sum_i (s_i^2 + sum_r V_ir^2) / s0_i^2 + sum_i (m_i - m0_i)^2 / s0_i^2 - P
            + sum_i log s0_i^2 - sum_i log s_i^2 - log det(I_R + V^T diag(s^-2) V) ]

    The capacitance I_R + V^T D^-1 V has entries ~|V|^2 / s^2, about 1e5 at the
    recommended initial scale 1e-3; in float32 its log-determinant (and its
    gradient) loses the digits that hold the guide stable, so this is done in
    float64 (R x R, cheap) with a Cholesky factor.
    """
    m, v, sd = loc.double(), cov_factor.double(), scale.double()
    m0, s0 = prior_loc.double(), prior_scale.double()
    s02 = s0.pow(2)
    d = sd.pow(2)
    trace = ((d + v.pow(2).sum(-1)) / s02).sum()
    maha = ((m - m0).pow(2) / s02).sum()
    cap = torch.eye(v.shape[1], dtype=v.dtype, device=v.device) + (v.T / d) @ v
    logdet_cap = 2.0 * torch.linalg.cholesky(cap).diagonal().log().sum()
    kl = 0.5 * (trace + maha - m.shape[0] + s02.log().sum() - d.log().sum() - logdet_cap)
    return kl.to(loc.dtype)
