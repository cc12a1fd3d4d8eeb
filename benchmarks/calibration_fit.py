"""One drift-alarm fit (calibration_plan + fit_alarm(estimate=False), as the drift loop's
_fit_thresholds calls them), before vs after the exact fast paths, in one process.

"Before" puts the earlier per-stream / per-lag code back (the reference copies the
tests check against); the fits must agree bit for bit, and the script says so.
Run: ``nice -n 10 .venv/bin/python benchmarks/calibration_fit.py`` (not a test).
"""

from __future__ import annotations

import contextlib
import pathlib
import statistics
import sys
import time
from collections.abc import Iterator

import numpy as np

from fogline.drift import calibration, runner
from fogline.drift.config import PolicyConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "drift"), str(ROOT / "tests" / "models")]
from test_calibration_exact import (  # noqa: E402
    _running_min_reference,
    simulate_streams_reference,
)
from test_lag_correlations import _detect_period_reference  # noqa: E402


@contextlib.contextmanager
def before() -> Iterator[None]:
    saved = calibration.simulate_streams, calibration._running_min, runner.detect_period
    calibration.simulate_streams = simulate_streams_reference  # type: ignore[assignment]
    calibration._running_min = _running_min_reference
    runner.detect_period = _detect_period_reference
    try:
        yield
    finally:
        calibration.simulate_streams, calibration._running_min, runner.detect_period = saved


def window(n: int, batch: int, cycle: int, seed: int) -> tuple[np.ndarray, ...]:
    """A calibration window of n (NLL, outlier) records in batches of ``batch``."""
    rng = np.random.default_rng(seed)
    nll = rng.gamma(2.0, 1.0, size=n)
    if cycle:
        nll += 3.0 * np.sin(2 * np.pi * np.arange(n) / cycle)
    rec = np.column_stack([nll, (rng.random(n) < 0.05).astype(np.float64)])
    return tuple(rec[i : i + batch] for i in range(0, n, batch))


def fit(cal: tuple[np.ndarray, ...], policy: PolicyConfig) -> tuple[object, object]:
    plan = runner.calibration_plan(cal, policy)
    records = np.concatenate(cal)
    batch_size = max(1, int(np.median([len(r) for r in cal])))
    c = runner.fit_alarm(
        records,
        batch_size,
        policy,
        ert=policy.ert,
        consecutive=policy.consecutive,
        n_streams=policy.n_streams,
        seed=0,
        block=min(plan.block * batch_size, len(records)),
        period=plan.period,
        estimate=False,
    )
    return plan, c


def timed(cal: tuple[np.ndarray, ...], policy: PolicyConfig, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fit(cal, policy)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out


def main() -> None:
    policy = PolicyConfig()
    cases = [
        ("320 records, batches of 8 (keyed key), noise", window(320, 8, 0, 1), 21),
        ("320 records, batches of 8, a 48-record cycle", window(320, 8, 48, 2), 21),
        ("2000 records, batches of 256, noise", window(2000, 256, 0, 3), 7),
    ]
    for name, cal, repeats in cases:
        with before():
            t_old, old = timed(cal, policy, repeats)
        t_new, new = timed(cal, policy, repeats)
        plan, c = new
        same = old == new
        print(
            f"{name}: before {t_old:.2f} ms, after {t_new:.2f} ms per fit "
            f"(x{t_old / t_new:.1f}); plan {plan}; threshold {c.threshold!r}; "  # type: ignore[attr-defined]
            f"identical: {same}"
        )


if __name__ == "__main__":
    main()
