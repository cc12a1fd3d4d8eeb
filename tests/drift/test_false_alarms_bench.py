"""The false-alarm benchmark runs end to end and prints one JSON object last."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_prints_json_last() -> None:
    args = ["--seeds", "1", "--batches", "60", "--calibration-batches", "20", "--ert", "50"]
    proc = subprocess.run(
        [sys.executable, "-m", "fogline.bench.false_alarms", *args, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["benchmark"] == "false_alarms" and out["ert_target"] == 50.0
    assert 0 < out["monitored_batches"] <= 40  # 60 batches minus the 20-batch calibration
    assert out["false_alarms"] == sum(out["alarms_per_seed"])
    if out["false_alarms"]:
        assert out["ratio"] == pytest.approx(out["mean_run_length"] / 50.0, rel=1e-2)
