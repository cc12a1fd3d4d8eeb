"""The drift loop resumes bit for bit from a serialised state (what the daemon's restart does)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fogline.drift.monitors import ThresholdMonitor
from fogline.drift.policy import PolicyConfig
from fogline.drift.runner import DriftLoop, drift_summary, has_drift, load_drift
from fogline.models.fprior import EXTRA_KEY as FPRIOR_KEY
from fogline.models.fprior import FunctionalPrior
from fogline.models.serialize import from_bytes, to_bytes
from fogline.models.state import PosteriorState
from fogline.replay_data.generator import generate

N_BATCHES = 150  # abrupt shift at batch 50
OUTLIER_BATCHES = (36, 110)


def _stream() -> list[tuple[torch.Tensor, torch.Tensor]]:
    s = generate("abrupt", seed=3, n_batches=N_BATCHES, batch_size=64)
    y = s.y.copy()
    rng = np.random.default_rng(0)
    for b in OUTLIER_BATCHES:  # 20% gross outliers: dropped and down-weighted by `forget`
        rows = b * 64 + rng.choice(64, size=13, replace=False)
        y[rows] = 9.0
    return [
        (torch.from_numpy(s.x[i * 64 : (i + 1) * 64]), torch.from_numpy(y[i * 64 : (i + 1) * 64]))
        for i in range(N_BATCHES)
    ]


def _loop(state: PosteriorState, policy: str) -> DriftLoop:
    return DriftLoop.resume(
        state,
        base_lr=5e-3,
        data_size=20_000,
        policy=PolicyConfig(policy=policy, calibration_batches=30),  # type: ignore[arg-type]
        monitor=ThresholdMonitor(consecutive=2),
        ert=200.0,
        num_steps=2,
        ensemble_size=32,
        n_streams=200,
    )


def _run(
    warm: PosteriorState, policy: str, restarts: set[int]
) -> tuple[bytes, list[str], list[int]]:
    state = warm.replace(lr=5e-3)
    loop = _loop(state, policy)
    modes, alarms = [], []
    for t, (x, y) in enumerate(_stream()):
        if t in restarts:
            state = from_bytes(to_bytes(state))
            loop = _loop(state, policy)
        state, _info, _signals, action = loop.process(state, x, y)
        modes.append(action.mode)
        if action.alarm:
            alarms.append(t)
    return to_bytes(state), modes, alarms


@pytest.mark.parametrize("policy", ["forget", "vb"])
def test_restarts_anywhere_give_the_same_posterior(warm_state: PosteriorState, policy: str) -> None:
    ref_blob, modes, alarms = _run(warm_state, policy, set())
    # the stream exercises calibration, an alarm, shifted, recovering and re-calibration
    assert {"stable", "shifted", "recovering"} <= set(modes)
    assert alarms and 50 <= alarms[0] <= 55
    restarts = {1, 12, 29, 30, 31, 36, 37, alarms[0], alarms[0] + 1, alarms[0] + 6, 90, 111, 140}
    blob, modes2, alarms2 = _run(warm_state, policy, restarts)
    assert (modes2, alarms2) == (modes, alarms)
    assert blob == ref_blob


def test_state_carries_the_loop(warm_state: PosteriorState) -> None:
    state = warm_state.replace(lr=5e-3)
    loop = _loop(state, "forget")
    for x, y in _stream()[:10]:
        state = loop.process(state, x, y)[0]
    st = from_bytes(to_bytes(state))
    summary = drift_summary(st)
    assert summary["calibrating"] == 20 and summary["threshold"] is None
    d = load_drift(st, loop.policy, monitor=ThresholdMonitor(consecutive=2), ensemble_size=32)
    assert d is not None
    assert len(d.cal_records) == 10 and sum(len(r) for r in d.cal_records) == 640
    assert [r.tolist() for r in d.cal_records] == [r.tolist() for r in loop.drift.cal_records]
    assert d.reference.loc.equal(warm_state.params["loc"])
    assert d.base_prior.scale.equal(warm_state.prior.scale)
    assert math.isfinite(d.last_step_kl) and d.last_step_kl == loop.drift.last_step_kl
    again = _loop(st, "forget")
    assert again.policy_state.replace(monitor=None) == loop.policy_state.replace(monitor=None)
    assert again.reference.loc.equal(loop.reference.loc)
    assert again.reference.ensemble.layers[0][0].equal(loop.reference.ensemble.layers[0][0])


def test_changed_policy_setting_wins_and_keeps_the_mode(warm_state: PosteriorState) -> None:
    state = warm_state.replace(lr=5e-3)
    loop = _loop(state, "forget")
    for x, y in _stream()[:5]:
        state = loop.process(state, x, y)[0]
    other = _loop(from_bytes(to_bytes(state)), "none")
    assert other.policy_state.config.name == "none"
    assert other.policy_state.batch == 5 and other.policy_state.mode == "stable"


@pytest.mark.parametrize("detector", ["adwin", "page_hinkley", "kswin"])
def test_river_monitors_survive_restarts(warm_state: PosteriorState, detector: str) -> None:
    """A River detector's running state rides in the snapshot: restarts change nothing."""
    from fogline.drift.monitors import make_monitor, monitor_state

    def run(restarts: set[int]) -> tuple[bytes, list[int], dict[str, object]]:
        state = warm_state.replace(lr=5e-3)
        alarms: list[int] = []
        loop = None
        for t, (x, y) in enumerate(_stream()[:80]):
            if loop is None or t in restarts:
                state = from_bytes(to_bytes(state))
                loop = DriftLoop.resume(
                    state,
                    base_lr=5e-3,
                    data_size=20_000,
                    policy=PolicyConfig(policy="none", calibration_batches=10),
                    monitor=make_monitor(detector),
                    ert=200.0,
                    ensemble_size=16,
                    n_streams=100,
                )
            state, _info, _sig, action = loop.process(state, x, y)
            if action.alarm:
                alarms.append(t)
        assert loop is not None
        return to_bytes(state), alarms, monitor_state(loop.monitor)

    blob, alarms, mon = run(set())
    assert mon["state"]  # the detector has seen values: there is state to carry
    blob2, alarms2, mon2 = run({11, 12, 30, 47, 51, 52, 70})
    assert alarms2 == alarms and mon2 == mon and blob2 == blob


def test_restarts_with_the_functional_prior_give_the_same_posterior(
    warm_state: PosteriorState,
) -> None:
    """A warm start that carries a functional prior streams with it (models.stream), exactly."""
    fp = FunctionalPrior(weight=0.05, scale=2.0, lo=(-3.0,) * 8, hi=(3.0,) * 8)
    warm = warm_state.replace(extra={**warm_state.extra, FPRIOR_KEY: fp.to_dict()})
    ref_blob, modes, alarms = _run(warm, "forget", set())
    assert "shifted" in modes
    blob, _, alarms2 = _run(warm, "forget", {7, 31, alarms[0] + 2, 120})
    assert alarms2 == alarms and blob == ref_blob
    plain_blob, _, _ = _run(warm_state, "forget", set())
    assert plain_blob != ref_blob  # the functional term took part


def test_an_init_file_starts_a_fresh_loop(warm_state: PosteriorState) -> None:
    """``fogline run --init`` with an exported snapshot: its drift loop is not carried over."""
    from fogline.daemon.stream.pipeline import fresh_stream

    fp = FunctionalPrior(weight=0.05, scale=2.0, lo=(-3.0,) * 8, hi=(3.0,) * 8)
    state = warm_state.replace(extra={**warm_state.extra, FPRIOR_KEY: fp.to_dict()}, lr=5e-3)
    loop = _loop(state, "forget")
    for x, y in _stream()[:3]:
        state = loop.process(state, x, y)[0]
    state = state.replace(offsets={("t", 0): 192})
    fresh = fresh_stream(from_bytes(to_bytes(state)))
    assert fresh.offsets == {} and fresh.records_absorbed == 0
    assert not has_drift(fresh) and not drift_summary(fresh)
    assert set(fresh.extra) == set(warm_state.extra) | {FPRIOR_KEY}
    assert set(fresh.aux) == set(warm_state.aux)
    assert FunctionalPrior.of(fresh) == fp and fresh.params["loc"].equal(state.params["loc"])
    again = _loop(fresh, "forget")
    assert again.policy_state.batch == 0
    assert again.reference.loc.equal(state.params["loc"])  # anchored at the init state


def test_predictive_kl_rows_only_thins_the_metric(warm_state: PosteriorState) -> None:
    """While stable and calibrated the predictive KL is estimated on the first rows; the
    policy's inputs (surprisal, step KL) and so the posterior do not change."""
    from fogline.drift.signals import gaussian_kl, posterior_moments

    def run(rows: int) -> tuple[dict[str, object], list[dict[str, float]], list[PosteriorState]]:
        state = warm_state.replace(lr=5e-3)
        cfg = PolicyConfig(calibration_batches=4, predictive_kl_rows=rows, n_streams=50)
        loop = DriftLoop.resume(state, base_lr=5e-3, data_size=20_000, policy=cfg)
        sigs, states = [], []
        for x, y in _stream()[:12]:
            state, _info, sig, _action = loop.process(state, x, y)
            sigs.append(sig)
            states.append(state)
        summary = {k: v for k, v in drift_summary(state).items() if k != "config"}
        return summary, sigs, states

    summary_all, all_rows, states_all = run(0)
    summary_16, head, states = run(16)
    assert summary_16 == summary_all and summary_16["calibrating"] == 0
    for name, value in states[-1].params.items():
        assert value.equal(states_all[-1].params[name])
    for t, (a, h) in enumerate(zip(all_rows, head, strict=True)):
        assert a.keys() == h.keys()
        for k in a.keys() - {"predictive_kl"}:
            assert a[k] == h[k] or (math.isnan(a[k]) and math.isnan(h[k])), (t, k)
        if t < 3:  # calibrating (the step KL is read): every row
            assert h["predictive_kl"] == a["predictive_kl"]
    # stable and calibrated: the KL over the first 16 rows, under the same reference
    x, _y = _stream()[11]
    ref = DriftLoop.resume(
        warm_state, base_lr=5e-3, data_size=20_000, policy=PolicyConfig()
    ).reference
    m, v = posterior_moments(states[11], x[:16], ref.num_samples, ref.seed)
    m0, v0 = posterior_moments(warm_state, x[:16], ref.num_samples, ref.seed)
    want = float(gaussian_kl(m, v, m0, v0).mean())
    assert math.isclose(head[11]["predictive_kl"], want, rel_tol=1e-5)  # float32 matmuls
    assert head[11]["predictive_kl"] != all_rows[11]["predictive_kl"]


def test_a_snapshot_of_the_previous_layout_resumes(warm_state: PosteriorState) -> None:
    """Before the typed state: one concatenated calibration tensor, the threshold monitor's own
    dict, ``config.name``.  Such a snapshot resumes (the monitor restarts, logged)."""
    import torch
    from structlog.testing import capture_logs

    state = warm_state.replace(lr=5e-3)
    loop = _loop(state, "forget")
    for x, y in _stream()[:12]:  # calibrating: 12 batches of the window collected
        state = loop.process(state, x, y)[0]
    d = loop.drift
    assert len(d.cal_records) == 12
    aux = {k: v for k, v in state.aux.items() if not k.startswith("drift.calibration_records")}
    aux["drift.calibration_records"] = torch.from_numpy(np.concatenate(d.cal_records))
    old = dict(drift_summary(state))
    old["config"] = {**{k: v for k, v in old["config"].items() if k != "policy"}, "name": "forget"}
    old["monitor"] = {"streak": 0, "armed": True, "n_seen": 10, "n_detections": 0}
    v0 = state.replace(aux=aux, extra={**state.extra, "drift": old})
    with capture_logs() as logs:
        back = load_drift(
            v0, loop.policy, monitor=ThresholdMonitor(consecutive=2), ensemble_size=32
        )
    assert back is not None
    assert [r.tolist() for r in back.cal_records] == [r.tolist() for r in d.cal_records]
    assert back.policy.calibrating == d.policy.calibrating == 18 and back.policy.batch == 12
    assert back.last_step_kl == d.last_step_kl and back.cal_kl == d.cal_kl
    assert {e["event"] for e in logs} >= {"drift_monitor_restarted", "drift_policy_changed"}


def test_the_calibration_window_is_one_tensor_and_the_per_batch_layout_resumes(
    warm_state: PosteriorState,
) -> None:
    """The window is written as one [sum n_i, 2] tensor (split by ``cal_sizes``); a snapshot
    of the 2026-12-01..03 layout (one tensor per batch) resumes to the same drift state."""
    import torch

    from fogline.drift.runner import policy_to_json

    state = warm_state.replace(lr=5e-3)
    loop = _loop(state, "forget")
    for x, y in _stream()[:7]:
        state = loop.process(state, x, y)[0]
    d = loop.drift
    assert len(d.cal_records) == 7
    cal = [k for k in state.aux if k.startswith("drift.calibration_records")]
    assert cal == ["drift.calibration_records"]
    joined = state.aux["drift.calibration_records"]
    assert joined.shape == (sum(len(r) for r in d.cal_records), 2)
    assert joined.dtype == torch.float64
    assert torch.equal(joined, torch.from_numpy(np.concatenate(d.cal_records)))
    back = load_drift(state, loop.policy, ensemble_size=32)
    assert back is not None
    assert [r.tolist() for r in back.cal_records] == [r.tolist() for r in d.cal_records]
    per_batch = {k: v for k, v in state.aux.items() if k != "drift.calibration_records"}
    for i, rec in enumerate(d.cal_records):
        per_batch[f"drift.calibration_records.{i}"] = torch.from_numpy(rec)
    old = load_drift(state.replace(aux=per_batch), loop.policy, ensemble_size=32)
    assert old is not None
    assert [r.tolist() for r in old.cal_records] == [r.tolist() for r in d.cal_records]
    assert policy_to_json(old.policy) == policy_to_json(back.policy)
    assert old.cal_kl == back.cal_kl


def test_step_is_a_function_of_its_inputs(warm_state: PosteriorState) -> None:
    """``DriftLoop.step`` leaves its inputs alone: the same inputs give the same outputs."""
    from fogline.drift.runner import drift_mode

    state = warm_state.replace(lr=5e-3)
    loop = _loop(state, "forget")
    assert drift_mode(state) == "none" and not has_drift(state)
    (x, y), (x2, y2) = _stream()[:2]
    d0 = loop.drift
    d1, s1, _info, sig1, _a = loop.step(d0, state, x, y)
    assert loop.drift is d0 and d0.policy.batch == 0 and len(d0.cal_records) == 0
    d2, s2, _info2, sig2, _a2 = loop.step(d1, s1, x2, y2)
    again, s2b, _info3, sig2b, _a3 = loop.step(d1, s1, x2, y2)
    assert to_bytes(s2) == to_bytes(s2b) and sig2.keys() == sig2b.keys()
    assert again.policy.replace(monitor=None) == d2.policy.replace(monitor=None)
    assert d1.policy.batch == 1 and d2.policy.batch == 2 and drift_mode(s2) == "stable"
    assert math.isnan(sig1["step_kl"]) and math.isfinite(sig2["step_kl"])  # first batch: none
