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
