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

Where the data are silent (:func:`robust_support`, :meth:`FunctionalPrior.from_data`)
-------------------------------------------------------------------------------------
Min/max edges fail on heavy tails: standardised California AveOccup has its
99.9th percentile at 0.9 sd and its maximum at 57 sd, so a region beyond the
maximum leaves everything in between confident.  The edges come from robust
quantiles of the (standardised) training data instead, per feature j:

    a_j = Q_j(p),  b_j = Q_j(1 - p)                      (p = ``tail``, 0.005)
    s_j = Q_j(0.75) - Q_j(0.25)                          (the IQR; if 0: b_j - a_j; if 0: 1)
    lo_j = a_j - k s_j,  hi_j = b_j + k s_j              (k = ``gap``, 0)

and the out-of-data inputs x~ are training rows with one feature j (drawn
uniformly from ``features``, all D by default) moved beyond an edge:

    x~_j = lo_j - U(0, m s_j)  or  hi_j + U(0, m s_j)    (side at random, m = ``margin``, 3)

so the region is [lo_j - m s_j, lo_j) u (hi_j, hi_j + m s_j], measured in
units of the feature's own spread on both sides.  With the defaults it starts
at the 0.5 % / 99.5 % quantiles: the outermost 0.5 % of rows on each side lie
in it, and there their likelihood outweighs the prior (the in-range bands do
not widen: docs/model.md); on a heavy tail that is where the rows thin out,
far inside the maximum.  States written before this rule carry min/max edges
and an absolute margin (``spread`` absent, s_j = 1) and keep that region
exactly.

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


#: Default tail probability p of the robust edges a_j = Q_j(p), b_j = Q_j(1 - p).
TAIL = 0.005
#: Default gap k: the region starts k spreads beyond a_j / b_j.
GAP = 0.0
#: Default margin m: the region is m spreads deep on each side.
MARGIN = 3.0


@dataclass(frozen=True)
class Support:
    """Robust per-feature summaries of training rows [N, D] (each a [D] tensor).

    ``q_lo`` = Q_j(p), ``q_hi`` = Q_j(1 - p), ``median`` = Q_j(0.5) and
    ``spread`` = s_j, the interquartile range Q_j(0.75) - Q_j(0.25), or
    ``q_hi - q_lo`` where the IQR is 0 (a mostly constant column), or 1 where
    that is 0 too (a constant column).  Q_j is the linear-interpolation
    quantile (numpy's and torch's default): with the column sorted,
    x_(0) <= ... <= x_(N-1), Q(p) = x_(i) + f (x_(i+1) - x_(i)) for
    i + f = p (N - 1).
    """

    q_lo: torch.Tensor
    q_hi: torch.Tensor
    median: torch.Tensor
    spread: torch.Tensor


def robust_support(x_nd: torch.Tensor, tail: float = TAIL) -> Support:
    """The :class:`Support` of rows ``x_nd`` [N, D] with tail probability ``tail`` in (0, 0.25)."""
    if not 0.0 < tail < 0.25:
        raise ValueError(f"tail must lie in (0, 0.25), got {tail}")
    if x_nd.dim() != 2 or x_nd.shape[0] < 2:
        raise ValueError(f"x_nd must be [N, D] with N >= 2 rows, got shape {tuple(x_nd.shape)}")
    x = x_nd.detach().to(torch.float64)
    bad = ~torch.isfinite(x)
    if bad.any():
        row, col = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"x_nd has a non-finite value at row {row}, column {col}")
    q = _quantiles(x, (tail, 0.25, 0.5, 0.75, 1.0 - tail))  # [5, D]
    iqr = q[3] - q[1]
    width = q[4] - q[0]
    spread = torch.where(iqr > 0, iqr, torch.where(width > 0, width, torch.ones_like(iqr)))
    return Support(q[0], q[4], q[2], spread)


def _quantiles(x_nd: torch.Tensor, probs: tuple[float, ...]) -> torch.Tensor:
    """Linear-interpolation quantiles [len(probs), D] of the columns of ``x_nd`` [N, D].

    By sorting, so any N works (``torch.quantile`` refuses inputs over 2^24 values).
    """
    xs = x_nd.sort(dim=0).values
    n = xs.shape[0]
    pos = torch.tensor(probs, dtype=xs.dtype) * (n - 1)
    i = pos.floor().long().clamp(max=n - 2)
    f = (pos - i).unsqueeze(1)
    return xs[i] + f * (xs[i + 1] - xs[i])


@dataclass(frozen=True)
class FunctionalPrior:
    """N(loc, scale^2) on the mean output at inputs beyond the data's robust edges.

    Parameters
    ----------
    weight:
        gamma, the weight of the functional KL per observation.
    scale, loc:
        sigma_0 and mu_0 of the function-space prior.
    lo, hi:
        Inner edges [lo_j, hi_j] of the out-of-data region, every feature (length D).
    features:
        Features whose edges are crossed to make x~; ``None`` (the default) = all D.
    margin:
        m: the region is m s_j deep beyond each edge.
    spread:
        s_j per feature (length D); ``None`` = 1 (absolute margin: states
        written before the robust rule).
    samples:
        S, weight samples used to moment-match q(f(x~)).
    """

    weight: float
    scale: float
    lo: tuple[float, ...]
    hi: tuple[float, ...]
    features: tuple[int, ...] | None = None
    loc: float = 0.0
    margin: float = MARGIN
    samples: int = 8
    spread: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.weight < 0 or self.scale <= 0 or self.margin <= 0 or self.samples < 2:
            raise ValueError(
                "FunctionalPrior needs weight >= 0, scale > 0, margin > 0, samples >= 2"
            )
        d = len(self.lo)
        if len(self.hi) != d or (self.spread is not None and len(self.spread) != d):
            raise ValueError(
                f"FunctionalPrior: lo, hi and spread need one value per feature "
                f"(lo {d}, hi {len(self.hi)}, spread {len(self.spread or self.lo)})"
            )
        if not self.active_features or any(not 0 <= j < d for j in self.active_features):
            raise ValueError(
                f"FunctionalPrior: features {self.features} must be indices in [0, {d})"
            )
        if self.spread is not None and any(not v > 0 for v in self.spread):
            raise ValueError("FunctionalPrior: every spread must be > 0")

    @property
    def active_features(self) -> tuple[int, ...]:
        """The feature indices x~ moves: ``features``, or all D when that is ``None``."""
        return tuple(range(len(self.lo))) if self.features is None else self.features

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored in ``PosteriorState.extra["functional_prior"]``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FunctionalPrior:
        """Inverse of :meth:`to_dict`; also reads dicts written before the robust rule.

        Those carry min/max ``lo``/``hi``, ``features`` and an absolute
        ``margin`` but no ``spread``; they load with ``spread = None`` and
        keep their region exactly.
        """
        features = d.get("features", (0,))
        spread = d.get("spread")
        return cls(
            weight=float(d["weight"]),
            scale=float(d["scale"]),
            lo=tuple(float(v) for v in d["lo"]),
            hi=tuple(float(v) for v in d["hi"]),
            features=None if features is None else tuple(int(j) for j in features),
            loc=float(d.get("loc", 0.0)),
            margin=float(d.get("margin", 3.0)),
            samples=int(d.get("samples", 8)),
            spread=None if spread is None else tuple(float(v) for v in spread),
        )

    @classmethod
    def of(cls, state: PosteriorState) -> FunctionalPrior | None:
        """The functional prior a state carries (``extra["functional_prior"]``), if any."""
        d = state.extra.get(EXTRA_KEY)
        return cls.from_dict(d) if d else None

    @classmethod
    def from_data(
        cls,
        x_nd: torch.Tensor,
        *,
        weight: float,
        scale: float,
        tail: float = TAIL,
        gap: float = GAP,
        margin: float = MARGIN,
        **kwargs: Any,
    ) -> FunctionalPrior:
        """Build with the robust edges of ``x_nd`` [N, D] (see the module docstring).

        lo_j = Q_j(tail) - gap s_j, hi_j = Q_j(1 - tail) + gap s_j, spread = s_j;
        ``kwargs`` are the other fields (``features``, ``loc``, ``samples``).
        """
        if gap < 0:
            raise ValueError(f"gap must be >= 0, got {gap}")
        sup = robust_support(x_nd, tail)
        lo = tuple(float(v) for v in sup.q_lo - gap * sup.spread)
        hi = tuple(float(v) for v in sup.q_hi + gap * sup.spread)
        spread = tuple(float(v) for v in sup.spread)
        return cls(weight=weight, scale=scale, lo=lo, hi=hi, margin=margin, spread=spread, **kwargs)

    def ood_inputs(self, x_nd: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x~ [N, D]: rows of ``x_nd`` with one feature moved beyond its edge (module docstring).

        :meth:`ood_draws` from ``generator`` then :meth:`ood_from_draws`.
        """
        draws = self.ood_draws(x_nd.shape[0], generator, dtype=x_nd.dtype, device=x_nd.device)
        return self.ood_from_draws(x_nd, *draws)

    def ood_draws(
        self,
        n: int,
        generator: torch.Generator,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The random part of :meth:`ood_inputs` for ``n`` rows, in its order of draws.

        (slot [n] int64: index into ``active_features``; dist_u [n] ``dtype``
        and left_u [n] float32, uniform on [0, 1)); ``out`` receives them in
        place (the batched key step draws every key's rows into one tensor).
        """
        k = len(self.active_features)
        if out is None:
            slot = torch.randint(k, (n,), generator=generator, device=device)
            dist_u = torch.rand(n, generator=generator, dtype=dtype, device=device)
            left_u = torch.rand(n, generator=generator, device=device)
            return slot, dist_u, left_u
        torch.randint(k, (n,), generator=generator, out=out[0])
        torch.rand(n, generator=generator, out=out[1])
        torch.rand(n, generator=generator, out=out[2])
        return out

    def ood_from_draws(
        self, x_nd: torch.Tensor, slot: torch.Tensor, dist_u: torch.Tensor, left_u: torch.Tensor
    ) -> torch.Tensor:
        """x~ [N, D] from the draws of :meth:`ood_draws` (row-wise: rows may be of many keys).

        Row i moves feature j_i = active_features[slot_i] to
        lo_j - margin spread_j dist_u_i if left_u_i < 1/2, else hi_j + margin spread_j dist_u_i.
        """
        n, d = x_nd.shape
        if d != len(self.lo):
            raise ValueError(f"FunctionalPrior covers {len(self.lo)} features, rows have {d}")
        dev = x_nd.device
        feats = torch.tensor(self.active_features, device=dev)
        j = feats[slot]
        lo = torch.tensor(self.lo, dtype=x_nd.dtype, device=dev)[j]
        hi = torch.tensor(self.hi, dtype=x_nd.dtype, device=dev)[j]
        dist_ = dist_u * self.margin
        if self.spread is not None:
            dist_ = dist_ * torch.tensor(self.spread, dtype=x_nd.dtype, device=dev)[j]
        left = left_u < 0.5
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
