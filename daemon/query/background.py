"""The query service on a background thread: the demo's and the tests' real HTTP server.

:class:`BackgroundServer` runs :func:`fogline.daemon.query.api.create_app`
under a real ``uvicorn.Server`` on a loopback port in a daemon thread, so a
caller in the same process talks to it over HTTP exactly as a user would.
``with BackgroundServer(settings) as url: ...`` starts it, waits until
``/healthz`` answers, and stops it (``should_exit``) on the way out.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from types import TracebackType
from typing import Any

from fogline.daemon.config import Settings
from fogline.daemon.embedded import free_port


class BackgroundServer:
    """uvicorn + the query app on ``settings.api.host`` and a free port (or ``api.port``)."""

    def __init__(
        self, settings: Settings, *, port: int | None = None, start_timeout_s: float = 20.0
    ) -> None:
        import uvicorn

        from fogline.daemon.query.api import create_app

        self.port = port if port is not None else free_port(settings.api.host)
        self.settings = settings.override({"api.port": self.port})
        config = uvicorn.Config(
            create_app(self.settings),
            host=self.settings.api.host,
            port=self.port,
            log_config=None,
            access_log=False,
            log_level="warning",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fogline-query", daemon=True)
        self._timeout = start_timeout_s

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.settings.api.host}:{self.port}"

    def start(self) -> str:
        """Start the thread and wait for ``/healthz``; returns :attr:`url`."""
        self._thread.start()
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            if self._server.started:
                return self.url
            if not self._thread.is_alive():
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"query service did not start on {self.url}")

    def stop(self) -> None:
        """Ask uvicorn to exit and join the thread."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def request_json(
    url: str, body: Any | None = None, *, token: str | None = None, timeout_s: float = 30.0
) -> Any:
    """GET (``body`` None) or POST JSON to ``url``; returns the decoded answer.

    Raises :class:`urllib.error.HTTPError` on a non-2xx status (its body is
    the service's problem detail).
    """
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def wait_for_snapshot(
    url: str, model: str, timeout_s: float = 30.0, token: str | None = None
) -> Any:
    """Poll ``GET /v1/models/{model}/snapshot`` until the service has loaded one."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return request_json(f"{url}/v1/models/{model}/snapshot", token=token)
        except Exception as exc:  # 503 until the first snapshot is loaded
            last = exc
            time.sleep(0.2)
    raise RuntimeError(f"model {model!r} has no snapshot loaded after {timeout_s} s: {last}")


__all__ = ["BackgroundServer", "request_json", "wait_for_snapshot"]
