"""Bootstrap calibration of alarm thresholds for a target ERT."""

from __future__ import annotations

import numpy as np
import pytest

from fogline.drift.calibration import (
    block_bootstrap,
    calibrate_batch_statistic,
    calibrate_threshold,
    dependence_horizon,
    mean_run_length,
    simulate_streams,
)
from fogline.drift.monitors import ThresholdMonitor


def _ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    e = rng.standard_normal(n)
    out = np.empty(n)
    out[0] = e[0]
    for i in range(1, n):
        out[i] = phi * out[i - 1] + np.sqrt(1 - phi**2) * e[i]
    return out


def test_iid_threshold_matches_normal_quantile() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(50_000)
    cal = calibrate_threshold(ref, ert=200, n_streams=3000, seed=1)
    # for iid N(0,1) and k=1 the exact answer is the 1 - 1/200 quantile = 2.576
    assert cal.threshold == pytest.approx(2.576, abs=0.08)
    assert cal.ert_estimate == pytest.approx(200, rel=0.15)
    assert cal.to_dict()["ert_target"] == 200


def test_record_bootstrap_on_batch_medians_gives_the_ert() -> None:
    rng = np.random.default_rng(1)
    ref = rng.standard_normal(20_000) ** 2  # per-record values, heavy-ish right tail
    cal = calibrate_batch_statistic(ref, batch_size=32, ert=300, statistic="median", n_streams=600)
    # check on fresh batches from the true distribution, through the monitor itself
    mon = ThresholdMonitor(threshold=cal.threshold)
    fresh = np.median(rng.standard_normal((90_000, 32)) ** 2, axis=1)
    alarms = 0
    for v in fresh:
        mon.update(float(v))
        alarms += mon.drift_detected
    assert mean_run_length(len(fresh), alarms) == pytest.approx(300, rel=0.3)
    assert cal.method == "record_bootstrap_median"


def test_block_bootstrap_handles_autocorrelation_with_consecutive_alarms() -> None:
    rng = np.random.default_rng(2)
    ref = _ar1(rng, 20_000, 0.6)
    cal = calibrate_threshold(ref, ert=200, consecutive=2, block=20, n_streams=2000, seed=0)
    fresh = _ar1(rng, 200_000, 0.6)
    mon = ThresholdMonitor(threshold=cal.threshold, consecutive=2)
    alarms = 0
    for v in fresh:
        mon.update(float(v))
        alarms += mon.drift_detected
    assert mean_run_length(len(fresh), alarms) == pytest.approx(200, rel=0.3)
    # an iid bootstrap breaks the runs of high values, under-estimates how often two
    # exceedances come in a row, and so sets a lower threshold: more false alarms
    iid = calibrate_threshold(ref, ert=200, consecutive=2, block=1, n_streams=2000, seed=0)
    assert iid.threshold < cal.threshold - 0.2


def test_block_bootstrap_shapes_and_determinism() -> None:
    v = np.arange(100.0)
    a = block_bootstrap(v, 5, 37, 10, np.random.default_rng(3))
    b = block_bootstrap(v, 5, 37, 10, np.random.default_rng(3))
    assert a.shape == (5, 37) and np.array_equal(a, b)
    assert np.all(np.diff(a[:, :10], axis=1) == 1)  # first block is contiguous
    with pytest.raises(ValueError):
        calibrate_threshold(np.ones(1), ert=10)


def _ar1_records(n: int, phi: float, rng: np.random.Generator) -> np.ndarray:
    from scipy.signal import lfilter

    return np.asarray(lfilter([1.0], [1.0, -phi], rng.standard_normal(n))) * np.sqrt(1 - phi**2)


def _alarms(batch_means: np.ndarray, threshold: float, consecutive: int) -> int:
    alarms, streak = 0, 0
    for over in batch_means > threshold:
        streak = streak + 1 if over else 0
        if streak >= consecutive:
            alarms, streak = alarms + 1, 0
    return alarms


def test_block_bootstrap_holds_the_ert_on_autocorrelated_records() -> None:
    """AR(1) records (phi 0.9): drawing records independently under-states the batch mean's
    variance (measured run length 8-9 batches for ERT 50); blocks of 2 batches hold it
    (measured 42-75 per seed, 55 pooled over seeds 0-2)."""
    b, ert = 64, 50.0
    monitored, alarms_iid, alarms_block = 0, 0, 0
    for seed in range(3):
        rng = np.random.default_rng(seed)
        ref = _ar1_records(200 * b, 0.9, rng)
        live = _ar1_records(4000 * b, 0.9, rng).reshape(-1, b).mean(1)
        monitored += len(live)
        for block in (1, 2 * b):
            cal = calibrate_batch_statistic(
                ref, b, ert, consecutive=2, n_streams=300, seed=0, block=block
            )
            n = _alarms(live, cal.threshold, 2)
            if block == 1:
                alarms_iid += n
            else:
                alarms_block += n
                assert cal.method == "record_block_bootstrap_mean" and cal.block == 2 * b
    assert monitored / alarms_iid < 0.3 * ert
    assert 0.5 * ert <= monitored / alarms_block <= 1.5 * ert


def test_block_zero_or_one_is_the_independent_draw() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(3_000)
    fits = [
        calibrate_batch_statistic(ref, 64, 50.0, consecutive=2, n_streams=50, seed=1, block=b)
        for b in (0, 1)
    ]
    assert fits[0] == fits[1] and fits[0].method == "record_bootstrap_mean"


# ----------------------------------------------------------------------------- cycles
def _cycle(n: int, period: int, rng: np.random.Generator, phase: int = 0) -> np.ndarray:
    """Records of a daily-like cycle: a sine of one unit plus unit noise."""
    t = phase + np.arange(n)
    return np.sin(2 * np.pi * t / period) + rng.standard_normal(n)


def test_dependence_horizon_of_noise_cycles_and_constants() -> None:
    rng = np.random.default_rng(0)
    assert dependence_horizon(rng.standard_normal(400)) <= 1
    # a batch signal with a cycle of 18 batches (7 high, 11 low): dependence spans the cycle
    square = np.tile([1.0] * 7 + [0.0] * 11, 5) + 0.05 * rng.standard_normal(90)
    assert dependence_horizon(square) >= 18
    assert dependence_horizon(square, max_lag=10) == 10
    assert dependence_horizon(np.full(40, 3.0)) == 0  # no autocorrelation to speak of
    assert dependence_horizon(np.arange(2.0)) == 0


def test_seasonal_bootstrap_keeps_every_record_at_its_phase() -> None:
    """Window = the phase itself: every simulated stream must read phi0, phi0 + 1, ... mod d."""
    period, b = 30, 8
    window = (np.arange(100) % period).astype(np.float64)
    broken: list[int] = []

    def stat(batches: np.ndarray) -> np.ndarray:
        # streams' batches, [streams, 40, b] (several streams a call); window statistics
        # ([windows, b], calibrate_batch_statistic's windowed path) are not checked
        streams = batches.reshape(-1, 40 * b) if batches.shape[-2:] == (40, b) else []
        for flat in streams:
            want = (flat[0] + np.arange(flat.size)) % period
            broken.append(int(np.count_nonzero(flat != want)))
        return np.asarray(batches.mean(-1))

    # the records themselves (the gathered path); the windowed one equals it bit for bit
    # (test_window_statistics_equal_the_gathered_batches)
    simulate_streams(
        window,
        stat,
        np.random.Generator(np.random.PCG64(0)),
        batch_size=b,
        length=40,
        n_streams=50,
        block=2 * b,
        period=period,
        windowed=False,
    )
    assert broken and max(broken) == 0
    cal = calibrate_batch_statistic(
        window, b, 40.0, statistic=stat, consecutive=2, n_streams=50, block=2 * b, period=period
    )
    assert cal.period == period and cal.method == "record_seasonal_block_bootstrap_stat"


def test_seasonal_bootstrap_needs_every_phase_twice() -> None:
    with pytest.raises(ValueError, match="2 periods"):
        calibrate_batch_statistic(np.zeros(100), 8, 40.0, block=16, period=50)


def test_seasonal_bootstrap_holds_the_ert_on_a_cycle() -> None:
    """A cycle of 100 records seen through batches of 16 (6.25 batches a cycle), windows
    of 40 batches: fresh streams of the same process (random phase) alarm about once per
    ERT with the seasonal bootstrap (measured per window 18-83 batches for ERT 50, pooled
    over windows 0-7: 38; blocks of 2 batches that ignore the cycle: 11-64, pooled 28),
    while records drawn independently alarm every ~6 batches."""
    period, b, ert = 100, 16, 50.0
    kw = {"consecutive": 2, "n_streams": 500, "seed": 0}
    monitored, seasonal_alarms, iid_alarms = 0, 0, 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        window = _cycle(40 * b, period, rng, phase=int(rng.integers(period)))
        live = _cycle(5_000 * b, period, rng, phase=int(rng.integers(period)))
        means = live.reshape(-1, b).mean(1)
        seasonal = calibrate_batch_statistic(window, b, ert, block=2 * b, period=period, **kw)
        iid = calibrate_batch_statistic(window, b, ert, **kw)
        monitored += len(means)
        seasonal_alarms += _alarms(means, seasonal.threshold, 2)
        iid_alarms += _alarms(means, iid.threshold, 2)
    assert 0.5 * ert <= monitored / seasonal_alarms <= 1.5 * ert
    assert monitored / iid_alarms < 0.3 * ert


def test_a_signal_that_repeats_exactly_is_deterministic() -> None:
    """A noise-free cycle: every simulated stream holds the cycle's highest pair, the
    threshold is that pair's value (plus the tie margin) and the fit says so."""
    period, b = 48, 8
    window = np.tile(np.sin(2 * np.pi * np.arange(period) / period), 8)
    cal = calibrate_batch_statistic(window, b, 20.0, consecutive=2, n_streams=100, period=period)
    means = window.reshape(-1, b).mean(1)
    top = max(min(means[i], means[i + 1]) for i in range(len(means) - 1))
    assert cal.deterministic and cal.threshold == pytest.approx(top, abs=1e-5)
    assert cal.threshold > top and _alarms(np.tile(means, 50), cal.threshold, 2) == 0
    noisy = window + 0.3 * np.random.default_rng(0).standard_normal(window.size)
    assert not calibrate_batch_statistic(noisy, b, 20.0, consecutive=2, n_streams=100).deterministic


@pytest.mark.parametrize(
    ("batch", "block", "period", "columns"),
    [(8, 16, 0, 2), (7, 21, 0, 2), (64, 128, 0, 1), (5, 5, 48, 2), (8, 8, 96, 1), (1, 0, 30, 2)],
)
def test_window_statistics_equal_the_gathered_batches(
    batch: int, block: int, period: int, columns: int
) -> None:
    """Blocks of whole batches: the windowed streams equal gathering each batch, bit for bit."""
    from fogline.drift.runner import inlier_batch_statistic

    rng = np.random.default_rng(5)
    v = np.stack([rng.normal(2.0, 1.0, 400), (rng.random(400) < 0.05).astype(float)], 1)
    if columns == 1:
        v, reduce = v[:, 0], (lambda a: np.asarray(np.median(a, axis=-1)))
    else:
        reduce = inlier_batch_statistic(0.4)
    kw = {"batch_size": batch, "length": 120, "n_streams": 40, "block": block, "period": period}
    fast = simulate_streams(v, reduce, np.random.Generator(np.random.PCG64(9)), windowed=True, **kw)
    slow = simulate_streams(
        v, reduce, np.random.Generator(np.random.PCG64(9)), windowed=False, **kw
    )
    assert fast.shape == (40, 120)
    assert np.array_equal(fast, slow)
    assert len(np.unique(fast)) > 20  # the streams vary: not a trivially equal pair


def test_windowed_streams_need_blocks_of_whole_batches() -> None:

    v = np.arange(100.0)
    with pytest.raises(ValueError, match="whole batches"):
        simulate_streams(
            v,
            np.mean,
            np.random.default_rng(0),
            batch_size=8,
            length=10,
            n_streams=2,
            block=12,
            windowed=True,
        )


def test_a_fit_without_the_ert_check_has_the_same_threshold() -> None:
    """The check streams are drawn after the fit's: skipping them changes no threshold."""
    rng = np.random.default_rng(2)
    v = np.stack([rng.normal(1.0, 1.0, 300), (rng.random(300) < 0.02).astype(float)], 1)
    kw = {"consecutive": 2, "n_streams": 60, "seed": 4, "block": 16}
    full = calibrate_batch_statistic(v[:, 0], 8, 200.0, **kw)  # type: ignore[arg-type]
    lean = calibrate_batch_statistic(v[:, 0], 8, 200.0, estimate=False, **kw)  # type: ignore[arg-type]
    assert lean.threshold == full.threshold and np.isfinite(full.ert_estimate)
    assert np.isnan(lean.ert_estimate) and lean.to_dict()["ert_estimate"] is None
