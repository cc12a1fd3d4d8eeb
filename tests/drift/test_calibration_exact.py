"""The fast bootstrap paths against the per-stream, sliding-window code they replaced.

``_running_min_reference`` and ``simulate_streams_reference`` are verbatim copies of
the earlier implementations (one ``rng`` call per stream, ``sliding_window_view``
minima); the fast ones must return the same values bit for bit and leave ``rng``
where the old ones did, so the thresholds fitted from them are equal with ``==``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from fogline.drift import calibration
from fogline.drift.calibration import (
    Calibration,
    _running_min,
    _seasonal_draws_loop,
    calibrate_batch_statistic,
    calibrate_threshold,
    dependence_horizon,
    seasonal_draws,
    simulate_streams,
)
from fogline.drift.config import PolicyConfig
from fogline.drift.runner import (
    CalibrationPlan,
    batch_statistic,
    calibration_plan,
    inlier_batch_statistic,
    mean_batch_statistic,
)
from fogline.models.autoregressive import detect_period

FloatArray = npt.NDArray[np.float64]


def _running_min_reference(s: FloatArray, k: int) -> FloatArray:
    if k == 1:
        return s
    windows = np.lib.stride_tricks.sliding_window_view(s, k, axis=-1)
    return np.asarray(windows.min(axis=-1))


def simulate_streams_reference(
    v: FloatArray,
    reduce: Callable[[FloatArray], FloatArray],
    rng: np.random.Generator,
    *,
    batch_size: int,
    length: int,
    n_streams: int,
    block: int = 1,
    period: int = 0,
    windowed: bool | None = None,
) -> FloatArray:
    b = max(block, 1)
    can_window = (block > 1 or period > 0) and b % batch_size == 0
    if windowed is None:
        windowed = can_window
    r = v.shape[0]
    n_blocks = -(-length * batch_size // b)

    def block_starts() -> npt.NDArray[np.int64]:
        if period:
            first = r + batch_size * int(rng.integers(0, period))
            phase = (first + np.arange(n_blocks) * b) % period
            count = (r - b - phase) // period + 1
            return np.asarray(phase + period * (rng.random(n_blocks) * count).astype(np.int64))
        return rng.integers(0, r - block + 1, size=n_blocks)

    out = np.empty((n_streams, length))
    if windowed:
        windows = np.lib.stride_tricks.sliding_window_view(v, batch_size, axis=0)
        per = max(1, 8_000_000 // max(1, batch_size * int(np.prod(v.shape[1:]))))
        stats = np.concatenate(
            [
                np.asarray(reduce(np.ascontiguousarray(np.moveaxis(windows[lo : lo + per], -1, 1))))
                for lo in range(0, windows.shape[0], per)
            ]
        )
        offsets = np.arange(0, b, batch_size)
        for i in range(n_streams):
            out[i] = np.take(stats, (block_starts()[:, None] + offsets).reshape(-1)[:length])
        return out
    for i in range(n_streams):
        if block <= 1 and not period:
            idx = rng.integers(0, r, size=(length, batch_size))
        else:
            idx = (block_starts()[:, None] + np.arange(b)).reshape(-1)[: length * batch_size]
        out[i] = reduce(np.take(v, idx.reshape(length, batch_size), axis=0))
    return out


def _records(rng: np.random.Generator, n: int, cycle: int = 0) -> FloatArray:
    """``[n, 2]`` (NLL, outlier flag) records, with a cycle of ``cycle`` records if > 0."""
    nll = rng.gamma(2.0, 1.0, size=n)
    if cycle:
        nll += 2.0 * np.sin(2 * np.pi * np.arange(n) / cycle)
    out = (rng.random(n) < 0.1).astype(np.float64)
    return np.column_stack([nll, out])


def _median(a: FloatArray) -> FloatArray:
    return np.asarray(np.median(a[..., 0], axis=-1))


STATISTICS: list[Any] = [inlier_batch_statistic(0.4), mean_batch_statistic, _median]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_running_min_equals_the_sliding_window_minimum(k: int) -> None:
    rng = np.random.default_rng(k)
    for shape in [(9,), (1, 5), (3, 17), (4, 2, 11), (5, 250), (2, k), (2, max(k - 1, 1))]:
        s = np.round(rng.standard_normal(shape), 1)  # ties
        s[rng.random(shape) < 0.05] = np.nan
        s[rng.random(shape) < 0.05] = -np.inf
        if shape[-1] < k:  # no whole window: both fail alike
            with pytest.raises(ValueError):
                _running_min_reference(s, k)
            with pytest.raises(ValueError):
                _running_min(s, k)
            continue
        fast, slow = _running_min(s, k), _running_min_reference(s, k)
        assert fast.shape == slow.shape
        assert np.array_equal(fast, slow, equal_nan=True)


def test_one_integers_call_draws_what_per_stream_calls_draw() -> None:
    """The numpy property the vectorised block starts stand on (int64 draws in a 32-bit
    range come from the bit generator's own 32-bit buffer, kept between calls): odd
    and even sizes, ranges below and above 2**32, a buffered half left before."""
    for n_blocks in [1, 2, 3, 124, 125]:
        for high in [1, 2, 17, 305, 2**32, 2**32 + 5, 2**40]:
            for pre in [0, 1]:
                a = np.random.Generator(np.random.PCG64(n_blocks + high))
                b = np.random.Generator(np.random.PCG64(n_blocks + high))
                a.integers(0, 3, size=pre)
                b.integers(0, 3, size=pre)
                one = a.integers(0, high, size=(7, n_blocks))
                many = np.stack([b.integers(0, high, size=n_blocks) for _ in range(7)])
                assert np.array_equal(one, many)
                assert a.bit_generator.state == b.bit_generator.state


def _cases() -> list[dict[str, Any]]:
    """Plain, block (windowed and gathered) and seasonal streams; odd and even block counts."""
    rng = np.random.default_rng(20)
    cases: list[dict[str, Any]] = []
    for i in range(60):
        batch = int(rng.choice([1, 3, 8, 16, 32]))
        kind = ["plain", "block", "block_ragged", "seasonal"][i % 4]
        length = int(rng.integers(2, 40))
        n_streams = int(rng.integers(1, 30))
        block, period = 0, 0
        if kind == "block":
            block = batch * int(rng.integers(2, 5))
        elif kind == "block_ragged":
            block = int(rng.integers(2, 3 * batch + 3))
        elif kind == "seasonal":
            block = batch * int(rng.integers(0, 3))
            period = batch * int(rng.integers(2, 6)) + int(rng.integers(0, 2))
        r = int(max(batch, block) + rng.integers(0, 200) + 2 * period)
        cases.append(
            {
                "n": r,
                "cycle": period,
                "batch_size": batch,
                "length": length,
                "n_streams": n_streams,
                "block": block,
                "period": period,
                "stat": i % len(STATISTICS),
                "seed": i,
            }
        )
    return cases


@pytest.mark.parametrize(
    "case", _cases(), ids=lambda c: f"B{c['batch_size']}b{c['block']}p{c['period']}"
)
def test_simulate_streams_equals_the_per_stream_loop(case: dict[str, Any]) -> None:
    v = _records(np.random.default_rng(case["seed"]), case["n"], case["cycle"])
    reduce = STATISTICS[case["stat"]]
    kw = {k: case[k] for k in ("batch_size", "length", "n_streams", "block", "period")}
    b = max(case["block"], 1)
    can_window = (case["block"] > 1 or case["period"] > 0) and b % case["batch_size"] == 0
    for windowed in {None, False, can_window}:
        rf = np.random.Generator(np.random.PCG64(case["seed"]))
        rs = np.random.Generator(np.random.PCG64(case["seed"]))
        fast = simulate_streams(v, reduce, rf, windowed=windowed, **kw)
        slow = simulate_streams_reference(v, reduce, rs, windowed=windowed, **kw)
        assert fast.shape == slow.shape == (case["n_streams"], case["length"])
        assert np.array_equal(fast, slow)
        # the same draws consumed: what the generator gives next is the same
        assert rf.bit_generator.state == rs.bit_generator.state
        assert rf.random() == rs.random()


def test_simulate_streams_in_slices_of_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gathered streams reduced a few at a time (a small WINDOW_ELEMENTS) are unchanged."""
    v = _records(np.random.default_rng(3), 300)
    kw: dict[str, Any] = {"batch_size": 8, "length": 25, "n_streams": 23}
    for block in (0, 5, 16):
        slow = simulate_streams_reference(
            v,
            STATISTICS[0],
            np.random.Generator(np.random.PCG64(1)),
            block=block,
            windowed=False,
            **kw,
        )
        monkeypatch.setattr(calibration, "WINDOW_ELEMENTS", 1000)
        fast = simulate_streams(
            v,
            STATISTICS[0],
            np.random.Generator(np.random.PCG64(1)),
            block=block,
            windowed=False,
            **kw,
        )
        monkeypatch.undo()
        assert np.array_equal(fast, slow)


def _reference_fit(monkeypatch: pytest.MonkeyPatch, fn: Callable[[], Calibration]) -> Calibration:
    with monkeypatch.context() as m:
        m.setattr(calibration, "simulate_streams", simulate_streams_reference)
        m.setattr(calibration, "_running_min", _running_min_reference)
        return fn()


@pytest.mark.parametrize("consecutive", [1, 2, 3])
@pytest.mark.parametrize("estimate", [False, True])
def test_fitted_thresholds_equal_the_reference(
    monkeypatch: pytest.MonkeyPatch, consecutive: int, estimate: bool
) -> None:
    """calibrate_batch_statistic (as the drift loop calls it: keyed 320 records in
    batches of 8, a stream window of 2,000 in batches of 256) returns the same
    Calibration, threshold equal with ``==``."""
    rng = np.random.default_rng(consecutive)
    configs = [
        (320, 8, 16, 0),
        (320, 8, 24, 0),
        (320, 8, 16, 48),
        (320, 8, 0, 0),
        (330, 8, 13, 0),
        (2000, 256, 512, 0),
        (2000, 256, 0, 0),
        (2000, 256, 256, 600),
    ]
    for r, batch, block, period in configs:
        v = _records(rng, r, period)
        for stat in ("mean", "median", inlier_batch_statistic(0.4)):
            values = v if callable(stat) else v[:, 0]  # the named statistics take [R]
            kw: dict[str, Any] = {
                "ert": 1000.0,
                "statistic": stat,
                "consecutive": consecutive,
                "n_streams": 40,
                "seed": r + block,
                "block": block,
                "period": period,
                "estimate": estimate,
            }

            def fit(
                v: FloatArray = values, batch: int = batch, kw: dict[str, Any] = kw
            ) -> Calibration:
                return calibrate_batch_statistic(v, batch, **kw)

            fast, slow = fit(), _reference_fit(monkeypatch, fit)
            assert fast.threshold == slow.threshold
            assert fast.to_dict() == slow.to_dict()


@pytest.mark.parametrize("consecutive", [1, 2, 3])
def test_calibrate_threshold_equals_the_reference(
    monkeypatch: pytest.MonkeyPatch, consecutive: int
) -> None:
    v = np.random.default_rng(consecutive).standard_normal(500)

    def fit() -> Calibration:
        return calibrate_threshold(v, ert=300, consecutive=consecutive, block=7, n_streams=200)

    fast, slow = fit(), _reference_fit(monkeypatch, fit)
    assert fast.threshold == slow.threshold
    assert fast.ert_estimate == slow.ert_estimate


def _calibration_plan_reference(
    cal_records: tuple[np.ndarray, ...], policy: PolicyConfig
) -> CalibrationPlan:
    """The earlier calibration_plan, verbatim (the batch signal one call per batch)."""
    base = policy.calibration_block
    n = len(cal_records)
    if not policy.calibration_block_auto or n < 4:
        return CalibrationPlan(base)
    batch = max(1, int(np.median([len(r) for r in cal_records])))
    nll = np.concatenate([r[:, 0] for r in cal_records])
    period = detect_period(nll, min_lag=2 * batch)
    if period is not None:
        missing = math.ceil((policy.calibration_cycles * period - len(nll)) / batch)
        extend = max(0, min(missing, policy.calibration_max_batches - n))
        if extend > 0:
            return CalibrationPlan(base, 0, extend)
        if len(nll) >= 2 * period + max(base, 1) * batch:
            return CalibrationPlan(base, int(period))
    stat = batch_statistic(policy.signal, policy.max_outlier_fraction)
    signal = np.array([float(stat(r[None])[0]) for r in cal_records])
    return CalibrationPlan(max(base, min(n // 2, 2 * dependence_horizon(signal))))


@pytest.mark.parametrize("signal", ["surprisal_inlier", "surprisal"])
def test_batch_signal_in_one_call_equals_one_call_per_batch(signal: str) -> None:
    stat = batch_statistic(signal, 0.4)
    rng = np.random.default_rng(5)
    for batch in (1, 2, 7, 8, 16, 256):
        recs = [_records(rng, batch) for _ in range(int(rng.integers(1, 41)))]
        for layout in (recs, [np.asfortranarray(r) for r in recs]):
            one = np.asarray(stat(np.stack(layout)), dtype=np.float64)
            each = np.array([float(stat(r[None])[0]) for r in layout])
            assert np.array_equal(one, each)


def test_calibration_plan_equals_the_reference() -> None:
    rng = np.random.default_rng(6)
    seen = set()
    for i in range(80):
        batch = int(rng.choice([4, 8, 16]))
        n = int(rng.integers(2, 60))
        cycle = int(rng.choice([0, 0, 3 * batch, 5 * batch]))
        v = _records(rng, n * batch, cycle)
        if i % 3 == 0:  # smooth: long dependence, longer blocks
            v[:, 0] = np.cumsum(v[:, 0] - v[:, 0].mean())
        window = tuple(v[j : j + batch] for j in range(0, n * batch, batch))
        if i % 5 == 0:  # a short last batch: the per-batch path
            window = (*window[:-1], window[-1][: batch // 2])
        for policy in (PolicyConfig(), PolicyConfig(signal="surprisal", calibration_block=1)):
            plan = calibration_plan(window, policy)
            assert plan == _calibration_plan_reference(window, policy)
            seen.add((plan.period > 0, plan.extend > 0, plan.block > policy.calibration_block))
    assert len(seen) >= 3  # seasonal, extended and long-block plans all met


def test_a_float32_statistic_is_cast_as_before() -> None:
    v = _records(np.random.default_rng(8), 200)

    def stat32(a: FloatArray) -> Any:
        return np.asarray(a[..., 0].mean(-1), dtype=np.float32)

    kw: dict[str, Any] = {"batch_size": 8, "length": 20, "n_streams": 9, "block": 16}
    fast = simulate_streams(v, stat32, np.random.Generator(np.random.PCG64(2)), **kw)
    slow = simulate_streams_reference(v, stat32, np.random.Generator(np.random.PCG64(2)), **kw)
    assert fast.dtype == np.float64 and np.array_equal(fast, slow)


def test_seasonal_draws_equal_the_rounds_of_integers_and_random() -> None:
    """One random_raw call against the per-stream rounds: values, the generator's state
    (the kept 32-bit half included) and what it draws next; periods whose draws are
    often rejected (near 2**31) take the rounds themselves, with the same result."""
    rng = np.random.default_rng(30)
    fallbacks = 0
    for _ in range(300):
        seed = int(rng.integers(1 << 30))
        n_streams, n_blocks = int(rng.integers(1, 40)), int(rng.integers(0, 130))
        period = int(rng.choice([2, 3, 17, 48, 600, 2**31 + 1, 3 * 2**30, 2**32 - 1]))
        pre = int(rng.integers(0, 3))  # 0, 1 or 2 integers drawn before: a half kept or not
        fast_rng = np.random.Generator(np.random.PCG64(seed))
        slow_rng = np.random.Generator(np.random.PCG64(seed))
        fast_rng.integers(0, 5, size=pre)
        slow_rng.integers(0, 5, size=pre)
        m, u = seasonal_draws(fast_rng, n_streams, n_blocks, period)
        m_ref, u_ref = _seasonal_draws_loop(slow_rng, n_streams, n_blocks, period)
        assert np.array_equal(m, m_ref) and np.array_equal(u, u_ref)
        assert m.dtype == m_ref.dtype and u.dtype == u_ref.dtype
        assert fast_rng.bit_generator.state == slow_rng.bit_generator.state
        assert np.array_equal(fast_rng.integers(0, 7, size=5), slow_rng.integers(0, 7, size=5))
        assert fast_rng.random() == slow_rng.random()
        fallbacks += period > 2**31
    assert fallbacks  # the rejection fallback was exercised


def test_seasonal_draws_of_another_generator_are_the_rounds() -> None:
    for bits in (np.random.MT19937, np.random.Philox, np.random.SFC64):
        a, b = np.random.Generator(bits(4)), np.random.Generator(bits(4))
        m, u = seasonal_draws(a, 9, 13, 40)
        m_ref, u_ref = _seasonal_draws_loop(b, 9, 13, 40)
        assert np.array_equal(m, m_ref) and np.array_equal(u, u_ref)
        assert a.random() == b.random()
