"""Unit tests of the model core: state, step, serialisation, predictive."""

from __future__ import annotations

import math

import pytest
import torch

from fogline.models.config import ModelConfig
from fogline.models.predictive import predict, predictive_moments, sample_ensemble
from fogline.models.priors import default_prior, kl_to_prior, posterior_as_prior, widen
from fogline.models.serialize import SnapshotFormatError, from_bytes, to_bytes
from fogline.models.state import Minibatch
from fogline.models.svi import init_state, scan, step


def _data(n: int = 256, seed: int = 0) -> Minibatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(3 * x[:, 0]) + (0.1 + 0.4 * x[:, 0].abs()) * torch.randn(n, generator=g)
    return Minibatch(x, y)


def test_fan_in_prior_scales() -> None:
    cfg = ModelConfig(in_features=8, hidden=(32,))
    prior = default_prior(cfg)
    # first weight matrix: fan_in 8 -> 1/sqrt(8); its biases: 1
    assert torch.allclose(prior.scale[: 8 * 32], torch.full((256,), 1 / math.sqrt(8)))
    assert torch.allclose(prior.scale[256:288], torch.ones(32))
    textbook = default_prior(ModelConfig(in_features=8, hidden=(32,), prior="standard"))
    assert torch.all(textbook.scale == 1.0)


def test_step_reduces_loss_and_is_pure() -> None:
    state = init_state(ModelConfig(), seed=0)
    before = {k: v.clone() for k, v in state.params.items()}
    batch = _data()
    s, first = step(state, batch)
    for k, v in state.params.items():
        assert torch.equal(v, before[k]), "step mutated its input state"
    for _ in range(300):
        s, info = step(s, batch)
    assert info.loss < first.loss
    assert s.step_count == 301
    assert s.records_absorbed == 301 * 256
    assert not info.rejected and info.rows == 256


def test_non_finite_batch_is_rejected() -> None:
    state = init_state(ModelConfig(), seed=0)
    bad = Minibatch(torch.randn(16, 8), torch.full((16,), float("nan")))
    new, info = step(state, bad)
    assert info.rejected
    assert new is state


def test_step_is_deterministic_given_state() -> None:
    batch = _data()
    a = init_state(ModelConfig(), seed=3)
    b = init_state(ModelConfig(), seed=3)
    for _ in range(5):
        a, _ = step(a, batch)
        b, _ = step(b, batch)
    assert torch.equal(a.params["loc"], b.params["loc"])
    assert torch.equal(a.rng_state, b.rng_state)


def test_k_steps_equal_k_single_steps() -> None:
    batch = _data()
    s0 = init_state(ModelConfig(), seed=1)
    many, info = step(s0, batch, num_steps=4)
    one = s0
    for _ in range(4):
        one, _ = step(one, batch)
    assert info.steps == 4
    assert torch.allclose(many.params["loc"], one.params["loc"], atol=1e-6)


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(likelihood="student-t"),
        ModelConfig(likelihood="student-t", df=4.0),
        ModelConfig(guide="lowrank", rank=4),
        ModelConfig(likelihood="bernoulli"),
    ],
    ids=["student-t-learned", "student-t-fixed", "lowrank", "bernoulli"],
)
def test_variants_train(cfg: ModelConfig) -> None:
    batch = _data()
    if cfg.likelihood == "bernoulli":
        batch = Minibatch(batch.x, (batch.y > 0).float())
    s = init_state(cfg, seed=0)
    _, first = step(s, batch)
    s = scan([batch] * 200, s)
    _, last = step(s, batch)
    assert math.isfinite(last.loss) and last.loss < first.loss


def test_serialisation_round_trip_is_bit_exact() -> None:
    s = init_state(ModelConfig(guide="lowrank", likelihood="student-t"), seed=0)
    s, _ = step(s, _data())
    s = s.replace(
        offsets={("telemetry", 0): 42},
        extra={"policy": {"state": "stable"}, "x": 0.1},
        aux={"reference.loc": torch.randn(7)},
    )
    blob = to_bytes(s)
    back = from_bytes(blob)
    assert to_bytes(back) == blob
    assert back.offsets == {("telemetry", 0): 42} and back.extra["x"] == 0.1
    assert torch.equal(back.aux["reference.loc"], s.aux["reference.loc"])
    for k in s.params:
        assert torch.equal(s.params[k], back.params[k])
    # resuming from the copy continues identically
    a, _ = step(s, _data(seed=1))
    b, _ = step(back, _data(seed=1))
    assert torch.equal(a.params["loc"], b.params["loc"])


def test_corrupt_blob_is_refused() -> None:
    blob = bytearray(to_bytes(init_state(ModelConfig(), seed=0)))
    blob[-5] ^= 0xFF
    with pytest.raises(SnapshotFormatError, match="checksum"):
        from_bytes(bytes(blob))
    with pytest.raises(SnapshotFormatError):
        from_bytes(b"garbage")


def test_prior_helpers() -> None:
    s = init_state(ModelConfig(), seed=0)
    p = posterior_as_prior(s)
    assert torch.allclose(p.scale, torch.full_like(p.scale, 1e-3), rtol=1e-4)
    w = widen(p, 3.0)
    assert torch.allclose(w.scale, 3 * p.scale)
    assert float(kl_to_prior(p.loc, p.scale, p)) == pytest.approx(0.0, abs=1e-3)


def test_predictive_decomposition() -> None:
    s = init_state(ModelConfig(), seed=0)
    s = scan([_data(seed=i % 4) for i in range(300)], s)
    ens = sample_ensemble(s, 200, seed=0)
    x = torch.randn(32, 8)
    pred = predict(ens, x, levels=(0.5, 0.95), y=torch.zeros(32))
    mean, epi, ale = predictive_moments(ens, x)
    assert torch.allclose(pred.mean, mean)
    assert torch.allclose(pred.total_std**2, epi + ale, rtol=1e-5)
    lo50, hi50 = pred.intervals[0.5]
    lo95, hi95 = pred.intervals[0.95]
    assert torch.all(lo95 < lo50) and torch.all(hi50 < hi95)
    assert pred.anomaly_score is not None
    assert torch.all((pred.anomaly_score >= 0) & (pred.anomaly_score <= 1))
    # the moment-matched Gaussian band is close to the exact mixture band
    gaussian = predict(ens, x, levels=(0.95,), method="gaussian")
    assert torch.allclose(gaussian.intervals[0.95][0], lo95, atol=0.25)
