"""Fit an alarm threshold for a target expected run time (ERT) between false alarms.

The operator chooses the ERT (in batches): on a stream without drift a
:class:`~fogline.drift.monitors.ThresholdMonitor` should raise a false alarm on
average once every ``ert`` batches.  As alibi-detect's online detectors do,
the threshold is fitted by simulation on a *no-drift reference window*:

1. Build ``n_streams`` bootstrap streams of length ``L`` from the reference.
   * :func:`calibrate_threshold` resamples the reference sequence of
     per-batch signal values in blocks (moving-block bootstrap, block length
     ``block``) so the short-range autocorrelation of per-batch signals
     survives resampling.
   * :func:`calibrate_batch_statistic` is for signals that are a *mean or
     median over the batch's records* of a per-record value computed against a fixed
     reference posterior (the surprisal): it resamples *records*, so a
     reference window of R records yields far more distinct batch values than
     R / batch_size, which is what estimating a 1/ERT tail needs.  With
     ``block`` > 1 it resamples runs of ``block`` consecutive records instead
     (moving-block bootstrap of the record sequence), for telemetry whose
     records are autocorrelated.
2. For a monitor that alarms on ``k`` consecutive exceedances, a stream raises
   an alarm within ``L`` batches iff ``M = max_t min(s_{t-k+1..t}) > h``.
3. Model the run length as geometric (memoryless) with mean ``ERT``, so
   ``P(no alarm within L) = (1 - 1/ERT)^L``.  The threshold is the
   ``(1 - 1/ERT)^L`` quantile of the simulated ``M``.

The fitted ERT reported back is the mean run length to the first exceedance
measured on fresh bootstrap streams (censored streams count their length, the
exponential maximum-likelihood estimate ``sum(run lengths) / alarms``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

#: Relative margin above a fitted threshold inside which a batch signal is a tie,
#: not an exceedance (:func:`calibrate_batch_statistic`): about 8 float32 ulps.
TIE = 1e-6


@dataclass(frozen=True)
class Calibration:
    """A fitted threshold and what it was fitted for (JSON-able via :meth:`to_dict`)."""

    threshold: float
    ert_target: float
    ert_estimate: float
    consecutive: int
    stream_length: int
    n_streams: int
    block: int
    reference_size: int
    method: str
    seed: int
    #: The cycle (records) of a seasonal block bootstrap; 0 for none.
    period: int = 0
    #: Every simulated stream had the same maximum: the window's signal repeats exactly
    #: (a noise-free series) and no threshold gives a finite ERT.
    deterministic: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain strict-JSON dict form (a non-finite number, e.g. an ERT estimate
        with no simulated alarm, becomes ``None``)."""
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(self).items()
        }


def _running_min(s: FloatArray, k: int) -> FloatArray:
    """``min`` over the last ``k`` values along the last axis (length shrinks by k-1).

    ``k - 1`` elementwise :func:`numpy.minimum` of shifted slices, in window order
    (``min(min(s_t, s_t+1), s_t+2) ...``, as ``sliding_window_view(s, k).min(-1)``
    reduces): the minimum is exact, so the values are the same, NaN included, and
    much faster for the small ``k`` of a ``consecutive`` setting.
    """
    if k == 1:
        return s
    n = s.shape[-1] - k + 1
    if n <= 0:  # no complete window: the sliding view's empty (or failing) result
        windows = np.lib.stride_tricks.sliding_window_view(s, k, axis=-1)
        return np.asarray(windows.min(axis=-1))
    out = np.minimum(s[..., :n], s[..., 1 : 1 + n])
    for j in range(2, k):
        np.minimum(out, s[..., j : j + n], out=out)
    return out


def _first_alarm(
    s: FloatArray, threshold: float, k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Index+1 of the first alarm per row (k consecutive > threshold); row length if none."""
    m = _running_min(s, k) > threshold
    hit = np.asarray(m.any(axis=-1), dtype=np.bool_)
    first = m.argmax(axis=-1) + k  # run length in batches (1-based)
    return np.where(hit, first, s.shape[-1]).astype(np.int64), hit


def _fit_from_streams(
    streams: FloatArray, ert: float, consecutive: int, check: FloatArray | None, tie: float = 0.0
) -> tuple[float, float, bool]:
    """``(threshold, ert_estimate, deterministic)``; deterministic: every simulated stream
    has the same maximum (within the tie margin), so the window's signal repeats exactly.
    Without ``check`` streams the ERT estimate is NaN (not measured)."""
    length = streams.shape[1]
    maxima = _running_min(streams, consecutive).max(axis=1)
    q = (1.0 - 1.0 / ert) ** (length - consecutive + 1)
    threshold = float(np.quantile(maxima, q))
    margin = tie * max(1.0, abs(threshold))
    deterministic = bool(np.ptp(maxima) <= margin)
    threshold += margin
    if check is None:
        return threshold, math.nan, deterministic
    runs, hit = _first_alarm(check, threshold, consecutive)
    alarms = int(np.count_nonzero(hit))
    ert_est = float(runs.sum() / alarms) if alarms else float("inf")
    return threshold, ert_est, deterministic


def dependence_horizon(values: npt.ArrayLike, max_lag: int | None = None, c: float = 2.0) -> int:
    """The lag beyond which a series' autocorrelation stays insignificant (Politis & White 2004).

    With the sample autocorrelations r_k of ``values`` (length n) and the band
    ``c sqrt(log10(n) / n)``, the horizon is the smallest m >= 0 such that
    |r_{m+j}| is inside the band for j = 1..K, K = max(5, ceil(sqrt(log10 n))):
    the first lag after which K consecutive autocorrelations look like noise.
    It is the "m-hat" of Politis & White's automatic block-length rule; a
    moving-block bootstrap with blocks of at least m-hat + 1 values keeps every
    dependence the sample can show.  A periodic signal (a daily cycle seen
    through batches) has autocorrelations that leave the band again at every
    period, so its horizon is at least about one period (at most ``max_lag``,
    default n // 2); a constant series, where the autocorrelation is undefined,
    gets 0 (any block draws the same values).

    >>> dependence_horizon(np.random.default_rng(0).normal(size=200))
    0
    >>> dependence_horizon(np.tile([0.0] * 7 + [1.0] * 11, 4))  # period 18
    29
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    n = int(v.shape[0])
    cap = n // 2 if max_lag is None else min(int(max_lag), n - 1)
    if n < 3 or cap < 1:
        return 0
    d = v - v.mean()
    var = float(d @ d)
    if not var > 1e-12 * max(1.0, float(np.abs(v).max()) ** 2) * n:
        return 0
    r = np.array([float(d[:-k] @ d[k:]) / var for k in range(1, cap + 1)])
    band = c * math.sqrt(math.log10(n) / n)
    width = max(5, math.ceil(math.sqrt(math.log10(n))))
    inside = np.abs(r) < band
    for m in range(0, cap - width + 1):
        if inside[m : m + width].all():  # r_{m+1} .. r_{m+width}
            return m
    return cap


def block_bootstrap(
    values: FloatArray, n_streams: int, length: int, block: int, rng: np.random.Generator
) -> FloatArray:
    """Moving-block bootstrap: ``[n_streams, length]`` streams of concatenated blocks."""
    v = np.asarray(values, dtype=np.float64)
    block = max(1, min(block, v.shape[0]))
    n_blocks = -(-length // block)
    starts = rng.integers(0, v.shape[0] - block + 1, size=(n_streams, n_blocks))
    idx = (starts[..., None] + np.arange(block)).reshape(n_streams, -1)[:, :length]
    return np.take(v, idx, axis=0)


def calibrate_threshold(
    values: FloatArray,
    ert: float,
    consecutive: int = 1,
    block: int = 1,
    n_streams: int = 2000,
    length: int | None = None,
    seed: int = 0,
) -> Calibration:
    """Threshold on a per-batch signal for a target ERT, by (block) bootstrap.

    Parameters
    ----------
    values:
        The signal over a no-drift reference window, one value per batch.
    ert:
        Target expected run time between false alarms, in batches.
    consecutive:
        The monitor's ``consecutive`` setting.
    block:
        Block length of the moving-block bootstrap (1 = i.i.d.); pick about the
        signal's autocorrelation time.
    n_streams, length:
        Number and length of the simulated streams (default length: ``min(ert, 250)``;
        the geometric run-length model carries the fit to the full ERT).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.shape[0] < 2:
        raise ValueError("values: need a 1-D reference window of at least 2 batches")
    rng = np.random.Generator(np.random.PCG64(seed))
    length = int(length or max(min(int(ert), 250), consecutive + 1))
    fit = block_bootstrap(v, n_streams, length, block, rng)
    check = block_bootstrap(v, n_streams, length, block, rng)
    threshold, ert_est, deterministic = _fit_from_streams(fit, ert, consecutive, check)
    return Calibration(
        threshold=threshold,
        ert_target=float(ert),
        ert_estimate=ert_est,
        consecutive=consecutive,
        stream_length=length,
        n_streams=n_streams,
        block=block,
        reference_size=int(v.shape[0]),
        method="block_bootstrap",
        seed=seed,
        deterministic=deterministic,
    )


#: Record values held at once while the window statistics of
#: :func:`simulate_streams` are computed (8 M float64, 64 MB).
WINDOW_ELEMENTS = 8_000_000


def _seasonal_draws_loop(
    rng: np.random.Generator, n_streams: int, n_blocks: int, period: int
) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """Per stream ``rng.integers(0, period)`` then ``rng.random(n_blocks)``."""
    m = np.empty(n_streams, dtype=np.int64)
    u = np.empty((n_streams, n_blocks))
    for i in range(n_streams):
        m[i] = rng.integers(0, period)
        u[i] = rng.random(n_blocks)
    return m, u


def seasonal_draws(
    rng: np.random.Generator, n_streams: int, n_blocks: int, period: int
) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """``(m [n_streams], u [n_streams, n_blocks])``: what ``n_streams`` rounds of
    ``m_i = rng.integers(0, period)``, ``u_i = rng.random(n_blocks)`` draw, and leave
    ``rng`` where they leave it, from one ``random_raw`` call (a ``PCG64`` generator;
    any other, or a rare rejected draw, runs the rounds themselves).

    What numpy does per round, on PCG64's 64-bit words w:

    * ``integers(0, d)``, d < 2**32: one 32-bit value x, the word's low half, its high
      half kept in the generator (``has_uint32``, ``uinteger``) and used by the next
      32-bit draw instead of a new word; then Lemire's method: ``t = x * d``,
      the value ``t >> 32``, redrawn only if ``t mod 2**32 < (2**32 - d) mod d``.
    * ``random(k)``: k words, each ``(w >> 11) * 2**-53``; the kept half stays kept.

    So the rounds alternate a round that takes a new word for its integer with one
    that takes the kept half.  tests/drift/test_calibration_exact.py checks the values
    and the generator's state against the rounds.
    """
    bg = rng.bit_generator
    if type(bg) is not np.random.PCG64 or not 1 < period < 2**32 or n_streams < 1:
        return _seasonal_draws_loop(rng, n_streams, n_blocks, period)
    state = bg.state
    held = bool(state["has_uint32"])
    # a round takes a new word for its integer unless the generator holds a half
    fresh = (np.arange(n_streams) + held) % 2 == 0
    words = np.asarray(bg.random_raw(n_streams * n_blocks + int(fresh.sum())), dtype=np.uint64)
    ends = np.cumsum(n_blocks + fresh.astype(np.int64))
    starts = ends - n_blocks - fresh
    low32, high32 = np.uint64(0xFFFFFFFF), np.uint64(32)
    new_word = words[starts[fresh]]  # the integer's word of each fresh round
    x = np.empty(n_streams, dtype=np.uint64)
    x[fresh] = new_word & low32
    # a held half: the high half of the previous fresh round's word (or the one held)
    held_from = np.concatenate([[np.uint64(state["uinteger"])], new_word >> high32])
    x[~fresh] = held_from[np.cumsum(fresh)[~fresh]]
    t = x * np.uint64(period)
    if np.any((t & low32) < np.uint64((2**32 - period) % period)):
        bg.state = state  # a rejected draw (probability < d / 2**32): the rounds themselves
        return _seasonal_draws_loop(rng, n_streams, n_blocks, period)
    body = starts[:, None] + fresh[:, None] + np.arange(n_blocks)
    u = (words[body] >> np.uint64(11)) * (1.0 / 9007199254740992.0)
    after = bg.state
    after["has_uint32"] = int(fresh[-1])
    after["uinteger"] = int(new_word[-1] >> high32) if fresh.any() else state["uinteger"]
    bg.state = after
    return (t >> high32).astype(np.int64), u


def simulate_streams(
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
    """``[n_streams, length]`` batch statistics of bootstrap streams of the records ``v``
    (the sampling scheme of :func:`calibrate_batch_statistic`, drawn from ``rng``).

    With blocks of whole batches (``b = max(block, 1)`` a multiple of B, and
    ``block > 1`` or a ``period``), every batch of a stream lies inside one block,
    so batch t is the window v[u_t : u_t + B] at its first record u_t and its
    statistic is one of the R - B + 1 window statistics, computed once; the
    stream is then a gather of those (``windowed``, the default where it applies).
    Otherwise each stream's records are gathered and reduced.  Both ways draw the
    same numbers from ``rng`` and reduce each batch as the same contiguous
    ``[B(, C)]`` block, so they return the same values bit for bit.
    """
    b = max(block, 1)
    can_window = (block > 1 or period > 0) and b % batch_size == 0
    if windowed is None:
        windowed = can_window
    elif windowed and not can_window:
        raise ValueError("windowed: needs blocks (block > 1 or a period) of whole batches")
    r = v.shape[0]
    n_blocks = -(-length * batch_size // b)

    def block_starts() -> npt.NDArray[np.int64]:
        """Every stream's block starts (window positions), ``[n_streams, n_blocks]``.

        The draws are those of one stream after another.  Without a period, one
        ``integers`` call of ``n_streams * n_blocks`` values is that sequence: numpy
        draws int64 values in a 32-bit range from the bit generator's own 32-bit
        buffer, which carries over between calls (tests/drift pin this against the
        per-stream calls; a range of 2**32 or more takes one 64-bit word a value, also
        the same).  The seasonal draws alternate a stream's phase (``integers``) with
        its ``n_blocks`` uniforms (``random``): :func:`seasonal_draws` gives that
        sequence; the arithmetic on it is done for all streams at once.
        """
        if not period:
            return rng.integers(0, r - block + 1, size=(n_streams, n_blocks))
        m, u = seasonal_draws(rng, n_streams, n_blocks, period)
        # the future batches start at window positions R + m B: their phases
        first = r + batch_size * m
        phase = (first[:, None] + np.arange(n_blocks) * b) % period
        count = (r - b - phase) // period + 1  # window starts of that phase
        return np.asarray(phase + period * (u * count).astype(np.int64))

    out = np.empty((n_streams, length))
    if windowed:
        # every window of B consecutive records as a contiguous [B(, C)] block, like a
        # gathered batch, reduced a slice of windows at a time
        windows = np.lib.stride_tricks.sliding_window_view(v, batch_size, axis=0)
        per = max(1, WINDOW_ELEMENTS // max(1, batch_size * int(np.prod(v.shape[1:]))))
        stats = np.concatenate(
            [
                np.asarray(reduce(np.ascontiguousarray(np.moveaxis(windows[lo : lo + per], -1, 1))))
                for lo in range(0, windows.shape[0], per)
            ]
        )
        offsets = np.arange(0, b, batch_size)
        starts = block_starts()
        idx = (starts[:, :, None] + offsets).reshape(n_streams, -1)[:, :length]
        out[:] = np.take(stats, idx)  # a custom statistic's dtype is cast, as row by row
        return out
    # a slice of streams at a time keeps the gathered records near WINDOW_ELEMENTS
    # (the draws, one stream after another, are the same sliced or not); each batch
    # is still reduced as one contiguous [B(, C)] block
    per = max(1, WINDOW_ELEMENTS // max(1, length * batch_size * int(np.prod(v.shape[1:]))))
    plain = block <= 1 and not period
    block_first = None if plain else block_starts()
    for lo in range(0, n_streams, per):
        rows = min(per, n_streams - lo)
        if block_first is None:
            idx = rng.integers(0, r, size=(rows, length, batch_size))
        else:
            idx = (block_first[lo : lo + rows, :, None] + np.arange(b)).reshape(rows, -1)
            idx = idx[:, : length * batch_size].reshape(rows, length, batch_size)
        # np.take gathers the same values as v[idx], ~10x faster than fancy indexing
        out[lo : lo + rows] = reduce(np.take(v, idx, axis=0))
    return out


def calibrate_batch_statistic(
    record_values: npt.ArrayLike,
    batch_size: int,
    ert: float,
    statistic: str | Callable[[FloatArray], FloatArray] = "mean",
    consecutive: int = 1,
    n_streams: int = 1000,
    length: int | None = None,
    seed: int = 0,
    block: int = 1,
    period: int = 0,
    tie: float = TIE,
    estimate: bool = True,
) -> Calibration:
    """Threshold on a batch signal ``s_t = stat(records of batch t)`` by bootstrapping records.

    ``record_values`` is ``[R]`` (or ``[R, C]`` for several per-record
    columns); ``statistic`` is ``mean``, ``median`` or a function mapping
    ``[..., B]`` (``[..., B, C]``) to ``[...]``.  Valid when the records are
    exchangeable under no drift, e.g. per-record NLL under a *fixed*
    reference posterior (the surprisal): each simulated batch draws
    ``batch_size`` records with replacement from the reference window.

    ``block`` > 1 is the moving-block bootstrap of the *record sequence* (the
    window in arrival order): each simulated stream is ``length * batch_size``
    records made of randomly placed runs of ``block`` consecutive records, cut
    into batches.  It keeps the records' autocorrelation up to lag ``block``
    (real telemetry: a batch of consecutive records shares a daily phase, so
    its mean varies far more than a mean of records drawn at random).  Choose
    ``block`` a multiple of ``batch_size``; at least one block must fit.

    ``period`` d > 0 (records) is the generalised seasonal block bootstrap
    (Dudek, Leskow, Paparoditis & Politis 2014) for a window with a cycle of d
    records (window position i has phase i mod d): the simulated stream starts
    where a future batch would, at synthetic time tau_0 = R + m B (m drawn
    uniformly: a batch boundary the stream will really have, so a cycle of a
    whole number of batches keeps its batch alignment), and its block starting
    at synthetic time tau is a run of ``block`` window records starting at one
    of the window positions u = (tau mod d) + j d, drawn uniformly: the same
    phase of another cycle.  The cycle's profile is kept
    (a batch at the cycle's peak is drawn from peaks) while the noise of
    different cycles mixes, so the threshold can lie beyond the largest batch
    the window happens to hold.  Needs every phase at least twice:
    ``R >= 2 d + block``.

    ``estimate=False`` skips the ERT check on fresh streams (drawn after the fit's, so
    the threshold is the same): ``ert_estimate`` is NaN, the fit half the work.

    ``tie``: the threshold is raised by ``tie * max(1, |h|)``.  The live signal
    is a float32 mean and the bootstrap recomputes it in float64, so a batch
    the window holds can come back a few float32 ulps apart; on a deterministic
    signal (a noise-free cycle), where the fitted quantile *is* such a batch, a
    rounding difference would otherwise count as an exceedance.
    """
    v = np.asarray(record_values, dtype=np.float64)
    if v.shape[0] < batch_size:
        raise ValueError("record_values: need at least one batch of reference records")
    if callable(statistic):
        reduce = statistic
        name = getattr(statistic, "__name__", "custom")
    elif statistic in ("mean", "median"):
        fn = np.mean if statistic == "mean" else np.median
        name = statistic

        def reduce(a: FloatArray) -> FloatArray:
            return np.asarray(fn(a, axis=-1))

    else:
        raise ValueError("statistic: 'mean', 'median' or a callable")
    rng = np.random.Generator(np.random.PCG64(seed))
    length = int(length or max(min(int(ert), 250), consecutive + 1))

    if block > v.shape[0]:
        raise ValueError(f"block: {block} records, the window has only {v.shape[0]}")
    if period < 0 or (period and v.shape[0] < 2 * period + max(block, 1)):
        raise ValueError(
            f"period: {period} records; a seasonal bootstrap needs a window of at least "
            f"2 periods + 1 block ({2 * period + max(block, 1)}), it has {v.shape[0]}"
        )

    def streams() -> FloatArray:
        return simulate_streams(
            v,
            reduce,
            rng,
            batch_size=batch_size,
            length=length,
            n_streams=n_streams,
            block=block,
            period=period,
        )

    threshold, ert_est, deterministic = _fit_from_streams(
        streams(), ert, consecutive, streams() if estimate else None, tie
    )
    return Calibration(
        threshold=threshold,
        ert_target=float(ert),
        ert_estimate=ert_est,
        consecutive=consecutive,
        stream_length=length,
        n_streams=n_streams,
        block=max(block, 1),
        reference_size=int(v.shape[0]),
        method=(
            f"record_seasonal_block_bootstrap_{name}"
            if period
            else f"record_{'block_' if block > 1 else ''}bootstrap_{name}"
        ),
        seed=seed,
        period=period,
        deterministic=deterministic,
    )


def run_lengths(alarm_batches: list[int], n_batches: int, start: int = 0) -> list[int]:
    """Run lengths between successive alarms (the first measured from ``start``).

    The censored tail after the last alarm is not included; use
    :func:`mean_run_length` for the censoring-aware estimate.
    """
    out = []
    prev = start - 1
    for a in sorted(alarm_batches):
        out.append(a - prev)
        prev = a
    return out


def mean_run_length(total_batches: int, alarms: int) -> float:
    """Exponential MLE of the ERT from ``alarms`` false alarms over ``total_batches``
    monitored batches (censored tails included): ``total / alarms``."""
    return float(total_batches / alarms) if alarms else float("inf")


def contaminated_batches(
    signal: npt.ArrayLike, threshold: float, run: int = 1
) -> npt.NDArray[np.bool_]:
    """The batches of a calibration window that lie in a long run above a threshold.

    ``signal`` s_1..s_n is the window's batch signal; a batch is flagged when it lies
    in a run of at least ``run`` (r) batches in a row with s_t > ``threshold`` (h).
    With h the threshold in force and r the monitor's ``consecutive``, these are the
    batches on which that :class:`~fogline.drift.monitors.ThresholdMonitor` would
    raise or hold an alarm.  A run shorter than r that ends the window is not
    flagged.  An infinite h (no threshold fitted yet) flags nothing.

    >>> contaminated_batches([0.0, 2.0, 3.0, 0.0, 2.0, 0.0], 1.0, run=2).tolist()
    [False, True, True, False, False, False]
    """
    s = np.asarray(signal, dtype=np.float64).reshape(-1)
    out = np.zeros(s.shape[0], dtype=np.bool_)
    if not math.isfinite(threshold):
        return out
    above = s > threshold
    r = max(1, int(run))
    start = 0
    for t in range(s.shape[0] + 1):
        if t < s.shape[0] and above[t]:
            continue
        if t - start >= r:
            out[start:t] = True
        start = t + 1
    return out
