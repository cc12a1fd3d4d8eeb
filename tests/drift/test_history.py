"""Alarm calibration from history: the loop starts calibrated on the warm start's holdout."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from fogline.cli import main as cli_main
from fogline.drift.calibration import mean_run_length
from fogline.drift.config import PolicyConfig
from fogline.drift.history import (
    EXTRA_KEY,
    calibrate_from_history,
    has_history,
    history_calibration,
    history_reference,
    without_history,
)
from fogline.drift.monitors import ThresholdMonitor
from fogline.drift.runner import DriftLoop, load_drift
from fogline.drift.signals import pre_update_signals
from fogline.models.serialize import from_bytes, load, to_bytes
from fogline.models.state import PosteriorState
from fogline.replay_data.generator import generate

B = 64  # records per stream batch
POLICY = PolicyConfig(policy="forget", calibration_batches=10, n_streams=200, ensemble_size=32)

Batches = list[tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture(scope="module")
def history_state(warm_state: PosteriorState) -> PosteriorState:
    """``warm_state`` with 4,096 fresh regime-0 records as its history reference."""
    h = generate("stable", seed=2000, n_batches=16, batch_size=256)
    return calibrate_from_history(
        warm_state.replace(lr=5e-3),
        torch.from_numpy(h.x),
        torch.from_numpy(h.y),
        POLICY,
        batch_size=B,
    )


def _loop(state: PosteriorState, policy: PolicyConfig = POLICY, batch_size: int = B) -> DriftLoop:
    return DriftLoop.resume(
        state, base_lr=5e-3, data_size=20_000, policy=policy, batch_size=batch_size
    )


def _batches(
    n: int, seed: int = 7, y_map: Callable[[np.ndarray], np.ndarray] | None = None, start: int = 0
) -> Batches:
    """``n`` regime-0 batches of ``B``; ``y_map`` applied to y from batch ``start`` on."""
    s = generate("stable", seed=seed, n_batches=max(n, 4), batch_size=B)
    y = s.y.copy()
    if y_map is not None:
        y[start * B :] = y_map(y[start * B :])
    return [
        (torch.from_numpy(s.x[i * B : (i + 1) * B]), torch.from_numpy(y[i * B : (i + 1) * B]))
        for i in range(n)
    ]


def _alarms(state: PosteriorState, loop: DriftLoop, batches: Batches) -> list[int]:
    alarms = []
    for t, (x, y) in enumerate(batches):
        state, _info, _signals, action = loop.process(state, x, y)
        if action.alarm:
            alarms.append(t)
    return alarms


SHIFTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean +0.3": lambda y: y + 0.3,
    "scale x1.3": lambda y: 1.3 * y,
}


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_a_stream_that_starts_in_another_regime_is_flagged_within_5_batches(
    history_state: PosteriorState, shift: str
) -> None:
    batches = _batches(40, y_map=SHIFTS[shift])
    loop = _loop(history_state)
    assert loop.policy_state.calibrating == 0  # calibrated before the first batch
    alarms = _alarms(history_state, loop, batches[:5])
    assert alarms and alarms[0] <= 4
    # the same stream under on-stream calibration: absorbed into the threshold, never flagged
    stream = _loop(history_state, POLICY.model_copy(update={"calibration": "stream"}))
    assert stream.policy_state.calibrating == POLICY.calibration_batches
    assert _alarms(history_state, stream, batches) == []


def test_history_regime_stays_quiet_and_fits_the_recovery_threshold(
    history_state: PosteriorState,
) -> None:
    loop = _loop(history_state)
    assert _alarms(history_state, loop, _batches(15)) == []
    # the step-KL window (calibration_batches = 10) closed and fitted the recovery threshold
    assert loop.drift.kl_window == 0
    assert 0 < loop.policy_state.kl_threshold < float("inf")


def _false_alarms(
    warm: PosteriorState,
    policy: PolicyConfig,
    batch_size: int,
    history_batches: int,
    stream_seeds: tuple[int, ...],
    n_batches: int,
) -> tuple[int, int]:
    """(alarms, batches): the loop's signal and monitor on fresh regime-0 streams.

    The signal is computed against the fixed reference posterior, so it does not depend on
    the SVI steps between alarms: the batches are scored without stepping, and the monitor
    restarts after each alarm (run lengths as the calibration defines them).
    """
    h = generate("stable", seed=2001, n_batches=history_batches, batch_size=256)
    state = calibrate_from_history(
        warm, torch.from_numpy(h.x), torch.from_numpy(h.y), policy, batch_size=batch_size
    )
    loop = _loop(state, policy, batch_size)
    threshold = loop.policy_state.threshold
    alarms = 0
    for seed in stream_seeds:
        s = generate("stable", seed=seed, n_batches=n_batches, batch_size=batch_size)
        x, y = torch.from_numpy(s.x), torch.from_numpy(s.y)
        monitor = ThresholdMonitor(threshold, consecutive=policy.consecutive)
        for t in range(n_batches):
            rows = slice(t * batch_size, (t + 1) * batch_size)
            signals, _ = pre_update_signals(
                loop.reference, x[rows], y[rows], max_outlier_fraction=policy.max_outlier_fraction
            )
            monitor.update(signals[policy.signal])
            if monitor.drift_detected:
                alarms += 1
                monitor = ThresholdMonitor(threshold, consecutive=policy.consecutive)
    return alarms, n_batches * len(stream_seeds)


def test_false_alarms_on_the_history_regime_match_the_ert(warm_state: PosteriorState) -> None:
    """Realised mean run length on 6,000 regime-0 batches of 32 for an ERT of 40."""
    policy = POLICY.model_copy(update={"ert": 40.0, "n_streams": 500})
    alarms, batches = _false_alarms(warm_state, policy, 32, 32, (11,), 6000)
    realised = mean_run_length(batches, alarms)
    # seeded (measured): 123 alarms in 6,000 batches, realised 48.8 for a target of 40
    assert alarms > 50  # enough alarms for the estimate to mean something
    assert 0.6 * policy.ert <= realised <= 1.6 * policy.ert


@pytest.mark.slow
def test_false_alarms_at_default_sizes(warm_state: PosteriorState) -> None:
    """ERT 1,000, batches of 256, 64 draws, 500 streams, 12,800 history records
    (MAX_RECORDS), three streams of 3,000 regime-0 batches (about 2 minutes)."""
    policy = PolicyConfig(policy="forget")
    alarms, batches = _false_alarms(warm_state, policy, 256, 50, (11, 12, 13), 3000)
    # seeded (measured): 10 alarms in 9,000 batches, realised 900 for a target of 1,000
    assert alarms >= 3
    assert mean_run_length(batches, alarms) >= 0.5 * policy.ert


@pytest.mark.parametrize("shift_at", [None, 20])
def test_restarts_give_the_same_posterior(
    history_state: PosteriorState, shift_at: int | None
) -> None:
    """Restarts (the warm-start file itself, the step-KL window, alarm, recovery) are exact."""
    start = 0 if shift_at is None else shift_at
    batches = _batches(50, seed=8, y_map=SHIFTS["mean +0.3"], start=start)

    def run(restarts: set[int]) -> tuple[bytes, list[int]]:
        state, loop, alarms = history_state, _loop(history_state), []
        for t, (x, y) in enumerate(batches):
            if t in restarts:
                state = from_bytes(to_bytes(state))
                loop = _loop(state)
            state, _info, _signals, action = loop.process(state, x, y)
            alarms.append(t) if action.alarm else None
        return to_bytes(state), alarms

    ref_blob, alarms = run(set())
    assert alarms and start <= alarms[0] <= start + 4
    restarts = {0, 1, 2, 5, 9, 10, 11, alarms[0], alarms[0] + 1, alarms[0] + 7, 30, 45}
    blob, alarms2 = run(restarts)
    assert alarms2 == alarms
    assert blob == ref_blob


def test_the_stored_holdout_refits_for_another_batch_size(history_state: PosteriorState) -> None:
    state = from_bytes(to_bytes(history_state))
    hist = history_reference(state)
    assert hist is not None and hist.rows == 4096 and hist.x.dtype == torch.float32
    stored = state.extra[EXTRA_KEY]["calibration"]
    # the warm start's own fit is what a daemon with the same settings fits at start-up
    assert _loop(state).policy_state.threshold == stored["threshold"]
    assert stored["batch_size"] == B
    # without a batch size the loop fits for the stored one
    assert _loop(state, batch_size=None).policy_state.threshold == stored["threshold"]  # type: ignore[arg-type]
    a, b = _loop(state, batch_size=256), _loop(state, batch_size=256)
    assert a.policy_state.threshold == b.policy_state.threshold  # deterministic refit
    assert a.policy_state.calibration is not None
    assert a.policy_state.calibration["batch_size"] == 256
    assert a.policy_state.calibration["source"] == "history"
    # larger batches average more records: a tighter threshold
    assert a.policy_state.threshold < stored["threshold"]
    direct = history_calibration(state, POLICY, batch_size=256, reference=a.reference)
    assert direct.threshold == a.policy_state.threshold


def test_the_loop_says_which_calibration_it_uses(
    history_state: PosteriorState, warm_state: PosteriorState
) -> None:
    with capture_logs() as logs:
        _loop(history_state)
        stream = _loop(history_state, POLICY.model_copy(update={"calibration": "stream"}))
        plain = _loop(warm_state)
        small = _loop(history_state, batch_size=5000)
    events = [e for e in logs if e["event"] == "drift_calibration"]
    assert [e["source"] for e in events] == ["history", "stream", "stream", "stream"]
    assert events[1]["reason"] == "drift.calibration = stream"
    assert events[2]["reason"] == "the state carries no history reference"
    assert "fewer than one batch of 5000" in events[3]["reason"]
    assert events[3]["log_level"] == "warning"
    for loop in (stream, plain, small):
        assert loop.policy_state.calibrating == POLICY.calibration_batches
        assert loop.drift.kl_window == 0


def test_the_history_survives_the_loop_and_its_snapshots(history_state: PosteriorState) -> None:
    loop = _loop(history_state)
    state = history_state
    for x, y in _batches(3):
        state, *_ = loop.process(state, x, y)
    blob = from_bytes(to_bytes(state))
    assert has_history(blob)
    loaded = load_drift(blob, POLICY)
    assert loaded is not None and loaded.kl_window == POLICY.calibration_batches - 3
    assert not has_history(without_history(blob))


def test_bad_holdout_is_named(warm_state: PosteriorState) -> None:
    x, y = torch.zeros(300, 8), torch.zeros(300)
    with pytest.raises(ValueError, match=r"x_held: shape \(300, 3\)"):
        calibrate_from_history(warm_state, x[:, :3], y, POLICY, batch_size=B)
    with pytest.raises(ValueError, match=r"y_held: shape \(299,\)"):
        calibrate_from_history(warm_state, x, y[:299], POLICY, batch_size=B)
    x_bad = x.clone()
    x_bad[17, 2] = float("nan")
    with pytest.raises(ValueError, match="x_held: row 17 is not finite"):
        calibrate_from_history(warm_state, x_bad, y, POLICY, batch_size=B)
    with pytest.raises(ValueError, match="fewer than one batch of 512"):
        calibrate_from_history(warm_state, x, y, POLICY, batch_size=512)


def test_large_holdouts_are_subsampled(warm_state: PosteriorState) -> None:
    x, y = torch.randn(1000, 8), torch.randn(1000)
    state = calibrate_from_history(warm_state, x, y, POLICY, batch_size=32, max_records=400)
    info = state.extra[EXTRA_KEY]
    assert (info["rows"], info["rows_offered"]) == (400, 1000)
    again = calibrate_from_history(warm_state, x, y, POLICY, batch_size=32, max_records=400)
    hist_a, hist_b = history_reference(state), history_reference(again)
    assert hist_a is not None and hist_b is not None
    assert torch.equal(hist_a.x, hist_b.x)


def test_calibration_setting_is_validated() -> None:
    assert PolicyConfig().calibration == "history"
    with pytest.raises(ValueError, match="calibration"):
        PolicyConfig(calibration="holdout")  # type: ignore[arg-type]


def test_recipe_warm_start_stores_the_alarm_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cal_housing_csv: Path
) -> None:
    argv = ["warmstart", "--data", str(cal_housing_csv), "--epochs", "1", "--json", "--quiet"]
    assert cli_main([*argv, "--out", str(tmp_path), "--alarm-batch-size", "128"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    alarm = doc["alarm_reference"]
    assert alarm["batch_size"] == 128 and alarm["rows"] > 3000 and alarm["ert"] == 1000.0
    state = load(doc["files"]["state"])
    assert has_history(state)
    # the reference is the recipe's holdout in the inputs the model was trained on
    # (the heavy-tailed columns as log1p), row for row
    from fogline.models.data import load_csv, recipe_data
    from fogline.models.warmstart import HEAVY_TAILED, log1p_columns

    held = recipe_data(log1p_columns(load_csv(cal_housing_csv), HEAVY_TAILED), seed=0).x_held
    stored = state.aux["drift_history.x"]
    for row in stored[:: max(1, stored.shape[0] // 20)]:
        assert bool((held == row).all(1).any())
    loop = DriftLoop.resume(
        state, base_lr=1e-3, data_size=None, policy=PolicyConfig(), batch_size=128
    )
    assert loop.policy_state.calibrating == 0
    assert loop.policy_state.threshold == alarm["threshold"]
    assert cli_main([*argv, "--out", str(tmp_path / "off"), "--no-alarm-reference"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "alarm_reference" not in doc and not has_history(load(doc["files"]["state"]))
