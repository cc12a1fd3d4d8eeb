"""detect_period's lag correlations against the per-lag numpy code they replaced, bit for bit."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from fogline.models import autoregressive
from fogline.models.autoregressive import detect_period, lag_correlations


def _lag_correlations_reference(v: npt.NDArray[np.float64], top: int) -> npt.NDArray[np.float64]:
    """The earlier loop of detect_period, verbatim."""
    ks = np.arange(2, top + 1)
    r = np.zeros(len(ks))
    for i, k in enumerate(ks):
        a, b = v[:-k], v[k:]
        sa, sb = a.std(), b.std()
        if sa > 0 and sb > 0:
            r[i] = float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))
    return r


def _detect_period_reference(
    values: npt.ArrayLike,
    min_lag: int = 2,
    max_lag: int | None = None,
    min_acf: float = 0.5,
    min_prominence: float = 0.5,
) -> int | None:
    """The earlier detect_period, verbatim but for the loop (the reference above)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    n = len(v)
    top = n // 2 if max_lag is None else min(max_lag, n // 2)
    if top < max(min_lag, 2) or not np.all(np.isfinite(v)) or np.ptp(v) == 0:
        return None
    ks = np.arange(2, top + 1)
    r = _lag_correlations_reference(v, top)
    prominence = r - np.minimum.accumulate(r)
    ok = (ks >= min_lag) & (r >= min_acf) & (prominence >= min_prominence)
    if not ok.any():
        return None
    score = np.where(ok, prominence, -np.inf)
    i = int(np.argmax(score))
    k_best, best = int(ks[i]), float(score[i])
    period = k_best
    for m in range(2, k_best // max(min_lag, 2) + 1):
        c = round(k_best / m) - 2
        near = [j for j in (c - 1, c, c + 1) if 0 <= j < len(ks)]
        j = max(near, key=lambda j: score[j])
        if score[j] >= 0.9 * best:
            period = int(ks[j])
    return period


def _series(rng: np.random.Generator, n: int, kind: int) -> npt.NDArray[np.float64]:
    t = np.arange(n)
    if kind == 0:
        v = rng.standard_normal(n)
    elif kind == 1:  # a noisy cycle
        v = np.sin(2 * np.pi * t / rng.integers(3, 80)) + rng.uniform(0, 1) * rng.standard_normal(n)
    elif kind == 2:  # rounded: ties and constant runs
        v = np.round(rng.standard_normal(n) * 2)
    elif kind == 3:  # a square wave, constant lagged halves possible
        v = (t % int(rng.integers(2, 40)) < 3).astype(np.float64)
    else:  # a trend
        v = np.cumsum(rng.standard_normal(n))
    return np.asarray(v * 10 ** rng.uniform(-4, 4) + rng.uniform(-1e3, 1e3))


@pytest.mark.parametrize("kind", range(5))
def test_lag_correlations_equal_the_per_lag_loop(kind: int) -> None:
    rng = np.random.default_rng(kind)
    for n in [*range(4, 40), *rng.integers(40, 1200, size=30).tolist(), 320, 321, 2000]:
        v = _series(rng, int(n), kind)
        top = int(n) // 2
        assert np.array_equal(lag_correlations(v, top), _lag_correlations_reference(v, top))


def test_lag_correlations_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lags laid end to end a few at a time (down to one per chunk) give the same values."""
    rng = np.random.default_rng(7)
    v = _series(rng, 401, 1)
    want = _lag_correlations_reference(v, 200)
    for chunk in (1, 500, 5000):
        monkeypatch.setattr(autoregressive, "LAG_CHUNK_ELEMENTS", chunk)
        assert np.array_equal(lag_correlations(v, 200), want)


@pytest.mark.parametrize("kind", range(5))
def test_detect_period_equals_the_reference(kind: int) -> None:
    rng = np.random.default_rng(10 + kind)
    found = 0
    for _ in range(60):
        n = int(rng.integers(8, 1000))
        v = _series(rng, n, kind)
        kw = {
            "min_lag": int(rng.choice([2, 4, 16, 32])),
            "max_lag": None if rng.random() < 0.7 else int(rng.integers(2, n)),
        }
        got = detect_period(v, **kw)
        assert got == _detect_period_reference(v, **kw)
        found += got is not None
    if kind in (1, 3):
        assert found  # the cycles are found, not only None == None
