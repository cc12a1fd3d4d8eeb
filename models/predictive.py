"""Predictive summaries from a cached ensemble of posterior samples.

An :class:`Ensemble` holds S weight samples w_s ~ q(w), already split into
stacked per-layer tensors (W_l [S, out, in], b_l [S, out]), so prediction is
a few batched matrix products.  For inputs x the predictive distribution is
the mixture

    p(y | x, D) ≈ (1/S) sum_s p(y | f_{w_s}(x)).

Moments (law of total variance), for Gaussian / Student-t components with
means mu_s and variances v_s (v_s = sigma_s^2 df/(df-2) for Student-t):

    mean = mean_s mu_s
    epistemic var = var_s mu_s          (spread of the means: what more data fixes)
    aleatoric var = mean_s v_s          (noise the model expects in any case)
    total var = epistemic + aleatoric

Credible intervals are quantiles of the mixture (``method="mixture"``, exact
for the ensemble) or of its moment-matched Gaussian (``method="gaussian"``,
faster).  Mixture quantiles solve F(q) = p by Newton's method

    q_{k+1} = q_k - (F(q_k) - p) / f(q_k),    f = F' = (1/S) sum_s f_s,

started at the moment-matched Gaussian quantile q_0 = mean + z_p sqrt(total
var); it stops when every step is below rtol (1 + |q|) (rtol 1e-5 in float32,
1e-9 in float64), typically after 2-4 iterations; Newton's quadratic
convergence leaves an error far below that last step.  Should it not converge (a multi-modal mixture can send Newton
into a gap between modes), the quantiles are found by bisection on a bracket
that always holds the root: [min_s q_s(p), max_s q_s(p)] for Gaussian
components (F is an average of the F_s, so F(min_s q_s) <= p <= F(max_s q_s)).  For Bernoulli telemetry the
"prediction" is the probability p = mean_s sigmoid(f_s): epistemic var =
var_s p_s, aleatoric var = mean_s p_s (1 - p_s), intervals are quantiles of the
p_s.

The anomaly score of an observed y is 1 - two-sided tail probability,
1 - 2 min(F(y), 1 - F(y)) with F the mixture CDF (Bernoulli: 1 - p(y)).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import scipy.special
import torch

from fogline.models.config import ModelConfig
from fogline.models.likelihoods import df_from_unconstrained
from fogline.models.network import forward_layers, layout, noise_scale, unflatten
from fogline.models.state import PosteriorState

_BISECT_ITERS = 48
#: Cap on Newton iterations before the bisection fallback.
_NEWTON_ITERS = 8
#: sqrt(2 pi): the Gaussian density is exp(-z^2/2) / (sigma sqrt(2 pi)).
_SQRT_2PI = math.sqrt(2 * math.pi)
_SQRT_HALF = math.sqrt(0.5)


@dataclass(frozen=True)
class Ensemble:
    """S posterior weight samples as stacked per-layer tensors."""

    config: ModelConfig
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    df: float | None = None

    @property
    def size(self) -> int:
        """Number of samples S."""
        return int(self.layers[0][0].shape[0])

    def flat(self) -> torch.Tensor:
        """The samples as a flat [S, P] matrix (inverse of the split)."""
        parts = []
        for weight, bias in self.layers:
            parts += [weight.reshape(weight.shape[0], -1), bias]
        return torch.cat(parts, dim=1)


@dataclass(frozen=True)
class Prediction:
    """Per-row predictive summaries (all tensors [N]; intervals map level -> (lo, hi))."""

    mean: torch.Tensor
    total_std: torch.Tensor
    epistemic_std: torch.Tensor
    aleatoric_std: torch.Tensor
    intervals: dict[float, tuple[torch.Tensor, torch.Tensor]]
    tail_prob: torch.Tensor | None = None
    anomaly_score: torch.Tensor | None = None


def sample_weights(state: PosteriorState, num_samples: int, seed: int = 0) -> torch.Tensor:
    """Draw w_s ~ q(w): [S, P], from a generator seeded by ``seed``."""
    gen = torch.Generator(device=state.device).manual_seed(seed)
    loc = state.params["loc"].detach()
    scale = torch.nn.functional.softplus(state.params["scale_unconstrained"].detach())
    eps = torch.randn(num_samples, loc.shape[0], generator=gen, device=state.device)
    w = loc + scale * eps
    if "cov_factor" in state.params:
        v = state.params["cov_factor"].detach()
        z = torch.randn(num_samples, v.shape[1], generator=gen, device=state.device)
        w = w + z @ v.T
    return w


def ensemble_from_weights(
    config: ModelConfig, w_sp: torch.Tensor, df: float | None = None
) -> Ensemble:
    """Wrap flat samples [S, P] as an :class:`Ensemble` (contiguous per-layer copies)."""
    layers = tuple(
        (weight.contiguous(), bias.contiguous()) for weight, bias in unflatten(w_sp, layout(config))
    )
    return Ensemble(config, layers, df)


def sample_ensemble(state: PosteriorState, num_samples: int = 100, seed: int = 0) -> Ensemble:
    """Cache S samples of q as an :class:`Ensemble`."""
    df: float | None = state.config.df
    if state.config.learns_df:
        df = float(df_from_unconstrained(state.params["df_unconstrained"].detach())[0])
    return ensemble_from_weights(state.config, sample_weights(state, num_samples, seed), df)


def component_params(ens: Ensemble, x_nd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample predictive parameters for rows ``x_nd`` [N, D].

    Returns (mu [S, N], sigma [S, N]) for Gaussian/Student-t, and
    (p [S, N], zeros) for Bernoulli.
    """
    out = forward_layers(list(ens.layers), x_nd.to(ens.layers[0][0].dtype), ens.config.activation)
    if ens.config.likelihood == "bernoulli":
        return torch.sigmoid(out[..., 0]), torch.zeros_like(out[..., 0])
    return out[..., 0], noise_scale(out[..., 1], ens.config)


def _component_var(ens: Ensemble, sigma: torch.Tensor) -> torch.Tensor:
    if ens.config.likelihood == "student-t" and ens.df is not None:
        factor = ens.df / (ens.df - 2.0) if ens.df > 2.0 else float("inf")
        return sigma.pow(2) * factor
    return sigma.pow(2)


def predictive_moments(
    ens: Ensemble, x_nd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean [N], epistemic var [N], aleatoric var [N]) of the predictive mixture."""
    mu, sigma = component_params(ens, x_nd)
    mean = mu.mean(0)
    epistemic = mu.var(0, unbiased=False)
    if ens.config.likelihood == "bernoulli":
        aleatoric = (mu * (1 - mu)).mean(0)
    else:
        aleatoric = _component_var(ens, sigma).mean(0)
    return mean, epistemic, aleatoric


def _component_cdf(
    ens: Ensemble, y: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    z = (y - mu) / sigma
    if ens.config.likelihood == "student-t" and ens.df is not None:
        return _t_cdf(z, ens.df)
    return 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))


def _t_cdf(z: torch.Tensor, df: float) -> torch.Tensor:
    """Student-t CDF F_df(z) by ``scipy.special.stdtr`` (Cephes), in ``z``'s dtype and device.

    Cephes evaluates it on the CPU to within a few float ulps (float32 ~2e-7
    absolute); a CUDA tensor makes one round trip to host memory.  (A
    hand-written incomplete-beta continued fraction before it was ~15x slower
    and lost up to 3e-4 to float32 cancellation near df = 30.)
    """
    dtype = z.dtype if z.dtype in (torch.float32, torch.float64) else torch.float64
    zc = z.detach().to("cpu", dtype).numpy()
    out = np.asarray(scipy.special.stdtr(df, zc), dtype=zc.dtype)
    return torch.from_numpy(out).to(device=z.device, dtype=z.dtype)


def mixture_cdf(
    ens: Ensemble, y: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """F(y) = (1/S) sum_s F_s(y) for y [N] (or [K, N]) and components [S, N]."""
    return _component_cdf(ens, y.unsqueeze(-2), mu, sigma).mean(-2)


def _bisect_quantiles(
    ens: Ensemble,
    target: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    iters: int = _BISECT_ITERS,
) -> torch.Tensor:
    """Quantiles [K, N] at probabilities ``target`` [K, 1] by bisection (robust, slow)."""
    if ens.config.likelihood == "gaussian":
        z = torch.special.ndtri(target.clamp(1e-12, 1 - 1e-12)).unsqueeze(-1)  # [K, 1, 1]
        comp = mu + sigma * z  # [K, S, N]: component quantiles bracket the mixture's
        lo = comp.amin(1) - 1e-6 * (1 + comp.abs().amax(1))
        hi = comp.amax(1) + 1e-6 * (1 + comp.abs().amax(1))
    else:
        spread = sigma * 60.0
        lo = (mu - spread).min(0).values.expand(target.shape[0], -1).clone()
        hi = (mu + spread).max(0).values.expand(target.shape[0], -1).clone()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = mixture_cdf(ens, mid, mu, sigma) < target
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def _t_log_norm(df: float) -> float:
    """log of the Student-t density's normalising constant."""
    return math.lgamma(0.5 * (df + 1)) - math.lgamma(0.5 * df) - 0.5 * math.log(df * math.pi)


def mixture_quantiles(
    ens: Ensemble,
    probs: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    *,
    start: torch.Tensor | None = None,
    max_newton: int = _NEWTON_ITERS,
) -> torch.Tensor:
    """Quantiles [K, N] of the mixture at probabilities ``probs`` [K].

    Newton's method from ``start`` [K, N] (default: the moment-matched
    Gaussian quantiles), with bisection as the fallback (see the module
    docstring).  Exact for the ensemble to about 1e-6 relative.
    """
    target = probs.unsqueeze(-1)  # [K, 1]
    student = ens.config.likelihood == "student-t" and ens.df is not None
    if start is None:
        mean = mu.mean(0)
        if student and ens.df is not None and ens.df <= 2.0:
            spread = sigma.pow(2).mean(0).sqrt() + mu.std(0, unbiased=False)
        else:
            spread = (mu.var(0, unbiased=False) + _component_var(ens, sigma).mean(0)).sqrt()
        start = mean + torch.special.ndtri(target) * spread
    inv = sigma.reciprocal()  # [S, N]
    # Stop once every step is within the CDF's rounding noise (float32: ~1e-7 / pdf);
    # a NaN step compares False, so it never counts as converged.
    rtol = 1e-5 if mu.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    y = start
    converged = False
    if student:
        assert ens.df is not None
        df = ens.df
        log_c = _t_log_norm(df)
        for _ in range(max_newton):
            z = (y.unsqueeze(1) - mu) * inv  # [K, S, N]
            cdf = _t_cdf(z, df).mean(1)
            pdf = (torch.exp(log_c - 0.5 * (df + 1) * torch.log1p(z * z / df)) * inv).mean(1)
            delta = (cdf - target) / pdf
            y_prev, y = y, y - delta
            if torch.allclose(y, y_prev, rtol=rtol, atol=rtol):
                converged = True
                break
    else:
        # u = (y - mu) / (sigma sqrt 2):  F(y) = 1/2 + 1/2 mean_s erf(u),
        # f(y) = mean_s exp(-u^2) / (sigma sqrt(2 pi)), so the Newton step is
        # (F - p) / f = (mean erf(u) - (2p - 1)) / mean(exp(-u^2) 2 / (sigma sqrt(2 pi))).
        inv_u = inv * _SQRT_HALF
        neg_m = mu * inv_u
        neg_m.neg_()
        dens = inv * (2.0 / _SQRT_2PI)
        target2 = target * 2.0 - 1.0
        for _ in range(max_newton):
            u = torch.addcmul(neg_m, y.unsqueeze(1), inv_u)  # [K, S, N]
            resid = torch.erf(u).mean(1).sub_(target2)
            delta = resid.div_((u.square_().neg_().exp_() * dens).mean(1))
            y_prev, y = y, y - delta
            # |y - y_prev| <= tol_abs + rtol |y_prev|; False for NaN
            if torch.allclose(y, y_prev, rtol=rtol, atol=rtol):
                converged = True
                break
    if converged:
        return y
    return _bisect_quantiles(ens, target, mu, sigma)


@functools.lru_cache(maxsize=64)
def _level_probs(
    levels: tuple[float, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities [2L] (lower, upper per level) and their standard-normal z [2L, 1]."""
    probs = torch.tensor(
        [p for lv in levels for p in ((1 - lv) / 2, (1 + lv) / 2)], dtype=dtype, device=device
    )
    return probs, torch.special.ndtri(probs).unsqueeze(-1)


def predict(
    ens: Ensemble,
    x_nd: torch.Tensor,
    levels: tuple[float, ...] = (0.95,),
    y: torch.Tensor | None = None,
    method: str = "mixture",
) -> Prediction:
    """Predictive summaries for rows ``x_nd`` [N, D] (see the module docstring).

    ``levels`` are central credible levels in (0, 1); ``y`` [N] optional
    observations for the tail probability / anomaly score.
    """
    for level in levels:
        if not 0.0 < level < 1.0:
            raise ValueError(f"credible level must lie in (0, 1), got {level}")
    if method not in ("mixture", "gaussian"):
        raise ValueError(f"method must be 'mixture' or 'gaussian', got {method!r}")
    with torch.no_grad():
        mu, sigma = component_params(ens, x_nd)
        epistemic, mean = torch.var_mean(mu, dim=0, correction=0)
        bern = ens.config.likelihood == "bernoulli"
        aleatoric = (mu * (1 - mu)).mean(0) if bern else _component_var(ens, sigma).mean(0)
        total = epistemic + aleatoric
        probs, z = _level_probs(tuple(levels), mu.dtype, mu.device)
        total_std = total.sqrt()
        if bern:
            q = torch.quantile(mu, probs, dim=0)
        elif method == "gaussian":
            q = torch.addcmul(mean, z, total_std)
        else:
            heavy = ens.config.likelihood == "student-t" and (ens.df is None or ens.df <= 2.0)
            start = None if heavy else torch.addcmul(mean, z, total_std)
            q = mixture_quantiles(ens, probs, mu, sigma, start=start)
        intervals = {lv: (q[2 * i], q[2 * i + 1]) for i, lv in enumerate(levels)}
        tail = score = None
        if y is not None:
            y = y.to(mu.dtype).reshape(-1)
            if bern:
                py = torch.where(y > 0.5, mu, 1 - mu).mean(0)
                tail = py
            else:
                cdf = mixture_cdf(ens, y, mu, sigma)
                tail = (2 * torch.minimum(cdf, 1 - cdf)).clamp(0, 1)
            score = 1 - tail
    return Prediction(mean, total_std, epistemic.sqrt(), aleatoric.sqrt(), intervals, tail, score)


def log_predictive_density(ens: Ensemble, x_nd: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(y_i | x_i, D) under the mixture, [N] (log-mean-exp over samples)."""
    from fogline.models.likelihoods import observation_dist

    with torch.no_grad():
        out = forward_layers(list(ens.layers), x_nd, ens.config.activation)
        df = (
            torch.tensor(ens.df)
            if ens.config.likelihood == "student-t" and ens.df is not None
            else None
        )
        lp = observation_dist(out, ens.config, df).log_prob(y.to(out.dtype))
        return torch.logsumexp(lp, 0) - torch.log(torch.tensor(float(lp.shape[0])))
