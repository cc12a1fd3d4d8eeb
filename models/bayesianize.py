"""Turn a deterministic torch MLP into a fogline BNN.

Given an ``nn.Sequential`` of ``nn.Linear`` layers (or its ``state_dict``
file), the prior is centred on the trained weights, p(w) = N(w_trained,
scale^2 I), and the variational posterior starts there, so a warm start can
begin from an existing model.  A net with ONE output (a point regressor) gets
a noise head appended: the raw-scale output row is zero weights with bias
r0 = noise_scale^-1(noise) for the configured head, i.e. a constant initial
noise level sigma(x) = noise.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import torch

from fogline.models.config import ModelConfig
from fogline.models.network import flatten_sequential, inverse_noise_scale, layout
from fogline.models.priors import centred_prior
from fogline.models.state import PosteriorState
from fogline.models.svi import init_state


def sequential_from_state_dict(
    sd: dict[str, torch.Tensor], activation: str = "relu"
) -> torch.nn.Sequential:
    """Rebuild an ``nn.Sequential`` of Linear layers from a state_dict.

    Keys must end in ``.weight`` / ``.bias``, in layer order.
    """
    acts = {
        "relu": torch.nn.ReLU,
        "tanh": torch.nn.Tanh,
        "silu": torch.nn.SiLU,
        "gelu": torch.nn.GELU,
    }
    if activation not in acts:
        raise ValueError(f"activation must be one of {sorted(acts)}")
    weights = [(k, v) for k, v in sd.items() if k.endswith(".weight")]
    if not weights:
        raise ValueError("state_dict has no '.weight' entries")
    layers: list[torch.nn.Module] = []
    for i, (k, w) in enumerate(weights):
        if w.dim() != 2:
            raise ValueError(f"{k}: expected a 2-D Linear weight, got shape {tuple(w.shape)}")
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=k[: -len("weight")] + "bias" in sd)
        lin.load_state_dict(
            OrderedDict(
                (n, sd[k[: -len("weight")] + n])
                for n in ("weight", "bias")
                if k[: -len("weight")] + n in sd
            )
        )
        layers.append(lin)
        if i < len(weights) - 1:
            layers.append(acts[activation]())
    return torch.nn.Sequential(*layers)


def bayesianize(
    net: torch.nn.Module | str,
    *,
    prior_scale: float = 0.1,
    noise: float = 0.5,
    config_overrides: dict[str, object] | None = None,
    seed: int = 0,
    lr: float = 5e-3,
    activation: str = "relu",
) -> PosteriorState:
    """A :class:`PosteriorState` whose prior and posterior mean are ``net``'s weights.

    ``net`` is a module or the path of a saved ``state_dict`` (``torch.save``;
    loaded with ``weights_only=True``).  ``prior_scale`` is the prior standard
    deviation around every trained weight; ``noise`` the initial noise level
    for a one-output net.
    """
    if isinstance(net, str):
        sd = torch.load(net, map_location="cpu", weights_only=True)
        net = sequential_from_state_dict(sd, activation)
    w, hidden, out_features, act = flatten_sequential(net)
    in_features = next(m for m in net.modules() if isinstance(m, torch.nn.Linear)).in_features
    if out_features not in (1, 2):
        raise ValueError(
            f"the net must have 1 or 2 outputs (mean[, raw scale]); it has {out_features}"
        )
    overrides = dict(config_overrides or {})
    config = ModelConfig(in_features=in_features, hidden=hidden, activation=act, **overrides)  # type: ignore[arg-type]
    if out_features == 1 and config.out_features == 2:
        w = _append_noise_row(w, in_features, hidden, inverse_noise_scale(noise, config))
    elif out_features != config.out_features:
        raise ValueError(
            f"a {config.likelihood} model needs {config.out_features} outputs, the net has {out_features}"
        )
    if w.shape[0] != layout(config).size:
        raise ValueError("internal: flattened size does not match the layout")
    return init_state(config, seed=seed, lr=lr, prior=centred_prior(w, prior_scale), init_loc=w)


def _append_noise_row(
    w: torch.Tensor, in_features: int, hidden: tuple[int, ...], raw: float
) -> torch.Tensor:
    """Insert a zero-weight raw-scale output row with bias ``raw`` (constant noise)."""
    widths = (in_features, *hidden)
    head_start = sum(a * b + b for a, b in itertools.pairwise(widths))
    last = widths[-1]
    w_mean = w[head_start : head_start + last]
    b_mean = w[head_start + last : head_start + last + 1]
    head = torch.cat([w_mean, torch.zeros(last), b_mean, torch.tensor([raw])])
    return torch.cat([w[:head_start], head])
