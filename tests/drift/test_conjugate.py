"""Conjugate check of the forgetting operator (slow exact vs fast streaming).

Bayesian linear regression with known noise: y = X b + e, e ~ N(0, s^2 I),
prior b ~ N(m0, S0).  Streaming: before each batch the prior is the stabilised
forgetting mix q^(1-γ) p0^γ of the current posterior q and the base prior p0
(natural parameters mixed linearly), then the conjugate update
Λ <- Λ + XᵀX/s², η <- η + Xᵀy/s².  With γ = 0 this must equal the batch
closed form Λ = Λ0 + XᵀX/s², m = Λ⁻¹(η0 + Xᵀy/s²); with γ > 0 the precision
never drops below γ Λ0.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fogline.drift.policy import forget_natural, forgetting_prior

D, S2 = 5, 0.3**2


def _data(seed: int, n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    beta = torch.randn(D, generator=g, dtype=torch.float64)
    return x, x @ beta + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)


def _base() -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.linspace(0.5, 2.0, D, dtype=torch.float64)
    prec0 = torch.diag(1.0 / a**2) + 0.1 * torch.ones(D, D, dtype=torch.float64)
    m0 = torch.linspace(-1, 1, D, dtype=torch.float64)
    return prec0, prec0 @ m0


def _stream(x: torch.Tensor, y: torch.Tensor, gamma: float, batch: int):  # type: ignore[no-untyped-def]
    prec0, eta0 = _base()
    prec, eta = prec0.clone(), eta0.clone()
    history = []
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        prec, eta = forget_natural(prec, eta, prec0, eta0, gamma)  # the prior of this batch
        history.append(prec.clone())
        prec = prec + xb.T @ xb / S2
        eta = eta + xb.T @ yb / S2
    return prec, eta, history


@pytest.mark.parametrize("batch", [1, 7, 64, 400])
def test_gamma_zero_streaming_equals_the_batch_posterior(batch: int) -> None:
    x, y = _data(0)
    prec0, eta0 = _base()
    prec_batch = prec0 + x.T @ x / S2
    mean_batch = torch.linalg.solve(prec_batch, eta0 + x.T @ y / S2)
    prec, eta, _ = _stream(x, y, 0.0, batch)
    assert torch.allclose(prec, prec_batch, rtol=1e-10, atol=1e-8)
    assert torch.allclose(torch.linalg.solve(prec, eta), mean_batch, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("gamma", [0.01, 0.2, 0.9])
def test_forgetting_keeps_precision_above_gamma_times_base(gamma: float) -> None:
    x, y = _data(1, n=2000)
    prec0, _ = _base()
    _, _, history = _stream(x, y, gamma, 50)
    for prior_prec in history:
        # Loewner order: prior precision - γ Λ0 is positive semi-definite
        assert float(torch.linalg.eigvalsh(prior_prec - gamma * prec0).min()) >= -1e-9
    # and the forgetting bounds the memory: precision stays near (XᵀX/s² per batch)/γ
    per_batch = 50 / S2
    assert float(torch.linalg.eigvalsh(history[-1]).max()) < 3.0 * per_batch / gamma


@settings(max_examples=50, deadline=None)
@given(
    st.floats(0.0, 1.0),
    st.lists(st.floats(0.01, 10.0), min_size=3, max_size=3),
    st.lists(st.floats(-5.0, 5.0), min_size=3, max_size=3),
)
def test_mean_field_forgetting_is_the_diagonal_natural_mix(
    gamma: float, scales: list[float], locs: list[float]
) -> None:
    sq = torch.tensor(scales, dtype=torch.float64)
    mq = torch.tensor(locs, dtype=torch.float64)
    s0 = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    m0 = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    loc, scale = forgetting_prior(mq, sq, m0, s0, gamma)
    prec, eta = forget_natural(
        torch.diag(sq**-2), mq / sq**2, torch.diag(s0**-2), m0 / s0**2, gamma
    )
    assert torch.allclose(torch.diag(prec), scale**-2, rtol=1e-10)
    assert torch.allclose(eta / torch.diag(prec), loc, rtol=1e-9, atol=1e-12)
    assert bool((scale**-2 >= gamma * s0**-2 - 1e-12).all())
    if gamma == 0.0:
        assert torch.allclose(loc, mq) and torch.allclose(scale, sq)
