"""Observation models: the distribution of y given the net's raw outputs.

``out`` has shape [..., O] where O = 2 (mean, raw scale) or 1 (logit).

* gaussian:  y ~ N(mu, sigma^2), mu = out[..., 0], sigma = head(out[..., 1])
* student-t: y ~ mu + sigma * T_df (df fixed or learned)
* bernoulli: y ~ Bernoulli(sigmoid(out[..., 0]))
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import TorchDistribution

from fogline.models.config import ModelConfig
from fogline.models.network import noise_scale

#: Student-t degrees of freedom are kept > 1 so the mean exists: df = 1 + softplus(r).
DF_OFFSET = 1.0


def df_from_unconstrained(raw: torch.Tensor) -> torch.Tensor:
    """Map the unconstrained df parameter to df > 1."""
    return DF_OFFSET + F.softplus(raw)


def df_to_unconstrained(df: float) -> torch.Tensor:
    """Inverse of :func:`df_from_unconstrained` (for initialisation)."""
    v = torch.tensor([df - DF_OFFSET])
    return v + torch.log(-torch.expm1(-v))


def observation_dist(
    out: torch.Tensor, config: ModelConfig, df: torch.Tensor | None = None
) -> TorchDistribution:
    """The distribution of y for raw outputs ``out`` [..., O] (batch shape [...])."""
    if config.likelihood == "bernoulli":
        return dist.Bernoulli(logits=out[..., 0])
    loc = out[..., 0]
    scale = noise_scale(out[..., 1], config)
    if config.likelihood == "student-t":
        if df is None:
            if config.df is None:
                raise ValueError("student-t with learned df needs the df parameter")
            df = torch.tensor(config.df, dtype=loc.dtype, device=loc.device)
        return dist.StudentT(df, loc, scale)
    return dist.Normal(loc, scale)
