"""Prior specifications over the flat weight vector.

The default prior is *fan-in aware*: w_ij ~ N(0, (c / sqrt(fan_in))^2) for
weight-matrix entries and b_j ~ N(0, c^2) for biases, with c =
``config.prior_scale``.  With the textbook N(0, 1) on every weight, a 2x32 MLP
has pre-activations of variance ~32 at initialisation under the prior, and the
KL term then pushes the variational mean to a near-constant function (measured
rmse 0.7 on sin(3x)); the fan-in prior keeps the prior function scale O(1).
"""

from __future__ import annotations

import math

import torch

from fogline.models.config import ModelConfig
from fogline.models.network import layout
from fogline.models.state import PosteriorState, PriorSpec


def default_prior(config: ModelConfig, device: torch.device | str = "cpu") -> PriorSpec:
    """The prior named by ``config.prior`` (``fan_in`` or ``standard``)."""
    lay = layout(config)
    if config.prior == "standard":
        scale = torch.full((lay.size,), config.prior_scale)
    else:
        mask = lay.weight_mask()
        scale = torch.where(
            mask,
            config.prior_scale / lay.fan_in().sqrt(),
            torch.full((lay.size,), config.prior_scale),
        )
    return PriorSpec(torch.zeros(lay.size, device=device), scale.to(device))


def centred_prior(weights: torch.Tensor, scale: float | torch.Tensor) -> PriorSpec:
    """N(weights, scale^2): a prior centred on known weights (e.g. a trained net)."""
    w = weights.detach().reshape(-1).float()
    s = torch.as_tensor(scale, dtype=w.dtype, device=w.device).expand_as(w).clone()
    return PriorSpec(w.clone(), s)


def posterior_as_prior(state: PosteriorState) -> PriorSpec:
    """The mean-field marginals of q as the next prior (streaming VB).

    p_{t+1}(w) = N(m_t, diag(sigma_t^2)) where sigma_t includes the low-rank
    part's marginal variance; correlations of a low-rank q are dropped.
    """
    return PriorSpec(state.params["loc"].detach().clone(), state.posterior_scale().detach().clone())


def widen(prior: PriorSpec, factor: float) -> PriorSpec:
    """Scale every prior standard deviation by ``factor`` (> 0)."""
    if not factor > 0 or not math.isfinite(factor):
        raise ValueError(f"widen factor must be a positive finite number, got {factor}")
    return PriorSpec(prior.loc.clone(), prior.scale * factor)


def kl_to_prior(loc: torch.Tensor, scale: torch.Tensor, prior: PriorSpec) -> torch.Tensor:
    """KL(N(loc, diag scale^2) || prior) in closed form (sum over P).

    KL = sum_i log(s0_i / s_i) + (s_i^2 + (m_i - m0_i)^2) / (2 s0_i^2) - 1/2.
    """
    var_ratio = (scale / prior.scale).pow(2)
    t = ((loc - prior.loc) / prior.scale).pow(2)
    return 0.5 * (var_ratio + t - 1.0 - var_ratio.log()).sum()
