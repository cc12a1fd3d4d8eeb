"""How the drift loop bootstraps a calibration window (:func:`fogline.drift.runner.calibration_plan`)."""

from __future__ import annotations

import numpy as np

from fogline.drift.config import PolicyConfig
from fogline.drift.runner import CalibrationPlan, calibration_plan


def _window(values: np.ndarray, batch: int) -> tuple[np.ndarray, ...]:
    """Per-batch [B, 2] (surprisal, outlier flag) records, as the loop collects them."""
    nll = values.reshape(-1, batch)
    return tuple(np.stack([row, np.zeros(batch)], 1) for row in nll)


def test_independent_records_keep_the_configured_block() -> None:
    rng = np.random.default_rng(0)
    window = _window(rng.standard_normal(40 * 16), 16)
    assert calibration_plan(window, PolicyConfig()) == CalibrationPlan(block=2)
    fixed = PolicyConfig(calibration_block_auto=False, calibration_block=3)
    assert calibration_plan(window, fixed) == CalibrationPlan(block=3)


def test_a_cycle_extends_the_window_then_bootstraps_by_phase() -> None:
    """A cycle of 96 records (6 batches of 16): 4 cycles are 24 batches."""
    rng = np.random.default_rng(1)
    t = np.arange(40 * 16)
    values = np.sin(2 * np.pi * t / 96) + 0.3 * rng.standard_normal(t.size)
    short = _window(values[: 12 * 16], 16)  # 2 cycles
    plan = calibration_plan(short, PolicyConfig())
    assert plan.extend == 12 and plan.period == 0  # 4 * 96 records - 192 = 12 batches
    assert calibration_plan(short, PolicyConfig(calibration_max_batches=15)).extend == 3
    # told 2 cycles are enough, but 2 cycles + a block do not fit 12 batches: long blocks
    assert calibration_plan(short, PolicyConfig(calibration_cycles=2)) == CalibrationPlan(6)
    full = _window(values, 16)
    plan = calibration_plan(full, PolicyConfig())
    assert plan.block == 2 and plan.extend == 0 and abs(plan.period - 96) <= 1
    assert calibration_plan(full, PolicyConfig(calibration_block_auto=False)) == CalibrationPlan(2)


def test_a_cycle_seen_less_than_twice_or_a_trend_gets_long_blocks() -> None:
    rng = np.random.default_rng(2)
    n = 40
    walk = np.cumsum(rng.standard_normal(n * 16)) * 0.05  # slowly wandering level
    plan = calibration_plan(_window(walk, 16), PolicyConfig())
    assert plan.period == 0 and plan.extend == 0 and 2 < plan.block <= n // 2
