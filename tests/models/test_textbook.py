"""The fast streaming path and the textbook Pyro recipe estimate the same ELBO.

For the SAME variational parameters (the flat loc/scale of :mod:`fogline.models.svi`
loaded into AutoNormal's locs/scales), the per-observation negative ELBO of
``Program.loss`` (traced and eager) and ``Trace_ELBO`` on the textbook model
agree within Monte Carlo error: |mean_fast - mean_textbook| < K * SE, with SE
the standard error of the difference of the two Monte Carlo means.  The same
holds with the functional-prior term of :mod:`fogline.models.fprior` added on
both sides, and that term is, draw for draw, the functional KL of the same
weight samples computed by ``network.forward``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fogline.models.config import ModelConfig
from fogline.models.fprior import FunctionalPrior, functional_kl
from fogline.models.network import forward, layout
from fogline.models.priors import centred_prior, default_prior
from fogline.models.state import PriorSpec
from fogline.models.svi import Program, Variant, init_state
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
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for jit in (True, False):
            prog = Program(config, jit=jit)
            for _ in range(200):
                eps = torch.randn(1, p, generator=g)
                fast["jit" if jit else "eager"].append(float(prog.loss(*args, eps)))
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
    g = torch.Generator().manual_seed(5)
    noise = (torch.randn(1, probe.size, generator=g),)
    if probe.lowrank:
        noise = (*noise, torch.randn(1, config.rank, generator=g))
    out = {}
    for jit in (True, False):
        prog = Program(config, jit=jit)
        theta = theta0.clone().requires_grad_(True)
        loss, kl, lp = prog.objective(
            Variant(), x, y, theta, prior.loc, prior.scale, *scales, *noise
        )
        (grad,) = torch.autograd.grad(loss, (theta,))
        out[jit] = (loss.detach(), kl, grad, lp)
    assert torch.allclose(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(out[True][1], out[False][1], rtol=1e-5)
    assert torch.allclose(out[True][2], out[False][2], rtol=1e-4, atol=1e-6)
    # the KL term is the closed-form KL of q to the prior, and the loss is its two terms
    ref = probe.kl(theta0, prior)
    assert torch.allclose(out[True][1], ref, rtol=1e-4)
    recombined = scales[1] * out[True][1] - scales[0] * out[True][3]
    assert torch.allclose(out[True][0], recombined, rtol=1e-4, atol=1e-5)


def test_trace_generalises_over_batch_rows() -> None:
    """A trace made at 256 rows evaluates other batch sizes like the eager program."""
    config = ModelConfig()
    theta = _theta(config, 0.05, seed=3)
    prior = default_prior(config)
    traced, eager = Program(config, jit=True), Program(config, jit=False)
    for n in (256, 37, 1000):
        x, y = _data(n, seed=n)
        eps = torch.randn(1, traced.size, generator=torch.Generator().manual_seed(n))
        args = (x, y, theta, prior.loc, prior.scale, torch.tensor(1 / n), torch.tensor(1 / n), eps)
        a = traced.loss(*args)
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


FP_CONFIGS = {
    "meanfield": ModelConfig(hidden=(16,)),
    "lowrank": ModelConfig(guide="lowrank", rank=3, hidden=(16,)),
}


@pytest.mark.parametrize("name", sorted(FP_CONFIGS))
def test_functional_term_is_the_functional_kl_of_the_same_draws(name: str) -> None:
    """objective(functional) - objective(plain) = gamma * KL_f of S hand-made draws of w,
    traced or eager, and the trace made at one batch size serves others."""
    config = FP_CONFIGS[name]
    state = init_state(config, seed=4)
    params = dict(state.params)
    params["scale_unconstrained"] = torch.full_like(params["loc"], -2.0)
    fp = FunctionalPrior(weight=0.3, scale=1.5, loc=0.2, lo=(-2.0,) * 8, hi=(2.0,) * 8)
    variant = Variant(particles=1, samples=fp.samples, functional=True)
    prior = default_prior(config)
    for jit in (True, False):
        prog = Program(config, jit=jit)
        theta = prog.pack(params)
        for n in (64, 23):
            x, y = _data(n, seed=n)
            g = torch.Generator().manual_seed(n)
            eps = torch.randn(fp.samples, prog.size, generator=g)
            z = torch.randn(fp.samples, config.rank, generator=g) if prog.lowrank else None
            x_ood = fp.ood_inputs(x, g)
            scales = (torch.tensor(1 / n), torch.tensor(1 / 500))
            noise = (eps,) if z is None else (eps, z)
            fterm = (x_ood, torch.tensor(fp.weight), torch.tensor(fp.loc), torch.tensor(fp.scale))
            with torch.no_grad():
                args = (x, y, theta, prior.loc, prior.scale, *scales)
                with_f = prog.objective(variant, *args, *noise, *fterm)[0]
                plain_noise = (eps[:1],) if z is None else (eps[:1], z[:1])
                plain = prog.objective(Variant(), *args, *plain_noise)[0]
            # the reference: S draws w_s = m + s eps_s (+ V z_s), network.forward, functional_kl
            loc, s = params["loc"], F.softplus(params["scale_unconstrained"])
            w = loc + s * eps
            if z is not None:
                w = w + z @ params["cov_factor"].T
            ref = fp.weight * functional_kl(forward(w, x_ood, config)[..., 0], fp)
            assert float(with_f - plain) == pytest.approx(float(ref), rel=1e-4, abs=1e-5), (jit, n)


def test_fast_and_textbook_agree_with_the_functional_prior_term() -> None:
    """E[fast objective with the functional term] = E[Trace_ELBO] / N + gamma E[KL_f],
    the functional KL of S independent draws from the textbook guide's q (Monte Carlo,
    within K standard errors)."""
    config = ModelConfig(hidden=(16,))
    x, y = _data(128)
    n, data_size = x.shape[0], 512
    theta = _theta(config, 0.05, seed=1)
    p = theta.shape[0] // 2
    loc, s = theta[:p], F.softplus(theta[p:])
    prior = default_prior(config)
    fp = FunctionalPrior.from_data(x, weight=0.5, scale=1.0, margin=2.0)
    x_ood = fp.ood_inputs(x, torch.Generator().manual_seed(11))
    fterm = (x_ood, torch.tensor(fp.weight), torch.tensor(fp.loc), torch.tensor(fp.scale))
    args = (x, y, theta, prior.loc, prior.scale, torch.tensor(1 / n), torch.tensor(1 / data_size))
    variant = Variant(particles=1, samples=fp.samples, functional=True)
    prog = Program(config, jit=True)
    g = torch.Generator().manual_seed(12)
    fast: list[float] = []
    with torch.no_grad():
        for _ in range(300):
            eps = torch.randn(fp.samples, p, generator=g)
            fast.append(float(prog.objective(variant, *args, eps, *fterm)[0]))
    textbook: list[float] = []
    with param_store_scope():
        tb = TextbookSVI(config, x, y, prior=prior)
        tb.set_flat(loc, s)
        tb_loc, tb_scale = tb.flat()
        for _ in range(300):
            w = tb_loc + tb_scale * torch.randn(fp.samples, p, generator=g)
            fkl = float(functional_kl(forward(w, x_ood, config)[..., 0], fp))
            textbook.append(tb.loss(x, y, data_size) / data_size + fp.weight * fkl)
    m_f, se_f = _mean_se(fast)
    m_t, se_t = _mean_se(textbook)
    se = math.sqrt(se_f**2 + se_t**2)
    assert se < 0.05 * abs(m_t), "too noisy to test anything"
    assert abs(m_f - m_t) < K_SIGMA * se, (m_f, m_t, se)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_objective_is_pyros_own_mean_field_elbo(name: str) -> None:
    """The ELBO particle built from public poutine traces equals Pyro's
    ``TraceMeanField_ELBO.differentiable_loss`` of the same model and guide, for the
    same given noise: value and gradient, traced and eager."""
    from pyro.infer import TraceMeanField_ELBO

    config = VARIANTS[name]
    x, y = _data(64)
    if config.likelihood == "bernoulli":
        y = (y > 0).float()
    state = init_state(config, seed=6)
    probe = Program(config, jit=False)
    params = dict(state.params)
    params["scale_unconstrained"] = torch.full_like(params["loc"], -3.0)
    theta0 = probe.pack(params)
    prior = default_prior(config)
    g = torch.Generator().manual_seed(8)
    eps = torch.randn(1, probe.size, generator=g)
    z = torch.randn(1, config.rank, generator=g) if probe.lowrank else None
    scales = (torch.tensor(1 / 64), torch.tensor(1 / 700))
    theta = theta0.clone().requires_grad_(True)
    pyro_args = (x, y, theta, prior.loc, prior.scale, *scales, eps[0], None if z is None else z[0])
    ref = TraceMeanField_ELBO().differentiable_loss(probe.model, probe.guide, *pyro_args)
    (ref_grad,) = torch.autograd.grad(ref, (theta,))
    noise = (eps,) if z is None else (eps, z)
    for jit in (True, False):
        prog = Program(config, jit=jit)
        th = theta0.clone().requires_grad_(True)
        loss = prog.objective(Variant(), x, y, th, prior.loc, prior.scale, *scales, *noise)[0]
        (grad,) = torch.autograd.grad(loss, (th,))
        assert torch.allclose(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6), jit
        assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-6), jit
