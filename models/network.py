"""The MLP as a function of a *flat* weight vector.

All weights and biases of the net live in one vector ``w`` of length ``P``
(one Pyro sample site), laid out layer by layer as ``[W_1 (out x in), b_1,
W_2, b_2, ...]``.  :func:`forward` evaluates ``S`` weight samples at once with
batched matrix products (``torch.baddbmm``), so the same code serves training
(S = 1) and the cached predictive ensemble (S = 100).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from fogline.models.config import ModelConfig

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "silu": F.silu,
    "gelu": F.gelu,
}


@dataclass(frozen=True)
class Layer:
    """Position of one linear layer inside the flat vector."""

    fan_in: int
    fan_out: int
    w_start: int  # W occupies [w_start, w_start + fan_out * fan_in)
    b_start: int  # b occupies [b_start, b_start + fan_out)


@dataclass(frozen=True)
class Layout:
    """Where every layer's weights sit in the flat vector of length ``size``."""

    layers: tuple[Layer, ...]
    size: int

    def weight_mask(self) -> torch.Tensor:
        """Boolean mask [P]: True for weight-matrix entries, False for biases."""
        mask = torch.zeros(self.size, dtype=torch.bool)
        for layer in self.layers:
            mask[layer.w_start : layer.w_start + layer.fan_in * layer.fan_out] = True
        return mask

    def fan_in(self) -> torch.Tensor:
        """Fan-in of the layer owning each entry [P] (float)."""
        out = torch.empty(self.size)
        for layer in self.layers:
            out[layer.w_start : layer.b_start + layer.fan_out] = float(layer.fan_in)
        return out


@cache
def layout_of(in_features: int, hidden: tuple[int, ...], out_features: int) -> Layout:
    """Layout of an MLP ``in_features -> hidden... -> out_features``."""
    widths = (in_features, *hidden, out_features)
    layers = []
    pos = 0
    for fan_in, fan_out in itertools.pairwise(widths):
        layers.append(Layer(fan_in, fan_out, pos, pos + fan_in * fan_out))
        pos += fan_in * fan_out + fan_out
    return Layout(tuple(layers), pos)


def layout(config: ModelConfig) -> Layout:
    """Layout of the net described by ``config``."""
    return layout_of(config.in_features, tuple(config.hidden), config.out_features)


def unflatten(w_sp: torch.Tensor, lay: Layout) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split flat samples [S, P] into per-layer (W [S, out, in], b [S, out])."""
    s = w_sp.shape[0]
    out = []
    for layer in lay.layers:
        weight = w_sp[:, layer.w_start : layer.b_start].reshape(s, layer.fan_out, layer.fan_in)
        bias = w_sp[:, layer.b_start : layer.b_start + layer.fan_out]
        out.append((weight, bias))
    return out


def forward_layers(
    params: list[tuple[torch.Tensor, torch.Tensor]], x_nd: torch.Tensor, activation: str
) -> torch.Tensor:
    """Evaluate the MLP for S weight samples: returns raw outputs [S, N, O].

    ``x_nd`` may be [N, D] (shared by all samples) or [S, N, D].
    h_{l+1} = act(h_l W_l^T + b_l), no activation after the last layer.
    """
    act = _ACTIVATIONS[activation]
    s = params[0][0].shape[0]
    # expand(S, -1, -1) rather than a literal shape keeps a JIT trace generic in N
    h = x_nd.expand(s, -1, -1) if x_nd.dim() == 2 else x_nd
    last = len(params) - 1
    for i, (weight, bias) in enumerate(params):
        h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
        if i < last:
            h = act(h)
    return h


def forward(w_sp: torch.Tensor, x_nd: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Raw net outputs [S, N, O] for flat weight samples ``w_sp`` [S, P]."""
    return forward_layers(unflatten(w_sp, layout(config)), x_nd, config.activation)


def noise_scale(raw: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Map the raw scale output r to sigma > 0 (see ``ModelConfig.noise_head``).

    exp: sigma = exp(r) + noise_min (unbounded, explodes when r extrapolates);
    softplus: sigma = softplus(r) + noise_min (grows linearly in r);
    bounded: sigma = noise_min + (noise_max - noise_min) sigmoid(r), so sigma
    stays in (noise_min, noise_max) however far the net extrapolates.
    """
    if config.noise_head == "exp":
        return torch.exp(raw) + config.noise_min
    if config.noise_head == "softplus":
        return F.softplus(raw) + config.noise_min
    return config.noise_min + (config.noise_max - config.noise_min) * torch.sigmoid(raw)


def inverse_noise_scale(sigma: float, config: ModelConfig) -> float:
    """The raw output r with ``noise_scale(r) == sigma`` (for initialising a noise head)."""
    lo = config.noise_min
    if not sigma > lo:
        raise ValueError(f"noise {sigma} must exceed noise_min {lo}")
    if config.noise_head == "exp":
        return math.log(sigma - lo)
    if config.noise_head == "softplus":
        return math.log(math.expm1(sigma - lo))
    if not sigma < config.noise_max:
        raise ValueError(f"noise {sigma} must be below noise_max {config.noise_max}")
    u = (sigma - lo) / (config.noise_max - lo)
    return math.log(u / (1.0 - u))


def flatten_sequential(module: torch.nn.Module) -> tuple[torch.Tensor, tuple[int, ...], int, str]:
    """Flatten an ``nn.Sequential`` of ``nn.Linear`` (+ activations) into our layout.

    Returns ``(w [P], hidden, out_features, activation)``.  Raises
    ``ValueError`` for anything but Linear layers with one activation type.
    """
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("the module has no nn.Linear layer")
    acts = {
        type(m).__name__
        for m in module.modules()
        if isinstance(m, torch.nn.ReLU | torch.nn.Tanh | torch.nn.SiLU | torch.nn.GELU)
    }
    names = {"ReLU": "relu", "Tanh": "tanh", "SiLU": "silu", "GELU": "gelu"}
    if len(acts) > 1:
        raise ValueError(f"mixed activations {sorted(acts)} are not supported")
    activation = names[acts.pop()] if acts else "relu"
    parts: list[torch.Tensor] = []
    for lin in linears:
        bias = lin.bias if lin.bias is not None else torch.zeros(lin.out_features)
        parts += [lin.weight.detach().reshape(-1), bias.detach().reshape(-1)]
    hidden = tuple(lin.out_features for lin in linears[:-1])
    return torch.cat(parts).float(), hidden, linears[-1].out_features, activation
