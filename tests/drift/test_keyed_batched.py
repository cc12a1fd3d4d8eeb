"""``KeyedDriftLoop``'s batched signals against its per-key reference path, key for key.

The same keyed stream (keys with 1 to 14 rows, a key missing from every third
micro-batch, three keys that shift, a gross outlier, a restart from the key
blobs halfway) runs through ``per_key=True`` (every key's signals alone, every
drift state restored from its posterior on each batch: the loop as it was)
and through the default batched path.  Everything discrete must be identical
(actions, alarms, modes, transitions, counters, the posterior parameters,
which only the actions steer); the float signals, thresholds and calibration
records are equal to float rounding (the batched passes sum in another order).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from fogline.drift.keyed import KeyedDriftLoop
from fogline.drift.keyed_signals import PostJob, post_signals, pre_signals, stacked_layers
from fogline.drift.policy import PolicyConfig
from fogline.drift.signals import (
    NoiseCache,
    make_reference,
    post_update_signals,
    pre_update_signals,
)
from fogline.models.config import ModelConfig
from fogline.models.keyed import fleet_prior, new_key_state
from fogline.models.serialize import from_bytes, to_bytes
from fogline.models.state import PosteriorState
from fogline.models.svi import init_state

KEYS = tuple(f"k{i}" for i in range(8))
SHIFTED = ("k0", "k3", "k6")
POLICY = PolicyConfig(
    policy="forget",
    calibration="stream",
    calibration_batches=5,
    ensemble_size=16,
    n_streams=50,
    ert=40.0,
    cooldown=2,
    min_recovery=3,
    recovery_window=2,
    max_recovery=6,
)
SETTINGS = {"base_lr": 5e-3, "data_size": 500, "num_steps": 1, "seed": 0}
BATCHES = 26
RESTART_AT = 13
REL, ABS = 1e-4, 1e-6


def _stream(features: int) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for t in range(BATCHES):
        batch = {}
        for i, k in enumerate(KEYS):
            if k == "k5" and t % 3 == 2:
                continue
            n = int(torch.randint(1, 15, (1,), generator=g))
            x = torch.randn(n, features, generator=g)
            y = torch.sin(3 * x[:, 0]) + 0.1 * torch.randn(n, generator=g) + 0.2 * i
            if t >= 9 and k in SHIFTED:
                y = y + 2.5
            if t == 7 and k == "k2":
                y[0] = y[0] + 40.0  # a gross outlier in a batch that is no shift
            batch[k] = (x, y)
        out.append(batch)
    return out


def _run(fleet: PosteriorState, per_key: bool, metrics: bool = True) -> dict[str, Any]:
    loop = KeyedDriftLoop(POLICY, per_key=per_key, metrics=metrics, **SETTINGS)  # type: ignore[arg-type]
    states = {k: new_key_state(fleet, k) for k in KEYS}
    actions, alarmed, signals = [], [], []
    for t, batch in enumerate(_stream(fleet.config.in_features)):
        if t == RESTART_AT:  # a new daemon: every key from its blob
            loop = KeyedDriftLoop(POLICY, per_key=per_key, metrics=metrics, **SETTINGS)  # type: ignore[arg-type]
            states = {k: from_bytes(to_bytes(s)) for k, s in states.items()}
        drifts = {k: loop.drift_for(states[k]) for k in batch}
        res = loop.step(drifts, states, batch)
        states = {**states, **res.states}
        actions.append(res.actions)
        alarmed.append(res.fleet.alarmed)
        signals.append(res.signals)
    return {"states": states, "actions": actions, "alarmed": alarmed, "signals": signals}


def _close(a: Any, b: Any, where: str) -> None:
    """Equal, floats to float rounding (NaN where NaN), everything else exactly."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, float | int) and isinstance(b, float | int), where
        if math.isnan(a) or math.isnan(b):
            assert math.isnan(a) and math.isnan(b), where
        else:
            assert a == pytest.approx(b, rel=REL, abs=ABS), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _close(u, v, f"{where}[{i}]")
    else:
        assert a == b, where


def test_batched_keys_match_the_per_key_loop(warm_state: PosteriorState) -> None:
    ref, new = _run(fleet_prior(warm_state), per_key=True), _run(fleet_prior(warm_state), False)
    # the stream exercised what it is meant to: alarms, a recovery, a re-anchor, an outlier
    modes = {a.mode for step in ref["actions"] for a in step.values()}
    assert {"stable", "shifted", "recovering"} <= modes
    assert any(a.reanchor for step in ref["actions"] for a in step.values())
    assert any(a.drop_outliers for step in ref["actions"] for a in step.values())
    assert set(SHIFTED) <= {k for alarms in ref["alarmed"] for k in alarms}
    # discrete outcomes: identical
    assert new["actions"] == ref["actions"]
    assert new["alarmed"] == ref["alarmed"]
    for t, (sa, sb) in enumerate(zip(ref["signals"], new["signals"], strict=True)):
        _close(sb, sa, f"signals[{t}]")
    for k in KEYS:
        a, b = ref["states"][k], new["states"][k]
        for name, v in a.params.items():  # only the actions steer the posterior
            assert torch.equal(v, b.params[name]), f"{k}.params.{name}"
        assert (a.step_count, a.records_absorbed) == (b.step_count, b.records_absorbed)
        _close(b.extra["drift"], a.extra["drift"], f"{k}.drift")
        _close(b.extra["drift_loop"], a.extra["drift_loop"], f"{k}.drift_loop")
        assert a.aux.keys() == b.aux.keys()
        for name, v in a.aux.items():
            torch.testing.assert_close(b.aux[name], v, rtol=REL, atol=ABS, msg=f"{k}.{name}")


@pytest.mark.parametrize("per_key", [False, True])
def test_unread_metrics_skipped_change_no_decision(
    warm_state: PosteriorState, per_key: bool
) -> None:
    """``metrics=False`` (the keyed daemon's): the post-update pass only where the loop reads
    the step KL; every action, alarm and parameter is the full run's, and a calibrated stable
    key's KL metrics are NaN, and its threshold fits skip the ERT check (``ert_estimate``
    None, the same threshold).  Per key the stored drift state is otherwise bit for bit the
    full run's; batched, the keys still read share their stacked passes with fewer others, so
    their step KLs (and what is fitted on them) agree to float rounding, as the two paths do."""
    full = _run(fleet_prior(warm_state), per_key=per_key)
    lean = _run(fleet_prior(warm_state), per_key=per_key, metrics=False)
    assert lean["actions"] == full["actions"] and lean["alarmed"] == full["alarmed"]
    fitted = 0
    for k in KEYS:
        a, b = full["states"][k], lean["states"][k]
        for name, v in a.params.items():
            assert torch.equal(v, b.params[name]), f"{k}.params.{name}"
        da, db = dict(a.extra["drift"]), dict(b.extra["drift"])
        if da.get("calibration"):  # the fits skipped their ERT check: the same thresholds
            fitted += 1
            ca, cb = dict(da.pop("calibration")), dict(db.pop("calibration"))
            assert cb.pop("ert_estimate") is None and ca.pop("ert_estimate") is not None, k
            assert cb == ca if per_key else cb.keys() == ca.keys(), k
            _close(cb, ca, f"{k}.calibration")
        if per_key:  # alone, every other stored float is the full run's bit for bit
            assert db == da and b.extra["drift_loop"] == a.extra["drift_loop"], k
            assert all(torch.equal(v, b.aux[n]) for n, v in a.aux.items()), k
        else:
            _close(db, da, f"{k}.drift")
            _close(b.extra["drift_loop"], a.extra["drift_loop"], f"{k}.drift_loop")
    assert fitted >= len(KEYS) // 2
    skipped = 0
    for t, (sf, sl) in enumerate(zip(full["signals"], lean["signals"], strict=True)):
        for k, f in sf.items():
            low = sl[k]
            assert math.isnan(f["step_kl"]) == math.isnan(low["step_kl"]), (t, k)
            if math.isnan(low["predictive_kl"]):
                skipped += 1
                assert math.isnan(low["weight_kl"]) and math.isnan(f["step_kl"]), (t, k)
            else:
                _close(low, f, f"signals[{t}].{k}")
    assert skipped > len(KEYS) * 5  # the stable calibrated keys' batches were skipped


@pytest.mark.parametrize("hidden", [(10, 6), (7,), ()])
@pytest.mark.parametrize("guide", ["meanfield", "lowrank"])
def test_stacked_signals_match_each_key_alone(guide: str, hidden: tuple[int, ...]) -> None:
    """pre_signals / post_signals against pre_update_signals / post_update_signals per key:
    keys sharing a reference and keys with their own, 1 to 14 rows, step KL for some;
    two, one and no hidden layers."""
    config = ModelConfig.model_validate({"in_features": 3, "hidden": hidden, "guide": guide})
    g = torch.Generator().manual_seed(11)
    shared = make_reference(init_state(config, seed=1), 16, 0)
    keys = []
    for i in range(9):
        ref = shared if i % 3 else make_reference(init_state(config, seed=20 + i), 16, 0)
        before = init_state(config, seed=40 + i)
        after = init_state(config, seed=60 + i)
        n = int(torch.randint(1, 15, (1,), generator=g))
        x = torch.randn(n, 3, generator=g)
        keys.append((ref, before if i % 2 else None, after, x, torch.randn(n, generator=g)))
    pre = pre_signals([k[0] for k in keys], [k[3] for k in keys], [k[4] for k in keys])
    noise = NoiseCache()
    eps, z = noise.draws(keys[0][2], 16, 0)
    rows = [max(1, int(k[3].shape[0]) - i % 4) for i, k in enumerate(keys)]
    jobs = [
        PostJob(after, before, x[:r], ks.scores.mean[:r], ks.scores.var[:r], ref.loc, ref.scale)
        for (ref, before, after, x, _), ks, r in zip(keys, pre, rows, strict=True)
    ]
    post = post_signals(jobs, eps, z)
    for i, ((ref, before, after, x, y), ks, r) in enumerate(zip(keys, pre, rows, strict=True)):
        alone, rs = pre_update_signals(ref, x, y)
        _close(ks.signals, alone, f"pre[{i}]")
        assert torch.equal(ks.scores.outlier, rs.outlier)
        torch.testing.assert_close(ks.scores.nll, rs.nll, rtol=REL, atol=ABS)
        assert ks.record.shape == (x.shape[0], 2)
        before_ens = noise.ensemble(before, 16, 0) if before is not None else None
        want = post_update_signals(
            ref, rs.head(r), x[:r], after, before_ens, ensemble=noise.ensemble(after, 16, 0)
        )[0]
        _close(post[i], want, f"post[{i}]")
        assert math.isnan(post[i]["step_kl"]) == (before is None)


@pytest.mark.parametrize("hidden", [(10, 6), (5, 4, 3), (7,), ()])
@pytest.mark.parametrize("guide", ["meanfield", "lowrank"])
def test_stacked_layers_are_each_states_ensemble(guide: str, hidden: tuple[int, ...]) -> None:
    """stacked_layers: per state and layer, the weights NoiseCache.ensemble draws (float
    rounding: one fused multiply-add), whatever memory layout the products read."""
    config = ModelConfig.model_validate({"in_features": 3, "hidden": hidden, "guide": guide})
    states = [init_state(config, seed=70 + i) for i in range(4)]
    g = torch.Generator().manual_seed(5)
    states = [
        st.replace(
            params={
                name: t + 0.3 * torch.randn(t.shape, generator=g) for name, t in st.params.items()
            }
        )
        for st in states
    ]
    noise = NoiseCache()
    eps, z = noise.draws(states[0], 9, 3)
    layers = stacked_layers(config, states, eps, z)
    assert len(layers) == len(hidden) + 1
    for k, st in enumerate(states):
        want = noise.ensemble(st, 9, 3).layers
        for (w, b), (w_want, b_want) in zip(layers, want, strict=True):
            assert w.shape[1:] == w_want.shape and b.shape[1:] == b_want.shape
            torch.testing.assert_close(w[k], w_want, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(b[k], b_want, rtol=1e-6, atol=1e-6)
