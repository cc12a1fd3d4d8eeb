"""The seeded stream generator: reproducible, with the change points it claims."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from fogline.replay_data.generator import (
    N_FEATURES,
    SCENARIOS,
    generate,
    read_jsonl,
    record_lines,
    regime0_noise_std,
    write_jsonl,
)

HERE = Path(__file__).resolve().parents[2] / "replay_data"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_bit_reproducible_and_shaped(name: str) -> None:
    a = generate(name, seed=3, n_batches=40, batch_size=16)
    b = generate(name, seed=3, n_batches=40, batch_size=16)
    c = generate(name, seed=4, n_batches=40, batch_size=16)
    assert a.x.tobytes() == b.x.tobytes() and a.y.tobytes() == b.y.tobytes()
    assert a.y.tobytes() != c.y.tobytes()
    assert a.x.shape == (640, N_FEATURES) and a.y.shape == (640,) and a.regime.shape == (640,)
    assert a.x.dtype == np.float32 and a.y.dtype == np.float32
    assert all(cp == 16 * cb for cp, cb in zip(a.change_points, a.change_batches, strict=True))
    json.dumps(a.meta())


def test_regime0_statistics() -> None:
    s = generate("stable", seed=0, n_batches=200, batch_size=100)
    x0 = s.x[:, 0].astype(np.float64)
    z = (s.y - np.sin(3 * x0)) / regime0_noise_std(x0)
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1.0) < 0.02
    assert abs(s.x.mean()) < 0.01 and abs(s.x.std() - 1.0) < 0.01
    assert s.change_points == ()


def test_abrupt_shift_at_its_change_point() -> None:
    s = generate("abrupt", seed=1, n_batches=30, batch_size=200)
    (cp,) = s.change_points
    assert cp == 10 * 200
    resid = s.y - np.sin(3 * s.x[:, 0])
    assert abs(resid[:cp].mean()) < 0.05 and abs(resid[cp:].mean() - 1.5) < 0.05
    assert set(s.regime[:cp]) == {0} and set(s.regime[cp:]) == {1}


def test_variance_change_keeps_the_mean() -> None:
    s = generate("variance", seed=2, n_batches=30, batch_size=200)
    (cp,) = s.change_points
    z = (s.y - np.sin(3 * s.x[:, 0])) / regime0_noise_std(s.x[:, 0].astype(np.float64))
    assert abs(z[:cp].std() - 1) < 0.05 and abs(z[cp:].std() - 3) < 0.15
    assert abs(z[cp:].mean()) < 0.15


def test_outlier_burst_only_inside_the_burst() -> None:
    s = generate("outlier", seed=0, n_batches=100, batch_size=50)
    start, end = s.change_batches
    out = s.regime == 2
    batch = np.arange(s.y.shape[0]) // 50
    assert out.any() and np.all((batch[out] >= start) & (batch[out] < end))
    assert 0.2 < out[(batch >= start) & (batch < end)].mean() < 0.4
    assert np.all(np.abs(s.y[out]) >= 6)


def test_recurring_alternates() -> None:
    s = generate("recurring", seed=0, n_batches=40, batch_size=8)
    assert s.change_batches == (10, 20, 30)
    assert [int(s.regime[b * 8]) for b in (0, 10, 20, 30)] == [0, 1, 0, 1]


def test_jsonl_round_trip(tmp_path: Path) -> None:
    s = generate("gradual", seed=5, n_batches=8, batch_size=4)
    path = tmp_path / "g.jsonl"
    assert write_jsonl(s, path) == 32
    x, y = read_jsonl(path)
    assert np.allclose(x, s.x, atol=5e-5) and np.allclose(y, s.y, atol=5e-5)
    rec = json.loads(next(record_lines(s)))
    assert set(rec) == {"ts", "x", "y", "key"} and len(rec["x"]) == N_FEATURES
    assert (
        hashlib.sha256(path.read_bytes()).hexdigest()
        == hashlib.sha256("".join(line + "\n" for line in record_lines(s)).encode()).hexdigest()
    )


def test_committed_streams_match_the_generator() -> None:
    index = json.loads((HERE / "streams.json").read_text())
    assert index, "replay_data/streams.json lists the committed streams"
    for entry in index:
        s = generate(entry["scenario"], entry["seed"], entry["n_batches"], entry["batch_size"])
        text = "".join(line + "\n" for line in record_lines(s, decimals=entry["decimals"]))
        assert (HERE / entry["file"]).read_text() == text, entry["file"]
        assert entry["change_batches"] == list(s.change_batches)
