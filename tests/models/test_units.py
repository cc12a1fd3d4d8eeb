"""Predictions in raw units: exact affine scaling, log1p through the monotone inverse."""

from __future__ import annotations

import math

import pytest
import torch

from fogline.models.config import ModelConfig
from fogline.models.predictive import component_params, predict, sample_ensemble
from fogline.models.schema import Column, DataSchema, SchemaError
from fogline.models.svi import init_state
from fogline.models.units import predict_raw, rows_to_model

LEVELS = (0.5, 0.95)
FEATS = (
    Column("a", "standardise", 10.0, 2.0),
    Column("b", "log1p", 0.5, 0.25),
    Column("c"),
)


def _ens(likelihood: str = "gaussian", **cfg: object):  # type: ignore[no-untyped-def]
    config = ModelConfig(in_features=3, hidden=(8,), likelihood=likelihood, **cfg)  # type: ignore[arg-type]
    state = init_state(config, seed=1)
    # widen q so the ensemble disagrees (epistemic spread) like a trained posterior
    scale = state.params["scale_unconstrained"] + 3.0
    state = state.replace(params={**state.params, "scale_unconstrained": scale})
    return sample_ensemble(state, 50, seed=3)


X_RAW = torch.tensor([[10.0, 1.0, 0.0], [14.0, 0.0, 1.5], [4.0, 30.0, -2.0]], dtype=torch.float64)


def test_rows_to_model_applies_each_column() -> None:
    schema = DataSchema(FEATS, Column("t"))
    z = rows_to_model(schema, X_RAW)
    assert z.dtype == torch.float32
    want = torch.stack(
        [(X_RAW[:, 0] - 10) / 2, (torch.log1p(X_RAW[:, 1]) - 0.5) / 0.25, X_RAW[:, 2]], 1
    )
    torch.testing.assert_close(z, want.float())
    with pytest.raises(SchemaError, match=r"b: transform log1p needs values > -1; row 1"):
        rows_to_model(schema, torch.tensor([[0.0, 0.0, 0.0], [0.0, -1.0, 0.0]]))


def test_standardised_target_is_the_model_answer_scaled_exactly() -> None:
    ens = _ens()
    schema = DataSchema(FEATS, Column("t", "standardise", 100.0, 4.0))
    y_raw = torch.tensor([100.0, 120.0, 60.0], dtype=torch.float64)
    got = predict_raw(ens, schema, X_RAW, LEVELS, y_raw)
    ref = predict(ens, rows_to_model(schema, X_RAW), LEVELS, y=(y_raw - 100.0) / 4.0)
    torch.testing.assert_close(got.mean, 100.0 + 4.0 * ref.mean.double())
    for name in ("total_std", "epistemic_std", "aleatoric_std"):
        torch.testing.assert_close(getattr(got, name), 4.0 * getattr(ref, name).double())
    for lv in LEVELS:
        torch.testing.assert_close(
            got.intervals[lv][0], 100.0 + 4.0 * ref.intervals[lv][0].double()
        )
        torch.testing.assert_close(
            got.intervals[lv][1], 100.0 + 4.0 * ref.intervals[lv][1].double()
        )
    assert got.anomaly_score is not None and ref.anomaly_score is not None
    torch.testing.assert_close(got.anomaly_score, ref.anomaly_score)


def test_identity_schema_changes_nothing() -> None:
    ens = _ens()
    schema = DataSchema.identity(("a", "b", "c"))
    got = predict_raw(ens, schema, X_RAW, LEVELS)
    ref = predict(ens, X_RAW.float(), LEVELS)
    assert torch.equal(got.mean, ref.mean) and torch.equal(got.total_std, ref.total_std)


def test_log1p_target_intervals_map_exactly_and_moments_match_monte_carlo() -> None:
    ens = _ens()
    loc, scale = 2.0, 0.2
    schema = DataSchema(FEATS, Column("t", "log1p", loc, scale))
    got = predict_raw(ens, schema, X_RAW, LEVELS, torch.tensor([5.0, -3.0, 7.0]))
    z = rows_to_model(schema, X_RAW)
    ref = predict(ens, z, LEVELS)
    for lv in LEVELS:
        lo, hi = ref.intervals[lv]
        torch.testing.assert_close(got.intervals[lv][0], torch.expm1(loc + scale * lo.double()))
        torch.testing.assert_close(got.intervals[lv][1], torch.expm1(loc + scale * hi.double()))
    # the closed-form log-normal moments against brute-force sampling of the mixture
    mu, sigma = component_params(ens, z)
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(40_000, *mu.shape, generator=gen, dtype=torch.float64)
    v = torch.expm1(loc + scale * (mu.double() + sigma.double() * eps))  # [K, S, N]
    per_comp = v.mean(0)
    torch.testing.assert_close(got.mean, v.mean((0, 1)), rtol=0.02, atol=0.0)
    torch.testing.assert_close(
        got.epistemic_std, per_comp.std(0, correction=0), rtol=0.05, atol=0.0
    )
    torch.testing.assert_close(
        got.total_std, v.reshape(-1, 3).std(0, correction=0), rtol=0.05, atol=0.0
    )
    # an observation below log1p's domain is as unlikely as can be
    assert got.tail_prob is not None and float(got.tail_prob[1]) == 0.0
    assert float(got.anomaly_score[1]) == 1.0  # type: ignore[index]


def test_student_t_log1p_target_gets_seeded_monte_carlo_moments() -> None:
    ens = _ens("student-t", df=6.0)
    schema = DataSchema(FEATS, Column("t", "log1p", 0.0, 0.1))
    a = predict_raw(ens, schema, X_RAW, LEVELS)
    b = predict_raw(ens, schema, X_RAW, LEVELS)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.total_std, b.total_std)
    assert bool(torch.isfinite(a.mean).all()) and bool((a.total_std > 0).all())
    lo, hi = a.intervals[0.95]
    assert bool((lo < a.mean).all()) and bool((a.mean < hi).all())
    assert math.isfinite(float(a.aleatoric_std.max()))
