"""The query service against a real redis-server, over HTTP (TestClient and uvicorn)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from api_helpers import MODEL, advance, wait_until, write
from fastapi.testclient import TestClient

from fogline.daemon.config import Settings
from fogline.daemon.query.api import create_app
from fogline.daemon.stream.store import SnapshotStore
from fogline.models.predictive import predict, sample_ensemble
from fogline.models.quantize import quantize_ensemble
from fogline.models.state import PosteriorState

LEVELS = (0.5, 0.9)


def _client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings))


def _version(client: TestClient, headers: dict[str, str] | None = None) -> int | None:
    r = client.get(f"/v1/models/{MODEL}/snapshot", headers=headers or {})
    return int(r.json()["version"]) if r.status_code == 200 else None


def _expected(state: PosteriorState, version: int, x: torch.Tensor, y: torch.Tensor | None) -> Any:
    return predict(sample_ensemble(state, 100, seed=version), x, levels=LEVELS, y=y)


def _assert_matches(body: dict[str, Any], ref: Any) -> None:
    rows = body["predictions"]
    assert len(rows) == ref.mean.shape[0]
    for i, row in enumerate(rows):
        assert row["mean"] == pytest.approx(float(ref.mean[i]), abs=1e-6)
        assert row["total_std"] == pytest.approx(float(ref.total_std[i]), abs=1e-6)
        assert row["epistemic_std"] == pytest.approx(float(ref.epistemic_std[i]), abs=1e-6)
        assert row["aleatoric_std"] == pytest.approx(float(ref.aleatoric_std[i]), abs=1e-6)
        for lv in LEVELS:
            lo, hi = row["intervals"][repr(lv)]
            assert lo == pytest.approx(float(ref.intervals[lv][0][i]), abs=1e-5)
            assert hi == pytest.approx(float(ref.intervals[lv][1][i]), abs=1e-5)
        if ref.anomaly_score is not None:
            assert row["anomaly_score"] == pytest.approx(float(ref.anomaly_score[i]), abs=1e-6)


def test_readyz_before_any_snapshot_then_ready(
    make_settings: Callable[..., Settings], store: SnapshotStore, base_state: PosteriorState
) -> None:
    with _client(make_settings()) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        r = client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["status"] == "not ready"
        r = client.post(f"/v1/models/{MODEL}/predict", json={"rows": [[0.0] * 8]})
        assert r.status_code == 503 and "no snapshot" in r.json()["detail"]
        meta = write(store, base_state)
        ready = wait_until(lambda: client.get("/readyz").status_code == 200, what="readyz")
        assert ready
        assert client.get("/readyz").json()["snapshot_version"] == meta.version


def test_predict_matches_model_core(
    make_settings: Callable[..., Settings], store: SnapshotStore, base_state: PosteriorState
) -> None:
    meta = write(store, base_state)
    x = torch.randn(5, 8)
    y = torch.randn(5)
    ref = _expected(base_state, meta.version, x, y)
    with _client(make_settings()) as client:
        wait_until(lambda: _version(client) == meta.version, what="first load")
        r = client.post(
            f"/v1/models/{MODEL}/predict",
            json={"rows": x.tolist(), "y": y.tolist(), "levels": list(LEVELS)},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["snapshot_version"] == meta.version
        assert body["ensemble_size"] == 100 and body["quantized"] is False
        assert body["drift_mode"] == "recovering"  # the answering snapshot is mid-adaptation
        _assert_matches(body, ref)
        # named features give the same answer
        named = [{f"x{j}": v for j, v in enumerate(row)} for row in x.tolist()]
        r2 = client.post(
            f"/v1/models/{MODEL}/predict",
            json={"rows": named, "y": y.tolist(), "levels": list(LEVELS)},
        )
        assert r2.json()["predictions"] == body["predictions"]
        snap = client.get(f"/v1/models/{MODEL}/snapshot").json()
        assert snap["version"] == meta.version == snap["latest_version"]
        assert snap["records_absorbed"] == base_state.records_absorbed
        assert snap["offsets"] == {"t:0": base_state.records_absorbed}
        assert snap["drift"] == {"policy": "forget", "alarms": 1, "mode": "recovering"}
        assert snap["features"] == [f"x{j}" for j in range(8)]
        assert snap["model_config"]["in_features"] == 8
        models = client.get("/v1/models").json()
        assert {"name": MODEL, "latest_version": meta.version, "loaded_version": meta.version} in (
            models
        )


def test_hot_reload_and_rollback_without_failed_requests(
    make_settings: Callable[..., Settings], store: SnapshotStore, base_state: PosteriorState
) -> None:
    v1 = write(store, base_state)
    newer = advance(base_state, steps=5, seed=1)
    x = torch.randn(3, 8)
    with _client(make_settings()) as client:
        wait_until(lambda: _version(client) == v1.version, what="v1 loaded")
        statuses: list[int] = []
        versions: set[int] = set()
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                r = client.post(f"/v1/models/{MODEL}/predict", json={"rows": x.tolist()})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    versions.add(r.json()["snapshot_version"])

        worker = threading.Thread(target=hammer)
        worker.start()
        try:
            v2 = write(store, newer)
            wait_until(lambda: _version(client) == v2.version, what="v2 loaded")
            r = client.post(
                f"/v1/models/{MODEL}/predict", json={"rows": x.tolist(), "levels": list(LEVELS)}
            )
            assert r.json()["snapshot_version"] == v2.version
            _assert_matches(r.json(), _expected(newer, v2.version, x, None))
            store.rollback(v1.version)
            wait_until(lambda: _version(client) == v1.version, what="rollback loaded")
            r = client.post(
                f"/v1/models/{MODEL}/predict", json={"rows": x.tolist(), "levels": list(LEVELS)}
            )
            assert r.json()["snapshot_version"] == v1.version
            _assert_matches(r.json(), _expected(base_state, v1.version, x, None))
        finally:
            stop.set()
            worker.join()
        assert statuses and set(statuses) == {200}
        assert v1.version in versions
        metrics = client.get("/metrics").text
        assert "fogline_query_reloads_total" in metrics
        assert f"fogline_query_snapshot_version {float(v1.version)}" in metrics
        assert 'fogline_query_request_seconds_bucket{endpoint="predict"' in metrics
        assert "fogline_records_in" not in metrics  # the daemon's series stay in the daemon


def test_bearer_token(
    make_settings: Callable[..., Settings], store: SnapshotStore, base_state: PosteriorState
) -> None:
    write(store, base_state)
    good = {"Authorization": "Bearer s3cret-token"}
    with _client(make_settings(token="s3cret-token")) as client:
        assert client.get("/healthz").status_code == 200
        wait_until(lambda: _version(client, good) is not None, what="load")
        body = {"rows": [[0.0] * 8]}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            r = client.post(f"/v1/models/{MODEL}/predict", json=body, headers=headers)
            assert r.status_code == 401
            assert "bearer token" in r.json()["detail"]
            assert r.headers["www-authenticate"] == "Bearer"
            assert "s3cret" not in r.text
        for path in ("/readyz", "/metrics", "/v1/models"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers=good).status_code == 200
        r = client.post(f"/v1/models/{MODEL}/predict", json=body, headers=good)
        assert r.status_code == 200


def test_bad_input_answers(
    make_settings: Callable[..., Settings], store: SnapshotStore, base_state: PosteriorState
) -> None:
    write(store, base_state)
    url = f"/v1/models/{MODEL}/predict"
    with _client(make_settings(max_rows=4, max_features=10)) as client:
        wait_until(lambda: _version(client) is not None, what="load")

        def post(body: Any, raw: str | None = None) -> tuple[int, str]:
            if raw is not None:
                r = client.post(url, content=raw, headers={"content-type": "application/json"})
            else:
                r = client.post(url, json=body)
            return r.status_code, json.dumps(r.json()["detail"])

        code, detail = post({"rows": [[0.0] * 7]})
        assert code == 422 and "7 features" in detail and "expects 8" in detail
        code, detail = post(None, raw='{"rows": [[NaN, 0, 0, 0, 0, 0, 0, 0]]}')
        assert code == 422 and "finite" in detail
        code, detail = post(None, raw='{"rows": [[Infinity, 0, 0, 0, 0, 0, 0, 0]]}')
        assert code == 422 and "finite" in detail
        code, detail = post({"rows": [[1e39] + [0.0] * 7]})
        assert code == 422 and "finite" in detail
        code, detail = post({"rows": [[0.0] * 8] * 5})
        assert code == 413 and "5 rows exceed the limit of 4" in detail
        code, detail = post({"rows": [[0.0] * 11]})
        assert code == 413 and "11 features exceed the limit of 10" in detail
        code, detail = post({"rows": [{"x0": 1.0, "bogus": 2.0}]})
        assert code == 422 and "missing" in detail and "bogus" in detail
        code, detail = post({"rows": [[0.0] * 8], "levels": [0.9, 1.5]})
        assert code == 422 and "between 0 and 1" in detail
        code, detail = post({"rows": [[0.0] * 8], "y": [1.0, 2.0]})
        assert code == 422 and "2 values for 1 rows" in detail
        code, detail = post({"rows": []})
        assert code == 422 and "at least one row" in detail
        code, detail = post({"rows": "nope"})
        assert code == 422
        code, detail = post(None, raw="{not json")
        assert code == 422
        r = client.post("/v1/models/nosuch/predict", json={"rows": [[0.0] * 8]})
        assert r.status_code == 404 and "nosuch" in r.json()["detail"]
        r = client.post(url, content=b"[" + b"0," * 100_000 + b"0]")
        assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]


def test_quantized_ensemble_reports_its_accuracy(
    make_settings: Callable[..., Settings], store: SnapshotStore, base_state: PosteriorState
) -> None:
    meta = write(store, base_state)
    x = torch.randn(4, 8)
    with _client(make_settings(quantize=True)) as client:
        wait_until(lambda: _version(client) == meta.version, what="load")
        snap = client.get(f"/v1/models/{MODEL}/snapshot").json()
        assert snap["quantized"] is True
        rep = snap["quantization"]
        assert rep["bytes_int8"] < rep["bytes_float32"] / 3
        assert 0 <= rep["max_abs_mean"] < 0.05 and 0 <= rep["max_abs_interval"] < 0.05
        r = client.post(
            f"/v1/models/{MODEL}/predict", json={"rows": x.tolist(), "levels": list(LEVELS)}
        )
        body = r.json()
        assert body["quantized"] is True
        deq = quantize_ensemble(sample_ensemble(base_state, 100, seed=meta.version)).dequantize()
        _assert_matches(body, predict(deq, x, levels=LEVELS))


# --------------------------------------------------------------------------
# a real uvicorn server and the CLI
# --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def live_server(
    make_settings: Callable[..., Settings], store: SnapshotStore, base_state: PosteriorState
) -> Iterator[tuple[str, Settings, int]]:
    import uvicorn

    meta = write(store, base_state)
    settings = make_settings(token="tok")
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, what="uvicorn start")
        yield f"http://127.0.0.1:{port}", settings, meta.version
    finally:
        server.should_exit = True
        thread.join(10)


def test_cli_query_via_http_and_redis(
    live_server: tuple[str, Settings, int],
    base_state: PosteriorState,
    redis_url: str,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import httpx

    from fogline.cli import main

    url, _settings, version = live_server
    auth = {"Authorization": "Bearer tok"}
    wait_until(lambda: httpx.get(f"{url}/readyz", headers=auth).status_code == 200, what="ready")
    monkeypatch.setenv("FOGLINE_REDIS__PREFIX", redis_prefix)
    monkeypatch.setenv("FOGLINE_API__TOKEN", "tok")
    row = [0.1, 0.2, 0.0, -0.3, 0.0, 0.5, 0.0, 1.0]
    xs = ",".join(str(v) for v in row)
    ref = predict(
        sample_ensemble(base_state, 100, seed=version),
        torch.tensor([row]),
        levels=(0.5, 0.9, 0.95),
        y=torch.tensor([1.3]),
    )
    answers = []
    for where in (["--url", url], ["--redis-url", redis_url]):
        rc = main(["query", "--model", MODEL, "--x", xs, "--y", "1.3", "--json", *where])
        out = capsys.readouterr().out.strip().splitlines()[-1]
        assert rc == 0
        body = json.loads(out)
        assert body["snapshot_version"] == version
        assert body["predictions"][0]["mean"] == pytest.approx(float(ref.mean[0]), abs=1e-6)
        assert body["predictions"][0]["anomaly_score"] == pytest.approx(
            float(ref.anomaly_score[0]),
            abs=1e-6,  # type: ignore[index]
        )
        answers.append(body)
    assert answers[0] == answers[1]
    # the human table, and a wrong feature count is a usage error (exit 2)
    assert main(["query", "--model", MODEL, "--x", xs, "--redis-url", redis_url]) == 0
    assert "interval" in capsys.readouterr().out
    assert main(["query", "--model", MODEL, "--x", "1,2", "--url", url]) == 2
    assert "expects 8" in capsys.readouterr().err
    monkeypatch.setenv("FOGLINE_API__TOKEN", "wrong")
    assert main(["query", "--model", MODEL, "--x", xs, "--url", url]) == 1
    assert "401" in capsys.readouterr().err


def test_watcher_survives_an_unexpected_failure(
    redis_url: str,
    redis_prefix: str,
    store: SnapshotStore,
    base_state: PosteriorState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Any exception in a reload (not only a store error) is retried; reloads never stop."""
    from fogline.daemon.query import serving

    real = serving.load_snapshot
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(serving, "load_snapshot", flaky)
    v1 = write(store, base_state)
    holder = serving.ModelHolder(SnapshotStore(redis_url, MODEL, prefix=redis_prefix), poll_s=0.05)
    holder.start()
    try:
        wait_until(lambda: holder.current is not None, what="load after the failure")
        assert holder.current is not None and holder.current.version == v1.version
        assert calls["n"] >= 2 and holder.last_error is None
        v2 = write(store, advance(base_state, steps=2, seed=3))
        wait_until(
            lambda: holder.current is not None and holder.current.version == v2.version,
            what="v2",
        )
    finally:
        holder.stop()
