"""Period detection from the autocorrelation, and the seasonal lag inputs built from it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from fogline.models.autoregressive import (
    LagState,
    Record,
    build_features,
    detect_period,
    seasonal_lags,
    seasonal_naive,
    select_lags,
)


@pytest.mark.parametrize("period", [24, 96, 288])
def test_a_noisy_cycle_gives_its_period(period: int) -> None:
    rng = np.random.default_rng(period)
    t = np.arange(int(2.2 * period))
    v = np.sin(2 * np.pi * t / period) + 0.3 * rng.standard_normal(len(t))
    found = detect_period(v, min_lag=16)
    assert found is not None and abs(found - period) <= 0.05 * period  # a broad peak: a few records


def test_a_square_wave_and_a_spike_train_have_periods() -> None:
    t = np.arange(700)
    assert detect_period((t % 288 < 144).astype(float), min_lag=16) == 288
    spikes = np.zeros(700)
    spikes[::100] = 5.0
    assert detect_period(spikes + 0.01 * np.sin(t), min_lag=16) == 100


def test_noise_trends_and_flat_series_have_none() -> None:
    rng = np.random.default_rng(0)
    for seed in range(5):
        noise = np.random.default_rng(seed).standard_normal(600)
        assert detect_period(noise, min_lag=16) is None
    walk = np.cumsum(rng.standard_normal(600))  # slowly decaying autocorrelation, no climb
    assert detect_period(walk, min_lag=16) is None
    assert detect_period(np.linspace(0, 1, 600), min_lag=16) is None
    assert detect_period(np.ones(600), min_lag=16) is None
    assert detect_period(np.ones(10), min_lag=16) is None  # too short to hold two periods


def test_seasonal_lags_and_their_columns() -> None:
    assert seasonal_lags(3, None) == (1, 2, 3)
    assert seasonal_lags(3, 10) == (1, 2, 3, 9, 10, 11)
    assert seasonal_lags(3, 3) == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="period"):
        seasonal_lags(3, 1)
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    records = [Record(t0 + timedelta(hours=i), float(i)) for i in range(30)]
    x, y, rows, _ = build_features(records, LagState(11), calendar=True)
    xs = select_lags(x, 11, seasonal_lags(3, 10), calendar=True)
    assert xs.shape == (len(y), 6 + 4)
    # lag k of record t is v_{t-k}: here v_t = t
    np.testing.assert_array_equal(xs[:, :6], y[:, None] - np.array([1, 2, 3, 9, 10, 11]))
    np.testing.assert_array_equal(xs[:, 6:], x[:, 11:])
    assert rows[0] == 11
    with pytest.raises(ValueError, match="lags"):
        select_lags(x, 11, (1, 12), calendar=True)


def test_the_seasonal_naive_forecast_is_exact_on_a_pattern_over_a_drifting_level() -> None:
    period = 12
    t = np.arange(120, dtype=np.float64)
    v = np.sin(2 * np.pi * t / period) + 0.05 * t  # a cycle on a linear trend
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    records = [Record(t0 + timedelta(minutes=5 * i), float(x)) for i, x in enumerate(v)]
    lags = seasonal_lags(2, period)
    x, y, _, _ = build_features(records, LagState(max(lags)), calendar=False)
    f = seasonal_naive(select_lags(x, max(lags), lags, calendar=False), lags, period)
    np.testing.assert_allclose(f, y, atol=1e-9)
    with pytest.raises(ValueError, match="seasonal naive"):
        seasonal_naive(x[:, :2], (1, 2), period)
