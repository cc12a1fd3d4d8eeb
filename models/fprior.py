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

The step here has the state layout of :func:`fogline.models.svi.step` (same packed
parameters, same Adam moments).  The warm start stores the prior in the
state (``extra["functional_prior"]``), and the daemon keeps applying it while
streaming (:func:`streaming_step` via :func:`fogline.models.stream.stream_step`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.adam import adam as _functional_adam

from fogline.models.likelihoods import df_from_unconstrained, observation_dist
from fogline.models.network import forward
from fogline.models.priors import kl_to_prior
from fogline.models.state import Minibatch, PosteriorState, StepInfo
from fogline.models.svi import ADAM_BETAS, ADAM_EPS, check_step_args, param_names

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
    m = mean_sn.mean(0)
    v = mean_sn.var(0) + 1e-8
    s0 = prior.scale
    return (
        math.log(s0) - 0.5 * v.log() + (v + (m - prior.loc).pow(2)) / (2 * s0 * s0) - 0.5
    ).mean()


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


def _unpack(
    theta: torch.Tensor, state: PosteriorState, names: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    pos = 0
    for k in names:
        n = state.params[k].numel()
        out[k] = theta[pos : pos + n].reshape(state.params[k].shape)
        pos += n
    return out


def objective(
    theta: torch.Tensor,
    state: PosteriorState,
    batch: Minibatch,
    data_size: float,
    fprior: FunctionalPrior | None,
    generator: torch.Generator,
    particles: int = 1,
    likelihood_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, nll, kl) of the module docstring for packed parameters ``theta``.

    ``likelihood_weight`` beta multiplies the data term (generalised Bayes, as
    in :func:`fogline.models.svi.step`); ``nll`` is returned unweighted.

    The expected log-likelihood is estimated with ``particles`` reparameterised
    samples (1, as in :mod:`fogline.models.svi`, by default; more lower the gradient
    variance, which the low-rank guide needs); ``fprior.samples`` samples (the
    first ones shared) serve the functional term.
    """
    cfg = state.config
    names = param_names(cfg)
    p = _unpack(theta, state, names)
    scale = F.softplus(p["scale_unconstrained"])
    if particles < 1:
        raise ValueError("particles must be >= 1")
    use_f = fprior is not None and fprior.weight > 0
    s = max(particles, fprior.samples if fprior is not None and use_f else 1)
    num_w = p["loc"].shape[0]
    eps = torch.randn(s, num_w, generator=generator, dtype=theta.dtype, device=theta.device)
    w = p["loc"] + scale * eps
    if "cov_factor" in p:
        z = torch.randn(
            s, p["cov_factor"].shape[1], generator=generator, dtype=theta.dtype, device=theta.device
        )
        w = w + z @ p["cov_factor"].T
        kl = lowrank_kl(p["loc"], p["cov_factor"], scale, state.prior.loc, state.prior.scale)
    else:
        kl = kl_to_prior(p["loc"], scale, state.prior)
    df = df_from_unconstrained(p["df_unconstrained"]) if cfg.learns_df else None
    if not use_f:
        out = forward(w[:particles], batch.x, cfg)  # [particles, n, O]
        nll = -observation_dist(out, cfg, df).log_prob(batch.y).mean()
        return likelihood_weight * nll + kl / data_size, nll, kl
    assert fprior is not None
    x_ood = fprior.ood_inputs(batch.x, generator)
    out_ood = forward(w[: fprior.samples], x_ood, cfg)  # [S, n, O]
    out = forward(w[:particles], batch.x, cfg)  # [particles, n, O]
    nll = -observation_dist(out, cfg, df).log_prob(batch.y).mean()
    fkl = functional_kl(out_ood[..., 0], fprior)
    return likelihood_weight * nll + kl / data_size + fprior.weight * fkl, nll, kl


def step(
    state: PosteriorState,
    batch: Minibatch,
    *,
    data_size: int,
    fprior: FunctionalPrior | None,
    generator: torch.Generator,
    particles: int = 1,
    cov_factor_lr_scale: float = 1.0,
    likelihood_weight: float = 1.0,
) -> tuple[PosteriorState, StepInfo]:
    """One Adam step on :func:`objective`; same state layout and guard as ``models.svi.step``.

    ``particles`` samples estimate the expected log-likelihood.  The low-rank
    factor V moves by ``cov_factor_lr_scale`` times its Adam step (a per-group
    learning rate lr_V = lr * scale): Adam moves every entry by ~lr at once, so
    at lr 0.005 a column's norm grows by ~0.2 per step and one draw z of the
    guide then perturbs all weights coherently (measured: the data NLL reached
    2e5 after four steps on the recipe).

    A non-finite loss or parameter returns ``state`` unchanged with ``rejected=True``.
    """
    names = param_names(state.config)
    theta = torch.cat([state.params[k].reshape(-1) for k in names]).detach().clone()
    theta.requires_grad_(True)
    x = batch.x.to(theta.device, torch.float32)
    y = batch.y.to(theta.device, torch.float32)
    try:
        loss, nll, kl = objective(
            theta,
            state,
            Minibatch(x, y),
            float(data_size),
            fprior,
            generator,
            particles,
            likelihood_weight,
        )
        (grad,) = torch.autograd.grad(loss, theta)
    except ValueError:  # distribution argument validation: a non-finite value
        nan = float("nan")
        return state, StepInfo(nan, nan, nan, nan, batch.rows, 1, rejected=True)
    exp_avg = state.opt_state["exp_avg"].clone()
    exp_avg_sq = state.opt_state["exp_avg_sq"].clone()
    opt_step = state.opt_state["step"].clone()
    theta = theta.detach()
    before = theta.clone() if "cov_factor" in names and cov_factor_lr_scale != 1.0 else None
    with torch.no_grad():
        _functional_adam(
            [theta],
            [grad],
            [exp_avg],
            [exp_avg_sq],
            [],
            [opt_step],
            amsgrad=False,
            beta1=ADAM_BETAS[0],
            beta2=ADAM_BETAS[1],
            lr=state.lr,
            weight_decay=0.0,
            eps=ADAM_EPS,
            maximize=False,
        )
        if before is not None:
            # Adam moves every entry of V by ~lr at once (coherently along a column),
            # so the low-rank factor gets its own, smaller step: lr * cov_factor_lr_scale.
            start = state.params["loc"].numel() + state.params["scale_unconstrained"].numel()
            sl = slice(start, start + state.params["cov_factor"].numel())
            theta[sl] = before[sl] + cov_factor_lr_scale * (theta[sl] - before[sl])
    loss_f = float(loss.detach())
    info = StepInfo(
        loss_f, float(nll.detach()), float(kl.detach()), float(grad.norm()), batch.rows, 1
    )
    if not (math.isfinite(loss_f) and bool(torch.isfinite(theta).all())):
        return state, StepInfo(info.loss, info.nll, info.kl, info.grad_norm, info.rows, 1, True)
    new = state.replace(
        params=_unpack(theta, state, names),
        opt_state={"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "step": opt_step},
        step_count=state.step_count + 1,
        records_absorbed=state.records_absorbed + batch.rows,
    )
    return new, info


def streaming_step(
    state: PosteriorState,
    batch: Minibatch,
    *,
    fprior: FunctionalPrior | None,
    num_steps: int = 1,
    data_size: int | None = None,
    likelihood_weight: float = 1.0,
    cov_factor_lr_scale: float = 1.0,
) -> tuple[PosteriorState, StepInfo]:
    """``num_steps`` of :func:`step` with the randomness drawn from ``state.rng_state``.

    ``fprior=None`` runs the plain ELBO (useful for a low-rank state's
    ``cov_factor_lr_scale``, which :func:`fogline.models.svi.step` does not have).

    The same contract as :func:`fogline.models.svi.step` (pure, ``step_count`` +
    ``num_steps``, ``records_absorbed`` + rows, a non-finite step returns
    ``state`` with ``rejected=True``): the generator is restored from the
    state's RNG state and its new state is written back, so a restarted
    process reproduces the update bit for bit.
    """
    check_step_args(batch, num_steps, likelihood_weight)
    gen = torch.Generator(device=state.device)
    gen.set_state(state.rng_state)
    n_data = data_size if data_size is not None else batch.rows
    cur = state
    info = StepInfo(math.nan, math.nan, math.nan, math.nan, batch.rows, 0)
    for _ in range(num_steps):
        cur, info = step(
            cur,
            batch,
            data_size=n_data,
            fprior=fprior,
            generator=gen,
            likelihood_weight=likelihood_weight,
            cov_factor_lr_scale=cov_factor_lr_scale,
        )
        if info.rejected:
            return state, StepInfo(
                info.loss, info.nll, info.kl, info.grad_norm, batch.rows, num_steps, True
            )
    new = cur.replace(
        rng_state=gen.get_state(), records_absorbed=state.records_absorbed + batch.rows
    )
    return new, StepInfo(info.loss, info.nll, info.kl, info.grad_norm, batch.rows, num_steps)
