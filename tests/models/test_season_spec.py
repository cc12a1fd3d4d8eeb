"""``model.season``: the seasonal inputs of ``bench nab`` built by the spec's one builder.

features_for with a period equals the experiment's composition (build_features,
select_lags, seasonal_naive) on the same series; split runs equal one run;
the spec validates the season; the warm start resolves ``"auto"`` and stores
the period; settings that contradict the stored season are named.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fogline.daemon.stream.series import series_problems, settings_spec
from fogline.models.autoregressive import (
    LagState,
    Record,
    SeriesState,
    ShortHistory,
    build_features,
    features_for,
    next_inputs,
    resolve_season,
    seasonal_lags,
    seasonal_naive,
    select_lags,
    spec_depth,
    stored_series,
    ts_from_ms,
)
from fogline.models.fit import FitOptions, fit
from fogline.models.spec import ModelSpec, contradictions
from fogline.models.tabular import Table

T0 = datetime(2024, 3, 4, tzinfo=UTC)  # a Monday


def _spec(**kw: object) -> ModelSpec:
    return ModelSpec.model_validate(
        {"mode": "autoregressive", "target": "value", "timestamp": "ts", "lags": 3, **kw}
    )


def _cycle(n: int, period: int, keys: tuple[str, ...] = ("a",), seed: int = 0) -> list[Record]:
    """Each key a noisy cycle of ``period`` records on a drifting level (5-minute steps)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        j = i // len(keys)  # the record's position in its key's series
        v = math.sin(2 * math.pi * j / period) + 0.001 * j + 0.1 * rng.standard_normal()
        out.append(Record(T0 + timedelta(minutes=5 * i), v, keys[i % len(keys)]))
    return out


def test_the_spec_names_the_seasonal_inputs_in_the_experiments_column_order() -> None:
    spec = _spec(season=10)
    assert spec.features == (
        "lag_1",
        "lag_2",
        "lag_3",
        "season_lag_9",
        "season_lag_10",
        "season_lag_11",
        "hour_sin",
        "hour_cos",
        "dow_sin",
        "dow_cos",
        "season_naive",
    )
    assert spec_depth(spec) == 11 and spec_depth(_spec()) == 3 == spec_depth(_spec(season="none"))
    assert _spec(season=3, calendar=False).features == (
        "lag_1",
        "lag_2",
        "lag_3",
        "season_lag_4",
        "season_naive",
    )
    assert _spec().season == "auto" and _spec().features == _spec(season="none").features
    logged = _spec(season=10, transforms={"value": "log1p"})
    assert logged.transform_of("season_lag_10") == "log1p"
    assert logged.transform_of("season_naive") == "standardise"  # v + v - v can be negative
    assert ModelSpec.model_validate(spec.model_dump(mode="json")) == spec  # round-trips


@pytest.mark.parametrize("bad", [1, 0, -5, "weekly", 2.5])
def test_a_bad_season_is_refused_naming_the_field(bad: object) -> None:
    with pytest.raises(ValidationError, match="season"):
        _spec(season=bad)


def test_features_for_with_a_season_equals_the_experiments_inputs() -> None:
    period = 12
    recs = _cycle(200, period)
    spec = _spec(season=period)
    got = features_for(spec, recs, SeriesState.empty(spec))
    # the composition drift/experiment.py streamed before it called features_for
    lags = seasonal_lags(3, period)
    x, y, rows, _ = build_features(recs, LagState(max(lags)), calendar=True)
    xs = select_lags(x, max(lags), lags, calendar=True)
    ref = np.column_stack([xs, seasonal_naive(xs, lags, period)])
    np.testing.assert_array_equal(got.x, ref)
    np.testing.assert_array_equal(got.y, y)
    np.testing.assert_array_equal(got.rows, rows)
    assert got.warming == period + 1 and got.x.shape == (200 - 13, len(spec.features))


def test_seasonal_split_runs_with_a_json_state_equal_one_run_and_next_inputs() -> None:
    spec = _spec(season=8, key="host")
    recs = _cycle(90, 8, ("a", "b", "c"))
    whole = features_for(spec, recs, SeriesState.empty(spec))
    first = features_for(spec, recs[:20], SeriesState.empty(spec))  # every key still warming
    assert len(first.rows) == 0 and first.x.shape == (0, len(spec.features))
    restored = SeriesState.from_json(json.loads(json.dumps(first.state.to_json())))
    second = features_for(spec, recs[20:], restored)
    np.testing.assert_array_equal(np.concatenate([first.x, second.x]), whole.x)
    assert second.state == whole.state
    assert first.warming + second.warming == whole.warming == 3 * 9  # 3 keys x (P + 1)
    # the next value's inputs are those a record at that time would get
    x, ts = next_inputs(spec, whole.state, "a")
    probe = Record(ts_from_ms(ts), 0.0, "a")
    np.testing.assert_array_equal(x, features_for(spec, [probe], whole.state).x)
    with pytest.raises(ShortHistory, match="needs 9"):
        next_inputs(spec, first.state, "a")
    with pytest.raises(ValueError, match="needs 9"):
        features_for(spec, recs, SeriesState.empty(_spec()))  # a state of another depth


def test_auto_resolves_to_the_detected_period_or_none() -> None:
    v = np.array([r.value for r in _cycle(300, 24)])
    found = resolve_season(_spec(), v).season
    assert isinstance(found, int) and abs(found - 24) <= 2  # a broad peak: a record or two
    noise = np.random.default_rng(1).standard_normal(300)
    assert resolve_season(_spec(), noise).season == "none"
    assert resolve_season(_spec(season=7), v).season == 7  # a fixed period is kept
    assert resolve_season(_spec(season="none"), v).season == "none"


def test_the_warm_start_stores_the_resolved_season_and_settings_are_checked_against_it() -> None:
    recs = _cycle(480, 24, ("a", "b"))
    spec = _spec(key="host", hidden=(4,))
    table = Table(
        torch.empty(len(recs), 0, dtype=torch.float64),
        torch.tensor([r.value for r in recs], dtype=torch.float64),
        torch.tensor([int(r.ts.timestamp() * 1000) for r in recs], dtype=torch.int64),
        [r.key for r in recs],
        "cycle",
    )
    state = fit(spec, table, FitOptions(epochs=1, samples=4)).state
    stored = stored_series(state.extra)
    assert stored is not None
    have, series = stored
    period = have.season
    assert isinstance(period, int) and abs(period - 24) <= 2
    assert state.config.features() == have.features and have.features[-1] == "season_naive"
    assert series == features_for(have, recs, SeriesState.empty(have)).state
    # "auto" in the settings agrees with the stored period; another one is named
    same = settings_spec(spec, state)
    assert same is not None and same.season == period
    assert contradictions(same, state.config) == [] and series_problems(same, state) == []
    other = _spec(key="host", hidden=(4,), season=period + 5)
    assert settings_spec(other, state) is other
    assert any(p.startswith("model.season: settings say") for p in series_problems(other, state))
    assert any(p.startswith("model.features") for p in contradictions(other, state.config))
