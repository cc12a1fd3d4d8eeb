"""models/restarts.py: several warm-start restarts, the highest ELBO kept."""

from __future__ import annotations

import math

import pytest
import torch

from fogline.models.config import ModelConfig
from fogline.models.priors import kl_to_prior
from fogline.models.restarts import RESTART_STRIDE, best_of, elbo, held_out_lpd, kl_to_prior_of
from fogline.models.state import PosteriorState
from fogline.models.svi import fit, init_state

CONFIG = ModelConfig(in_features=2, hidden=(8,))


def data(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=gen)
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(n, generator=gen)
    return x, y


def fitted(seed: int, epochs: int = 30) -> PosteriorState:
    x, y = data()
    return fit(init_state(CONFIG, seed=seed), x, y, epochs=epochs, batch_size=64, seed=seed).state


def test_one_restart_is_the_single_fit() -> None:
    x, y = data()
    res = best_of(fitted, lambda st: elbo(st, x, y), restarts=1, seed=3)
    plain = fitted(3)
    assert res.best == 0 and len(res.scores) == 1
    for name, value in plain.params.items():
        torch.testing.assert_close(res.state.params[name], value, rtol=0, atol=0)


def test_the_highest_elbo_is_kept_and_seeds_are_spread() -> None:
    x, y = data()
    seen: list[int] = []

    def fit_one(seed: int) -> PosteriorState:
        seen.append(seed)
        # restart 2 trains much longer: it must explain the data far better
        return fitted(seed, epochs=60 if len(seen) == 3 else 2)

    res = best_of(fit_one, lambda st: elbo(st, x, y), restarts=4, seed=5)
    assert seen == [5 + r * RESTART_STRIDE for r in range(4)]
    assert res.best == 2 and res.scores[2] == max(res.scores)
    assert res.scores[2] > res.scores[0] + 10  # nats: not a Monte Carlo tie


def test_held_out_selection_prefers_the_fit_that_predicts_unseen_rows() -> None:
    x, y = data(300)
    x_fit, y_fit, x_held, y_held = x[:240], y[:240], x[240:], y[240:]

    def fit_one(seed: int) -> PosteriorState:
        epochs = 60 if seed == 1 + RESTART_STRIDE else 2  # restart 1 is the trained one
        state = init_state(CONFIG, seed=seed)
        return fit(state, x_fit, y_fit, epochs=epochs, batch_size=64, seed=seed).state

    res = best_of(fit_one, lambda st: held_out_lpd(st, x_held, y_held), restarts=3, seed=1)
    assert res.best == 1 and res.scores[1] > res.scores[0] + 0.3  # nats per row
    assert held_out_lpd(res.state, x_held, y_held, seed=4) == held_out_lpd(
        res.state, x_held, y_held, seed=4
    )


def test_elbo_is_expected_log_likelihood_minus_kl() -> None:
    x, y = data()
    state = fitted(0)
    scale = torch.nn.functional.softplus(state.params["scale_unconstrained"])
    kl = float(kl_to_prior(state.params["loc"], scale, state.prior))
    assert kl_to_prior_of(state) == pytest.approx(kl)
    assert kl > 0
    value = elbo(state, x, y, samples=64, seed=1)
    assert math.isfinite(value) and value == elbo(state, x, y, samples=64, seed=1)  # seeded
    # the expected log-likelihood is at most the log-likelihood at the best weights: ELBO < 0 here
    assert value < 0


def test_a_diverged_restart_never_wins_and_bad_counts_fail() -> None:
    x, y = data()
    good = fitted(0)
    bad = good.replace(params={**good.params, "loc": torch.full_like(good.params["loc"], math.nan)})
    assert elbo(bad, x, y) == -math.inf
    states = iter([bad, good])
    res = best_of(lambda _seed: next(states), lambda st: elbo(st, x, y), restarts=2, seed=0)
    assert res.best == 1
    assert held_out_lpd(bad, x, y) == -math.inf
    with pytest.raises(ValueError, match="restarts"):
        best_of(fitted, lambda st: elbo(st, x, y), restarts=0, seed=0)
