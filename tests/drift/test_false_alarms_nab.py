"""``fogline bench false_alarms --nab``: which batches are stable, the pooled run length,
and the command end to end on a tiny NAB-layout corpus (no ../shared needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_bench_nab import tiny_corpus

from fogline.bench import false_alarms, false_alarms_nab
from fogline.bench.false_alarms_nab import clean_calibration, pooled, stable_batches, windows_of


def test_windows_of_labels() -> None:
    labels = np.array([0, 1, 1, 0, 0, 1, 0, 1])
    assert windows_of(labels) == [(1, 2), (5, 5), (7, 7)]
    assert windows_of(np.zeros(4)) == []


def test_stable_batches_exclude_windows_and_their_aftermath() -> None:
    # rows 0..99, stream from row 10 in batches of 10 (9 batches), one window rows 40..49
    labels = np.zeros(100, dtype=np.int64)
    labels[40:50] = 1
    stable, before = stable_batches(100, 10, 10, 9, labels, after=1.0)
    # batch t holds rows [10 + 10 t, 20 + 10 t): ends <= 40, or starts > 49 + 10
    assert stable.tolist() == [True, True, True, False, False, True, True, True, True]
    assert before.tolist() == [True, True, True] + [False] * 6
    stable0, _ = stable_batches(100, 10, 10, 9, labels, after=0.0)
    assert stable0.tolist() == [True, True, True, False, True, True, True, True, True]
    none, first = stable_batches(100, 10, 10, 9, np.zeros(100), after=1.0)
    assert none.all() and first.all()
    with pytest.raises(ValueError, match="after"):
        stable_batches(100, 10, 10, 9, labels, after=-1.0)


def test_clean_calibration_follows_the_last_window() -> None:
    # calibrate 3, live 3, alarm + recovery 2, calibrate 2, extended on 1 batch, 1 more, live 2
    modes = ["calibrating"] * 3 + ["stable"] * 3 + ["shifted", "recovering"]
    modes += ["calibrating"] * 2 + ["stable", "calibrating", "stable", "stable"]
    live = np.array([0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=bool)
    stable = np.ones(14, dtype=bool)
    want = [0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    assert clean_calibration(modes, live, stable).astype(int).tolist() == want
    stable[8] = False  # the second window began inside a labelled window's aftermath
    assert clean_calibration(modes, live, stable)[12:].tolist() == [False, False]
    stable[8], stable[10] = True, False  # the batch on which the window was extended
    assert clean_calibration(modes, live, stable)[12:].tolist() == [False, False]


def test_pooled_run_length_and_interval() -> None:
    p = pooled(400, 16, 20.0)
    assert p["mean_run_length"] == 25.0 and p["ratio"] == 1.25 and p["within_50pct"]
    lo, hi = p["ci95_run_length"]
    assert lo == pytest.approx(25 * math.exp(-1.96 / 4), abs=0.1) and hi > 25
    assert pooled(400, 0, 20.0)["mean_run_length"] is None
    assert not pooled(400, 0, 20.0)["within_50pct"]


def test_bench_false_alarms_nab_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(1)
    tiny_corpus(tmp_path / "nab")
    args = ["--nab", str(tmp_path / "nab"), "--ert", "20,50", "--batch-size", "16", "--json"]
    assert false_alarms.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert res["benchmark"] == "false_alarms_nab" and res["files"] == 2
    assert [(s["batch_size"], s["ert"]) for s in res["settings"]] == [(16, 20.0), (16, 50.0)]
    rows = res["per_file"]
    assert len(rows) == 4 and {r["group"] for r in rows} == {"no_anomaly", "stable_parts"}
    for s in res["settings"]:
        mine = [r for r in rows if r["ert"] == s["ert"]]
        for group, kind in (("no_anomaly", "no_anomaly"), ("stable_parts", "stable_parts")):
            part = [r for r in mine if r["group"] == kind]
            assert s[group]["monitored_batches"] == sum(r["monitored"] for r in part)
            assert s[group]["false_alarms"] == sum(r["alarms"] for r in part)
        assert s["all"]["monitored_batches"] == sum(r["monitored"] for r in mine)
        noisy = [r for r in mine if not r["deterministic"]]
        assert s["clean_calibration"]["monitored_batches"] == sum(
            r["monitored_clean"] for r in noisy
        )
    for r in rows:
        assert 0 < r["monitored"] <= r["batches"] and r["alarms"] == len(r["alarm_batches"])
        assert r["monitored_before_first"] <= r["monitored"]
        assert r["monitored_clean"] <= r["monitored"] and r["alarms_clean"] <= r["alarms"]
        assert r["monitored"] <= r["batches"] - 40  # the 40-batch calibration is not monitored
        if r["name"] == "calm":
            assert r["monitored_before_first"] == r["monitored"]  # no window: all stable
        else:  # the jump's window (rows 580-640) and as long after it are not stable
            assert r["windows"] == 1 and r["group"] == "stable_parts"
    assert any("calm" in line and "monitored stable batches" in line for line in lines)


def test_lists_need_nab() -> None:
    with pytest.raises(SystemExit):
        false_alarms.main(["--ert", "20,50"])


def test_run_checks_the_tree(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        false_alarms_nab.run(tmp_path, erts=[20.0], batch_sizes=[16])


def test_fixed_block_is_the_baseline_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[dict[str, object]] = []

    def fake_run(root: Path, **kw: object) -> dict[str, object]:
        seen.append(kw)
        return {"settings": [], "per_file": []}

    monkeypatch.setattr(false_alarms_nab, "run", fake_run)
    assert false_alarms.main(["--nab", str(tmp_path), "--fixed-block"]) == 0
    assert false_alarms.main(["--nab", str(tmp_path)]) == 0
    assert seen[0]["drift"] == {"calibration_block_auto": False} and seen[1]["drift"] is None
    assert seen[1]["erts"] == [20.0, 50.0] and seen[1]["batch_sizes"] == [16]
