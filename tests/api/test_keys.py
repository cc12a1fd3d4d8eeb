"""Query by key (keyed mode): the key list and a key's own predictive bands, via HTTP and CLI."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

import pytest
import torch
from api_helpers import MODEL, advance

from fogline.cli.commands import query as query_cmd
from fogline.daemon.config import Settings
from fogline.daemon.query.api import create_app
from fogline.daemon.query.serving import load_key
from fogline.daemon.stream.store import PartitionStore, SnapshotStore
from fogline.models.predictive import predict, sample_ensemble
from fogline.models.serialize import to_bytes
from fogline.models.state import PosteriorState

ROWS = [[0.1] * 8, [-1.0] * 8]


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
