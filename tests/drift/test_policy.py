"""The policy state machine, driven by River's NoDrift / DummyDriftDetector."""

from __future__ import annotations

import dataclasses
import math

import pytest
from river import drift as rdrift
from structlog.testing import capture_logs

from fogline.drift.monitors import ThresholdMonitor
from fogline.drift.policy import PolicyConfig, PolicyState, init, step
from fogline.drift.runner import policy_from_json, policy_to_json

CFG = PolicyConfig(
    policy="forget",
    gamma=0.3,
    lr_boost=3.0,
    shift_steps=2,
    reset_adam="alarm",
    cooldown=2,
    recovery_window=3,
    min_recovery=4,
    max_recovery=20,
    calibration_batches=0,
)


def _run(cfg: PolicyConfig, monitor: object, n: int, step_kl: float = 0.0, **sig: float):  # type: ignore[no-untyped-def]
    ps = init(cfg, monitor).replace(kl_threshold=0.01)
    actions = []
    for _ in range(n):
        signals = {"surprisal_inlier": 0.5, "outlier_fraction": 0.0, "step_kl": step_kl, **sig}
        ps, a = step(ps, signals)
        actions.append(a)
    return ps, actions


def _json_round_trip(ps: PolicyState) -> None:
    """The stored form restores an equal state (monitor compared by its stored form)."""
    back = policy_from_json(policy_to_json(ps), ps.config, ps.monitor.clone())
    assert policy_to_json(back) == policy_to_json(ps)
    assert dataclasses.replace(back, monitor=None) == dataclasses.replace(ps, monitor=None)


def test_no_drift_stays_stable_and_plain() -> None:
    ps, actions = _run(CFG, rdrift.NoDrift(), 50)
    assert {a.mode for a in actions} == {"stable"} and not any(a.alarm for a in actions)
    assert all(a.prior == "base" and a.lr_scale == 1.0 and not a.streaming for a in actions)
    assert ps.transitions == () and ps.batch == 50
    _json_round_trip(ps)


def test_full_cycle_with_logged_transitions() -> None:
    with capture_logs() as logs:
        ps, actions = _run(CFG, rdrift.DummyDriftDetector(t_0=10), 40)
    modes = [a.mode for a in actions]
    # alarm at batch 9, cooldown 2 -> recovering at 11, W=3 quiet and >= 4 batches -> stable at 15
    assert modes[8:17] == ["stable"] + ["shifted"] * 2 + ["recovering"] * 4 + ["stable"] * 2
    a = actions[9]
    assert a.alarm and a.reset_optimizer and a.prior == "forget" and a.streaming
    assert a.lr_scale == CFG.lr_boost and a.gamma == CFG.gamma and a.num_steps == CFG.shift_steps
    rec = actions[12]
    assert rec.prior == "forget" and 1.0 < rec.lr_scale < CFG.lr_boost and rec.gamma < CFG.gamma
    assert rec.num_steps == CFG.recovery_steps == 2 and not rec.streaming  # data size N
    assert actions[15].num_steps is None and not actions[15].streaming
    assert actions[15].reanchor and actions[15].transition == ("recovering", "stable")
    events = [e for e in logs if e["event"] == "policy_transition"]
    assert [(e["from_mode"], e["to_mode"]) for e in events[:3]] == [
        ("stable", "shifted"),
        ("shifted", "recovering"),
        ("recovering", "stable"),
    ]
    assert [t.batch for t in ps.transitions[:3]] == [9, 11, 15]
    assert any(e["event"] == "drift_detected" for e in logs)
    _json_round_trip(ps)


def test_recovery_waits_for_the_kl_and_is_bounded() -> None:
    _, actions = _run(CFG, rdrift.DummyDriftDetector(t_0=5), 40, step_kl=1.0)
    modes = [a.mode for a in actions]
    first = modes.index("recovering")
    # KL never settles: recovery ends by max_recovery
    assert modes[first : first + 20] == ["recovering"] * 20 and modes[first + 20] == "stable"


@pytest.mark.parametrize("name", ["none", "vb", "reset"])
def test_other_policies_actions(name: str) -> None:
    cfg = PolicyConfig(policy=name, cooldown=2, calibration_batches=0)  # type: ignore[arg-type]
    _, actions = _run(cfg, rdrift.DummyDriftDetector(t_0=5), 12, outlier_fraction=0.2)
    assert actions[4].alarm and actions[4].mode == "shifted"  # all policies monitor alike
    for a in actions:
        assert a.likelihood_weight == 1.0 and not a.drop_outliers
        if name == "vb":
            assert a.prior == "posterior" and a.streaming
        else:
            assert a.prior == "base" and not a.streaming and a.lr_scale == 1.0
    assert actions[4].reset_posterior == (name == "reset")
    assert sum(a.reset_posterior for a in actions) == (1 if name == "reset" else 0)


def test_outlier_batches_get_a_bounded_weight() -> None:
    _, actions = _run(CFG, rdrift.NoDrift(), 3, outlier_fraction=0.25)
    assert actions[0].drop_outliers and math.isclose(actions[0].likelihood_weight, 0.75)
    _, actions = _run(CFG, rdrift.NoDrift(), 1, outlier_fraction=0.39)
    assert actions[0].likelihood_weight == pytest.approx(0.61)
    cfg = PolicyConfig(policy="forget", min_weight=0.7, calibration_batches=0)
    _, actions = _run(cfg, rdrift.NoDrift(), 1, outlier_fraction=0.35)
    assert actions[0].likelihood_weight == 0.7
    # more than max_outlier_fraction is a shift, not an outlier burst: nothing dropped
    _, actions = _run(CFG, rdrift.NoDrift(), 1, outlier_fraction=0.8)
    assert not actions[0].drop_outliers and actions[0].likelihood_weight == 1.0


def test_calibration_window_blocks_alarms_and_threshold_monitor_state_is_saved() -> None:
    cfg = PolicyConfig(policy="forget", calibration_batches=5)
    mon = ThresholdMonitor(threshold=0.1)
    ps = init(cfg, mon)
    alarms = []
    for _ in range(8):
        ps, a = step(ps, {"surprisal_inlier": 1.0, "outlier_fraction": 0.0})
        alarms.append(a.alarm)
    assert alarms == [False] * 5 + [True, False, False]
    assert ps.monitor.n_detections == 1 and ps.calibrating == 0
    assert mon.n_seen == 0  # the caller's monitor was not touched
    _json_round_trip(ps)


def test_input_state_and_monitor_are_not_mutated() -> None:
    dummy = rdrift.DummyDriftDetector(t_0=3)
    ps = init(CFG, dummy)
    first, _ = step(ps, {"surprisal_inlier": 1.0})
    again, _ = step(ps, {"surprisal_inlier": 1.0})
    assert ps.batch == 0 and ps.monitor is dummy and dummy._n == 0
    assert first.monitor is not dummy and first.monitor._n == again.monitor._n == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        ps.batch = 3  # type: ignore[misc]


def test_bad_config() -> None:
    with pytest.raises(ValueError):
        PolicyConfig(policy="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PolicyConfig(gamma=1.5)
    with pytest.raises(ValueError):
        PolicyConfig(recovery_steps=0)


def test_default_forget_resets_adam_when_recovery_starts() -> None:
    cfg = PolicyConfig(policy="forget", cooldown=2, calibration_batches=0)
    _, actions = _run(cfg, rdrift.DummyDriftDetector(t_0=5), 12)
    resets = [i for i, a in enumerate(actions) if a.reset_optimizer]
    assert resets == [6]  # alarm at 4, cooldown 2: first recovering batch
    assert actions[6].mode == "recovering" and actions[4].lr_scale == 1.0


def test_recovery_streaming_option() -> None:
    cfg = PolicyConfig(
        policy="forget",
        cooldown=2,
        calibration_batches=0,
        recovery_steps=1,
        recovery_streaming=True,
    )
    _, actions = _run(cfg, rdrift.DummyDriftDetector(t_0=5), 12)
    rec = actions[6]
    assert rec.mode == "recovering" and rec.streaming and rec.num_steps == 1
    assert actions[4].mode == "shifted" and actions[4].streaming
