"""The query service for an autoregressive model: a key's NEXT value from its lags at the snapshot."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from api_helpers import MODEL, wait_until, write
from fastapi.testclient import TestClient

from fogline.daemon.config import Settings
from fogline.daemon.query.api import create_app
from fogline.daemon.stream.store import SnapshotStore
from fogline.models import autoregressive as ar
from fogline.models.fit import FitOptions, fit
from fogline.models.spec import ModelSpec
from fogline.models.state import PosteriorState
from fogline.models.tabular import load_table

SPEC = ModelSpec(
    mode="autoregressive", target="value", timestamp="ts", key="host", lags=4, hidden=(8,)
)
T0 = 1_700_000_000


@pytest.fixture(scope="module")
def ar_state(tmp_path_factory: pytest.TempPathFactory) -> PosteriorState:
    """A warm start on two hosts (levels 10 and 50) plus a host with 2 values only."""
    path: Path = tmp_path_factory.mktemp("series") / "history.csv"
    rng = np.random.default_rng(0)
    lines = ["ts,host,value"]
    for i in range(200):
        for host, level in (("a", 10.0), ("b", 50.0)):
            lines.append(f"{T0 + 60 * i},{host},{level + math.sin(i / 8) + rng.normal(0, 0.1)}")
    lines += [f"{T0 + 60 * i},short,1.0" for i in range(2)]
    path.write_text("\n".join(lines) + "\n")
    table, _ = load_table(path, SPEC)
    return fit(SPEC, table, FitOptions(epochs=30, samples=20)).state


def test_predict_by_key_uses_the_keys_lags_in_target_units(
    make_settings: Callable[..., Settings],
    store: SnapshotStore,
    ar_state: PosteriorState,
    base_state: PosteriorState,
) -> None:
    meta = write(store, ar_state)
    stored = ar.stored_series(ar_state.extra)
    assert stored is not None
    spec, series = stored
    with TestClient(create_app(make_settings())) as client:
        wait_until(
            lambda: client.get(f"/v1/models/{MODEL}/snapshot").status_code == 200, what="load"
        )
        info = client.get(f"/v1/models/{MODEL}/snapshot").json()
        assert info["series"] == {
            "lags": 4,
            "calendar": True,
            "keys_seen": 3,
            "keys_ready": 2,
            "ready": ["a", "b"],
        }
        url = f"/v1/models/{MODEL}/predict"
        means = {}
        for host in ("a", "b"):
            r = client.post(url, json={"key": host})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["key"] == host and body["snapshot_version"] == meta.version
            # the default time is the key's last time stamp plus its last step (60 s)
            assert body["ts"] == ar.ts_from_ms((T0 + 60 * 200) * 1000).isoformat()[:19] + "Z"
            x, _ = ar.next_inputs(spec, series, host)
            assert x[0, 0] == series.lags.buffers[host][-1]  # lag_1 is the key's last value
            same = client.post(url, json={"rows": x.tolist()}).json()
            assert same["predictions"] == body["predictions"]
            p = body["predictions"][0]
            assert p["epistemic_std"] > 0 and p["aleatoric_std"] > 0
            means[host] = p["mean"]
        assert means["a"] < 30 < means["b"]  # target units: each host near its own level
        at = client.post(url, json={"key": "a", "ts": "2024-03-04T06:00:00Z"}).json()
        assert at["ts"] == "2024-03-04T06:00:00Z"
        missing = client.post(url, json={"key": "nobody"})
        assert missing.status_code == 404 and "'nobody'" in missing.json()["detail"]
        short = client.post(url, json={"key": "short"})
        assert short.status_code == 422 and "key 'short': 2 past values" in short.json()["detail"]
        both = client.post(url, json={"key": "a", "rows": x.tolist()})
        assert both.status_code == 422
        # a tabular model has no keys to predict from
        tab = write(store, base_state)
        wait_until(
            lambda: client.get(f"/v1/models/{MODEL}/snapshot").json()["version"] == tab.version,
            what="reload",
        )
        plain = client.post(url, json={"key": "a"})
        assert plain.status_code == 422 and "not autoregressive" in plain.json()["detail"]
