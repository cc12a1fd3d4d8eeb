"""Contamination-screened re-calibration (``PolicyConfig.recalibration_screen``).

A re-calibration window collected while the aftermath of a change is still in the
data fits a threshold partly on it.  The screen keeps out of the window the runs of
batches above the threshold in force, extends the window by them, and leaves a
window without such a run exactly as it was.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from fogline.drift.calibration import contaminated_batches
from fogline.drift.config import PolicyConfig
from fogline.drift.monitors import ThresholdMonitor
from fogline.drift.runner import (
    DriftLoop,
    WindowScreen,
    calibration_plan,
    drift_summary,
    fit_alarm,
    load_drift,
    policy_from_json,
    policy_to_json,
    screen_window,
    window_signal,
)
from fogline.models.serialize import from_bytes, to_bytes
from fogline.models.state import PosteriorState
from fogline.replay_data.generator import generate

B = 16


def _window(levels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Per-batch [B, 2] (NLL, outlier flag) records: batch b's NLLs ~ levels[b] + N(0, 0.3^2)."""
    rng = np.random.default_rng(seed)
    nll = levels[:, None] + 0.3 * rng.standard_normal((len(levels), B))
    return tuple(np.stack([row, np.zeros(B)], 1) for row in nll)


# ----------------------------------------------------------------------------- the run rule
def test_runs_of_r_batches_above_the_threshold_are_flagged() -> None:
    s = np.array([0.0, 2.0, 3.0, 0.0, 2.0, 0.0, 2.0, 2.0, 2.0])
    assert contaminated_batches(s, 1.0, run=2).tolist() == [0, 1, 1, 0, 0, 0, 1, 1, 1]
    assert contaminated_batches(s, 1.0, run=3).tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert contaminated_batches(s, 1.0, run=1).tolist() == [0, 1, 1, 0, 1, 0, 1, 1, 1]
    assert not contaminated_batches(s, math.inf, run=1).any()  # no threshold fitted yet
    assert not contaminated_batches([0.0, 2.0], 1.0, run=2).any()  # a run cut by the window's end


# ----------------------------------------------------------------------------- the window
def test_the_screen_keeps_the_aftermath_out_and_extends_the_window() -> None:
    """40 batches, the first 8 still at the anomaly's level: they are kept out, the window
    asks for 8 more, and the fit on the screened window is the fit of the clean batches."""
    cfg = PolicyConfig(calibration_batches=40, recalibration_screen=2)
    levels = np.r_[np.full(8, 3.0), np.zeros(40)]
    records = _window(levels)
    first = screen_window(records[:40], cfg, threshold=1.0, run=2)
    assert first.flagged == 8 and first.extend == 8 and first.keep[:8] == (False,) * 8
    full = screen_window(records, cfg, threshold=1.0, run=2)
    assert full.extend == 0 and full.excluded == 8
    kept = full.kept(records)
    assert len(kept) == 40 and all(a is b for a, b in zip(kept, records[8:], strict=True))
    fit = {
        name: fit_alarm(
            np.concatenate(w), B, cfg, ert=50.0, consecutive=2, n_streams=200, seed=0, block=2 * B
        ).threshold
        for name, w in (("all", records), ("screened", kept), ("clean", records[8:]))
    }
    assert fit["screened"] == fit["clean"] < fit["all"]
    # blocks of 2 batches (the default plan): the contaminated fit sits at the anomaly's level
    assert fit["all"] > 2.0 > 0.5 > fit["clean"]


def test_the_extension_stops_at_the_longest_window() -> None:
    cfg = PolicyConfig(calibration_batches=40, calibration_max_batches=44, recalibration_screen=2)
    records = _window(np.r_[np.full(8, 3.0), np.zeros(32)])
    screen = screen_window(records, cfg, threshold=1.0, run=2)
    assert screen.extend == 4  # 44 collected at most
    capped = screen_window(records[:8] + _window(np.zeros(36), 1), cfg, threshold=1.0, run=2)
    assert capped.extend == 0 and len(capped.kept(records[:8] + _window(np.zeros(36), 1))) == 36


def test_a_majority_above_the_old_threshold_is_a_new_level_not_contamination() -> None:
    cfg = PolicyConfig(recalibration_screen=2)
    records = _window(np.r_[np.full(24, 3.0), np.zeros(16)])
    screen = screen_window(records, cfg, threshold=1.0, run=2)
    assert screen.abandoned and screen.flagged == 24
    assert screen.kept(records) is records and screen.extend == 0


def test_a_window_without_a_run_above_the_threshold_is_left_alone() -> None:
    cfg = PolicyConfig(recalibration_screen=2)
    records = _window(np.zeros(40))
    signal = window_signal(records, cfg)
    # a threshold single batches cross, but never two in a row
    threshold = float(np.sort(signal)[-3])
    assert contaminated_batches(signal, threshold, run=1).any()
    screen = screen_window(records, cfg, threshold=threshold, run=2)
    assert screen == WindowScreen() and screen.kept(records) is records
    assert calibration_plan(screen.kept(records), cfg) == calibration_plan(records, cfg)


# ----------------------------------------------------------------------------- the loop
N_BATCHES = 150  # abrupt shift at batch 50, recovery, then the re-calibration window


def _stream(burst: range = range(0)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The abrupt scenario; batches in ``burst`` get extra N(0, 1) noise (an aftermath)."""
    s = generate("abrupt", seed=3, n_batches=N_BATCHES, batch_size=64)
    y = s.y.copy()
    rng = np.random.default_rng(0)
    for b in burst:
        y[b * 64 : (b + 1) * 64] += rng.standard_normal(64).astype(y.dtype)
    return [
        (torch.from_numpy(s.x[i * 64 : (i + 1) * 64]), torch.from_numpy(y[i * 64 : (i + 1) * 64]))
        for i in range(N_BATCHES)
    ]


def _loop(state: PosteriorState, screen: int) -> DriftLoop:
    return DriftLoop.resume(
        state,
        base_lr=5e-3,
        data_size=20_000,
        policy=PolicyConfig(calibration_batches=30, recalibration_screen=screen),
        monitor=ThresholdMonitor(consecutive=2),
        ert=200.0,
        num_steps=2,
        ensemble_size=32,
        n_streams=200,
    )


def _run(
    warm: PosteriorState,
    screen: int,
    stream: list[tuple[torch.Tensor, torch.Tensor]],
    restarts: set[int] = frozenset(),  # type: ignore[assignment]
) -> tuple[bytes, list[str], list[float], list[dict[str, object]]]:
    state = warm.replace(lr=5e-3)
    loop = _loop(state, screen)
    modes, thresholds = [], []
    with capture_logs() as logs:
        for t, (x, y) in enumerate(stream):
            if t in restarts:
                state = from_bytes(to_bytes(state))
                loop = _loop(state, screen)
            state, _info, _signals, action = loop.process(state, x, y)
            modes.append("calibrating" if action.calibrating else action.mode)
            thresholds.append(loop.policy_state.threshold)
    return to_bytes(state), modes, thresholds, logs


def _recalibration_start(modes: list[str]) -> int:
    """The first batch of the window collected after the recovery."""
    t = modes.index("recovering")
    return modes.index("calibrating", t)


@pytest.fixture(scope="module")
def burst_start(warm_state: PosteriorState) -> int:
    return _recalibration_start(_run(warm_state, 0, _stream())[1])


def test_the_loop_keeps_an_aftermath_out_of_the_recalibration(
    warm_state: PosteriorState, burst_start: int
) -> None:
    burst = range(burst_start, burst_start + 6)
    stream = _stream(burst)
    *_, logs_off = _run(warm_state, 0, stream)
    blob, *_, logs_on = _run(warm_state, 2, stream)
    fits_off = [e for e in logs_off if e["event"] == "thresholds_calibrated"]
    fits_on = [e for e in logs_on if e["event"] == "thresholds_calibrated"]
    # the first (stream) window has no threshold in force: the same fit with and without
    assert fits_on[0]["threshold"] == fits_off[0]["threshold"]
    assert fits_on[0]["screened_batches"] == 0
    # the re-calibration: the burst is kept out, the window extended by it
    extended = [e for e in logs_on if e["event"] == "calibration_extended"]
    assert extended and extended[0]["reason"] == "screen" and extended[0]["more"] >= 5
    assert fits_on[1]["screened_batches"] >= 5
    assert fits_on[1]["threshold"] < fits_off[1]["threshold"]
    st = from_bytes(blob)
    assert drift_summary(st)["calibration"]["screened_batches"] == fits_on[1]["screened_batches"]
    # ... and the fit is the clean window's: the window after the burst fits about the same
    assert fits_on[1]["threshold"] < fits_on[0]["threshold"] * 1.25


def test_restarts_inside_a_screened_window_give_the_same_posterior(
    warm_state: PosteriorState, burst_start: int
) -> None:
    stream = _stream(range(burst_start, burst_start + 6))
    ref_blob, modes, thresholds, _ = _run(warm_state, 2, stream)
    t = burst_start
    restarts = {t, t + 3, t + 6, t + 29, t + 30, t + 31, t + 33, t + 36, t + 37}
    blob, modes2, thresholds2, _ = _run(warm_state, 2, stream, restarts)
    assert (modes2, thresholds2) == (modes, thresholds)
    assert blob == ref_blob


def test_a_stream_without_contamination_fits_the_same_thresholds(
    warm_state: PosteriorState, burst_start: int
) -> None:
    """No run above the threshold in force in any window: the screen changes nothing,
    bit for bit (the setting itself is stored with the policy state)."""
    stream = _stream()
    _, modes_off, thr_off, logs_off = _run(warm_state, 0, stream)
    _, modes_on, thr_on, logs_on = _run(warm_state, 4, stream)
    fits = [
        [e["threshold"] for e in logs if e["event"] == "thresholds_calibrated"]
        for logs in (logs_off, logs_on)
    ]
    assert len(fits[0]) >= 2 and fits[0] == fits[1]
    assert (modes_on, thr_on) == (modes_off, thr_off)


def test_the_setting_round_trips_and_old_states_load(warm_state: PosteriorState) -> None:
    state = warm_state.replace(lr=5e-3)
    loop = _loop(state, 2)
    for x, y in _stream()[:5]:
        state = loop.process(state, x, y)[0]
    st = from_bytes(to_bytes(state))
    stored = drift_summary(st)
    assert stored["config"]["recalibration_screen"] == 2
    cfg = loop.policy
    back = policy_from_json(policy_to_json(loop.policy_state), cfg)
    assert back.replace(monitor=None) == loop.policy_state.replace(monitor=None)
    # a snapshot written before the setting existed: its stored config lacks the key
    old = {
        **stored,
        "config": {k: v for k, v in stored["config"].items() if k != "recalibration_screen"},
    }
    v0 = st.replace(extra={**st.extra, "drift": old})
    d = load_drift(v0, cfg, monitor=ThresholdMonitor(consecutive=2), ensemble_size=32)
    assert d is not None and d.policy.config.recalibration_screen == 2
    assert [r.tolist() for r in d.cal_records] == [r.tolist() for r in loop.drift.cal_records]
    assert PolicyConfig.model_validate(old["config"]).recalibration_screen == 0
