"""models/svi.fit: the end of a fit, step-size annealing and iterate averaging (SWA)."""

from __future__ import annotations

import math

import pytest
import torch

from fogline.models.config import ModelConfig
from fogline.models.state import PosteriorState
from fogline.models.svi import fit, init_state

CONFIG = ModelConfig(in_features=2, hidden=(8,))


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def data(n: int = 120) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=gen)
    return x, torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(n, generator=gen)


def test_zero_anneal_and_average_is_the_plain_fit() -> None:
    x, y = data()
    start = init_state(CONFIG, seed=0, lr=5e-3)
    plain = fit(start, x, y, epochs=12, batch_size=32, seed=1).state
    same = fit(start, x, y, epochs=12, batch_size=32, seed=1, anneal=0.0, average=0.0).state
    for name, value in plain.params.items():
        torch.testing.assert_close(same.params[name], value, rtol=0, atol=0)


def test_average_is_the_mean_of_the_last_epochs_iterates() -> None:
    x, y = data()
    start = init_state(CONFIG, seed=0, lr=5e-3)
    seen: list[dict[str, torch.Tensor]] = []

    def keep(_epoch: int, _loss: float, state: PosteriorState) -> None:
        seen.append({k: v.detach().clone() for k, v in state.params.items()})

    res = fit(start, x, y, epochs=12, batch_size=32, seed=1, average=0.25, on_epoch=keep)
    assert len(seen) == 12
    for name, value in res.state.params.items():
        expect = torch.stack([s[name].double() for s in seen[-3:]]).mean(0).float()
        torch.testing.assert_close(value, expect, rtol=0, atol=1e-7)
        assert not torch.equal(value, seen[-1][name])  # not the last iterate


def test_anneal_lowers_the_step_size_on_the_last_epochs_and_restores_it() -> None:
    x, y = data()
    start = init_state(CONFIG, seed=0, lr=5e-3)
    rates: list[float] = []
    res = fit(
        start,
        x,
        y,
        epochs=10,
        batch_size=32,
        seed=1,
        anneal=0.3,
        on_epoch=lambda _e, _l, st: rates.append(st.lr),
    )
    assert rates[:7] == [5e-3] * 7
    expect = [5e-3 * 0.5 * (1 + math.cos(math.pi * j / 4)) for j in (1, 2, 3)]
    assert rates[7:] == pytest.approx(expect)
    assert rates[7] > rates[8] > rates[9] > 0 and res.state.lr == 5e-3
    plain = fit(start, x, y, epochs=10, batch_size=32, seed=1).state
    assert not torch.equal(plain.params["loc"], res.state.params["loc"])


def test_settings_are_checked() -> None:
    x, y = data()
    with pytest.raises(ValueError, match="anneal and average"):
        fit(init_state(CONFIG, seed=0), x, y, epochs=2, anneal=1.0)
