"""RequestGuard: the token before the body, the body cap as it streams (real uvicorn, raw sockets).

A raw socket lets a test send the headers alone, or a chunked body one
chunk at a time, and read what the server answers at that point: the
server can only have answered from what it was sent so far.  No timing is
asserted.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from api_helpers import MODEL, wait_until, write

from fogline.daemon.config import Settings
from fogline.daemon.query.api import body_limit, create_app
from fogline.daemon.stream.store import SnapshotStore
from fogline.models.state import PosteriorState

TOKEN = "guard-token"
PATH = f"/v1/models/{MODEL}/predict"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(
    make_settings: Callable[..., Settings], store: SnapshotStore, base_state: PosteriorState
) -> Iterator[tuple[int, Settings]]:
    """uvicorn on a loopback port: token set, 4 rows x 10 features (cap 67,296 bytes)."""
    import uvicorn

    write(store, base_state)
    settings = make_settings(token=TOKEN, max_rows=4, max_features=10)
    port = _free_port()
    srv = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: srv.started, what="uvicorn start")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", headers=auth).status_code == 200,
            what="ready",
        )
        yield port, settings
    finally:
        srv.should_exit = True
        thread.join(10)


def _head(port: int, headers: dict[str, str]) -> socket.socket:
    """Open a connection and send a POST's request line and headers only."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    lines = [f"POST {PATH} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def _response(sock: socket.socket) -> tuple[int, dict[str, str], Any]:
    """Read one response (status, headers, JSON body) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(status_line.split()[1]), headers, json.loads(rest[:length] or b"null")


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_no_token_is_refused_from_the_headers_before_any_body_byte(
    server: tuple[int, Settings],
) -> None:
    port, _ = server
    for framing in ({"Content-Length": str(62_000_000)}, {"Transfer-Encoding": "chunked"}):
        with _head(port, framing) as sock:  # not one body byte sent
            status, headers, body = _response(sock)
        assert status == 401, framing
        assert headers["www-authenticate"] == "Bearer"
        assert "bearer token" in body["detail"] and TOKEN not in json.dumps(body)
    with _head(port, {"Content-Length": "62000000", "Authorization": "Bearer wrong"}) as sock:
        assert _response(sock)[0] == 401


def test_declared_length_over_the_cap_is_refused_before_the_body(
    server: tuple[int, Settings],
) -> None:
    port, settings = server
    limit = body_limit(settings.api)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with _head(port, {**auth, "Content-Length": str(limit + 1)}) as sock:
        status, _, body = _response(sock)
    assert status == 413 and f"limit of {limit} bytes" in body["detail"]


def test_chunked_body_over_the_cap_gets_413_while_it_still_streams(
    server: tuple[int, Settings],
) -> None:
    port, settings = server
    limit = body_limit(settings.api)
    with _head(port, {"Authorization": f"Bearer {TOKEN}", "Transfer-Encoding": "chunked"}) as sock:
        sock.sendall(_chunk(b'{"rows": [[' + b"0," * 8000))  # 16 KB, under the cap
        sent = 16_012
        piece = b"0," * 8192
        while sent <= limit:
            sock.sendall(_chunk(piece))
            sent += len(piece)
        # over the cap, the body unfinished (no terminating chunk): the 413 is already there
        status, headers, body = _response(sock)
    assert status == 413 and f"limit of {limit} bytes" in body["detail"]
    assert headers["connection"] == "close"
    # the service is unharmed
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200


def test_chunked_body_under_the_cap_is_answered(server: tuple[int, Settings]) -> None:
    port, _ = server
    payload = json.dumps({"rows": [[0.1] * 8, [0.0] * 8], "levels": [0.9]}).encode()
    with _head(port, {"Authorization": f"Bearer {TOKEN}", "Transfer-Encoding": "chunked"}) as sock:
        for i in range(0, len(payload), 7):
            sock.sendall(_chunk(payload[i : i + 7]))
        sock.sendall(b"0\r\n\r\n")
        status, _, body = _response(sock)
    assert status == 200, body
    assert len(body["predictions"]) == 2 and list(body["predictions"][0]["intervals"]) == ["0.9"]
    # the same rows with Content-Length give the same answer (same snapshot, same ensemble)
    r = httpx.post(
        f"http://127.0.0.1:{port}{PATH}",
        content=payload,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    assert r.status_code == 200 and r.json() == body


def test_healthz_needs_no_token_and_everything_else_does(server: tuple[int, Settings]) -> None:
    port, _ = server
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    for path in ("/openapi.json", "/docs"):  # the schema only: no token needed
        assert httpx.get(f"{base}{path}").status_code == 200, path
    for path in ("/readyz", "/metrics", "/v1/models", f"/v1/models/{MODEL}/snapshot"):
        assert httpx.get(f"{base}{path}").status_code == 401, path


def test_parsing_and_prediction_run_off_the_event_loop(
    make_settings: Callable[..., Settings],
    store: SnapshotStore,
    base_state: PosteriorState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The predict route hands parsing + prediction to the thread pool (no running loop there)."""
    import asyncio

    from fastapi.testclient import TestClient

    from fogline.daemon.query import api

    seen: list[bool] = []
    real_body = api._predict_body
    real_parse = api.PredictRequest.model_validate_json

    def on_a_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def predict_body(*args: Any, **kwargs: Any) -> Any:
        seen.append(on_a_loop())
        return real_body(*args, **kwargs)

    def parse(raw: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(on_a_loop())
        return real_parse(raw, *args, **kwargs)

    monkeypatch.setattr(api, "_predict_body", predict_body)
    monkeypatch.setattr(api.PredictRequest, "model_validate_json", parse)
    write(store, base_state)
    with TestClient(create_app(make_settings())) as client:
        wait_until(
            lambda: client.get(f"/v1/models/{MODEL}/snapshot").status_code == 200, what="load"
        )
        r = client.post(PATH, json={"rows": [[0.0] * 8]})
        assert r.status_code == 200
        bad = client.post(PATH, content=b'{"rows": "nope"}')
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][:2] == ["body", "rows"]
    assert seen == [False, False, False]  # parse + predict, then the bad body's parse
