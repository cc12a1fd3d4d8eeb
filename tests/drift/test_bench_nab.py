"""``fogline bench nab`` on a tiny synthetic NAB-layout corpus (no ../shared needed),
and the score it reaches on the real NAB subset when ../shared has it (slow)."""

from __future__ import annotations

import csv
import json
import math
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from fogline.bench import nab


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _write_series(path: Path, values: np.ndarray, start: datetime) -> list[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    stamps = [
        (start + timedelta(hours=i)).strftime("%Y-%m-%d %H:%M:%S") for i in range(len(values))
    ]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp", "value"])
        for t, v in zip(stamps, values, strict=True):
            w.writerow([t, f"{v:.4f}"])
    return stamps


def tiny_corpus(root: Path, n: int = 900) -> dict[str, list[list[str]]]:
    """Two files: a noisy daily cycle without anomalies and one with a level jump."""
    rng = np.random.default_rng(0)
    t = np.arange(n)
    start = datetime(2024, 1, 1)
    calm = 10 + 2 * np.sin(2 * np.pi * t / 24) + 0.3 * rng.standard_normal(n)
    _write_series(root / "data" / "synthetic" / "calm.csv", calm, start)
    jump = 10 + 2 * np.sin(2 * np.pi * t / 24) + 0.3 * rng.standard_normal(n)
    jump[600:] += 8.0
    stamps = _write_series(root / "data" / "synthetic" / "jump.csv", jump, start)
    windows = {"synthetic/calm.csv": [], "synthetic/jump.csv": [[stamps[580], stamps[640]]]}
    (root / "labels").mkdir(parents=True)
    (root / "labels" / "combined_windows.json").write_text(json.dumps(windows))
    return windows


def test_bench_nab_writes_the_results_tree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_corpus(tmp_path / "nab")
    out = tmp_path / "results"
    rc = nab.main(
        ["--data", str(tmp_path / "nab"), "--out", str(out), "--warm-steps", "300", "--json"]
    )
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert res["files"] == 2 and res["rows"] == 1800 and res["detector"] == "forget"
    assert {r["name"] for r in res["per_file"]} == {"calm", "jump"}
    assert all(r["wall_s"] > 0 for r in res["per_file"])
    assert any(line.startswith("synthetic/calm: 900 rows") for line in lines)
    fa = res["false_alarms"]
    assert fa["no_anomaly"]["files"] == 1 and fa["before_first_window"]["files"] == 1
    rates = res["score_rates"]  # the per-record score on the window-free file (calm)
    assert rates["files"] == 1 and rates["records"] == 900 - 135  # past NAB's probation
    raw, events = rates["raw"]["counts"], rates["events"]["counts"]
    assert raw == sorted(raw, reverse=True) and events == sorted(events, reverse=True)
    assert all(e <= r for e, r in zip(events, raw, strict=True))  # suppression only removes
    assert raw[0] > 0  # q = 0.1 on 765 records
    for name in ("calm", "jump"):
        path = out / "forget" / "synthetic" / f"forget_{name}.csv"
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert list(rows[0]) == ["timestamp", "value", "anomaly_score", "tail_probability", "label"]
        assert len(rows) == 900  # every row, the tail past the last full batch included
        scores = np.asarray([float(r["anomaly_score"]) for r in rows])
        tails = np.asarray([float(r["tail_probability"]) for r in rows])
        assert np.all((scores >= 0) & (scores <= 1)) and np.all((tails >= 0) & (tails <= 1))
        assert scores[-10:].max() > 0 or tails[-10:].min() < 1  # the last partial batch is scored
    with (out / "forget" / "synthetic" / "forget_jump.csv").open(newline="") as fh:
        jump = np.asarray([float(r["anomaly_score"]) for r in csv.DictReader(fh)])
    # the jump at row 600 scores above everything before it, within a few records
    assert jump[600:608].max() > jump[:600].max()


def test_bench_nab_names_a_bad_tree(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data/"):
        nab.main(["--data", str(tmp_path)])
    (tmp_path / "data" / "c").mkdir(parents=True)
    (tmp_path / "data" / "c" / "f.csv").write_text("timestamp,value\n")
    with pytest.raises(FileNotFoundError, match=r"combined_windows\.json"):
        nab.main(["--data", str(tmp_path)])


def test_scorer_table_is_parsed(tmp_path: Path, shared_dir: Path) -> None:
    """The real scorer on the tiny corpus's results (skips without ../shared)."""
    scorer = shared_dir / "tools" / "nab_score.py"
    if not scorer.is_file():
        pytest.skip(f"no scorer at {scorer}")
    tiny_corpus(tmp_path / "nab")
    out = tmp_path / "results"
    nab.main(["--data", str(tmp_path / "nab"), "--out", str(out), "--warm-steps", "300"])
    scored = nab.score(scorer, tmp_path / "nab", out / "forget")
    assert set(scored["profiles"]) == {"standard", "low_fp", "low_fn"}
    for prof in scored["profiles"].values():
        assert math.isfinite(prof["score"]) and prof["tp"] + prof["fn"] == 1


@pytest.mark.slow
def test_nab_subset_score(
    tmp_path: Path, nab_root: Path, shared_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The NAB subset at default settings, seed 0 (40-160 s on 2 shared cores).

    The issue's bar is standard >= 60.  Measured at the current defaults (recurrence floor
    m = 0.02, suppression over S = 128 records, normal scores clipped at 12) on an AMD EPYC
    2-core machine over seeds 0-9: 66.75, 56.50, 64.42, 61.54, 60.09, 57.26, 55.75, 61.21,
    62.13, 61.11 (low FN above low FP at every seed, 24-30 TP windows); at earlier defaults
    (m = 0, S = 64, clip 6) on the CI machine kind (Intel Xeon, 2 cores) seeds 0-9 scored
    54.93-61.32, >= 23 TP windows (docs/drift.md); the current defaults have not been
    measured on that kind.  Another CPU rounds the warm start differently, as another seed
    would.  This runs seed 0 and asserts what every measured seed holds, and that the
    score's realised rate on the window-free files is near nominal at q = 0.1 and within a
    factor 2.5 at q = 1e-2: seed 0 reads 0.63 and 0.82; over the ten seeds 0.63-1.21 x at
    0.1 and 0.76-2.75 x at 1e-2 (seed 5 above 2.5, 2.61 with the earlier clip 6; below 1e-2
    the rate is not nominal, docs/drift.md).
    """
    scorer = shared_dir / "tools" / "nab_score.py"
    if not scorer.is_file():
        pytest.skip(f"no scorer at {scorer}")
    out = tmp_path / "results"
    nab.main(["--data", str(nab_root), "--out", str(out), "--jobs", "2", "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    scored = nab.score(scorer, nab_root, out / "forget")["profiles"]
    assert scored["standard"]["score"] >= 50.0, scored
    assert scored["low_fn"]["score"] >= scored["low_fp"]["score"], scored
    assert scored["standard"]["tp"] >= 22, scored
    rates = res["score_rates"]
    assert rates["files"] == 6 and rates["records"] == 20_568
    assert 0.5 <= rates["raw"]["ratio"][0] <= 1.5, rates  # q = 0.1
    assert 0.5 <= rates["raw"]["ratio"][1] <= 2.5, rates  # q = 1e-2


def test_warm_start_restarts(tmp_path: Path) -> None:
    """One restart (the default) is the single fit at the seed; restarts are deterministic."""
    from fogline.drift import experiment as ex

    tiny_corpus(tmp_path / "nab")
    path = tmp_path / "nab" / "data" / "synthetic" / "calm.csv"
    assert ex.ExperimentConfig().warm_restarts == 1
    quick = {"warm_steps": 150, "warm_epochs": 1}
    one = ex.ExperimentConfig(warm_restarts=1, **quick)  # type: ignore[arg-type]
    data = ex.load_nab(path, one)
    single = ex.warm_start(data, one)
    config = ex.ModelConfig.model_validate({"in_features": int(data.x.shape[1])})
    x, y = torch.from_numpy(data.warm_x), torch.from_numpy(data.warm_y)
    epochs = max(1, math.ceil(150 * 256 / len(y)))
    plain = ex.fit(ex.init_state(config, seed=0), x, y, epochs=epochs, batch_size=256, seed=0)
    for name, value in plain.state.params.items():
        torch.testing.assert_close(single.params[name], value, rtol=0, atol=0)
    for select in ("held_out", "elbo"):
        cfg = ex.ExperimentConfig(warm_restarts=4, warm_select=select, **quick)  # type: ignore[arg-type]
        a, b = ex.warm_start(data, cfg), ex.warm_start(data, cfg)
        torch.testing.assert_close(a.params["loc"], b.params["loc"], rtol=0, atol=0)
        if select == "held_out":  # fitted on 80 % and then a final pass: never the single fit
            assert not torch.equal(a.params["loc"], single.params["loc"])
