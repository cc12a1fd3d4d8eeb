"""``drift.keyed``: a drift loop per key, all keys of a micro-batch stepped together."""

from __future__ import annotations

import torch

from fogline.drift.keyed import KeyedDriftLoop
from fogline.drift.policy import PolicyConfig
from fogline.drift.runner import DriftLoop, drift_mode
from fogline.models.keyed import fleet_prior, keyed_step_loop, new_key_state
from fogline.models.serialize import from_bytes, to_bytes
from fogline.models.state import PosteriorState
from fogline.replay_data.generator import generate

KEYS = ("a", "b", "c")
POLICY = PolicyConfig(policy="forget", calibration_batches=6, ensemble_size=16, n_streams=50)
SETTINGS = {"base_lr": 5e-3, "data_size": 2_000, "num_steps": 1, "ert": 50.0, "seed": 0}


def _streams(n: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    out = {}
    for i, k in enumerate(KEYS):
        s = generate("abrupt", seed=10 + i, n_batches=n, batch_size=8 + 4 * i)
        b = 8 + 4 * i
        out[k] = [
            (torch.from_numpy(s.x[t * b : (t + 1) * b]), torch.from_numpy(s.y[t * b : (t + 1) * b]))
            for t in range(n)
        ]
    return out


def _keyed(step_fn=None, per_key: bool = False) -> KeyedDriftLoop:  # type: ignore[no-untyped-def]
    kw = {} if step_fn is None else {"step_fn": step_fn}
    return KeyedDriftLoop(POLICY, **SETTINGS, per_key=per_key, **kw)  # type: ignore[arg-type]


def test_each_key_runs_the_one_model_drift_loop(warm_state: PosteriorState) -> None:
    """With the reference step and the per-key signals, a key's result is bit for bit
    DriftLoop's on its stream alone (the batched signals: tests/drift/test_keyed_batched.py)."""
    fleet = fleet_prior(warm_state)
    streams = _streams(12)
    kl = _keyed(keyed_step_loop, per_key=True)
    states = {k: new_key_state(fleet, k) for k in KEYS}
    drifts = {k: kl.drift_for(states[k]) for k in KEYS}
    alone = {}
    for k in KEYS:
        st = states[k]
        loop = DriftLoop.resume(st, policy=POLICY, **SETTINGS)  # type: ignore[arg-type]
        for t, (x, y) in enumerate(streams[k]):
            if k == "b" and t % 2:  # key b is absent from every other micro-batch
                continue
            st = loop.process(st, x, y)[0]
        alone[k] = st
    for t in range(12):
        batch = {k: streams[k][t] for k in KEYS if not (k == "b" and t % 2)}
        res = kl.step(drifts, states, batch)
        assert res.fleet.keys == len(batch)
        states = {**states, **res.states}
        drifts = {**drifts, **res.drifts}
    for k in KEYS:
        assert to_bytes(states[k]) == to_bytes(alone[k])


def test_key_drift_rides_in_the_key_blob_and_resumes_exactly(warm_state: PosteriorState) -> None:
    fleet = fleet_prior(warm_state)
    streams = _streams(14)

    def run(restart_at: int | None) -> dict[str, bytes]:
        kl = _keyed()
        states = {k: new_key_state(fleet, k) for k in KEYS}
        drifts = {k: kl.drift_for(states[k]) for k in KEYS}
        for t in range(14):
            if t == restart_at:
                kl = _keyed()
                states = {k: from_bytes(to_bytes(s)) for k, s in states.items()}
                drifts = {k: kl.drift_for(s) for k, s in states.items()}
            res = kl.step(drifts, states, {k: streams[k][t] for k in KEYS})
            states, drifts = res.states, res.drifts
        assert all(drift_mode(s) != "none" for s in states.values())
        return {k: to_bytes(s) for k, s in states.items()}

    assert run(None) == run(7)


def test_one_shifted_key_of_50_alarms_alone_and_in_time() -> None:
    """The issue's experiment: key 0 of 50 shifts by +1.5 at batch 40 of its own stream."""
    from fogline.drift.keyed_experiment import KeyedExperimentConfig, run

    rec = run(KeyedExperimentConfig(keys=50, batches=48, shift_at=40))
    assert rec["detection_batches"] is not None and rec["detection_batches"] <= 5
    assert "key-000" not in rec["false_alarm_keys"]
    assert rec["final_mode_shifted_key"] != "stable"
    assert rec["monitored_key_batches"] >= 49 * 40  # history-calibrated: live from batch 1
    assert rec["false_alarms"] <= rec["false_alarms_allowed"]


def test_new_keys_of_one_fleet_prior_share_one_anchored_drift_state(
    warm_state: PosteriorState,
) -> None:
    fleet = fleet_prior(warm_state)
    kl = _keyed()
    a, b = new_key_state(fleet, "a"), new_key_state(fleet, "b")
    da, db = kl.drift_for(a), kl.drift_for(b)
    assert da is db  # fitted once; the reference ensemble is held once
    other = fleet_prior(warm_state)  # equal values, other tensors: anchored on its own
    assert kl.drift_for(new_key_state(other, "c")) is not da
