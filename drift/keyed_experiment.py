"""The keyed drift experiment: 1 key of K shifts; does it alone alarm, and in time?

Setup (every number a setting of :class:`KeyedExperimentConfig`).  A BNN is
warm-started on regime-0 history (:mod:`fogline.replay_data.generator`:
y = sin(3 x0) + eps, eps std 0.1 + 0.4 |x0|); every key starts from that fleet
prior (:func:`fogline.models.keyed.fleet_prior`, :func:`~fogline.models.keyed.new_key_state`)
and receives its own seeded regime-0 stream, ``batch_size`` records per
micro-batch.  From batch ``shift_at`` on, the records of key 0 only get the
``abrupt`` scenario's shift, y + ``shift``.  Every micro-batch of all K keys
goes through :class:`fogline.drift.keyed.KeyedDriftLoop` (per-key policy and
threshold monitor, one batched :func:`fogline.models.keyed.keyed_step`).  The
alarm threshold for the ERT is fitted on the warm start's holdout
(``calibration = "history"``, :mod:`fogline.drift.history`; ``holdout_rows``
records), once for the fleet prior, so every key's alarm is live from its first
batch; ``calibration = "stream"`` makes each key fit its own on its first
``calibration_batches`` batches instead (measured: too few records at the
defaults, see docs/drift.md).

Reported:

``detection_batches``
    batches of key 0's own shifted records up to and including its first
    alarm at or after ``shift_at`` (1 = it alarmed on the first shifted batch;
    ``None``: no alarm); the issue asks for <= 5.
``false_alarms``
    alarms of the other K - 1 keys, and key 0's before ``shift_at``.
``monitored_key_batches``
    key-batches in which a monitor that could only alarm falsely was live
    (calibrated, mode ``stable``; key 0 before ``shift_at``); with a monitor fitted for ERT batches between false alarms
    the false alarms are about Poisson(lambda), lambda = monitored / ERT.
``false_alarms_allowed``
    the 99 % Poisson quantile of lambda: "no more false alarms than the ERT
    allows" is ``false_alarms <= false_alarms_allowed``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fogline.drift.config import PolicyConfig
from fogline.drift.history import attach_history
from fogline.drift.keyed import KeyedDriftLoop
from fogline.models.config import ModelConfig
from fogline.models.keyed import fleet_prior, new_key_state
from fogline.models.state import PosteriorState
from fogline.models.svi import fit, init_state
from fogline.replay_data.generator import generate


class KeyedExperimentConfig(BaseModel):
    """Settings of :func:`run` (defaults: the figures in docs/drift.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keys: int = Field(default=50, ge=2)
    batches: int = Field(default=60, ge=4)
    batch_size: int = Field(default=16, ge=1)
    shift_at: int = Field(default=40, ge=1)
    shift: float = 1.5
    calibration_batches: int = Field(default=20, ge=1)
    ert: float = Field(default=500.0, gt=1)
    policy: str = "forget"
    hidden: tuple[int, ...] = (16, 16)
    warm_rows: int = Field(default=4096, ge=64)
    warm_epochs: int = Field(default=40, ge=1)
    holdout_rows: int = Field(default=4096, ge=64)
    calibration: str = "history"
    lr: float = Field(default=5e-3, gt=0)
    ensemble_size: int = Field(default=32, ge=2)
    n_streams: int = Field(default=200, ge=10)
    seed: int = 0


def warm_start(cfg: KeyedExperimentConfig) -> PosteriorState:
    """The fleet's posterior: regime-0 history, minibatch SVI (seeded), with a holdout.

    The holdout (``holdout_rows`` regime-0 records the fit never saw) is the
    history reference every key's alarm is calibrated on
    (:func:`fogline.drift.history.attach_history`; with ``calibration =
    "stream"`` it is not used).
    """
    s = generate("stable", seed=1000 + cfg.seed, n_batches=16, batch_size=cfg.warm_rows // 16)
    config = ModelConfig.model_validate({"in_features": s.x.shape[1], "hidden": cfg.hidden})
    state = init_state(config, seed=cfg.seed, lr=1e-2)
    x, y = torch.from_numpy(s.x), torch.from_numpy(s.y)
    res = fit(state, x, y, epochs=cfg.warm_epochs, batch_size=256, seed=cfg.seed)
    held = generate("stable", seed=2000 + cfg.seed, n_batches=8, batch_size=cfg.holdout_rows // 8)
    warm = res.state.replace(extra={}, lr=cfg.lr)
    return attach_history(warm, torch.from_numpy(held.x), torch.from_numpy(held.y))


def key_name(i: int) -> str:
    """The name of key ``i`` (key 0 is the one that shifts)."""
    return f"key-{i:03d}"


def streams(cfg: KeyedExperimentConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each key's (x [B * n, 8], y [B * n]): its own seeded regime-0 stream; key 0 shifts."""
    out = {}
    for i in range(cfg.keys):
        s = generate(
            "stable", seed=cfg.seed * 10_007 + i, n_batches=cfg.batches, batch_size=cfg.batch_size
        )
        y = s.y.copy()
        if i == 0:
            y[cfg.shift_at * cfg.batch_size :] += cfg.shift
        out[key_name(i)] = (s.x, y)
    return out


def poisson_quantile(lam: float, q: float = 0.99) -> int:
    """The smallest c with P(Poisson(lam) <= c) >= q."""
    c, term = 0, math.exp(-lam)
    total = term
    while total < q:
        c += 1
        term *= lam / c
        total += term
    return c


def run(cfg: KeyedExperimentConfig) -> dict[str, Any]:
    """Run the experiment; returns the JSON-able result record."""
    t0 = time.perf_counter()
    warm = warm_start(cfg)
    policy = PolicyConfig.model_validate(
        {
            "policy": cfg.policy,
            "ert": cfg.ert,
            "calibration_batches": cfg.calibration_batches,
            "calibration": cfg.calibration,
            "ensemble_size": cfg.ensemble_size,
            "n_streams": cfg.n_streams,
        }
    )
    loop = KeyedDriftLoop(
        policy, base_lr=cfg.lr, data_size=cfg.warm_rows, seed=cfg.seed, batch_size=cfg.batch_size
    )
    fleet = fleet_prior(loop.new_key(warm))
    data = streams(cfg)
    states = {k: new_key_state(fleet, k) for k in data}
    drifts = {k: loop.drift_for(s) for k, s in states.items()}
    alarms: dict[str, list[int]] = {k: [] for k in data}
    monitored = 0
    t_warm = time.perf_counter() - t0
    b = cfg.batch_size
    for t in range(cfg.batches):
        batch = {
            k: (torch.from_numpy(x[t * b : (t + 1) * b]), torch.from_numpy(y[t * b : (t + 1) * b]))
            for k, (x, y) in data.items()
        }
        live = {
            k
            for k, d in drifts.items()
            if d.policy.mode == "stable"
            and d.policy.calibrating == 0
            and (k != key_name(0) or t < cfg.shift_at)
        }
        res = loop.step(drifts, states, batch)
        states, drifts = res.states, res.drifts
        monitored += len(live)
        for k in res.fleet.alarmed:
            alarms[k].append(t)
    shifted = key_name(0)
    after = [t for t in alarms[shifted] if t >= cfg.shift_at]
    detection = after[0] - cfg.shift_at + 1 if after else None
    false = sum(len(v) for k, v in alarms.items() if k != shifted) + sum(
        1 for t in alarms[shifted] if t < cfg.shift_at
    )
    lam = monitored / cfg.ert
    allowed = poisson_quantile(lam)
    return {
        "experiment": "keyed_drift",
        "keys": cfg.keys,
        "shifted_key": shifted,
        "shift_at": cfg.shift_at,
        "detection_batches": detection,
        "detected_within_5": detection is not None and detection <= 5,
        "false_alarms": false,
        "false_alarm_keys": sorted(k for k, v in alarms.items() if v and k != shifted),
        "monitored_key_batches": monitored,
        "ert": cfg.ert,
        "false_alarms_expected": round(lam, 3),
        "false_alarms_allowed": allowed,
        "false_alarms_ok": false <= allowed,
        "measured_ert": round(monitored / false, 1) if false else None,
        "alarms_of_shifted_key": alarms[shifted],
        "final_mode_shifted_key": drifts[shifted].policy.mode,
        "warm_start_s": round(t_warm, 2),
        "wall_s": round(time.perf_counter() - t0, 2),
        "config": cfg.model_dump(mode="json"),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fogline bench keyed_drift", description=__doc__.split("\n")[0]
    )
    defaults = KeyedExperimentConfig()
    for name in ("keys", "batches", "batch_size", "shift_at", "calibration_batches", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("shift", "ert"):
        p.add_argument(f"--{name}", type=float, default=getattr(defaults, name))
    p.add_argument("--policy", default=defaults.policy)
    p.add_argument("--calibration", choices=("history", "stream"), default=defaults.calibration)
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``fogline bench keyed_drift``: run and print the result (exit 1 if a goal is missed)."""
    import structlog

    args = _parser().parse_args(list(argv) if argv is not None else None)
    fields = {k: v for k, v in vars(args).items() if k != "json"}
    try:
        cfg = KeyedExperimentConfig.model_validate(fields)
    except ValueError as exc:
        print(f"fogline bench keyed_drift: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    rec = run(cfg)
    print(
        f"keyed drift  keys={rec['keys']}  shift of {rec['shifted_key']} at batch {rec['shift_at']}"
    )
    print(f"  detection: {rec['detection_batches']} batches of its own shifted records")
    print(
        f"  false alarms of the others: {rec['false_alarms']} in "
        f"{rec['monitored_key_batches']} monitored key-batches "
        f"(ERT {rec['ert']:g}: expected {rec['false_alarms_expected']}, "
        f"allowed <= {rec['false_alarms_allowed']})"
    )
    if args.json:
        print(json.dumps(rec, sort_keys=True))
    return 0 if rec["detected_within_5"] and rec["false_alarms_ok"] else 1
