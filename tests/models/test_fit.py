"""models/fit.py + models/report.py + `fogline warmstart --config`: the generic warm start."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fogline.cli import main as cli_main
from fogline.models.fit import FitOptions, epochs_for, fit
from fogline.models.predictive import predict
from fogline.models.serialize import load
from fogline.models.spec import ModelSpec
from fogline.models.tabular import load_table

SPEC = ModelSpec(features=("cpu_pct", "mem_gb", "conns"), target="throughput", timestamp="time")
CONFIG = """[model]
features = ["cpu_pct", "mem_gb", "conns"]
target = "throughput"
timestamp = "time"
"""
HOLDOUT_KEYS = ("n", "nll", "rmse", "coverage_50", "coverage_90", "coverage_95")


def truth(x: np.ndarray) -> np.ndarray:
    """E[throughput | cpu, mem, conns]; the noise sd is 1."""
    return 10 + 0.2 * x[:, 0] + 3 * np.sin(x[:, 1]) + 0.05 * x[:, 2]


def write_history(path: Path, n: int = 1200, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = np.stack([rng.uniform(0, 100, n), rng.normal(8, 2, n), rng.poisson(50, n)], axis=1)
    y = truth(x) + rng.normal(0, 1.0, n)
    order = rng.permutation(n)  # rows out of time order: the split must sort them
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["time", "cpu_pct", "mem_gb", "conns", "throughput"])
        for i in order:
            w.writerow([1_700_000_000 + 60 * int(i), *x[i].tolist(), y[i]])


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("fit") / "history.csv"
    write_history(p)
    return p


def test_fit_three_features_in_raw_units(history: Path, tmp_path: Path) -> None:
    table, _ = load_table(history, SPEC)
    res = fit(SPEC, table, FitOptions(epochs=60, samples=50))
    # the state carries the schema fitted on the training part only
    schema = res.state.schema
    assert schema is not None and schema.feature_names == SPEC.features
    assert schema.target.name == "throughput" and schema.target.transform == "standardise"
    train_raw = schema.x_from_model(res.x_train.double())
    assert torch.allclose(
        train_raw.mean(0), torch.tensor([c.loc for c in schema.features]).double()
    )
    # chronological split: the holdout is the last 20 % in time
    assert res.held_ts is not None and res.x_held.shape[0] == 240
    assert int(res.held_ts.min()) == 1_700_000_000_000 + 60_000 * 960
    # report keys and sane figures
    h = res.report["holdout"]
    assert all(k in h for k in HOLDOUT_KEYS) and h["n"] == 240
    ood = res.report["ood"]  # per-feature out-of-support probes (models/ood.py)
    assert set(ood["epistemic_ratio"]) == set(schema.feature_names)
    assert ood["epistemic_ratio_min"] == min(ood["epistemic_ratio"].values()) > 1.0
    assert h["rmse"] < 0.35 * h["y_sd"]
    assert 0.8 <= h["coverage_95"] <= 1.0
    x_raw = schema.x_from_model(res.x_held.double()).numpy()
    mean = schema.y_from_model(predict(res.ensemble, res.x_held).mean.double()).numpy()
    rmse_truth = float(np.sqrt(np.mean((mean - truth(x_raw)) ** 2)))
    print(f"rmse to the generating mean {rmse_truth:.3f}, target sd {h['y_sd']:.2f}")
    assert rmse_truth < 0.2 * h["y_sd"]  # sd of the truth is 6.4; the noise sd is 1
    assert tuple(res.state.extra["functional_prior"]["features"]) == (0, 1, 2)
    # the saved state keeps the schema
    path = tmp_path / "s.safetensors"
    from fogline.models.serialize import save

    save(res.state, str(path))
    assert load(str(path)).schema == schema


def test_bernoulli_report_keys(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 400
    x = rng.standard_normal((n, 2))
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-3 * x[:, 0]))).astype(int)
    p = tmp_path / "b.csv"
    p.write_text("a,b,failed\n" + "".join(f"{u},{v},{t}\n" for (u, v), t in zip(x, y, strict=True)))
    spec = ModelSpec(features=("a", "b"), target="failed", likelihood="bernoulli")
    table, _ = load_table(p, spec)
    res = fit(spec, table, FitOptions(epochs=30, samples=30))
    h = res.report["holdout"]
    assert {"n", "nll", "accuracy", "brier", "ece"} <= h.keys()
    assert res.report["train"]["split"] == "random" and res.held_ts is None
    assert h["accuracy"] > 0.7


def test_epoch_rule() -> None:
    opts = FitOptions()
    assert epochs_for(100, opts) == 800  # tiny data: capped at 800 passes
    assert epochs_for(1_000_000, opts) == 20  # huge data: at least 20 passes
    assert epochs_for(20_000, opts) == 318  # 16,000 train rows: 63 steps/epoch, ~20k steps
    assert epochs_for(20_000, FitOptions(epochs=7)) == 7


def test_cli_config_warmstart_json(
    history: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "out" / "state.safetensors"
    args = ["warmstart", "--config", str(cfg), "--data", str(history), "--out", str(out)]
    args += ["--epochs", "2", "--samples", "20", "--json", "--alarm-batch-size", "64"]
    rc = cli_main([*args, "--report-dir", str(tmp_path / "rep")])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(k in doc["holdout"] for k in HOLDOUT_KEYS)
    assert doc["data"]["rows_kept"] == 1200 and doc["fit"]["epochs"] == 2
    for kind in ("pit", "reliability", "bands"):
        assert Path(doc["files"][kind]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["holdout"]["n"] == 240
    state = load(str(out))
    assert state.schema is not None
    # drift/history.py: the holdout is stored as the alarm's reference
    assert doc["alarm_reference"]["rows"] == 240 and "drift_history" in state.extra


def test_cli_exit_2_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG)
    bad = tmp_path / "bad.csv"
    bad.write_text("time,cpu_pct,mem_gb,throughput\n1,2,3,4\n")
    args = ["warmstart", "--config", str(cfg), "--out", str(tmp_path / "s.safetensors")]
    assert cli_main([*args, "--data", str(bad)]) == 2
    assert "missing column(s) ['conns']" in capsys.readouterr().err
    bad.write_text("time,cpu_pct,mem_gb,conns,throughput\n1,2,3,4,5\n2,2,oops,4,5\n")
    assert cli_main([*args, "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "row 2 (line 3): column 'mem_gb': 'oops' is not a number" in err
    assert "--drop-invalid" in err
    assert cli_main([*args, "--data", str(bad), "--drop-invalid"]) == 2  # 1 row left
    assert "at least 10" in capsys.readouterr().err
    assert cli_main([*args, "--data", str(bad), "--likelihood", "student-t"]) == 2
    assert "--likelihood: with --config the [model] section sets" in capsys.readouterr().err
    empty = tmp_path / "empty.toml"
    empty.write_text('model_name = "x"\n')
    assert cli_main(["warmstart", "--config", str(empty), "--data", str(bad)]) == 2
    assert "no [model] section" in capsys.readouterr().err
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[model]\nfeatures = ["a", "a"]\n')
    assert cli_main(["warmstart", "--config", str(wrong), "--data", str(bad)]) == 2
    assert "features: duplicate names" in capsys.readouterr().err
    assert cli_main(["warmstart", "--drop-invalid", "--epochs", "1"]) == 2
    assert "need --config" in capsys.readouterr().err
