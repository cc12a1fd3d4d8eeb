"""``models.stream.stream_step``: the daemon's update, with the warm start's functional prior."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fogline.models.config import ModelConfig
from fogline.models.fprior import EXTRA_KEY, LR_SCALE_KEY, FunctionalPrior
from fogline.models.serialize import from_bytes, to_bytes
from fogline.models.state import Minibatch, PosteriorState
from fogline.models.stream import stream_step
from fogline.models.svi import init_state, step


def _batches(n: int, rows: int = 32, seed: int = 0) -> list[Minibatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(rows, 8, generator=g)
        y = torch.sin(3 * x[:, 0]) + 0.2 * torch.randn(rows, generator=g)
        out.append(Minibatch(x, y))
    return out


def _state(with_fprior: bool) -> PosteriorState:
    st = init_state(ModelConfig.model_validate({"hidden": (16, 16)}), seed=0, lr=5e-3)
    if not with_fprior:
        return st
    fp = FunctionalPrior(weight=0.05, scale=1.5, lo=(-2.0,) * 8, hi=(2.0,) * 8)
    return st.replace(extra={**st.extra, EXTRA_KEY: fp.to_dict()})


def _run(st: PosteriorState, batches: list[Minibatch], **kw: object) -> PosteriorState:
    for b in batches:
        st = stream_step(st, b, **kw)[0]  # type: ignore[arg-type]
    return st


def test_without_a_functional_prior_it_is_svi_step() -> None:
    st = _state(False)
    b = _batches(1)[0]
    a, _ = stream_step(st, b, num_steps=3, data_size=1000, likelihood_weight=0.5)
    c, _ = step(st, b, num_steps=3, data_size=1000, likelihood_weight=0.5)
    assert to_bytes(a) == to_bytes(c)


def test_functional_prior_step_contract_and_exact_restarts() -> None:
    st = _state(True)
    batches = _batches(12)
    one, info = stream_step(st, batches[0], num_steps=3, data_size=1000)
    assert not info.rejected and info.steps == 3 and info.rows == 32
    assert one.step_count == st.step_count + 3
    assert one.records_absorbed == st.records_absorbed + 32
    assert not one.rng_state.equal(st.rng_state)
    plain, _ = step(st, batches[0], num_steps=3, data_size=1000)
    assert not one.params["loc"].equal(plain.params["loc"])  # the functional term acts
    off, _ = stream_step(st, batches[0], num_steps=3, data_size=1000, functional_prior=False)
    assert to_bytes(off) == to_bytes(plain)
    # deterministic, and a serialise/restore between any two batches changes nothing
    full = _run(st, batches, num_steps=2, data_size=1000)
    assert to_bytes(full) == to_bytes(_run(st, batches, num_steps=2, data_size=1000))
    mid = _run(st, batches[:5], num_steps=2, data_size=1000)
    resumed = _run(from_bytes(to_bytes(mid)), batches[5:], num_steps=2, data_size=1000)
    assert to_bytes(resumed) == to_bytes(full)


def test_with_a_functional_prior_it_is_svi_step_with_that_term() -> None:
    """One step: stream_step only reads the state's terms and calls svi.step."""
    cfg = ModelConfig.model_validate({"hidden": (16, 16), "guide": "lowrank"})
    st = init_state(cfg, seed=0, lr=5e-3)
    fp = FunctionalPrior(weight=0.05, scale=1.5, lo=(-2.0,) * 8, hi=(2.0,) * 8)
    st = st.replace(extra={EXTRA_KEY: fp.to_dict(), LR_SCALE_KEY: 0.05})
    b = _batches(1)[0]
    a, ia = stream_step(st, b, num_steps=2, data_size=1000, likelihood_weight=0.7)
    c, ic = step(
        st,
        b,
        num_steps=2,
        data_size=1000,
        likelihood_weight=0.7,
        functional_prior=fp,
        cov_factor_lr_scale=0.05,
    )
    assert to_bytes(a) == to_bytes(c) and ia == ic


def test_likelihood_weight_and_rejection() -> None:
    st = _state(True)
    b = _batches(1)[0]
    with pytest.raises(ValueError, match="likelihood_weight"):
        stream_step(st, b, likelihood_weight=1.5)
    bad = Minibatch(b.x, torch.full_like(b.y, float("nan")))
    same, info = stream_step(st, bad)
    assert info.rejected and same is st
    w0, _ = stream_step(st, b, likelihood_weight=0.0)
    w1, _ = stream_step(st, b, likelihood_weight=1.0)
    assert not w0.params["loc"].equal(w1.params["loc"])


def test_roundtrip_of_the_stored_prior() -> None:
    fp = FunctionalPrior(weight=0.1, scale=2.0, lo=(-1.0, -2.0), hi=(1.0, 2.0), features=(1,))
    assert FunctionalPrior.from_dict(fp.to_dict()) == fp
    st = _state(False)
    assert FunctionalPrior.of(st) is None
    assert FunctionalPrior.of(st.replace(extra={EXTRA_KEY: fp.to_dict()})) == fp


@pytest.mark.slow
def test_streaming_keeps_the_warm_starts_out_of_range_uncertainty(cal_housing_csv: Path) -> None:
    """60-epoch warm start, then 600 batches of in-range rows: 95% coverage beyond
    |x0| >= 3 stays >= 0.95 (plain streaming SVI erodes it: docs/model.md)."""
    from fogline.models.data import load, recipe_data
    from fogline.models.predictive import sample_ensemble
    from fogline.models.warmstart import WarmstartOptions, evaluate, run

    res = run(WarmstartOptions(data=str(cal_housing_csv), epochs=60))
    assert EXTRA_KEY in res.state.extra
    data = recipe_data(load(str(cal_housing_csv)), seed=0)
    n = data.x_train.shape[0]
    g = torch.Generator().manual_seed(5)
    st = res.state
    for _ in range(600):
        idx = torch.randint(0, n, (64,), generator=g)
        st, info = stream_step(st, Minibatch(data.x_train[idx], data.y_train[idx]), data_size=n)
        assert not info.rejected
    m = evaluate(sample_ensemble(st, 200, 0), data)
    assert m["coverage_95_out"] >= 0.95, m
    assert m["coverage_95_in"] >= 0.90, m
    assert FunctionalPrior.of(st) == FunctionalPrior.of(res.state)  # carried along


def test_lowrank_state_streams_with_its_factor_step_scale() -> None:
    cfg = ModelConfig.model_validate({"hidden": (16, 16), "guide": "lowrank"})
    st = init_state(cfg, seed=0, lr=5e-3)
    b = _batches(1)[0]
    assert to_bytes(stream_step(st, b)[0]) == to_bytes(step(st, b)[0])  # no scale stored
    scaled = st.replace(extra={LR_SCALE_KEY: 0.05})
    a, _ = stream_step(scaled, b, num_steps=2)
    full, _ = stream_step(scaled.replace(extra={LR_SCALE_KEY: 1.0}), b, num_steps=2)
    moved_a = (a.params["cov_factor"] - st.params["cov_factor"]).abs().max()
    moved_full = (full.params["cov_factor"] - st.params["cov_factor"]).abs().max()
    assert 0 < moved_a < 0.2 * moved_full
    assert a.step_count == st.step_count + 2 and not a.rng_state.equal(st.rng_state)
