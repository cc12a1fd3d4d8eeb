"""The README's main command, ``fogline demo``, end to end with nothing started by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "fogline.cli", "demo", "--out", str(out), "--batches", "30"],
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit"] == 0
    assert summary["records_absorbed"] > 0
    # every record sent is either absorbed or dead-lettered: nothing is lost
    assert summary["records_absorbed"] + summary["dead_lettered"] == summary["records_sent"]
    assert summary["snapshot_version"] >= 1
    pngs = list(out.glob("*.png"))
    assert pngs, f"no plot written in {sorted(p.name for p in out.iterdir())}"
    # the query step: the service answered on the live snapshot, in and out of range
    q = summary["query"]
    for tag in ("in_range", "out_of_range"):
        lo, hi = q[tag]["intervals"]["0.95"]
        assert lo < q[tag]["mean"] < hi
        assert q[tag]["epistemic_std"] > 0 and q[tag]["aleatoric_std"] > 0
    assert (out / "bands.png").stat().st_size > 0


@pytest.mark.slow
def test_demo_on_own_data(tmp_path: Path) -> None:
    """``fogline demo --config CFG --data FILE``: warm start, replay, daemon, query by name."""
    import numpy as np
    from test_own_telemetry_e2e import NOISE, draw, truth, write_csv

    rng = np.random.default_rng(0)
    x = draw(3000, 5)
    write_csv(tmp_path / "mine.csv", x, truth(x, False) + rng.normal(0, NOISE, 3000), 0)
    cfg = tmp_path / "mine.toml"
    cfg.write_text(
        '[model]\nfeatures = ["cpu_pct", "mem_mb", "queue_len"]\ntarget = "throughput"\n'
        'timestamp = "time"\n[model.transforms]\nqueue_len = "log1p"\n'
        "[stream]\nbatch_size = 100\nlr = 0.005\n"
    )
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable, "-m", "fogline.cli", "demo", "--config", str(cfg),
            "--data", str(tmp_path / "mine.csv"), "--out", str(out), "--epochs", "40",
        ],
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["warm_rows"] == 1500
    assert summary["records_absorbed"] + summary["dead_lettered"] == summary["records_sent"]
    assert summary["records_absorbed"] == 1500  # count batching, 15 x 100
    q = summary["query"]
    inside = q["in_range"]
    row = inside["input"]
    f = float(truth(np.array([[row["cpu_pct"], row["mem_mb"], row["queue_len"]]]), False)[0])
    lo, hi = inside["intervals"]["0.95"]
    assert lo < f < hi  # raw units: throughput ~ 200, not standardised
    assert q["out_of_range"]["epistemic_std"] > 3 * inside["epistemic_std"]
    assert (out / "bands.png").stat().st_size > 0
