"""The fast predictive summaries against slow exact references.

The Newton mixture quantiles are checked against 80-step float64 bisection
(exact to ~1e-13 for the ensemble) and against a brute-force Monte Carlo
quantile of draws from the mixture; the Student-t CDF against scipy.
"""

from __future__ import annotations

import math

import pytest
import torch

import fogline.models.predictive as P
from fogline.models.config import ModelConfig
from fogline.models.predictive import (
    Ensemble,
    component_params,
    mixture_cdf,
    mixture_quantiles,
    predict,
    sample_ensemble,
)
from fogline.models.state import Minibatch
from fogline.models.svi import init_state, step

LEVELS = (0.5, 0.9, 0.95, 0.99)


def _probs() -> torch.Tensor:
    return torch.tensor([p for lv in LEVELS for p in ((1 - lv) / 2, (1 + lv) / 2)])


def _trained_ensemble(cfg: ModelConfig, steps: int = 30, seed: int = 0) -> Ensemble:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    y = torch.sin(3 * x[:, 0]) + (0.1 + 0.4 * x[:, 0].abs()) * torch.randn(256, generator=g)
    if cfg.likelihood == "bernoulli":
        y = (y > 0).float()
    state = init_state(cfg, seed=seed)
    for _ in range(steps):
        state, _ = step(state, Minibatch(x, y))
    return sample_ensemble(state, num_samples=100, seed=seed)


def _reference(ens: Ensemble, x: torch.Tensor) -> torch.Tensor:
    """Quantiles [2L, N] by 200-step bisection in float64 (the slow exact path)."""
    mu, sigma = component_params(ens, x)
    return P._bisect_quantiles(
        ens, _probs().double().unsqueeze(-1), mu.double(), sigma.double(), iters=80
    )


def _stacked(pred: P.Prediction) -> torch.Tensor:
    return torch.stack([b for lv in LEVELS for b in pred.intervals[lv]]).double()


@pytest.mark.parametrize("likelihood", ["gaussian", "student-t"])
def test_newton_quantiles_match_exact_bisection(likelihood: str) -> None:
    df = 4.0 if likelihood == "student-t" else None
    ens = _trained_ensemble(ModelConfig(likelihood=likelihood, df=df))
    # in range, and far outside the data (x0 up to +-6) where the mixture is widest
    n = 32 if likelihood == "gaussian" else 4  # the t CDF is costly in the reference
    x = torch.cat([torch.randn(n, 8), 3 * torch.randn(n, 8)])
    pred = predict(ens, x, levels=LEVELS)
    err = (_stacked(pred) - _reference(ens, x)).abs().max().item()
    assert err < 1e-4
    # and the quantiles are what they claim: F(q) = p
    mu, sigma = component_params(ens, x)
    cdf = mixture_cdf(ens, _stacked(pred), mu.double(), sigma.double())
    assert (cdf - _probs().double().unsqueeze(-1)).abs().max().item() < 1e-5


def test_newton_path_is_taken_for_a_trained_net(monkeypatch: pytest.MonkeyPatch) -> None:
    ens = _trained_ensemble(ModelConfig())

    def no_bisection(*_a: object, **_k: object) -> torch.Tensor:
        raise AssertionError("fell back to bisection")

    monkeypatch.setattr(P, "_bisect_quantiles", no_bisection)
    predict(ens, torch.randn(64, 8) * 2, levels=LEVELS)


def test_quantiles_match_monte_carlo_draws() -> None:
    ens = _trained_ensemble(ModelConfig())
    x = torch.randn(4, 8) * 2
    pred = predict(ens, x, levels=LEVELS)
    mu, sigma = component_params(ens, x)  # [S, N]
    g = torch.Generator().manual_seed(1)
    n = 400_000
    comp = torch.randint(0, mu.shape[0], (n,), generator=g)
    draws = (
        mu[comp].double() + sigma[comp].double() * torch.randn(n, x.shape[0], generator=g).double()
    )
    for i in range(x.shape[0]):
        mc = torch.quantile(draws[:, i], _probs().double())
        q = _stacked(pred)[:, i]
        # Monte Carlo error of a quantile ~ sqrt(p(1-p)/n)/f; generous bound
        tol = 0.02 * (1 + float(pred.total_std[i]))
        assert (q - mc).abs().max().item() < tol


def test_bimodal_mixture_falls_back_to_bisection() -> None:
    """Newton from the moment-matched start lands in the empty gap (pdf ~ 0)."""
    ens = _trained_ensemble(ModelConfig(), steps=1)
    mu = torch.cat([torch.full((50, 1), -10.0), torch.full((50, 1), 10.0)]).double()
    sigma = torch.full((100, 1), 0.1).double()
    probs = torch.tensor([0.3, 0.5, 0.7]).double()
    q = mixture_quantiles(ens, probs, mu, sigma)
    ref = P._bisect_quantiles(ens, probs.unsqueeze(-1), mu, sigma, iters=200)
    assert torch.isfinite(q).all()
    assert (q - ref).abs().max().item() < 1e-6
    cdf = mixture_cdf(ens, q, mu, sigma)
    assert (cdf - probs.unsqueeze(-1)).abs().max().item() < 1e-6


def test_single_component_mixture_is_its_gaussian() -> None:
    ens = _trained_ensemble(ModelConfig(), steps=1)
    mu = torch.tensor([[0.3, -2.0]]).double()
    sigma = torch.tensor([[1.5, 0.2]]).double()
    probs = _probs().double()
    q = mixture_quantiles(ens, probs, mu, sigma)
    exact = mu + sigma * torch.special.ndtri(probs).unsqueeze(-1)
    assert (q - exact).abs().max().item() < 1e-9


@pytest.mark.parametrize("df", [1.5, 3.0, 10.0, 30.0])
def test_student_t_cdf_matches_scipy(df: float) -> None:
    stats = pytest.importorskip("scipy.stats")
    z = torch.linspace(-40, 40, 801, dtype=torch.float64)
    ours = P._t_cdf(z, df)
    ref = torch.from_numpy(stats.t.cdf(z.numpy(), df))
    assert (ours - ref).abs().max().item() < 1e-9
    ours32 = P._t_cdf(z.float(), df)
    assert ours32.dtype == torch.float32
    assert (ours32.double() - ref).abs().max().item() < 1e-6
    zr = torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 3  # float32 body
    ref_r = torch.from_numpy(stats.t.cdf(zr.double().numpy(), df))
    assert (P._t_cdf(zr, df).double() - ref_r).abs().max().item() < 1e-6


def test_moments_and_anomaly_score() -> None:
    ens = _trained_ensemble(ModelConfig())
    x = torch.randn(8, 8)
    mu, sigma = component_params(ens, x)
    y = mu.mean(0) + 3 * sigma.mean(0)
    pred = predict(ens, x, levels=(0.9,), y=y)
    assert torch.allclose(pred.mean, mu.mean(0))
    assert torch.allclose(pred.epistemic_std, mu.std(0, unbiased=False), atol=1e-6)
    assert torch.allclose(pred.aleatoric_std, sigma.pow(2).mean(0).sqrt(), atol=1e-6)
    assert torch.allclose(
        pred.total_std, (pred.epistemic_std**2 + pred.aleatoric_std**2).sqrt(), atol=1e-6
    )
    assert pred.anomaly_score is not None and pred.tail_prob is not None
    cdf = mixture_cdf(ens, y, mu, sigma)
    assert torch.allclose(pred.anomaly_score, 1 - 2 * torch.minimum(cdf, 1 - cdf), atol=1e-6)
    assert bool((pred.anomaly_score > 0.9).all())
    lo, hi = pred.intervals[0.9]
    assert bool((lo < pred.mean).all() and (pred.mean < hi).all())


def test_bernoulli_and_gaussian_method_still_work() -> None:
    ens = _trained_ensemble(ModelConfig(likelihood="bernoulli"))
    pred = predict(ens, torch.randn(5, 8), levels=(0.9,), y=torch.ones(5))
    assert bool(((pred.mean >= 0) & (pred.mean <= 1)).all())
    g = _trained_ensemble(ModelConfig())
    x = torch.randn(5, 8)
    pg = predict(g, x, levels=(0.95,), method="gaussian")
    z = math.sqrt(2) * torch.erfinv(torch.tensor(0.95)).item()
    assert torch.allclose(pg.intervals[0.95][1], pg.mean + z * pg.total_std, atol=1e-5)
    with pytest.raises(ValueError, match="credible level"):
        predict(g, x, levels=(1.0,))


def test_int8_ensemble_rounding_bound_and_report() -> None:
    from fogline.models.quantize import quantization_report, quantize_ensemble, reference_grid

    ens = _trained_ensemble(ModelConfig())
    q = quantize_ensemble(ens)
    deq = q.dequantize()
    for (w, b), (wq, bq), scale in zip(ens.layers, deq.layers, q.scales, strict=True):
        assert bool(((w - wq).abs() <= scale / 2 + 1e-7).all())
        assert torch.equal(b, bq)
    assert q.codes[0].dtype == torch.int8 and q.size == ens.size
    rep = quantization_report(ens, q)
    assert rep["grid_rows"] == reference_grid(ens.config).shape[0] == 8 * 25 + 256
    assert rep["bytes_int8"] < rep["bytes_float32"] / 2
    assert 0 < rep["max_abs_mean"] < 0.05 and 0 < rep["max_abs_interval"] < 0.05
