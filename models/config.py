"""Model configuration: the frozen description of a fogline BNN.

Everything that determines the *shape* of the inference problem lives here:
the MLP architecture, the likelihood, the variational family and the default
prior.  It is stored (as JSON) in every snapshot, so a snapshot can be loaded
without any other file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Activation = Literal["relu", "tanh", "silu", "gelu"]
LikelihoodName = Literal["gaussian", "student-t", "bernoulli"]
GuideName = Literal["meanfield", "lowrank"]
PriorName = Literal["fan_in", "standard"]
NoiseHead = Literal["exp", "softplus", "bounded"]


class ModelConfig(BaseModel):
    """Architecture, likelihood, variational family and prior of a BNN.

    Parameters
    ----------
    in_features:
        Number of input features ``D``.
    hidden:
        Widths of the hidden layers, e.g. ``(32, 32)``.
    activation:
        Hidden-layer non-linearity.
    likelihood:
        ``gaussian``: heteroscedastic N(mu(x), sigma(x)^2), the net outputs mean
        and a raw scale.  ``student-t``: location-scale Student-t with degrees of
        freedom ``df`` (fixed when given, else learned as a point estimate).
        ``bernoulli``: binary telemetry, the net outputs one logit.
    guide:
        ``meanfield``: q(w) = N(m, diag(s^2)).  ``lowrank``:
        q(w) = N(m, V V^T + diag(s^2)) with ``V`` of shape ``[P, rank]``.
    prior:
        ``fan_in`` (default): w_ij ~ N(0, (prior_scale / sqrt(fan_in))^2), biases
        N(0, prior_scale^2).  ``standard``: the textbook N(0, 1) on every weight
        (kept reachable to show why it under-fits).
    init_scale:
        Initial posterior standard deviation of every weight.  A small value
        (1e-3) lets the mean fit the data before the variance grows; the
        textbook default (~0.1 for AutoNormal) collapses the fit.
    noise_head:
        Map from the raw second output r to the noise scale sigma:
        ``exp``: sigma = exp(r); ``softplus``: sigma = softplus(r) + noise_min;
        ``bounded``: sigma = noise_min + (noise_max - noise_min) * sigmoid(r),
        which cannot blow up when the head extrapolates.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    in_features: int = Field(default=8, ge=1)
    hidden: tuple[int, ...] = (32, 32)
    activation: Activation = "relu"
    likelihood: LikelihoodName = "gaussian"
    guide: GuideName = "meanfield"
    rank: int = Field(default=10, ge=1)
    prior: PriorName = "fan_in"
    prior_scale: float = Field(default=1.0, gt=0)
    init_scale: float = Field(default=1e-3, gt=0)
    noise_head: NoiseHead = "softplus"
    noise_min: float = Field(default=1e-3, ge=0)
    noise_max: float = Field(default=10.0, gt=0)
    df: float | None = Field(default=None, gt=0)
    feature_names: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if any(h < 1 for h in self.hidden):
            raise ValueError("hidden: every width must be >= 1")
        if self.feature_names is not None and len(self.feature_names) != self.in_features:
            raise ValueError(
                f"feature_names: {len(self.feature_names)} names for in_features={self.in_features}"
            )
        if self.noise_head == "bounded" and self.noise_max <= self.noise_min:
            raise ValueError("noise_max: must exceed noise_min")
        return self

    @property
    def out_features(self) -> int:
        """Outputs of the net: 2 (mean, raw scale) or 1 (Bernoulli logit)."""
        return 1 if self.likelihood == "bernoulli" else 2

    @property
    def learns_df(self) -> bool:
        """Whether a Student-t degrees-of-freedom point estimate is learned."""
        return self.likelihood == "student-t" and self.df is None

    def features(self) -> tuple[str, ...]:
        """Feature names, defaulting to ``x0 .. x{D-1}``."""
        return self.feature_names or tuple(f"x{i}" for i in range(self.in_features))
