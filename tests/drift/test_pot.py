"""drift/pot.py: calibrated exceedance probabilities (rank bulk, peaks-over-threshold tail)."""

from __future__ import annotations

import numpy as np
import pytest

from fogline.drift.pot import TailCalibrator, TailConfig, calibrate, gpd_pwm


def _rates(q: np.ndarray, levels: tuple[float, ...]) -> list[float]:
    return [float(np.mean(q <= lv)) / lv for lv in levels]


@pytest.mark.parametrize("shape", [0.0, 0.3])
def test_a_threshold_q_fires_at_rate_q_on_a_stable_stream(shape: float) -> None:
    """i.i.d. light (exponential) and heavy (Pareto, xi = 0.3) tails; nominal q deliberately wrong."""
    rng = np.random.default_rng(0)
    u = rng.uniform(size=60_000)
    a = -np.log(u) if shape == 0 else (u**-shape - 1) / shape  # GPD(xi, 1) draws
    q = calibrate(a, 0.5, TailConfig())[1000:]
    for rate in _rates(q, (1e-1, 1e-2, 1e-3)):
        assert 0.7 <= rate <= 1.3, rate
    assert 0.5 <= _rates(q, (1e-4,))[0] <= 2.0  # 6 expected: sampling error


def test_pwm_recovers_a_generalised_pareto() -> None:
    rng = np.random.default_rng(1)
    xi, sigma = 0.2, 2.0
    y = sigma * (rng.uniform(size=20_000) ** -xi - 1) / xi
    fit = gpd_pwm(y, max_shape=0.5)
    assert fit is not None
    assert fit[0] == pytest.approx(xi, abs=0.03) and fit[1] == pytest.approx(sigma, rel=0.05)
    assert gpd_pwm(np.zeros(10)) is None  # degenerate: no excess at all
    assert gpd_pwm(rng.uniform(size=2000), max_shape=0.5)[0] == 0.0  # type: ignore[index]


def test_the_zero_atom_and_the_nominal_warm_up() -> None:
    rng = np.random.default_rng(2)
    a = np.where(rng.uniform(size=5000) < 0.03, rng.exponential(size=5000) + 1.0, 0.0)
    cfg = TailConfig()
    q = calibrate(a, 0.25, cfg)
    assert np.all(q[: cfg.min_history] == 0.25)  # nominal until warmed up
    assert np.all(q[cfg.min_history :][a[cfg.min_history :] == 0] == 1.0)
    live = q[cfg.min_history :][a[cfg.min_history :] > 0]
    assert live.max() < 0.1 and live.min() > 0  # a nonzero value is rarer than 3 %


def test_a_restarted_calibrator_continues_exactly() -> None:
    rng = np.random.default_rng(3)
    a = rng.exponential(size=3000)
    cfg = TailConfig(window=1000, min_history=200)
    whole = calibrate(a, 1.0, cfg)
    first = TailCalibrator(cfg)
    q1 = first.update(a[:1700].tolist(), [1.0] * 1700)
    state = first.state_dict()
    assert len(state["history"]) == 1000 and state["history"][-1] == a[1699]
    second = TailCalibrator.from_state(state, cfg)
    q2 = second.update(a[1700:].tolist(), [1.0] * 1300)
    np.testing.assert_array_equal(np.r_[q1, q2], whole)


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="min_history"):
        TailConfig(window=100, min_history=200)
    with pytest.raises(ValueError, match="min_peaks"):
        TailConfig(min_history=10, min_peaks=10)
