"""The fast streaming path and the textbook Pyro recipe estimate the same ELBO.

For the SAME variational parameters (the flat loc/scale of :mod:`fogline.models.svi`
loaded into AutoNormal's locs/scales), the per-observation negative ELBO of
``Program.loss`` (traced and eager) and ``Trace_ELBO`` on the textbook model
agree within Monte Carlo error: |mean_fast - mean_textbook| < K * SE, with SE
the standard error of the difference of the two Monte Carlo means.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fogline.models.config import ModelConfig
from fogline.models.network import layout
from fogline.models.priors import centred_prior, default_prior
from fogline.models.state import PriorSpec
from fogline.models.svi import Program, init_state
from fogline.models.textbook import TextbookBNN, TextbookSVI, param_store_scope

K_SIGMA = 4.0


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(3 * x[:, 0]) + (0.1 + 0.4 * x[:, 0].abs()) * torch.randn(n, generator=g)
    return x, y


def _mean_se(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std() / math.sqrt(len(values)))


def _theta(config: ModelConfig, scale: float, seed: int) -> torch.Tensor:
    """Packed (loc, scale_unconstrained) with loc from init_state and s = ``scale``."""
    state = init_state(config, seed=seed)
    s = torch.full_like(state.params["loc"], scale)
    return torch.cat([state.params["loc"], s + torch.log(-torch.expm1(-s))])


CASES = {
    # init-like q against the fan-in prior: the KL term dominates
    "fan_in_prior": (ModelConfig(), None, 0.05, 256),
    # the textbook N(0, 1) prior, batch standing for a larger data set
    "standard_prior_data_size": (ModelConfig(prior="standard"), None, 0.05, 1024),
    # a prior near q (posterior-as-prior): the likelihood term dominates
    "near_prior": (ModelConfig(), "near", 0.02, 256),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_and_textbook_estimate_the_same_elbo(case: str) -> None:
    config, prior_kind, scale, data_size = CASES[case]
    x, y = _data(128)
    n = x.shape[0]
    theta = _theta(config, scale, seed=1)
    p = theta.shape[0] // 2
    loc, s = theta[:p], F.softplus(theta[p:])
    prior = default_prior(config) if prior_kind is None else centred_prior(loc + 0.01, 2 * scale)
    args = (
        x,
        y,
        theta,
        prior.loc,
        prior.scale,
        torch.tensor(1.0 / n),
        torch.tensor(1.0 / data_size),
    )
    fast: dict[str, list[float]] = {"jit": [], "eager": []}
    with torch.no_grad():
        for jit in (True, False):
            prog = Program(config, jit=jit)
            for _ in range(200):
                fast["jit" if jit else "eager"].append(float(prog.loss(*args)))
    textbook: list[float] = []
    with param_store_scope():
        tb = TextbookSVI(config, x, y, prior=prior)
        tb.set_flat(loc, s)
        got_loc, got_scale = tb.flat()
        assert torch.allclose(got_loc, loc) and torch.allclose(got_scale, s, rtol=1e-5)
        for _ in range(300):
            textbook.append(tb.loss(x, y, data_size) / data_size)
    m_t, se_t = _mean_se(textbook)
    assert se_t < 0.02 * abs(m_t) + 0.02, "the textbook estimate is too noisy to test anything"
    for name, values in fast.items():
        m_f, se_f = _mean_se(values)
        se = math.sqrt(se_f**2 + se_t**2)
        assert abs(m_f - m_t) < K_SIGMA * se, (name, m_f, m_t, se)


VARIANTS = {
    "meanfield": ModelConfig(),
    "lowrank": ModelConfig(guide="lowrank", rank=3, hidden=(16,)),
    "student-t-learned": ModelConfig(likelihood="student-t", hidden=(16,)),
    "bernoulli": ModelConfig(likelihood="bernoulli", hidden=(16,)),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fast_path_traced_and_eager_agree_draw_for_draw(name: str) -> None:
    """Same RNG draws -> the traced and eager Pyro ELBO agree (value, KL and gradient)."""
    config = VARIANTS[name]
    x, y = _data(256)
    if config.likelihood == "bernoulli":
        y = (y > 0).float()
    state = init_state(config, seed=2)
    probe = Program(config, jit=False)
    params = dict(state.params)
    params["scale_unconstrained"] = torch.full_like(params["loc"], -3.0)  # s ~ 0.05
    theta0 = probe.pack(params)
    prior = default_prior(config)
    scales = (torch.tensor(1 / 256), torch.tensor(1 / 1000))
    out = {}
    for jit in (True, False):
        prog = Program(config, jit=jit)
        theta = theta0.clone().requires_grad_(True)
        torch.manual_seed(5)
        loss, kl = prog.loss_and_kl(x, y, theta, prior.loc, prior.scale, *scales)
        (grad,) = torch.autograd.grad(loss, (theta,))
        out[jit] = (loss.detach(), kl, grad)
    assert torch.allclose(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(out[True][1], out[False][1], rtol=1e-5)
    assert torch.allclose(out[True][2], out[False][2], rtol=1e-4, atol=1e-6)
    # the KL recovered from the ELBO's terms is the closed-form KL of q to the prior
    ref = probe.kl(theta0, prior)
    assert torch.allclose(out[True][1], ref, rtol=1e-4)


def test_trace_generalises_over_batch_rows() -> None:
    """A trace made at 256 rows evaluates other batch sizes like the eager program."""
    config = ModelConfig()
    theta = _theta(config, 0.05, seed=3)
    prior = default_prior(config)
    traced, eager = Program(config, jit=True), Program(config, jit=False)
    for n in (256, 37, 1000):
        x, y = _data(n, seed=n)
        args = (x, y, theta, prior.loc, prior.scale, torch.tensor(1 / n), torch.tensor(1 / n))
        torch.manual_seed(n)
        a = traced.loss(*args)
        torch.manual_seed(n)
        b = eager.loss(*args)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), n


def test_textbook_model_shares_the_prior_and_architecture() -> None:
    config = ModelConfig(hidden=(16, 8))
    size = layout(config).size
    prior = PriorSpec(torch.linspace(-1, 1, size), torch.ones(size))
    model = TextbookBNN(config, prior)
    base = model.fc1._pyro_samples["weight"].base_dist  # the PyroSample prior of fc1.weight
    assert base.loc.shape == (8, 16)
    assert torch.equal(base.loc.reshape(-1), prior.loc[8 * 16 + 16 : 8 * 16 + 16 + 128])
    with param_store_scope():
        out = model(torch.randn(5, 8), torch.randn(5))
    assert out.shape == (5,)
    with pytest.raises(ValueError, match="gaussian"):
        TextbookBNN(ModelConfig(likelihood="bernoulli"))


def test_param_store_scope_restores_the_callers_store() -> None:
    import pyro

    pyro.param("callers_param", torch.tensor(3.0))
    x, y = _data(32)
    with param_store_scope():
        assert "callers_param" not in pyro.get_param_store()
        tb = TextbookSVI(ModelConfig(), x, y)
        loss = tb.step(x, y)
        assert math.isfinite(loss)
    store = pyro.get_param_store()
    assert float(store["callers_param"].detach()) == 3.0
    assert not any(k.startswith("AutoNormal") for k in store)
