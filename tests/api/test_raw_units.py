"""The query service in raw units: named rows in, target units out (a fitted standardise schema)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from api_helpers import MODEL, wait_until, write
from fastapi.testclient import TestClient

from fogline.cli import main as cli_main
from fogline.daemon.config import Settings
from fogline.daemon.query.api import create_app
from fogline.daemon.stream.store import SnapshotStore
from fogline.models.predictive import predict, sample_ensemble
from fogline.models.schema import Column, DataSchema
from fogline.models.spec import ModelSpec
from fogline.models.state import Minibatch, PosteriorState
from fogline.models.svi import init_state, step

LEVELS = (0.5, 0.9)
FEATURES = ("cpu", "mem", "disk")
LOC = torch.tensor([50.0, 8.0, 0.5], dtype=torch.float64)
SCALE = torch.tensor([10.0, 2.0, 0.25], dtype=torch.float64)
Y_LOC, Y_SCALE = 120.0, 15.0
SCHEMA = DataSchema(
    tuple(
        Column(f, "standardise", float(m), float(s))
        for f, m, s in zip(FEATURES, LOC, SCALE, strict=True)
    ),
    Column("throughput", "standardise", Y_LOC, Y_SCALE),
)


@pytest.fixture(scope="module")
def fitted_state() -> PosteriorState:
    """A 3-feature state trained in model units, with the standardise schema stored."""
    config = ModelSpec(features=FEATURES, target="throughput", hidden=(16,)).to_config()
    state = init_state(config, seed=0)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, 3, generator=g)
    batch = Minibatch(
        z, torch.sin(2 * z[:, 0]) + 0.3 * z[:, 1] + 0.2 * torch.randn(256, generator=g)
    )
    for _ in range(20):
        state, _ = step(state, batch, jit=False)
    return state.replace(schema=SCHEMA)


def _by_hand(state: PosteriorState, version: int, x_raw: torch.Tensor, y_raw: torch.Tensor) -> Any:
    """The model-space prediction of the standardised rows, and the hand scaling of it."""
    z = ((x_raw - LOC) / SCALE).float()
    ref = predict(
        sample_ensemble(state, 100, seed=version), z, LEVELS, y=((y_raw - Y_LOC) / Y_SCALE).float()
    )
    return {
        "mean": Y_LOC + Y_SCALE * ref.mean.double(),
        "total_std": Y_SCALE * ref.total_std.double(),
        "epistemic_std": Y_SCALE * ref.epistemic_std.double(),
        "aleatoric_std": Y_SCALE * ref.aleatoric_std.double(),
        "intervals": {
            lv: (Y_LOC + Y_SCALE * lo.double(), Y_LOC + Y_SCALE * hi.double())
            for lv, (lo, hi) in ref.intervals.items()
        },
        "anomaly_score": ref.anomaly_score,
    }


def _check(rows: list[dict[str, Any]], want: dict[str, Any]) -> None:
    for i, row in enumerate(rows):
        for key in ("mean", "total_std", "epistemic_std", "aleatoric_std"):
            assert row[key] == pytest.approx(float(want[key][i]), rel=1e-5, abs=1e-4), key
        for lv in LEVELS:
            lo, hi = row["intervals"][repr(lv)]
            assert lo == pytest.approx(float(want["intervals"][lv][0][i]), rel=1e-5, abs=1e-3)
            assert hi == pytest.approx(float(want["intervals"][lv][1][i]), rel=1e-5, abs=1e-3)
        assert row["anomaly_score"] == pytest.approx(float(want["anomaly_score"][i]), abs=1e-5)


X_RAW = torch.tensor([[50.0, 8.0, 0.5], [65.0, 5.0, 1.0], [20.0, 14.0, 0.0]], dtype=torch.float64)
Y_RAW = torch.tensor([120.0, 150.0, 90.0], dtype=torch.float64)


def test_named_raw_rows_are_answered_in_target_units(
    make_settings: Callable[..., Settings], store: SnapshotStore, fitted_state: PosteriorState
) -> None:
    meta = write(store, fitted_state)
    want = _by_hand(fitted_state, meta.version, X_RAW, Y_RAW)
    named = [dict(zip(FEATURES, row, strict=True)) for row in X_RAW.tolist()]
    named = [dict(reversed(list(r.items()))) for r in named]  # key order does not matter
    with TestClient(create_app(make_settings())) as client:
        wait_until(
            lambda: client.get(f"/v1/models/{MODEL}/snapshot").status_code == 200, what="load"
        )
        body = {"rows": named, "y": Y_RAW.tolist(), "levels": list(LEVELS)}
        r = client.post(f"/v1/models/{MODEL}/predict", json=body)
        assert r.status_code == 200, r.text
        _check(r.json()["predictions"], want)
        # list rows are raw units too, in feature order
        r2 = client.post(f"/v1/models/{MODEL}/predict", json={**body, "rows": X_RAW.tolist()})
        assert r2.json()["predictions"] == r.json()["predictions"]
        snap = client.get(f"/v1/models/{MODEL}/snapshot").json()
        assert snap["features"] == list(FEATURES) and snap["target"] == "throughput"
        assert snap["transforms"] == {c: "standardise" for c in (*FEATURES, "throughput")}
        assert snap["schema"]["target"] == {
            "name": "throughput",
            "transform": "standardise",
            "loc": Y_LOC,
            "scale": Y_SCALE,
        }
        bad = client.post(f"/v1/models/{MODEL}/predict", json={"rows": [{"cpu": 1, "mem": 2}]})
        assert bad.status_code == 422 and "missing ['disk']" in bad.json()["detail"]


def test_a_value_outside_a_transform_is_a_422_naming_the_column(
    make_settings: Callable[..., Settings], store: SnapshotStore, fitted_state: PosteriorState
) -> None:
    cols = list(SCHEMA.features)
    cols[1] = Column("mem", "log1p", 2.0, 0.5)
    write(store, fitted_state.replace(schema=DataSchema(tuple(cols), SCHEMA.target)))
    with TestClient(create_app(make_settings())) as client:
        wait_until(
            lambda: client.get(f"/v1/models/{MODEL}/snapshot").status_code == 200, what="load"
        )
        rows = [{"cpu": 50, "mem": 3, "disk": 0}, {"cpu": 50, "mem": -2, "disk": 0}]
        r = client.post(f"/v1/models/{MODEL}/predict", json={"rows": rows})
        assert r.status_code == 422
        assert r.json()["detail"] == "rows: mem: transform log1p needs values > -1; row 1 has -2.0"


def test_fogline_query_with_named_values(
    tmp_path: Path,
    store: SnapshotStore,
    fitted_state: PosteriorState,
    redis_url: str,
    redis_prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    meta = write(store, fitted_state)
    cfg = tmp_path / "fogline.toml"
    cfg.write_text(
        f'model_name = "{MODEL}"\n[redis]\nurl = "{redis_url}"\nprefix = "{redis_prefix}"\n'
    )
    want = _by_hand(fitted_state, meta.version, X_RAW, Y_RAW)
    rows = [
        ",".join(f"{f}={v}" for f, v in zip(FEATURES, row, strict=True)) for row in X_RAW.tolist()
    ]
    argv = ["query", "--config", str(cfg), "--levels", "0.5,0.9", "--json"]
    for row, y in zip(rows, Y_RAW.tolist(), strict=True):
        argv += ["--x", row, "--y", str(y)]
    assert cli_main(argv) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    _check(answer["predictions"], want)
    # the positional form still works, and gives the same numbers
    argv_pos = ["query", "--config", str(cfg), "--levels", "0.5,0.9", "--json"]
    for row, y in zip(X_RAW.tolist(), Y_RAW.tolist(), strict=True):
        argv_pos += ["--x", ",".join(map(str, row)), "--y", str(y)]
    assert cli_main(argv_pos) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == answer
    # a bad name is refused naming it
    assert cli_main(["query", "--config", str(cfg), "--x", "cpu=1,mem=2,gpu=3"]) == 2
    assert "unknown ['gpu']" in capsys.readouterr().err
