"""Query by key (keyed mode): the key list and a key's own predictive bands, via HTTP and CLI."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import torch
from api_helpers import MODEL, advance
from fastapi.testclient import TestClient

from fogline.cli.commands import query as query_cmd
from fogline.daemon.config import Settings
from fogline.daemon.query.api import create_app
from fogline.daemon.query.serving import load_key
from fogline.daemon.stream.store import PartitionStore, SnapshotStore
from fogline.models.predictive import predict, sample_ensemble
from fogline.models.serialize import to_bytes
from fogline.models.state import PosteriorState

ROWS = [[0.1] * 8, [-1.0] * 8]
T0 = 1_700_000_000


@pytest.fixture
def keyed_store(redis_url: str, redis_prefix: str, base_state: PosteriorState) -> PartitionStore:
    """Two keys with different posteriors, checkpointed by partition 2's lease holder."""
    store = PartitionStore(SnapshotStore(redis_url, MODEL, prefix=redis_prefix))
    lease = store.acquire(2, "test", 5.0)
    assert lease is not None
    states = {
        "web-1": base_state,
        "web-2": advance(base_state, steps=5, seed=1),
        "rack/7": advance(base_state, steps=2, seed=2),  # a key with a slash
    }
    store.commit(
        lease,
        2,
        offsets={"t:2": 40},
        records_absorbed=40,
        blobs={k: to_bytes(s) for k, s in states.items()},
        entries={k: {"records_absorbed": 20, "drift_mode": "stable"} for k in states},
    )
    store.states = states  # type: ignore[attr-defined]
    return store


def test_keys_list_and_key_predict_answer_from_each_keys_posterior(
    make_settings: Callable[..., Settings], keyed_store: PartitionStore
) -> None:
    from fastapi.testclient import TestClient

    states: dict[str, PosteriorState] = keyed_store.states  # type: ignore[attr-defined]
    with TestClient(create_app(make_settings())) as client:
        r = client.get(f"/v1/models/{MODEL}/keys")
        assert r.status_code == 200
        body = r.json()
        assert [k["key"] for k in body["keys"]] == ["rack/7", "web-1", "web-2"]
        assert body["keys"][1] == {
            "key": "web-1",
            "version": 1,
            "drift_mode": "stable",
            "partition": 2,
            "records_absorbed": 20,
        }
        assert body["fleet"] == {"keys": 3, "records_absorbed": 60, "drift_modes": {"stable": 3}}
        means = {}
        for key, state in states.items():
            path = quote(key, safe="")
            r = client.post(f"/v1/models/{MODEL}/keys/{path}/predict", json={"rows": ROWS})
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["key"] == key and got["snapshot_version"] == 1
            want = predict(sample_ensemble(state, num_samples=100, seed=1), _x(), levels=(0.9,))
            assert [p["mean"] for p in got["predictions"]] == pytest.approx(
                want.mean.tolist(), rel=1e-5, abs=1e-6
            )
            means[key] = got["predictions"][0]["mean"]
        assert means["web-1"] != means["web-2"]
        assert (
            client.post(f"/v1/models/{MODEL}/keys/nope/predict", json={"rows": ROWS}).status_code
            == 404
        )
        assert client.get("/v1/models/other/keys").status_code == 404


def test_cli_query_key_reads_redis_without_knowing_the_owner(
    make_settings: Callable[..., Settings],
    keyed_store: PartitionStore,
) -> None:
    settings = make_settings()
    loaded = load_key(keyed_store, "web-2", 100, False)
    assert loaded is not None and loaded.meta.drift["partition"] == 2
    status, answer = query_cmd._via_redis(settings, {"rows": ROWS, "levels": [0.9]}, "web-2")
    assert status == 200 and answer["key"] == "web-2"
    status, _ = query_cmd._via_redis(settings, {"rows": ROWS, "levels": [0.9]}, "absent")
    assert status == 404


def _x() -> torch.Tensor:
    return torch.tensor(ROWS)


@pytest.fixture(scope="module")
def ar_fit(tmp_path_factory: pytest.TempPathFactory) -> PosteriorState:
    """A warm start on hosts a (level 10) and b (level 50), and a host with 2 values only."""
    from fogline.models.fit import FitOptions, fit
    from fogline.models.spec import ModelSpec
    from fogline.models.tabular import load_table

    spec = ModelSpec(
        mode="autoregressive", target="value", timestamp="ts", key="host", lags=4, hidden=(8,)
    )
    path = tmp_path_factory.mktemp("keyed-series") / "history.csv"
    rng = np.random.default_rng(0)
    lines = ["ts,host,value"]
    for i in range(200):
        for host, level in (("a", 10.0), ("b", 50.0)):
            lines.append(f"{T0 + 60 * i},{host},{level + math.sin(i / 8) + rng.normal(0, 0.1)}")
    lines += [f"{T0 + 60 * i},short,1.0" for i in range(2)]
    path.write_text("\n".join(lines) + "\n")
    table, _ = load_table(path, spec)
    return fit(spec, table, FitOptions(epochs=30, samples=20)).state


def test_keyed_autoregressive_key_predicts_its_next_value_from_its_own_lags(
    make_settings: Callable[..., Settings],
    redis_url: str,
    redis_prefix: str,
    ar_fit: PosteriorState,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Keyed + autoregressive: each key's blob holds its own posterior and lags; the key
    path alone (no rows) answers the key's next value; ``fogline query --key K`` too."""
    from fogline.cli import main
    from fogline.daemon.stream.keyed_series import KeyedSeries
    from fogline.models import autoregressive as ar
    from fogline.models.keyed import fleet_prior

    stored = ar.stored_series(ar_fit.extra)
    assert stored is not None
    spec, series = stored
    cut = KeyedSeries(spec, ar_fit.data_schema())
    states = {k: cut.own(fleet_prior(ar_fit), k) for k in ("a", "b", "short")}
    store = PartitionStore(SnapshotStore(redis_url, MODEL, prefix=redis_prefix))
    lease = store.acquire(0, "test", 5.0)
    assert lease is not None
    store.commit(
        lease,
        0,
        offsets={"t:0": 402},
        records_absorbed=0,
        blobs={k: to_bytes(s) for k, s in states.items()},
        entries={k: {"records_absorbed": 0, "drift_mode": "none"} for k in states},
    )
    store.close()
    last = series.clock["a"][-1]
    with TestClient(create_app(make_settings())) as client:
        r = client.post(f"/v1/models/{MODEL}/keys/a/predict", json={})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["key"] == "a" and got["ts"] == ar.ts_from_ms(last + 60_000).isoformat().replace(
            "+00:00", "Z"
        )
        assert abs(got["predictions"][0]["mean"] - 10.0) < 5, got
        at = T0 + 60 * 500
        r = client.post(f"/v1/models/{MODEL}/keys/b/predict", json={"ts": at})
        assert r.status_code == 200 and abs(r.json()["predictions"][0]["mean"] - 50.0) < 5
        assert r.json()["ts"] == ar.ts_from_ms(at * 1000).isoformat().replace("+00:00", "Z")
        r = client.post(f"/v1/models/{MODEL}/keys/a/predict", json={"key": "b"})
        assert r.status_code == 422 and "the path 'a'" in r.text
        r = client.post(f"/v1/models/{MODEL}/keys/short/predict", json={})
        assert r.status_code == 422 and "2 past values" in r.text

    cfg = tmp_path / "keyed.yaml"
    cfg.write_text(
        f"model_name: {MODEL}\nredis:\n  url: {redis_url}\n  prefix: {redis_prefix}\n"
        "keyed:\n  enabled: true\n"
    )
    assert main(["query", "--config", str(cfg), "--key", "b", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["key"] == "b" and abs(answer["predictions"][0]["mean"] - 50.0) < 5
    assert main(["query", "--config", str(cfg), "--key", "nope"]) == 2
    assert "has no key 'nope'" in capsys.readouterr().err
