"""The textbook Pyro recipe for the same BNN: a reference, not a production path.

This is the model as the Pyro tutorials write it, used as the baseline the
fast streaming step (:mod:`fogline.models.svi`) is checked and timed against:

* ``PyroModule[nn.Linear]`` layers whose ``weight`` and ``bias`` are
  ``PyroSample`` priors, N(0, 1) on every entry by default (the textbook
  choice), or the entries of a :class:`~fogline.models.state.PriorSpec` so both paths
  share one prior;
* the same architecture as ``ModelConfig(hidden=..., activation=...)``, and
  the same heteroscedastic Gaussian likelihood
  y_i ~ N(mu(x_i), sigma(x_i)^2) with sigma = :func:`fogline.models.network.noise_scale`
  of the second output;
* an ``AutoNormal`` guide (mean-field q(w) = prod_j N(m_j, s_j^2), s_j =
  softplus(u_j)), ``Trace_ELBO`` and ``pyro.optim.Adam``, driven by ``SVI``.

Objective.  With the data plate of size N_t subsampled to the n rows of a
minibatch, ``Trace_ELBO`` returns the one-sample estimate

    loss = -(N_t / n) sum_i log p(y_i | x_i, w) + log q(w) - log p(w),
           w ~ q,

whose expectation is N_t times the per-observation negative ELBO that
:meth:`fogline.models.svi.Program.loss` computes (with beta = 1); the fast path uses
the closed-form KL instead of the Monte Carlo term log q - log p.

Pyro's global parameter store holds the guide's parameters; everything here
runs inside :func:`param_store_scope`, which swaps in an empty store and puts
the caller's back afterwards.  Only benchmarks and tests use this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample
from pyro.optim import Adam  # type: ignore[attr-defined]
from torch import nn

from fogline.models.config import ModelConfig
from fogline.models.network import layout, noise_scale
from fogline.models.state import PriorSpec

_ACT = {"relu": torch.relu, "tanh": torch.tanh, "silu": F.silu, "gelu": F.gelu}


@contextlib.contextmanager
def param_store_scope() -> Iterator[None]:
    """Run a block against an empty Pyro param store; restore the caller's after."""
    store = pyro.get_param_store()
    saved = store.get_state()
    store.clear()
    try:
        yield
    finally:
        store.clear()
        store.set_state(saved)


class TextbookBNN(PyroModule):
    """MLP with ``PyroSample`` priors on every ``nn.Linear`` weight and bias.

    Layer ``l`` is the attribute ``fc{l}``; its sample sites are
    ``fc{l}.weight`` [out, in] and ``fc{l}.bias`` [out].  With ``prior=None``
    every entry has the textbook prior N(0, 1); with a :class:`PriorSpec` the
    entries of the flat layout (:func:`fogline.models.network.layout`) are used.
    Prior tensors (and so every sample) live on ``device``.
    """

    def __init__(
        self,
        config: ModelConfig,
        prior: PriorSpec | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        if config.likelihood != "gaussian":
            raise ValueError("the textbook baseline implements the gaussian likelihood only")
        self.config = config
        lay = layout(config)
        self.num_layers = len(lay.layers)
        for i, layer in enumerate(lay.layers):
            lin: Any = PyroModule[nn.Linear](layer.fan_in, layer.fan_out)  # type: ignore[call-arg, arg-type]
            lin.to(device)
            w_end = layer.b_start
            b_end = layer.b_start + layer.fan_out
            if prior is None:
                w_loc = torch.zeros(layer.fan_out, layer.fan_in)
                w_scale = torch.ones(layer.fan_out, layer.fan_in)
                b_loc = torch.zeros(layer.fan_out)
                b_scale = torch.ones(layer.fan_out)
            else:
                shape = (layer.fan_out, layer.fan_in)
                w_loc = prior.loc[layer.w_start : w_end].reshape(shape).detach().cpu()
                w_scale = prior.scale[layer.w_start : w_end].reshape(shape).detach().cpu()
                b_loc = prior.loc[layer.b_start : b_end].detach().cpu()
                b_scale = prior.scale[layer.b_start : b_end].detach().cpu()
            dev = torch.device(device)
            lin.weight = PyroSample(dist.Normal(w_loc.to(dev), w_scale.to(dev)).to_event(2))
            lin.bias = PyroSample(dist.Normal(b_loc.to(dev), b_scale.to(dev)).to_event(1))
            setattr(self, f"fc{i}", lin)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, data_size: int | None = None
    ) -> torch.Tensor:
        """h_{l+1} = act(W_l h_l + b_l); y_i ~ N(out_i0, noise_scale(out_i1)^2).

        The data plate has size ``data_size`` (default: the rows of ``x``), so
        the log-likelihood of the n rows is scaled by data_size / n.
        """
        act = _ACT[self.config.activation]
        h = x
        for i in range(self.num_layers):
            h = getattr(self, f"fc{i}")(h)
            if i < self.num_layers - 1:
                h = act(h)
        mu = h[..., 0]
        sigma = noise_scale(h[..., 1], self.config)
        n = x.shape[0]
        if data_size is None or data_size == n:
            plate = pyro.plate("data", n)  # the tutorial form (no subsampling)
        else:
            plate = pyro.plate("data", size=data_size, subsample_size=n)
        with plate:
            pyro.sample("obs", dist.Normal(mu, sigma), obs=y)
        return mu


class TextbookSVI:
    """Model, ``AutoNormal`` guide and ``SVI(Trace_ELBO, pyro.optim.Adam)``, as written in the tutorials.

    Use inside :func:`param_store_scope`.  The guide is initialised on a first
    batch (AutoNormal must see ``y`` then, or ``obs`` becomes latent).
    """

    def __init__(
        self,
        config: ModelConfig,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        prior: PriorSpec | None = None,
        lr: float = 5e-3,
        num_particles: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.model = TextbookBNN(config, prior, device)
        self.guide = AutoNormal(self.model)
        self.elbo = Trace_ELBO(num_particles=num_particles)
        self.guide(x, y)  # create the guide's parameters, with obs observed
        self.svi = SVI(self.model, self.guide, Adam({"lr": lr}), self.elbo)

    def step(self, x: torch.Tensor, y: torch.Tensor, data_size: int | None = None) -> float:
        """One ``SVI.step``; returns the loss estimate (negative ELBO, not per observation)."""
        return float(self.svi.step(x, y, data_size))

    def loss(self, x: torch.Tensor, y: torch.Tensor, data_size: int | None = None) -> float:
        """One Monte Carlo estimate of the negative ELBO (``Trace_ELBO.loss``), no update."""
        return float(self.elbo.loss(self.model, self.guide, x, y, data_size))

    def set_flat(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """Load the flat mean-field parameters of :mod:`fogline.models.svi` into the guide.

        ``loc`` [P] and ``scale`` [P] (the constrained s = softplus(u)) follow
        :func:`fogline.models.network.layout`; AutoNormal keeps s under the same
        softplus constraint, so both paths then describe the same q.
        """
        lay = layout(self.config)
        with torch.no_grad():
            for i, layer in enumerate(lay.layers):
                shape = (layer.fan_out, layer.fan_in)
                b_end = layer.b_start + layer.fan_out
                parts = {
                    f"fc{i}.weight": (
                        loc[layer.w_start : layer.b_start].reshape(shape),
                        scale[layer.w_start : layer.b_start].reshape(shape),
                    ),
                    f"fc{i}.bias": (loc[layer.b_start : b_end], scale[layer.b_start : b_end]),
                }
                for site, (m, s) in parts.items():
                    store = pyro.get_param_store()
                    locs: Any = store[f"AutoNormal.locs.{site}"]
                    scales: Any = store[f"AutoNormal.scales.{site}"]
                    locs.unconstrained().data.copy_(m)
                    scales.unconstrained().data.copy_(_inverse_softplus(s.detach()))

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The guide's (loc [P], scale [P]) in the flat layout (inverse of :meth:`set_flat`)."""
        lay = layout(self.config)
        loc = torch.empty(lay.size)
        scale = torch.empty(lay.size)
        with torch.no_grad():
            for i, layer in enumerate(lay.layers):
                b_end = layer.b_start + layer.fan_out
                for site, start, end in (
                    (f"fc{i}.weight", layer.w_start, layer.b_start),
                    (f"fc{i}.bias", layer.b_start, b_end),
                ):
                    loc[start:end] = pyro.param(f"AutoNormal.locs.{site}").reshape(-1)
                    scale[start:end] = pyro.param(f"AutoNormal.scales.{site}").reshape(-1)
        return loc, scale


def _inverse_softplus(s: torch.Tensor) -> torch.Tensor:
    """u with softplus(u) = s (s > 0): u = s + log(-expm1(-s))."""
    return s + torch.log(-torch.expm1(-s))
