"""A user's own 3-feature CSV, end to end, through the commands a user runs (issue 15).

``fogline warmstart --config --data`` on the first half (own column names, target
``throughput``, raw units of very different scales), ``fogline replay --config`` of
the second half (a regime change in it), ``fogline run`` on the embedded broker and a
real redis-server, then the query service asked *by name in raw units*; the answers are
checked against the generating function of the regime the stream ended in.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from daemon_runs import run_daemon

from fogline.bench.crash_replay import write_config
from fogline.cli import main
from fogline.daemon.config import Settings
from fogline.daemon.query.background import BackgroundServer, request_json, wait_for_snapshot
from fogline.daemon.stream.store import SnapshotStore
from fogline.drift.runner import drift_summary
from fogline.models.serialize import from_bytes

SPEC = {
    "features": ["cpu_pct", "mem_mb", "queue_len"],
    "target": "throughput",
    "timestamp": "time",
    "transforms": {"queue_len": "log1p"},
    "hidden": [32, 32],
}
NOISE = 4.0
SHIFT = 30.0  # throughput drops by 30 units after the change
T0 = 1_700_000_000


def truth(x: np.ndarray, shifted: bool) -> np.ndarray:
    """E[throughput | cpu_pct, mem_mb, queue_len]: non-linear in cpu, linear in mem, log in queue."""
    cpu, mem, queue = x[:, 0], x[:, 1], x[:, 2]
    f = 200 + 40 * np.sin(cpu / 18.0) + 0.004 * (mem - 8000) - 12 * np.log1p(queue)
    return f - SHIFT if shifted else f


def draw(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack(
        [rng.uniform(5, 95, n), rng.normal(8000, 2500, n), rng.lognormal(1.5, 1.0, n)]
    )


def write_csv(path: Path, x: np.ndarray, y: np.ndarray, start: int) -> None:
    lines = ["time,host,cpu_pct,mem_mb,queue_len,throughput"]
    for i in range(len(y)):
        lines.append(
            f"{T0 + 10 * (start + i)},web-{i % 4},{x[i, 0]:.3f},{x[i, 1]:.2f},{x[i, 2]:.4f},{y[i]:.3f}"
        )
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_own_csv_warm_start_daemon_query_by_name(
    kafka_bootstrap: str, redis_url: str, fresh_topic: str, redis_prefix: str, tmp_path: Path
) -> None:
    rng = np.random.default_rng(7)
    n_hist, n_live, change = 4000, 5120, 1024  # the live part shifts after 1,024 records
    x_hist = draw(n_hist, 1)
    y_hist = truth(x_hist, False) + rng.normal(0, NOISE, n_hist)
    x_live = draw(n_live, 2)
    shifted = np.arange(n_live) >= change
    y_live = np.where(shifted, truth(x_live, True), truth(x_live, False)) + rng.normal(
        0, NOISE, n_live
    )
    hist_csv, live_csv = tmp_path / "history.csv", tmp_path / "live.csv"
    write_csv(hist_csv, x_hist, y_hist, 0)
    write_csv(live_csv, x_live, y_live, n_hist)

    cfg = write_config(
        tmp_path / "fogline.yaml",
        bootstrap=kafka_bootstrap,
        topic=fresh_topic,
        redis_url=redis_url,
        model="own",
        prefix=redis_prefix,
        batch_size=128,
        batching="count",
    )
    settings = yaml.safe_load(cfg.read_text())
    settings["model"] = SPEC
    settings["drift"] = {"policy": "forget"}  # the default policy (write_config turns it off)
    settings["stream"].update({"lr": 5e-3, "steps_per_batch": 2, "data_size": 4000})
    cfg.write_text(yaml.safe_dump(settings))

    # 1. warm start on the user's history, by the config's [model] section
    state_path = tmp_path / "warm.safetensors"
    code = main(
        [
            "warmstart", "--config", str(cfg), "--data", str(hist_csv), "--out", str(state_path),
            "--epochs", "60", "--alarm-batch-size", "128", "--json", "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    assert state_path.is_file()

    # 2. replay the live half by the spec's columns; 3. the daemon absorbs it
    assert main(["replay", str(live_csv), "--topic", fresh_topic, "--config", str(cfg)]) == 0
    log = tmp_path / "daemon.log"
    assert run_daemon(cfg, log, "--init", str(state_path), "--idle-exit-s", "3") == 0
    with SnapshotStore(redis_url, "own", prefix=redis_prefix) as store:
        snap = store.read()
    state = from_bytes(snap.blob)
    assert snap.meta.records_absorbed == n_live  # count batching: 5,120 = 40 x 128
    assert state.data_schema().feature_names == tuple(SPEC["features"])
    summary = drift_summary(state)
    alarms = [t["batch"] for t in summary["transitions"] if t["reason"] == "alarm"]
    change_batch = change // 128
    assert alarms, f"no alarm after the change at batch {change_batch}: {summary}"
    assert change_batch <= alarms[0] <= change_batch + 5, alarms

    # 4. ask the query service by name, in raw units, inside the data
    probe = draw(64, 3)
    probe = probe[(probe[:, 2] < 20) & (np.abs(probe[:, 1] - 8000) < 4000)]
    rows = [dict(zip(SPEC["features"], map(float, r), strict=True)) for r in probe]
    s = Settings.load(cfg)
    with BackgroundServer(s) as url:
        wait_for_snapshot(url, "own")
        info = request_json(f"{url}/v1/models/own/snapshot")
        answer = request_json(f"{url}/v1/models/own/predict", {"rows": rows, "levels": [0.5, 0.95]})
    assert info["target"] == "throughput"
    preds = answer["predictions"]
    mean = np.array([p["mean"] for p in preds])
    f = truth(probe, True)  # the stream ended in the shifted regime
    rmse = float(np.sqrt(np.mean((mean - f) ** 2)))
    # within one noise sd of the new regime's truth, and far nearer it than the old one
    rmse_old = float(np.sqrt(np.mean((mean - truth(probe, False)) ** 2)))
    assert rmse < NOISE, (rmse, mean[:5], f[:5])
    assert rmse < 0.25 * rmse_old, (rmse, rmse_old)
    aleatoric = np.array([p["aleatoric_std"] for p in preds])
    assert 0.6 * NOISE < float(np.median(aleatoric)) < 1.6 * NOISE
    lo = np.array([p["intervals"]["0.95"][0] for p in preds])
    hi = np.array([p["intervals"]["0.95"][1] for p in preds])
    draws = f[None, :] + np.random.default_rng(9).normal(0, NOISE, (200, len(f)))
    coverage = float(((draws >= lo) & (draws <= hi)).mean())
    print(f"rmse {rmse:.3f} (old regime {rmse_old:.3f}), coverage_95 {coverage:.3f}")
    assert 0.85 <= coverage <= 0.995, coverage
    for p in preds:
        assert p["total_std"] == pytest.approx(
            math.hypot(p["epistemic_std"], p["aleatoric_std"]), rel=1e-3
        )

    # 5. far outside the data along cpu_pct the epistemic part grows
    base = {"cpu_pct": 50.0, "mem_mb": 8000.0, "queue_len": 3.0}
    far = {**base, "cpu_pct": 400.0}
    with BackgroundServer(s) as url:
        wait_for_snapshot(url, "own")
        pin, pout = request_json(f"{url}/v1/models/own/predict", {"rows": [base, far]})[
            "predictions"
        ]
    assert pout["epistemic_std"] > 3 * pin["epistemic_std"], (pin, pout)
    (tmp_path / "answers.json").write_text(json.dumps({"in": pin, "out": pout}))
