"""Signals: closed forms, anomaly scores, and their reaction to a shift."""

from __future__ import annotations

import math

import torch

from fogline.drift.signals import (
    gaussian_kl,
    make_reference,
    post_update_signals,
    pre_update_signals,
    record_scores,
    weight_kl,
)
from fogline.models.predictive import log_predictive_density, predict
from fogline.models.state import Minibatch, PosteriorState
from fogline.models.svi import step
from fogline.replay_data.generator import generate


def _batch(name: str, seed: int, i: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    s = generate(name, seed=seed, n_batches=30, batch_size=n)
    x, y = list(s.batches())[i]
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def test_gaussian_kl_closed_form() -> None:
    m1, v1, m0, v0 = torch.tensor(0.3), torch.tensor(0.5), torch.tensor(-0.2), torch.tensor(2.0)
    exact = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, v1.sqrt()), torch.distributions.Normal(m0, v0.sqrt())
    )
    assert torch.allclose(gaussian_kl(m1, v1, m0, v0), exact)
    assert float(gaussian_kl(m0, v0, m0, v0)) == 0.0
    loc, scale = torch.randn(50), torch.rand(50) + 0.1
    assert weight_kl(loc, scale, loc, scale) == 0.0
    assert math.isclose(
        weight_kl(loc, scale, loc + 1, scale), float((0.5 / scale**2).sum()), rel_tol=1e-5
    )


def test_record_scores_match_the_model_predictive(warm_state: PosteriorState) -> None:
    ref = make_reference(warm_state, num_samples=32, seed=0)
    x, y = _batch("stable", 1, 0)
    rs = record_scores(ref, x, y)
    assert torch.allclose(rs.nll, -log_predictive_density(ref.ensemble, x, y), atol=1e-4)
    pred = predict(ref.ensemble, x, y=y)
    assert pred.anomaly_score is not None
    assert torch.allclose(rs.anomaly, pred.anomaly_score, atol=1e-4)
    assert float(rs.anomaly.min()) >= 0.0 and float(rs.anomaly.max()) <= 1.0


def test_signals_react_to_a_shift_and_not_to_stable_data(warm_state: PosteriorState) -> None:
    ref = make_reference(warm_state, num_samples=32, seed=0)
    xs, ys = _batch("stable", 2, 20)
    xa, ya = _batch("abrupt", 2, 20)  # same x and noise, +1.5 on y
    pre_s, _ = pre_update_signals(ref, xs, ys)
    pre_a, rs_a = pre_update_signals(ref, xa, ya)
    assert pre_a["surprisal"] > pre_s["surprisal"] + 3.0
    assert pre_a["outlier_fraction"] > 0.3 > pre_s["outlier_fraction"]
    # a sustained shift is not trimmed away
    assert pre_a["surprisal_inlier"] > pre_s["surprisal_inlier"] + 2.0
    after, _ = step(warm_state, Minibatch(xa, ya), num_steps=5, data_size=4096)
    post, ens = post_update_signals(ref, rs_a, xa, after, None)
    assert math.isnan(post["step_kl"]) and post["predictive_kl"] > 0 and post["weight_kl"] > 0
    post2, _ = post_update_signals(ref, rs_a, xa, after, ens)
    assert post2["step_kl"] == 0.0  # same posterior, same seed: common random numbers


def test_outliers_are_trimmed_from_the_inlier_surprisal(warm_state: PosteriorState) -> None:
    ref = make_reference(warm_state, num_samples=32, seed=0)
    x, y = _batch("stable", 3, 5)
    clean, _ = pre_update_signals(ref, x, y)
    y_bad = y.clone()
    y_bad[:10] = 9.0
    dirty, rs = pre_update_signals(ref, x, y_bad)
    assert bool(rs.outlier[:10].all())
    assert dirty["surprisal"] > clean["surprisal"] + 3.0
    assert abs(dirty["surprisal_inlier"] - clean["surprisal_inlier"]) < 0.15
    assert math.isclose(dirty["outlier_fraction"], 10 / 64, abs_tol=2 / 64)


def test_noise_cache_is_sample_ensemble_bit_for_bit(warm_state: PosteriorState) -> None:
    """The cached draws give exactly ``sample_ensemble`` (same seed), however the state moves."""
    from fogline.drift.signals import NoiseCache
    from fogline.models.predictive import sample_ensemble

    cache = NoiseCache()
    state = warm_state
    for k in range(3):
        moved = {**state.params, "loc": state.params["loc"] + 0.1 * k}
        state = state.replace(params=moved)
        got = cache.ensemble(state, 16, 5)
        want = sample_ensemble(state, 16, 5)
        assert all(
            a.equal(b) and c.equal(d)
            for (a, c), (b, d) in zip(got.layers, want.layers, strict=True)
        )
        assert got.df == want.df
