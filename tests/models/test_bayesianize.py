"""Bayesianising a deterministic torch MLP: prior centred on its weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fogline.models.bayesianize import bayesianize, sequential_from_state_dict
from fogline.models.network import forward, noise_scale
from fogline.models.predictive import predict, sample_ensemble


def _net(outputs: int = 2) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, outputs),
    )


def test_sequential_mean_equals_the_net_at_init() -> None:
    net = _net(2)
    state = bayesianize(net, prior_scale=0.05)
    x = torch.randn(32, 8)
    out = forward(state.params["loc"].unsqueeze(0), x, state.config)[0]
    with torch.no_grad():
        assert torch.allclose(out, net(x), atol=1e-5)
    assert state.config.hidden == (16, 16)
    assert torch.equal(state.prior.loc, state.params["loc"])
    assert torch.allclose(state.prior.scale, torch.full_like(state.prior.scale, 0.05))
    # the predictive mean over samples of q (scale 1e-3) is the net's mean output
    p = predict(sample_ensemble(state, 50, seed=0), x)
    with torch.no_grad():
        assert torch.allclose(p.mean, net(x)[:, 0], atol=2e-2)


@pytest.mark.parametrize("head", ["softplus", "bounded", "exp"])
def test_point_regressor_gets_a_constant_noise_head(head: str) -> None:
    net = _net(1)
    state = bayesianize(net, noise=0.3, config_overrides={"noise_head": head, "noise_max": 2.0})
    x = torch.randn(16, 8)
    out = forward(state.params["loc"].unsqueeze(0), x, state.config)[0]
    with torch.no_grad():
        assert torch.allclose(out[:, 0], net(x)[:, 0], atol=1e-5)
    assert torch.allclose(noise_scale(out[:, 1], state.config), torch.full((16,), 0.3), atol=1e-5)


def test_state_dict_file(tmp_path: Path) -> None:
    net = _net(2)
    path = tmp_path / "net.pt"
    torch.save(net.state_dict(), path)
    state = bayesianize(str(path), prior_scale=0.1)
    x = torch.randn(8, 8)
    out = forward(state.params["loc"].unsqueeze(0), x, state.config)[0]
    with torch.no_grad():
        assert torch.allclose(out, net(x), atol=1e-5)
    rebuilt = sequential_from_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), net(x))


def test_bad_nets_are_refused() -> None:
    with pytest.raises(ValueError, match="1 or 2 outputs"):
        bayesianize(_net(3))
    with pytest.raises(ValueError, match=r"no '\.weight'"):
        sequential_from_state_dict({})
